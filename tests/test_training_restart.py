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
"""Restarting the bundle's main training job (real MONAI ``ConfigWorkflow`` runs on a tiny network).

A re-run in the same ``ckpt_dir`` resumes from the last complete epoch instead of starting over and overwriting it;
``--resume_from none`` starts fresh on purpose; a failed run (here: a checkpoint of another network configuration)
stops with an error naming the config to merge and never replaces ``model_final.pt``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow
from test_bundle_workflows import TINY

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from scripts.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "lcadb", 2, seed=1, progress=False).parent


def _train(bundle_root: Path, dataset: Path, **override) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(bundle_root),
        dataset_dir=str(dataset),
        **{**TINY, **override},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def test_rerun_resumes_from_last_complete_checkpoint(tmp_path, dataset):
    first = _train(tmp_path, dataset, max_epochs=1)  # as if killed after epoch 1: checkpoint.pt is that epoch
    epoch_length = first.trainer.state.epoch_length
    models = tmp_path / "models"

    rerun = _train(tmp_path, dataset, max_epochs=2)  # the same command again, no resume_from given
    assert rerun.trainer.state.epoch == 2
    assert rerun.trainer.state.iteration == 2 * epoch_length  # epoch 1 restored, not retrained
    assert torch.load(models / "checkpoint.pt", weights_only=True)["trainer"]["iteration"] == 2 * epoch_length

    # starting fresh is explicit
    fresh_dir = tmp_path / "fresh"
    shutil.copytree(models, fresh_dir / "models")
    fresh = _train(fresh_dir, dataset, max_epochs=1, resume_from="none")
    assert fresh.trainer.state.iteration == epoch_length  # started at epoch 0 on purpose


def test_wrong_network_checkpoint_fails_clearly_and_keeps_model_final(tmp_path, dataset):
    _train(tmp_path, dataset, max_epochs=1)
    models = tmp_path / "models"
    final_before = (models / "model_final.pt").read_bytes()
    best_before = (models / "model.pt").read_bytes()
    # the "full-size" configuration (here: twice as wide) resuming the small network's checkpoint
    with pytest.raises(Exception) as error:
        _train(tmp_path, dataset, max_epochs=2, **{"network_def#widen_factor": 0.25})
    text = repr(error.value) + repr(error.value.__cause__) + repr(error.value.__context__)
    assert "does not fit the network this config builds" in text and "--resume_from none" in text
    assert (models / "model_final.pt").read_bytes() == final_before  # not replaced by a random wide network
    assert (models / "model.pt").read_bytes() == best_before
    assert not (models / "model_final_at_failure.pt").exists()  # nothing trained in the failed run
    assert not [p.name for p in models.glob(".*")], "temporary files left behind"
