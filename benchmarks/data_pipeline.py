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
"""The bundle's training data path without the network: samples/s and CPU core-milliseconds per sample.

Every path is built from the bundle's own ``train.json`` (the same transforms, loaders and batch size), at the paper
ROI (8 x 128 x 128 x 16 per sample), batch 8, one thread per process:

- ``authors``: load the 8 NIfTI phases and run every transform for every sample (a plain ``Dataset``, as the
  authors' loader does), ``DataLoader`` with ``--workers`` worker processes;
- ``cached_cpu_aug``: ``train.json`` as it is: the deterministic part cached once (``CacheDataset``), the random
  rotation/flip on MetaTensors in ``--workers`` worker processes;
- ``cached_device_aug``: ``train.json`` + ``fast_train.json`` (MONAI's fast-training recipe): plain tensors cached on
  the device, the random rotation/flip run by a ``ThreadDataLoader`` on that device. With ``--device cpu`` CPU
  tensors stand in for the GPU, so the rotation's arithmetic is counted as CPU time;
- ``cached_device_aug_host``: the same on PyTorch's ``meta`` device (tensors with shapes and no data): every
  Python, MONAI and dispatcher step the loader takes per sample, none of the arithmetic that a GPU would do.
  This is the loader's CPU cost per sample when the augmentation runs on a GPU (CUDA kernel launches excluded).

CPU time is the user + system time of this process (all threads) and of its live worker processes (psutil), over
the timed samples; workers are persistent, so the per-epoch worker start-up is not counted. The cache is built
before timing (its one-off cost is reported as ``cache_s``).

    python benchmarks/data_pipeline.py                      # 4 cases per class generated into a temporary folder
    python benchmarks/data_pipeline.py --samples 64 --paths cached_device_aug_host --json out.json
    python benchmarks/data_pipeline.py --device cuda        # on a GPU machine: the device path for real
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))

__all__ = ["PATHS", "measure_path"]

PATHS = ("authors", "cached_cpu_aug", "cached_device_aug", "cached_device_aug_host")
PAPER_ROI = [128, 128, 16]


def _parser(path: str, dataset_dir: Path, bundle_root: Path, workers: int, device: str, batch: int, roi: list[int]):
    from monai.bundle import ConfigParser

    files = [str(BUNDLE / "configs" / "train.json")]
    if path.startswith("cached_device_aug"):
        files.append(str(BUNDLE / "configs" / "fast_train.json"))
    parser = ConfigParser()
    parser.read_config(files)
    override = {
        "dataset_dir": str(dataset_dir),
        "bundle_root": str(bundle_root),
        "roi_size": roi,
        "batch_size": batch,
        "num_workers": workers,
        "device": f"$torch.device({'meta' if path == 'cached_device_aug_host' else device!r})",
        "train#dataloader#persistent_workers": workers > 0 and not path.startswith("cached_device_aug"),
    }
    if path == "authors":
        override["train#dataset"] = {
            "_target_": "Dataset",
            "data": "@train#datalist",
            "transform": "@train#preprocessing",
        }
    parser.update(override)
    return parser


def _cpu_seconds(process: psutil.Process) -> float:
    """User + system seconds of this process (all its threads) and of its live children."""
    times = process.cpu_times()
    total = times.user + times.system
    for child in process.children(recursive=True):
        try:
            child_times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += child_times.user + child_times.system
    return total


def measure_path(
    path: str,
    dataset_dir: Path,
    samples: int,
    workers: int = 2,
    device: str = "cpu",
    batch: int = 8,
    roi: list[int] | None = None,
) -> dict:
    """Samples/s and CPU core-ms per sample of one data path, over at least ``samples`` samples after one warm-up batch.

    Args:
        path: one of :data:`PATHS`.
        dataset_dir: a dataset folder holding ``datalist.json`` (fold 0's training cases are used).
        samples: number of samples to time (rounded up to whole batches).
        workers: worker processes of the ``DataLoader`` paths (the device paths use none, as the recipe does).
        device: training device of the ``cached_device_aug`` path.
        batch: batch size.
        roi: ROI size, defaults to the paper's 128 x 128 x 16.

    Returns:
        path, samples, samples_per_s, cpu_ms_per_sample, cache_s, workers, device.
    """
    from monai.utils import set_determinism

    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
    set_determinism(seed=0)
    with tempfile.TemporaryDirectory() as bundle_root:
        parser = _parser(path, dataset_dir, Path(bundle_root), workers, device, batch, roi or PAPER_ROI)
        start = time.perf_counter()
        loader = parser.get_parsed_content("train#dataloader")
        cache_s = time.perf_counter() - start
        process = psutil.Process()
        batches = iter(())
        first = True
        counted = 0
        while True:
            try:
                data = next(batches)
            except StopIteration:
                batches = iter(loader)
                continue
            if first:  # warm-up batch: starts the workers and the loader thread
                first = False
                wall, cpu = time.perf_counter(), _cpu_seconds(process)
                continue
            counted += len(data["label"])
            if data["image"].device.type == "cuda":
                torch.cuda.synchronize()
            if counted >= samples:
                break
        wall, cpu = time.perf_counter() - wall, _cpu_seconds(process) - cpu
        del batches, loader
    set_determinism(seed=None)
    return {
        "path": path,
        "samples": counted,
        "samples_per_s": counted / wall,
        "cpu_ms_per_sample": 1e3 * cpu / counted,
        "cache_s": cache_s,
        "workers": 0 if path.startswith("cached_device_aug") else workers,
        "device": "meta" if path == "cached_device_aug_host" else device,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", type=Path, help="default: generate one in a temporary folder")
    parser.add_argument("--cases_per_class", type=int, default=4, help="cases per class of the generated dataset")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=PATHS)
    parser.add_argument("--samples", type=int, default=160, help="samples timed per path")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the worker paths")
    parser.add_argument("--device", default="cpu", help="device of the cached_device_aug path")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--roi", type=int, nargs=3, default=PAPER_ROI)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        dataset_dir = args.dataset_dir
        if dataset_dir is None:
            from scripts.synthetic import generate_dataset

            dataset_dir = generate_dataset(Path(tmp) / "lcadb", args.cases_per_class, seed=0, progress=False).parent
        load = os.getloadavg()
        print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs", flush=True)
        results = []
        for path in args.paths:
            result = measure_path(path, dataset_dir, args.samples, args.workers, args.device, args.batch, args.roi)
            results.append(result)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    header = f"{'path':<24} {'samples/s':>10} {'CPU ms/sample':>14} {'cache s':>8}"
    print(header)
    for r in results:
        print(f"{r['path']:<24} {r['samples_per_s']:>10.1f} {r['cpu_ms_per_sample']:>14.2f} {r['cache_s']:>8.1f}")
    if args.json:
        args.json.write_text(json.dumps({"load_average": load, "roi": args.roi, "results": results}, indent=2))


if __name__ == "__main__":
    main()
