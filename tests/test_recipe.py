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
"""The few-case recipe: more generated training cases with the test split fixed, the crop-margin transforms, phase-wise
augmentation, mixup, the fold ensemble (MONAI's EnsembleEvaluator, one TorchScript, the deploy app's folder of
exports), late fusion with the radiomics baseline and self-supervised pretraining, on a small generated dataset and a
tiny network."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export
from scripts.constants import PHASES, ROI_MARGIN
from scripts.ensemble import LCADBEnsemble, combine_checkpoints, fold_checkpoints
from scripts.evaluation import predict_cases
from scripts.fusion import FUSION_WEIGHTS, fuse, fusion_weight
from scripts.lesion_transforms import (
    CropLesionMargin,
    LesionBoxMask,
    LiverRatioNormalize,
    RandPhaseIntensityd,
    RandPhaseShiftd,
)
from scripts.loss import LCADBLoss
from scripts.network import LCADB, LCADBInference
from scripts.roi import lesion_box_slices, liver_reference_level
from scripts.synthetic import generate_dataset
from scripts.training import LCADBPrepareBatch, LCADBTrainingLoss, load_datalist

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundle" / "configs"
TRAIN, LIGHT, EVALUATE = (str(CONFIGS / n) for n in ("train.json", "cpu_light.json", "evaluate.json"))
INFERENCE, ENSEMBLE = str(CONFIGS / "inference.json"), str(CONFIGS / "ensemble.json")
ENSEMBLE_INFERENCE = str(CONFIGS / "ensemble_inference.json")
META, LOGGING = str(CONFIGS / "metadata.json"), str(CONFIGS / "logging.conf")
#: The recipe's input options all on.
RECIPE = {"liver_ratio": True, "lesion_margin": [4, 4, 1], "lesion_box_channel": True}
TINY = {
    "network_def#widen_factor": 0.0625,
    "network_def#stem": "resnet",
    "batch_size": 4,
    "num_workers": 0,
    "num_threads": 1,
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    """The same spec without and with 14 extra training cases (3 cases per class: 14 training, 7 test)."""
    root = tmp_path_factory.mktemp("recipe")
    plain = generate_dataset(root / "plain", 3, seed=5, site=("site_a", "site_b"), progress=False).parent
    extra = generate_dataset(
        root / "extra", 3, seed=5, site=("site_a", "site_b"), progress=False, extra_training_cases=14
    ).parent
    return plain, extra


def test_extra_training_cases_keep_the_test_split_and_folds(datasets):
    plain, extra = (json.loads((d / "datalist.json").read_text()) for d in datasets)
    assert extra["test"] == plain["test"] and extra["training"][: len(plain["training"])] == plain["training"]
    added = extra["training"][len(plain["training"]) :]
    assert len(added) == 14 and sorted({c["fold"] for c in added}) == [0, 1, 2, 3, 4]
    assert sorted(c["label"] for c in added) == sorted(list(range(7)) * 2)  # the class proportions of 3 per class
    for case in plain["test"] + plain["training"][:3]:  # the same voxels, not only the same names
        for phase in ("C+A", "DWI"):
            a, b = (nib.load(d / case[phase]).get_fdata() for d in datasets)
            np.testing.assert_array_equal(a, b)
    names = {c["case"] for c in plain["training"] + plain["test"]}
    assert not names & {c["case"] for c in added}
    with pytest.raises(ValueError, match="extra_training_cases must be >= 0"):
        generate_dataset(datasets[0].parent / "bad", 3, extra_training_cases=-1)


def test_max_cases_gives_nested_training_subsets(datasets):
    root = datasets[1]
    train = load_datalist(root, "training", fold=0, subset="train")
    first = load_datalist(root, "training", fold=0, subset="train", max_cases=5)
    assert [c["case"] for c in first] == [c["case"] for c in train[:5]]
    with pytest.raises(ValueError, match="max_cases=99 but .* holds"):
        load_datalist(root, "training", fold=0, subset="train", max_cases=99)
    with pytest.raises(ValueError, match="max_cases must be a positive"):
        load_datalist(root, "training", max_cases=0)


def _crop(liver: float = 100.0, lesion: float = 250.0, box=(8, 6, 3)) -> np.ndarray:
    """A crop with the LLD-MMRI margin around a uniform box, liver outside."""
    shape = [b + 2 * m for b, m in zip(box, ROI_MARGIN)]
    crop = np.full(shape, liver, dtype=np.float32)
    crop[lesion_box_slices(shape)] = lesion
    return crop


def test_liver_ratio_box_mask_and_tight_crop():
    crop = _crop()
    assert liver_reference_level(crop)[0] == 100.0
    image = torch.as_tensor(np.stack([crop, 2 * crop]))
    ratio = LiverRatioNormalize()(image)
    inside = (slice(None), *lesion_box_slices(crop.shape))
    torch.testing.assert_close(ratio[inside], torch.full_like(ratio[inside], float(np.log(2.5))))
    assert float(ratio[:, 0, 0, 0].abs().max()) == 0.0  # each phase relative to its own liver level
    mask = LesionBoxMask()(image)
    assert mask.shape == (1, *crop.shape) and float(mask.sum()) == 8 * 6 * 3 and float(mask[inside].min()) == 1
    tight = CropLesionMargin((4, 4, 1))(image)
    assert tuple(tight.shape[1:]) == (8 + 8, 6 + 8, 3 + 2)
    assert float(LesionBoxMask((4, 4, 1))(tight).sum()) == 8 * 6 * 3
    with pytest.raises(ValueError, match="must not exceed"):
        CropLesionMargin((20, 4, 1))


def test_phase_augmentations_leave_the_box_channel_alone():
    image = torch.rand(9, 8, 8, 4)
    image[8] = 0
    image[8, 2:6, 2:6, 1:3] = 1
    intensity = RandPhaseIntensityd("image", scale=0.3, shift=0.3, prob=1.0).set_random_state(0)
    shift = RandPhaseShiftd("image", max_shift=(2, 2, 1), prob=1.0).set_random_state(0)
    for transform in (intensity, shift):
        out = transform({"image": image})["image"]
        torch.testing.assert_close(out[8], image[8])
        assert not torch.equal(out[:8], image[:8])
    shifted = RandPhaseShiftd("image", max_shift=(2, 0, 0), prob=1.0).set_random_state(1)({"image": image})["image"]
    for c in range(8):  # every phase is the original moved along x with the edge repeated
        matches = [s for s in range(-2, 3) if torch.equal(shifted[c], image[c][torch.clamp(torch.arange(8) - s, 0, 7)])]
        assert matches, f"phase {c} is not a whole-voxel shift"
    ratios = intensity({"image": image})["image"][:8] / image[:8]
    assert ratios.flatten(1).std(1).max() > 0  # an offset is added as well as a factor


def test_mixup_target_is_the_weighted_loss():
    torch.manual_seed(0)
    np.random.seed(0)
    net = LCADB(widen_factor=0.0625, roi_size=(32, 32, 8), patch_size=16)
    batch = {"image": torch.randn(4, 8, 32, 32, 8), "label": torch.tensor([0, 3, 6, 2])}
    image, target = LCADBPrepareBatch(mixup_alpha=0.4)(batch)
    assert target.shape == (4, 3) and 0.5 <= float(target[0, 2]) <= 1
    lam = float(target[0, 2])
    output = net(image)
    loss = LCADBTrainingLoss(LCADBLoss())
    expected = lam * LCADBLoss()(output, target[:, 0].long())["total"]
    expected = expected + (1 - lam) * LCADBLoss()(output, target[:, 1].long())["total"]
    torch.testing.assert_close(loss(output, target), expected)
    assert torch.equal(loss.mixup_labels, batch["label"])
    plain_image, plain_label = LCADBPrepareBatch()(batch)
    assert torch.equal(plain_image, batch["image"]) and torch.equal(plain_label, batch["label"])
    with pytest.raises(ValueError, match="mixup_alpha"):
        LCADBPrepareBatch(mixup_alpha=-1)


def test_train_and_inference_configs_prepare_the_same_input(datasets):
    """The recipe's options on: the training preprocessing, the inference config's file loading and its stacked-image
    path (the deploy app's) give the same network input for a dataset case."""
    case = load_datalist(datasets[0], "test")[0]
    outputs = {}
    for name, files, key in (
        ("train", [TRAIN, LIGHT], "validate#preprocessing"),
        ("inference", [INFERENCE, LIGHT], "preprocessing"),
    ):
        parser = ConfigParser()
        parser.read_config(files)
        parser.update(RECIPE)
        outputs[name] = parser.get_parsed_content(key)(dict(case))["image"]
    assert outputs["train"].shape == (9, 32, 32, 8)
    torch.testing.assert_close(outputs["train"], outputs["inference"])
    # the deploy app's path: every phase already on one grid, stacked, then image_preprocessing
    parser = ConfigParser()
    parser.read_config([INFERENCE, LIGHT])
    parser.update(RECIPE)
    phases = [nib.load(case[p]).get_fdata().astype(np.float32) for p in PHASES]
    same_grid = np.stack([phases[PHASES.index("C+A")] * (1 + 0.1 * k) for k in range(8)])
    out = parser.get_parsed_content("image_preprocessing")({"image": torch.as_tensor(same_grid)})["image"]
    assert out.shape == (9, 32, 32, 8)
    for k in range(1, 8):  # liver-relative: a phase that is the reference phase scaled is the same input
        torch.testing.assert_close(out[k], out[0], atol=1e-5, rtol=0)
    assert float(out[8].max()) == 1.0 and float(out[8].min()) == 0.0


def test_fusion_weight_follows_the_validation_fold():
    labels = np.array([0, 1, 2, 0, 1, 2])
    perfect = np.eye(3)[labels] * 0.9 + 0.1 / 3
    flat = np.full((6, 3), 1 / 3)
    assert fusion_weight(perfect, flat, labels) == 1.0 and fusion_weight(flat, perfect, labels) == 0.0
    assert 0.0 < fusion_weight(perfect, perfect[::-1], labels) <= 1.0 and 0.5 in FUSION_WEIGHTS
    np.testing.assert_allclose(fuse(perfect, flat, 0.25), 0.25 * perfect + 0.75 * flat)
    with pytest.raises(ValueError, match="weight must be in"):
        fuse(perfect, flat, 1.5)


@pytest.fixture(scope="module")
def folds(tmp_path_factory, datasets) -> Path:
    """5 untrained fold models (different seeds) of the tiny light network, as the bundle's checkpoints."""
    ckpt_dir = tmp_path_factory.mktemp("folds")
    for k in range(5):
        torch.manual_seed(k)
        net = LCADB(widen_factor=0.0625, roi_size=(32, 32, 8), patch_size=16, stem="resnet")
        (ckpt_dir / f"fold{k}").mkdir()
        torch.save(net.state_dict(), ckpt_dir / f"fold{k}" / "model.pt")
    return ckpt_dir


def test_ensemble_evaluator_is_the_mean_of_the_fold_models(tmp_path, datasets, folds):
    workflow = ConfigWorkflow(
        workflow_type="train",
        config_file=[TRAIN, LIGHT, EVALUATE, ENSEMBLE],
        meta_file=META,
        logging_file=LOGGING,
        bundle_root=str(tmp_path),
        ckpt_dir=str(folds),
        dataset_dir=str(datasets[0]),
        baseline=False,
        **TINY,
    )
    workflow.initialize()
    workflow.run()
    report = json.loads((tmp_path / "eval" / "LCADB.json").read_text())
    assert type(workflow.evaluator).__name__ == "EnsembleEvaluator"
    cases = load_datalist(datasets[0], "test")
    preprocessing = workflow.parser.get_parsed_content("validate#preprocessing")
    network = workflow.parser.get_parsed_content("network_def")
    single = []
    for path in fold_checkpoints(folds):
        network.load_state_dict(torch.load(path, weights_only=True))
        single.append(predict_cases(network, cases, preprocessing))
    for entry in report:
        mean = np.mean([s[entry["image_id"]] for s in single], axis=0)
        np.testing.assert_allclose(entry["score"], mean, atol=1e-5)
    workflow.finalize()
    with pytest.raises(FileNotFoundError, match="fold checkpoints missing"):
        fold_checkpoints(tmp_path)


def test_ensemble_as_one_network_torchscript_and_deploy_folder(tmp_path, folds):
    """``LCADBEnsemble`` (combined checkpoint, ``ensemble_inference.json``) exports to one TorchScript the deploy app
    loads; a folder of the fold models' own exports gives the same probabilities and attention."""
    from deploy_app.bundle_access import load_model
    from deploy_app.domain import LesionROI
    from deploy_app.errors import ModelPackageError
    from deploy_app.inference import classify_lesions
    from deploy_app.preflight import check_model_package

    light = {
        "network_def#widen_factor": 0.0625,
        "network_def#stem": "resnet",
        "roi_size": [32, 32, 8],
        "patch_size": 16,
    }
    parser = ConfigParser()
    parser.read_config([INFERENCE, ENSEMBLE_INFERENCE])
    parser.update(light)
    ensemble = parser.get_parsed_content("network_def")
    assert isinstance(ensemble, LCADBEnsemble) and ensemble.num_members == 5
    reference = LCADBInference(widen_factor=0.0625, roi_size=(32, 32, 8), patch_size=16, stem="resnet")
    combined = combine_checkpoints(fold_checkpoints(folds), tmp_path / "ensemble.pt", reference)
    ensemble.load_state_dict(torch.load(combined, weights_only=True))
    x = torch.randn(3, 8, 32, 32, 8)
    members = []
    for path in fold_checkpoints(folds):
        reference.load_state_dict(torch.load(path, weights_only=True))
        members.append(reference.eval()(x))
    ensemble.eval()
    torch.testing.assert_close(ensemble(x), torch.stack(members).mean(0))

    def export(config_file, ckpt_file, name):
        """ckpt_export embeds config files as they are on disk: merge the overrides into one inference.json first."""
        folder = tmp_path / name.replace(".ts", "")
        folder.mkdir()
        merged = ConfigParser()
        merged.read_config(config_file)
        merged.update({**light, "network_def#return_attention": True})
        ConfigParser.export_config_file(merged.get(), str(folder / "inference.json"))
        ckpt_export(
            "network_def",
            filepath=str(folder / name),
            ckpt_file=str(ckpt_file),
            meta_file=META,
            config_file=str(folder / "inference.json"),
        )
        return folder / name

    one = export([INFERENCE, ENSEMBLE_INFERENCE], combined, "ensemble.ts")
    rng = np.random.default_rng(0)
    rois = [
        LesionROI(f"L{n}", (16, 16, 2, 26, 28, 6), rng.normal(100, 20, (8, 42, 44, 8)), (0, 0, 0), "t") for n in (0, 1)
    ]
    whole = classify_lesions(load_model(one, "cpu"), rois)
    folder = tmp_path / "folds_ts"
    folder.mkdir()
    for k, path in enumerate(fold_checkpoints(folds)):
        export([INFERENCE], path, f"fold{k}.ts").rename(folder / f"fold{k}.ts")
    model = load_model(folder, "cpu")
    assert len(model.members) == 5 and model.path == folder
    assert check_model_package(folder) == sorted(folder.glob("fold*.ts"))  # the app's fail-fast check takes them all
    for a, b in zip(whole, classify_lesions(model, rois), strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)
    other = export([INFERENCE], fold_checkpoints(folds)[0], "other.ts")
    config = json.loads((other.parent / "inference.json").read_text())
    config["lesion_margin"] = [4, 4, 1]  # another preprocessing: not a member of this ensemble
    (other.parent / "inference.json").write_text(json.dumps(config))
    ckpt_export(
        "network_def",
        filepath=str(folder / "other.ts"),
        ckpt_file=str(fold_checkpoints(folds)[0]),
        meta_file=META,
        config_file=str(other.parent / "inference.json"),
    )
    with pytest.raises(ModelPackageError, match="different bundles .*preprocessing_config"):
        load_model(folder, "cpu")
