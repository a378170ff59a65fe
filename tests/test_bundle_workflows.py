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
"""The bundle's workflows in the style of the model zoo's CI, on a small generated dataset and a tiny network.

ConfigWorkflow initialize / check_properties / run / finalize for training (2 epochs), resuming, evaluation and
inference; ``verify_net_in_out``; TorchScript and ONNX exports re-loaded and compared with the eager network;
the multi-GPU config under ``torchrun`` on 2 CPU processes (gloo); bad inputs stopping with the case named.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, ckpt_export, onnx_export, verify_net_in_out
from monai.data import load_net_with_metadata
from scripts.constants import LESION_CLASSES, PHASES
from scripts.network import LCADBInference

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundle" / "configs"
META = str(CONFIGS / "metadata.json")
TRAIN = str(CONFIGS / "train.json")
EVALUATE = str(CONFIGS / "evaluate.json")
INFERENCE = str(CONFIGS / "inference.json")
MULTI_GPU = str(CONFIGS / "multi_gpu_train.json")
LOGGING = str(CONFIGS / "logging.conf")

#: A tiny network and a single thread (the test machine's cores are shared): seconds per epoch.
NETWORK = {"depth": 10, "widen_factor": 0.125, "roi_size": (32, 32, 8), "patch_size": 16}
TINY = {
    "network_def#widen_factor": NETWORK["widen_factor"],
    "roi_size": list(NETWORK["roi_size"]),
    "patch_size": NETWORK["patch_size"],
    "batch_size": 4,
    "num_workers": 0,
    "num_threads": 1,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """3 cases per class: 14 training cases in 5 folds and 7 test cases."""
    from scripts.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "lcadb", 3, seed=0, progress=False).parent


def _workflow(config_file, workflow_type, bundle_root, dataset_dir, **override) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=config_file,
        meta_file=META,
        logging_file=LOGGING,
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        dataset_dir=str(dataset_dir),
        **{**TINY, **override},
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    return workflow


def _error_text(error: BaseException) -> str:
    """Messages of an exception and of everything that caused it (MONAI wraps errors of components)."""
    texts = []
    while error is not None:
        texts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def _no_partial_files(folder: Path) -> None:
    assert not [p.name for p in folder.glob(".*")], "temporary files left behind"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset) -> tuple[Path, ConfigWorkflow]:
    bundle_root = tmp_path_factory.mktemp("bundle")
    workflow = _workflow(TRAIN, "train", bundle_root, dataset, max_epochs=2)
    workflow.run()
    workflow.finalize()
    return bundle_root, workflow


def test_train_workflow(trained):
    bundle_root, workflow = trained
    trainer = workflow.trainer
    assert trainer.state.epoch == 2
    models = bundle_root / "models"
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint.pt", "model.pt", "model_final.pt"]
    _no_partial_files(models)
    # model.pt / model_final.pt: the network state dict only, loadable into the deployment network
    for name in ("model.pt", "model_final.pt"):
        LCADBInference(**NETWORK).load_state_dict(torch.load(models / name, weights_only=True), strict=True)
    checkpoint = torch.load(models / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "best_model_saver"} <= set(checkpoint)
    # every loss term logged, the ramp-up following the 0-based epoch (u_w = 0 at epoch 0)
    metrics = trainer.state.metrics
    for term in ("total", "focal", "instance_ia", "instance_pa", "cross_ia", "cross_pa", "similarity", "u_w"):
        assert f"train_{term}" in metrics
    assert workflow.parser.get_parsed_content("loss").epoch == 1
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert {"val_accuracy", "val_f1", "val_kappa", "val_auc", "val_f1_kappa"} <= set(evaluator.state.metrics)
    assert list((bundle_root / "logs").glob("events.out.tfevents.*"))


def test_resume_training(trained, tmp_path, dataset):
    bundle_root, _ = trained
    shutil.copytree(bundle_root / "models", tmp_path / "models")
    workflow = _workflow(
        TRAIN, "train", tmp_path, dataset, max_epochs=3, resume_from=str(tmp_path / "models" / "checkpoint.pt")
    )
    workflow.run()
    workflow.finalize()
    trainer = workflow.trainer
    assert trainer.state.epoch == 3
    assert trainer.state.iteration == 3 * trainer.state.epoch_length  # epochs 1-2 restored, one more trained
    assert workflow.parser.get_parsed_content("loss").epoch == 2
    assert trainer.state.metrics["train_u_w"] > 0


def test_key_metric_selectable(tmp_path, dataset):
    workflow = _workflow(TRAIN, "train", tmp_path, dataset, max_epochs=1, key_metric_name="f1_kappa")
    workflow.run()
    workflow.finalize()
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.key_metric_name == "val_f1_kappa"
    assert (tmp_path / "models" / "model.pt").is_file()


def test_evaluate_workflow(trained, tmp_path, dataset):
    bundle_root, _ = trained
    workflow = _workflow(
        [TRAIN, EVALUATE], "train", tmp_path, dataset, ckpt_path=str(bundle_root / "models" / "model.pt")
    )
    workflow.run()
    workflow.finalize()
    out = tmp_path / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_cases"] == 7 and metrics["class_names"] == list(LESION_CLASSES)
    for name in ("accuracy", "f1", "kappa", "auc", "f1_kappa"):
        assert name in metrics
    submission = json.loads((out / "LCADB.json").read_text())  # <TeamName>.json
    assert len(submission) == 7
    for entry in submission:
        assert set(entry) == {"image_id", "prediction", "score"}
        assert len(entry["score"]) == 7 and entry["prediction"] == int(np.argmax(entry["score"]))
        assert abs(sum(entry["score"]) - 1) < 1e-4
    for png in ("confusion_matrix.png", "roc_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "models").exists()  # evaluation writes no checkpoint
    baseline = json.loads((out / "baseline" / "metrics.json").read_text())  # same command, same test split
    assert baseline["num_cases"] == 7 and (out / "baseline" / "LCADB_baseline.json").is_file()
    fusion = json.loads((out / "fusion" / "metrics.json").read_text())  # fusion: true, the default
    weight = fusion["fusion_weight"]
    assert fusion["num_cases"] == 7 and 0.0 <= weight <= 1.0 and "validation" in fusion

    def scores(path: Path) -> dict[str, np.ndarray]:
        return {e["image_id"]: np.array(e["score"]) for e in json.loads(path.read_text())}

    network, radiomics = scores(out / "LCADB.json"), scores(out / "baseline" / "LCADB_baseline.json")
    for case, fused in scores(out / "fusion" / "LCADB_fusion.json").items():
        np.testing.assert_allclose(fused, weight * network[case] + (1 - weight) * radiomics[case], atol=1e-4)


def _read_predictions(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert json.loads((out / "predictions.json").read_text())[0]["case"] == rows[0]["case"]
    return rows


def test_inference_workflow_with_attention(trained, tmp_path, dataset):
    bundle_root, _ = trained
    workflow = _workflow(
        INFERENCE,
        "infer",
        tmp_path,
        dataset,
        ckpt_path=str(bundle_root / "models" / "model.pt"),
        save_attention=True,
    )
    workflow.run()
    workflow.finalize()
    rows = _read_predictions(tmp_path / "eval")
    assert len(rows) == 7
    for row in rows:
        probabilities = [float(row[f"p_{name}"]) for name in LESION_CLASSES]
        assert abs(sum(probabilities) - 1) < 1e-4
        assert row["predicted_class"] == LESION_CLASSES[int(np.argmax(probabilities))]
    case = rows[0]["case"]
    attention = tmp_path / "eval" / "attention"
    for branch in ("ia", "pa"):
        heatmap = nib.load(attention / f"{case}_attention_{branch}.nii.gz")
        assert heatmap.shape == NETWORK["roi_size"]
        # the weights of one lesion's patches sum to 1; every patch covers 16 x 16 voxels on each slice
        np.testing.assert_allclose(np.asarray(heatmap.dataobj)[:, :, 0].sum() / 16**2, 1.0, rtol=1e-4)
    assert (attention / f"{case}_attention.png").stat().st_size > 0
    _no_partial_files(attention)


def test_inference_on_a_folder_of_cases(trained, tmp_path, dataset):
    bundle_root, _ = trained
    cases = tmp_path / "cases"
    for name in sorted(p.name for p in (dataset / "images").iterdir())[:2]:
        shutil.copytree(dataset / "images" / name, cases / name)
    workflow = _workflow(
        INFERENCE, "infer", tmp_path, dataset, input_path=str(cases), ckpt_path=str(bundle_root / "models" / "model.pt")
    )
    workflow.run()
    workflow.finalize()
    rows = _read_predictions(tmp_path / "eval")
    assert [r["case"] for r in rows] == sorted(p.name for p in cases.iterdir())
    assert not (tmp_path / "eval" / "attention").exists()  # save_attention defaults to False


def test_verify_net_in_out():
    verify_net_in_out(
        net_id="network_def",
        meta_file=META,
        config_file=INFERENCE,
        device="cpu",
        **{**TINY, "_meta_#network_data_format#inputs#image#spatial_shape": list(NETWORK["roi_size"])},
    )


@pytest.mark.slow
def test_exports_match_eager(trained, tmp_path):
    bundle_root, _ = trained
    ckpt = str(bundle_root / "models" / "model.pt")
    tiny_config = tmp_path / "tiny.json"  # the overrides travel with the export as a second config file
    tiny_config.write_text(json.dumps({k: v for k, v in TINY.items() if k != "num_threads"}))
    configs = [INFERENCE, str(tiny_config)]
    shape = [1, 8, *NETWORK["roi_size"]]
    eager = LCADBInference(**NETWORK).eval()
    eager.load_state_dict(torch.load(ckpt, weights_only=True))
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = eager(x)

    ts_path = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_path),
        ckpt_file=ckpt,
        meta_file=META,
        config_file=configs,
        use_trace=True,
        input_shape=shape,
        **TINY,
    )
    scripted, meta, extra = load_net_with_metadata(str(ts_path), more_extra_files=["inference.json", "tiny.json"])
    assert meta["version"] and meta["network_data_format"]["inputs"]["image"]["num_channels"] == 8
    assert "image_preprocessing" in json.loads(extra["inference.json"])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), expected, atol=1e-5, rtol=1e-4)

    onnx_path = tmp_path / "model.onnx"
    onnx_export(
        net_id="network_def",
        filepath=str(onnx_path),
        ckpt_file=ckpt,
        meta_file=META,
        config_file=configs,
        use_trace=True,
        input_shape=shape,
        **TINY,
    )
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(onnx_out, expected.numpy(), atol=1e-5, rtol=1e-4)


def _cli_overrides(**override) -> list[str]:
    args = []
    for key, value in {**TINY, **override}.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return args


@pytest.mark.slow
def test_multi_gpu_config_torchrun_gloo(tmp_path, dataset):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--meta_file",
        META,
        "--config_file",
        json.dumps([TRAIN, MULTI_GPU]),
        "--logging_file",
        LOGGING,
        *_cli_overrides(bundle_root=str(tmp_path), dataset_dir=str(dataset), max_epochs=2),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint.pt", "model.pt", "model_final.pt"]
    checkpoint = torch.load(models / "checkpoint.pt", weights_only=True)
    assert checkpoint["trainer"]["epoch"] if "epoch" in checkpoint["trainer"] else checkpoint["trainer"]["iteration"]
    # the DDP wrapper is not saved: the state dict loads into the plain network
    LCADBInference(**NETWORK).load_state_dict(torch.load(models / "model.pt", weights_only=True), strict=True)


# ------------------------------------------------------------------------------------------- bad inputs


def _datalist_copy(dataset: Path, target: Path, edit) -> Path:
    """A dataset folder whose datalist points (absolute paths) at ``dataset``'s files, edited by ``edit``."""
    datalist = json.loads((dataset / "datalist.json").read_text())
    for section in ("training", "test"):
        for item in datalist[section]:
            for phase in PHASES:
                item[phase] = str(dataset / item[phase])
            item.pop("image", None)
    edit(datalist)
    target.mkdir(parents=True)
    (target / "datalist.json").write_text(json.dumps(datalist))
    return target


def _run_expecting_failure(bundle_root: Path, dataset_dir: Path) -> str:
    workflow = ConfigWorkflow(
        config_file=TRAIN,
        meta_file=META,
        logging_file=False,
        workflow_type="train",
        bundle_root=str(bundle_root),
        dataset_dir=str(dataset_dir),
        **{**TINY, "max_epochs": 1},
    )
    workflow.initialize()
    with pytest.raises(Exception) as error:
        workflow.run()
    assert not (bundle_root / "models").exists(), "nothing may be written to models/ for a bad dataset"
    return _error_text(error.value)


def test_bad_input_missing_file(tmp_path, dataset):
    def edit(datalist):
        item = datalist["training"][0]
        item["C+A"] = str(Path(item["C+A"]).with_name("missing.nii.gz"))
        edit.case = item["case"]

    text = _run_expecting_failure(tmp_path / "bundle", _datalist_copy(dataset, tmp_path / "data", edit))
    assert f"case '{edit.case}': the file of phase 'C+A' does not exist" in text


def test_bad_input_seven_phases(tmp_path, dataset):
    def edit(datalist):
        item = datalist["training"][-1]
        del item["DWI"]
        edit.case = item["case"]

    text = _run_expecting_failure(tmp_path / "bundle", _datalist_copy(dataset, tmp_path / "data", edit))
    assert f"case '{edit.case}' has 7 of the 8 phases: missing ['DWI']" in text


def _nan_voxel_dataset(dataset: Path, tmp_path: Path) -> tuple[Path, str, Path]:
    """A copy of ``dataset`` whose second training case has one NaN voxel in T2WI: (dataset, case, corrupt file)."""
    corrupt = tmp_path / "corrupt" / "T2WI.nii.gz"

    def edit(datalist):
        item = datalist["training"][1]
        image = nib.load(item["T2WI"])
        data = np.asarray(image.dataobj, dtype=np.float32)
        data[0, 0, 0] = np.nan
        corrupt.parent.mkdir()
        nib.save(nib.Nifti1Image(data, image.affine), corrupt)
        item["T2WI"] = str(corrupt)
        edit.case = item["case"]

    return _datalist_copy(dataset, tmp_path / "data", edit), edit.case, corrupt


def test_bad_input_non_finite_voxels(tmp_path, dataset):
    data, case, corrupt = _nan_voxel_dataset(dataset, tmp_path)
    text = _run_expecting_failure(tmp_path / "bundle", data)
    assert f"case '{case}' 'T2WI' ({corrupt}): 1 non-finite voxel(s)" in text


@pytest.mark.slow
def test_bad_input_non_finite_voxels_cli_exit_status(tmp_path, dataset):
    """The README's command line with train.json's own loader settings (4 cache threads, torch's default threads): a
    NaN voxel ends the run with exit status 1 and the case named, not an abort (134) while the other cache threads
    are still loading cases."""
    data, case, corrupt = _nan_voxel_dataset(dataset, tmp_path)
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--meta_file", "bundle/configs/metadata.json"]
    command += ["--config_file", "bundle/configs/train.json", "--logging_file", "bundle/configs/logging.conf"]
    overrides = {"bundle_root": str(tmp_path / "bundle"), "dataset_dir": str(data), "num_workers": 4, "num_threads": 0}
    result = subprocess.run(
        command + _cli_overrides(**overrides), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"case '{case}' 'T2WI' ({corrupt}): 1 non-finite voxel(s)" in result.stderr
    assert not (tmp_path / "bundle" / "models").exists()


def test_bad_input_seven_phase_case_folder(trained, tmp_path, dataset):
    bundle_root, _ = trained
    case = sorted((dataset / "images").iterdir())[0]
    shutil.copytree(case, tmp_path / "cases" / case.name)
    (tmp_path / "cases" / case.name / "C+V.nii.gz").unlink()
    workflow = ConfigWorkflow(
        config_file=INFERENCE,
        meta_file=META,
        logging_file=False,
        workflow_type="infer",
        bundle_root=str(tmp_path),
        input_path=str(tmp_path / "cases"),
        ckpt_path=str(bundle_root / "models" / "model.pt"),
        **TINY,
    )
    workflow.initialize()
    with pytest.raises(Exception) as error:
        workflow.run()
    assert f"case '{case.name}' has 7 of the 8 phases: missing ['C+V']" in _error_text(error.value)
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_bad_input_no_dataset_folder_cli(tmp_path):
    """The README's command line with a dataset folder that does not exist: non-zero exit, the folder named."""
    missing = tmp_path / "no_such_dataset"
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--meta_file",
        "bundle/configs/metadata.json",
        "--config_file",
        "bundle/configs/train.json",
        "--logging_file",
        "bundle/configs/logging.conf",
        *_cli_overrides(bundle_root=str(tmp_path / "bundle"), dataset_dir=str(missing)),
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"dataset folder {missing} does not exist" in result.stderr
    assert not (tmp_path / "bundle" / "models").exists()
