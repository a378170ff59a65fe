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
"""Bundle configs and helper code without running a workflow: metadata, properties, checks, metrics, saving."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scripts.transforms
import torch
from monai.bundle import ConfigParser, verify_metadata
from monai.data import MetaTensor
from scripts.constants import LESION_CLASSES, PHASES
from scripts.evaluation import ClassificationReport, classification_metrics, classification_scores
from scripts.import_reference import import_reference_checkpoint, main
from scripts.network import LCADB, LCADBInference
from scripts.training import (
    AtomicDiskSaver,
    LCADBPrepareBatch,
    LCADBTrainingLoss,
    SelectOutputInferer,
    load_datalist,
)
from scripts.transforms import CheckLesionROI, CheckLesionROID, CheckLesionROId, CheckLesionROIDict, check_case


@pytest.fixture(scope="module")
def configs(bundle_root):
    return bundle_root / "configs"


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------- metadata


def test_verify_metadata_offline(configs, bundle_root):
    schema = bundle_root / "schema" / "metadata_schema.json"
    verify_metadata(meta_file=str(configs / "metadata.json"), filepath=str(schema))


def test_metadata_schema_rejects_missing_required_key(configs, bundle_root, tmp_path):
    meta = _load(configs / "metadata.json")
    del meta["network_data_format"]["inputs"]["image"]["channel_def"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="channel_def"):
        verify_metadata(meta_file=str(bad), filepath=str(bundle_root / "schema" / "metadata_schema.json"))


def test_metadata_matches_constants(configs):
    meta = _load(configs / "metadata.json")
    assert meta["version"] in meta["changelog"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == len(PHASES)
    assert [image["channel_def"][str(i)] for i in range(len(PHASES))] == list(PHASES)
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert [pred["channel_def"][str(i)] for i in range(len(LESION_CLASSES))] == list(LESION_CLASSES)
    assert "research use only" in meta["intended_use"].lower()


@pytest.mark.parametrize("name", ["train.json", "inference.json"])
def test_config_constants_match_code(configs, name):
    config = _load(configs / name)
    assert config["phases"] == list(PHASES)
    assert config["class_names"] == list(LESION_CLASSES)
    assert config["num_classes"] == len(LESION_CLASSES)


@pytest.mark.parametrize("name", ["evaluate.json", "multi_gpu_train.json"])
def test_variant_configs_hold_overrides_only(configs, name):
    train = ConfigParser(_load(configs / "train.json"))
    variant = _load(configs / name)
    # ids are merged on train.json: each one overrides an id of it or adds one to an existing section
    for key in variant:
        assert key in train or "#" not in key or key.rsplit("#", 1)[0] in train, key
    assert "train" not in variant and "validate" not in variant and "network_def" not in variant


def test_image_preprocessing_of_inference_config(configs):
    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    preprocessing = parser.get_parsed_content("image_preprocessing")
    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.normal(50.0, 20.0, (8, 52, 47, 9)), dtype=torch.float32)
    out = preprocessing({"image": image})["image"]
    assert tuple(out.shape) == (8, 32, 32, 8) and out.dtype == torch.float32  # the shipped weights' ROI
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(dim=(1, 2, 3), unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    with pytest.raises(RuntimeError) as error:  # Compose wraps the ValueError of the check
        preprocessing({"image": image[:7], "case": "seven"})
    assert "case 'seven' 'image': expected 8 phases" in str(error.value.__cause__)


# --------------------------------------------------------------------------------------------- transforms


def test_check_lesion_roi_passes_and_aliases():
    image = torch.rand(8, 6, 5, 4)
    assert CheckLesionROI(num_channels=8)(image) is image
    assert CheckLesionROID is CheckLesionROIDict is CheckLesionROId


@pytest.mark.parametrize(
    "image, match",
    [
        (torch.rand(7, 6, 5, 4), "expected 8 phases .* got 7"),
        (torch.rand(8, 6, 5), "3 spatial dimensions"),
        (torch.rand(8, 0, 5, 4), "empty"),
    ],
)
def test_check_lesion_roi_rejects(image, match):
    with pytest.raises(ValueError, match=match):
        CheckLesionROI(num_channels=8)(image)


def test_check_lesion_roi_dict_names_case_key_and_file():
    image = MetaTensor(torch.rand(1, 6, 5, 4), meta={"filename_or_obj": "/data/images/X1/C+A.nii.gz"})
    image[0, 1, 1, 1] = float("nan")
    image[0, 2, 2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"case 'X1' 'C\+A' \(/data/images/X1/C\+A.nii.gz\): 2 non-finite"):
        CheckLesionROId(keys=["C+A"], num_channels=1)({"case": "X1", "C+A": image})
    CheckLesionROId(keys=["missing"], allow_missing_keys=True)({"case": "X1"})
    with pytest.raises(ValueError, match="num_channels"):
        CheckLesionROI(num_channels=0)


def test_exit_does_not_wait_for_idle_pool_threads():
    """The exit hook of scripts.transforms waits for busy cache threads only (see
    test_bad_input_non_finite_voxels_cli_exit_status); an idle thread of a pool left open must not delay the exit."""
    code = "import scripts.transforms\nfrom multiprocessing.pool import ThreadPool\nThreadPool(2).map(abs, [-1, -2])"
    bundle = Path(scripts.transforms.__file__).resolve().parents[1]
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=bundle, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.monotonic() - start < 60  # the hook's wait for one thread is 120 s


def test_check_case(tmp_path):
    item = {"case": "C7", "label": 2}
    for phase in PHASES:
        (tmp_path / f"{phase}.nii.gz").write_bytes(b"")
        item[phase] = f"{phase}.nii.gz"
    assert set(check_case(item, tmp_path, num_classes=7)) == set(PHASES)
    with pytest.raises(ValueError, match=r"case 'C7' has 7 of the 8 phases: missing \['C\+V'\]"):
        check_case({k: v for k, v in item.items() if k != "C+V"}, tmp_path)
    (tmp_path / "DWI.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="case 'C7': the file of phase 'DWI' does not exist"):
        check_case(item, tmp_path)
    with pytest.raises(ValueError, match=r"case 'C9': label must be an integer in \[0, 7\), got 7"):
        check_case({**item, "case": "C9", "label": 7, "DWI": item["T2WI"]}, tmp_path, num_classes=7)


def test_load_datalist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder .*nowhere does not exist"):
        load_datalist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="datalist .*datalist.json does not exist"):
        load_datalist(tmp_path)
    (tmp_path / "datalist.json").write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="no 'test' section"):
        load_datalist(tmp_path, "test")
    with pytest.raises(ValueError, match="needs the validation fold"):
        load_datalist(tmp_path, "training", subset="val")


# ------------------------------------------------------------------------------------------ training code


def test_training_loss_follows_epoch_and_reports_terms():
    network = LCADB(widen_factor=0.125, roi_size=(32, 32, 8), patch_size=16)
    loss = LCADBTrainingLoss()
    output = network(torch.randn(2, 8, 32, 32, 8))
    loss.epoch = 30
    total = loss(output, torch.tensor([1, 3]))
    assert total.ndim == 0 and total.requires_grad
    assert loss.last_terms["u_w"] == pytest.approx(0.2)
    terms = {"total", "focal", "instance_ia", "instance_pa", "cross_ia", "cross_pa", "similarity", "u_w"}
    assert set(loss.last_terms) == terms
    assert loss.output_terms([{"loss_focal": 1.0, "pred": 0}]) == {"train_loss_focal": 1.0}
    assert SelectOutputInferer("logits")(torch.randn(2, 8, 32, 32, 8), network.eval()).shape == (2, 7)


def test_atomic_disk_saver_leaves_nothing_on_failure(tmp_path):
    saver = AtomicDiskSaver(tmp_path / "models", filename="model.pt")
    saver({"weights": torch.ones(2)}, "ignored.pt")
    before = (tmp_path / "models" / "model.pt").read_bytes()
    with pytest.raises((AttributeError, pickle.PicklingError)):
        saver({"weights": lambda: None}, "ignored.pt")  # lambdas cannot be pickled
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.pt"]
    assert (tmp_path / "models" / "model.pt").read_bytes() == before


# ----------------------------------------------------------------------------------------------- metrics


def test_classification_scores():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 0, 1, 2, 2, 2]] * 0.8 + 0.2 / 3
    scores = classification_scores(probs, labels)
    assert scores["accuracy"] == pytest.approx(5 / 6)
    f1 = np.mean([1.0, 2 / 3, 0.8])
    assert scores["f1"] == pytest.approx(f1)
    assert scores["kappa"] == pytest.approx(0.75)
    assert scores["f1_kappa"] == pytest.approx((f1 + 0.75) / 2)
    assert 0.5 < scores["auc"] <= 1.0
    assert classification_scores(np.eye(3)[[1, 1]], np.array([1, 1]))["kappa"] == 1.0
    assert math.isnan(classification_scores(np.eye(3)[[1, 1]], np.array([1, 1]), ["auc"])["auc"])
    with pytest.raises(ValueError, match="accuracy"):
        classification_metrics(["accurcy"])
    assert sorted(classification_metrics(exclude=["f1_kappa"])) == ["val_accuracy", "val_auc", "val_f1", "val_kappa"]


def test_classification_report_files(tmp_path):
    rng = np.random.default_rng(1)
    records = []
    for i in range(21):
        probs = rng.dirichlet(np.ones(7))
        records.append((f"case{i:02d}", probs.tolist(), i % 7))
    metrics = ClassificationReport(tmp_path).write(records)
    assert metrics["num_cases"] == 21 and set(metrics["per_class"]) == set(LESION_CLASSES)
    assert np.asarray(metrics["confusion_matrix"]).sum() == 21
    submission = _load(tmp_path / "LCADB.json")  # <TeamName>.json, default team LCADB
    assert submission[0]["image_id"] == "case00" and len(submission[0]["score"]) == 7
    assert submission[0]["prediction"] == int(np.argmax(records[0][1]))
    for name in ("metrics.json", "confusion_matrix.png", "roc_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_inference_network_loads_training_checkpoint():
    kwargs = {"widen_factor": 0.125, "roi_size": (32, 32, 8), "patch_size": 16}
    trained = LCADB(**kwargs).eval()
    deployed = LCADBInference(**kwargs).eval()
    deployed.load_state_dict(trained.state_dict(), strict=True)
    x = torch.randn(1, 8, 32, 32, 8)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), torch.softmax(trained(x).logits, 1))


@pytest.mark.parametrize("base", ["train.json", "inference.json"])
def test_cpu_light_preset_merges(configs, base):
    parser = ConfigParser()
    parser.read_config([str(configs / base), str(configs / "cpu_light.json")])
    network = parser.get_parsed_content("network_def")
    assert network.roi_size == (32, 32, 8) and network.patch_size == 16
    with torch.no_grad():
        output = network.eval()(torch.randn(1, 8, 32, 32, 8))
    logits = output if isinstance(output, torch.Tensor) else output.logits
    assert logits.shape == (1, 7)


def test_prepare_batch_plain_tensors_and_channels_last():
    batch = {"image": MetaTensor(torch.rand(2, 8, 8, 8, 4)), "label": torch.tensor([3, 1])}
    image, label = LCADBPrepareBatch(channels_last=True)(batch, "cpu")
    assert type(image) is torch.Tensor and image.is_contiguous(memory_format=torch.channels_last_3d)
    assert label.dtype == torch.long and label.tolist() == [3, 1]
    image, label = LCADBPrepareBatch()({"image": torch.rand(1, 8, 8, 8, 4)}, "cpu")
    assert label is None and image.is_contiguous()


def test_import_reference_checkpoint(test_data, tmp_path):
    vectors = torch.load(test_data / "lcadb_reference_vectors.pt", weights_only=True)
    reference = {k[len("state_dict.") :]: v for k, v in vectors.items() if k.startswith("state_dict.")}
    source = tmp_path / "best_model.pth"
    torch.save({"epoch": 42, "model": reference, "best_acc": 0.7}, source)
    output = tmp_path / "models" / "model.pt"
    assert main([str(source), "--output", str(output), "--widen_factor", "0.125"]) == 0
    imported = torch.load(output, weights_only=True)
    network = LCADBInference(widen_factor=0.125)
    network.load_state_dict(imported, strict=True)
    torch.testing.assert_close(imported["classifier_ia.weight"], reference["linear1.weight"])
    with pytest.raises(FileExistsError, match="overwrite"):
        import_reference_checkpoint(source, output, widen_factor=0.125)
    with pytest.raises(ValueError, match="mis-shaped"):
        import_reference_checkpoint(source, output, overwrite=True, widen_factor=0.25)
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.pt"]
