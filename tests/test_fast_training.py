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
"""MONAI's fast-training recipe in the bundle (``augment_on_device``, ``bundle/configs/fast_train.json``).

The training data path built from the bundle's own configs: the default path (CPU worker processes, metadata
tracked) stays as it was; the device path (plain tensors cached on the device, random transforms in a
``ThreadDataLoader``; CPU tensors stand in for the GPU here) draws augmented samples from the same distribution,
checked with two-sample Kolmogorov-Smirnov tests on per-sample statistics, and a deliberately different
augmentation is caught by the same test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import DataLoader, MetaTensor, ThreadDataLoader
from monai.utils import set_determinism
from scipy.stats import ks_2samp
from scripts.fast_training import ComposeWithoutMeta

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundle" / "configs"
TRAIN = str(CONFIGS / "train.json")
FAST = str(CONFIGS / "fast_train.json")

TINY = {
    "roi_size": [32, 32, 8],
    "patch_size": 16,
    "network_def#widen_factor": 0.125,
    "batch_size": 4,
    "num_workers": 0,
    "num_threads": 1,
}
#: Epochs drawn per path: 11 training cases x 40 = 440 augmented samples.
EPOCHS = 40
#: Two-sample KS critical value at alpha = 0.001 (c(alpha) = sqrt(-ln(alpha / 2) / 2) = 1.949), n = m = 440.
KS_CRITICAL = 1.949 * math.sqrt(2 / (11 * EPOCHS))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """2 cases per class: 11 training cases of fold 0."""
    from scripts.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "lcadb", 2, seed=0, progress=False).parent


def _parser(files: list[str], dataset: Path, bundle_root: Path, **override) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(files)
    parser.update({"dataset_dir": str(dataset), "bundle_root": str(bundle_root), **TINY, **override})
    return parser


def test_default_path_unchanged_and_fast_path_switched(dataset, tmp_path):
    default = _parser([TRAIN], dataset, tmp_path)
    loader = default.get_parsed_content("train#dataloader")
    assert type(loader) is DataLoader and loader.dataset.copy_cache
    assert isinstance(loader.dataset._cache[0]["image"], MetaTensor)
    assert not any(isinstance(t, ComposeWithoutMeta) for t in loader.dataset.transform.transforms)
    assert default.get_parsed_content("use_compile") is False

    fast = _parser([TRAIN, FAST], dataset, tmp_path)
    loader = fast.get_parsed_content("train#dataloader")
    assert type(loader) is ThreadDataLoader and loader.num_workers == 0 and not loader.dataset.copy_cache
    cached = loader.dataset._cache[0]["image"]
    assert type(cached) is torch.Tensor and cached.device == fast.get_parsed_content("device")
    batch = next(iter(loader))
    assert type(batch["image"]) is torch.Tensor and batch["image"].shape == (4, 8, 32, 32, 8)
    # AMP, channels_last and torch.compile only take effect on CUDA
    on_cuda = torch.cuda.is_available()
    assert [fast.get_parsed_content(k) for k in ("use_amp", "use_channels_last", "use_compile")] == [on_cuda] * 3
    validation = fast.get_parsed_content("validate#dataloader")
    assert type(validation) is ThreadDataLoader and type(validation.dataset._cache[0]["image"]) is torch.Tensor


def test_fast_path_trains_with_the_bundle_workflow(dataset, tmp_path):
    workflow = ConfigWorkflow(
        config_file=[TRAIN, FAST],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        bundle_root=str(tmp_path),
        dataset_dir=str(dataset),
        max_epochs=1,
        **TINY,
    )
    threads = torch.get_num_threads()
    try:
        workflow.initialize()
        assert workflow.check_properties() == []
        workflow.run()
        workflow.finalize()
    finally:
        torch.set_num_threads(threads)
    state = workflow.parser.get_parsed_content("train#trainer").state
    assert state.epoch == 1 and math.isfinite(state.metrics["train_total"])
    assert (tmp_path / "models" / "model_final.pt").is_file()


def _augmentation_statistics(parser: ConfigParser, seed: int) -> dict[str, np.ndarray]:
    """Per augmented sample, its distance to the cached (un-augmented) case and to that case flipped."""
    set_determinism(seed=seed)
    try:
        loader = parser.get_parsed_content("train#dataloader")
        originals = {item["case"]: torch.as_tensor(item["image"]).float().cpu() for item in loader.dataset._cache}
        distance, flip_distance = [], []
        for _ in range(EPOCHS):
            for batch in loader:
                for case, image in zip(batch["case"], torch.as_tensor(batch["image"]).float().cpu()):
                    original = originals[case]
                    scale = float(original.norm())
                    distance.append(float((image - original).norm()) / scale)
                    flip_distance.append(float((image - original.flip(1, 2, 3)).norm()) / scale)
    finally:
        set_determinism(seed=None)
    return {"distance": np.array(distance), "flip_distance": np.array(flip_distance)}


def test_device_and_worker_augmentation_follow_the_same_distribution(dataset, tmp_path):
    torch.set_num_threads(1)
    # the worker path as train.json runs it: 2 worker processes augment MetaTensors
    workers = _parser([TRAIN], dataset, tmp_path, num_workers=2, **{"train#dataloader#persistent_workers": True})
    worker_stats = _augmentation_statistics(workers, seed=1)
    device_stats = _augmentation_statistics(_parser([TRAIN, FAST], dataset, tmp_path), seed=2)
    assert len(worker_stats["distance"]) == len(device_stats["distance"]) == 11 * EPOCHS

    for name in worker_stats:
        result = ks_2samp(worker_stats[name], device_stats[name])
        assert result.statistic < KS_CRITICAL, f"{name}: KS D={result.statistic:.3f} >= {KS_CRITICAL:.3f}"
    # both paths leave about (1 - 0.3)^2 = 49 % of the samples untouched (no rotation, no flip)
    for stats in (worker_stats, device_stats):
        untouched = float(np.mean(stats["distance"] < 1e-6))
        assert abs(untouched - 0.49) < 0.08, untouched

    # the same test catches a real difference: rotation probability 0.7 instead of 0.3 on the device path
    changed = _parser([TRAIN, FAST], dataset, tmp_path, **{"train#random_transforms#0#prob": 0.7})
    changed_stats = _augmentation_statistics(changed, seed=3)
    assert ks_2samp(worker_stats["distance"], changed_stats["distance"]).statistic > KS_CRITICAL
