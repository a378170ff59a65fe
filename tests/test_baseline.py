# Copyright (c) LCA-DB MONAI plugin contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The radiomics baseline: features, the evaluate.json wiring (same training cases and split as the network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser
from scripts.baseline import case_features, cross_validate, evaluate_baseline, feature_names
from scripts.constants import PHASES
from scripts.training import load_datalist

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
OFFICIAL_CROPS = Path(__file__).parent / "data" / "lldmmri_official" / "released" / "classification_dataset"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from scripts.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("base") / "ds", 4, seed=5, progress=False).parent


def test_features_are_finite_and_named(dataset):
    case = load_datalist(dataset, "training")[0]
    features = case_features(case)
    assert features.shape == (len(feature_names()),) and np.isfinite(features).all()
    # also on the official tool's crops (1 mm spacing, zero padding at the image edge)
    entry = {p: OFFICIAL_CROPS / "images" / "MR210004" / f"{p}.nii.gz" for p in PHASES}
    assert np.isfinite(case_features(entry)).all()


def test_evaluate_config_runs_the_baseline_on_the_same_split(dataset, tmp_path):
    parser = ConfigParser()
    parser.read_config([CONFIGS / "train.json", CONFIGS / "evaluate.json"])
    parser.update({"dataset_dir": str(dataset), "output_dir": str(tmp_path / "eval"), "fold": 1})
    assert parser.get_parsed_content("baseline") is True
    metrics = parser.get_parsed_content("baseline_evaluation")()
    written = json.loads((tmp_path / "eval" / "baseline" / "metrics.json").read_text())
    assert written["num_cases"] == metrics["num_cases"] == len(load_datalist(dataset, "test"))
    assert {"f1", "kappa", "auc"} <= set(written)
    val = evaluate_baseline(dataset, fold=1, eval_split="val", model="logistic")
    assert val["num_cases"] == len(load_datalist(dataset, "training", fold=1, subset="val"))


def test_cross_validation_pools_every_fold(dataset):
    scores = cross_validate(dataset)
    assert scores["num_cases"] == len(load_datalist(dataset, "training"))
    assert 0.0 <= scores["f1"] <= 1.0 and scores["fold_f1_sd"] >= 0.0
