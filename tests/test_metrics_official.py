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
"""Scores and submission against the challenge's official main/metrics.py and main/predict.py.

``tests/data/lldmmri_official/official_metrics.json`` holds predictions (class 2 absent from truth and prediction)
and the scores the unchanged official ``main/metrics.py`` of LMMMEng/LLD-MMRI2023@e6809b0 computed on them
(``F1_score`` lines 16-20, ``Cohen_Kappa`` lines 10-14, ``ACC`` lines 4-8), written by ``make_fixture.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scripts.evaluation import ClassificationReport, classification_scores
from sklearn import metrics as sk

OFFICIAL = json.loads((Path(__file__).parent / "data" / "lldmmri_official" / "official_metrics.json").read_text())


def test_scores_equal_the_official_metrics_py():
    probabilities, labels = np.asarray(OFFICIAL["probabilities"]), np.asarray(OFFICIAL["labels"])
    scores = classification_scores(probabilities, labels)
    assert scores["f1"] == pytest.approx(OFFICIAL["f1"], abs=1e-12)
    assert scores["kappa"] == pytest.approx(OFFICIAL["kappa"], abs=1e-12)
    assert scores["accuracy"] == pytest.approx(OFFICIAL["accuracy"], abs=1e-12)
    assert scores["f1_kappa"] == pytest.approx((OFFICIAL["f1"] + OFFICIAL["kappa"]) / 2)
    # independently: per-class F1 averaged over the classes present in truth or prediction (class 2 is not)
    predictions = probabilities.argmax(1)
    present = np.union1d(labels, predictions)
    assert 2 not in present
    per_class = sk.f1_score(labels, predictions, labels=list(range(7)), average=None, zero_division=0)
    assert scores["f1"] == pytest.approx(per_class[present].mean())
    assert scores["f1"] > per_class.mean() + 0.1  # what averaging over all 7 labels would wrongly give


def test_submission_is_named_by_the_team(tmp_path):
    """main/README.md line 175 and main/predict.py lines 181-198: ``<team_name>.json``, LLDBaseline.json format."""
    records = [(f"MR{i}", p, int(y)) for i, (p, y) in enumerate(zip(OFFICIAL["probabilities"], OFFICIAL["labels"]))]
    ClassificationReport(tmp_path, team_name="MyTeam", plots=False).write(records)
    submission = json.loads((tmp_path / "MyTeam.json").read_text())
    assert not (tmp_path / "submission.json").exists()
    assert [set(e) for e in submission] == [{"image_id", "prediction", "score"}] * len(records)
    assert all(e["prediction"] == e["score"].index(max(e["score"])) for e in submission)  # predict.py line 188
    with pytest.raises(ValueError, match="team_name"):
        ClassificationReport(tmp_path, team_name="../x")
