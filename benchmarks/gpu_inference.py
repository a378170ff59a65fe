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
"""The deploy app's GPU inference path, without Holoscan: the bundle's exported model run by the app's own inference
function (:func:`deploy_app.inference.classify_lesions`) on CUDA, fp32 and bfloat16 autocast.

    python benchmarks/gpu_inference.py --json gpu_inference.json              # on a GPU machine (paper-size net)
    python benchmarks/gpu_inference.py --device cpu --tiny --lesions 3        # the same path on a CPU (a smoke run)

The paper-size network (random weights, ``monai.bundle.ckpt_export`` as the bundle exports it) classifies
``--lesions`` random 8-phase ROIs through the model's embedded ``image_preprocessing``: in fp32 and under bfloat16
autocast, for each ``--batch-sizes``. Reported: the largest probability difference between the two and whether every
predicted class agrees (the app keeps autocast on only where the difference is within 1e-3), seconds per lesion, and
the peak GPU memory per batch size (``torch.cuda.max_memory_allocated``: the figure behind app.yaml's gpuMemory).
Needs torch, monai, einops, nibabel, pydicom and this repository; not holoscan (see benchmarks/gpu_inference.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-3


def _rois(count: int, seed: int = 0):
    import numpy as np

    from deploy_app.domain import LesionROI

    rng = np.random.default_rng(seed)
    rois = []
    for n in range(count):
        shape = (8, int(rng.integers(48, 96)), int(rng.integers(48, 96)), int(rng.integers(8, 16)))
        roi = rng.normal(100.0, 30.0, size=shape).astype(np.float32)
        rois.append(LesionROI(f"L{n + 1}", (0, 0, 0, *shape[1:]), roi, (0, 0, 0), "random"))
    return rois


def _classify(model, rois, batch_size: int, autocast: bool) -> tuple[list, float, float | None]:
    import torch

    from deploy_app.inference import classify_lesions

    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    results = classify_lesions(model, rois, batch_size=batch_size, autocast=autocast)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
    return results, seconds / len(rois), peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny network instead of the paper-size one")
    parser.add_argument("--lesions", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 20])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "bundle")]

    import numpy as np
    import torch

    from deploy_app.benchmark import FULL_SIZE_OVERRIDES, TINY_OVERRIDES, export_bundle_model
    from deploy_app.bundle_access import load_model

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available here: run with --device cpu for the CPU path.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        path = export_bundle_model(Path(tmp), TINY_OVERRIDES if args.tiny else FULL_SIZE_OVERRIDES)
        model = load_model(path, args.device)
    rois = _rois(args.lesions)
    _classify(model, rois[:1], 1, autocast=True)  # warm-up (CUDA context, kernels)
    report: dict = {"device": str(model.device), "torch": torch.__version__, "lesions": args.lesions, "runs": []}
    if model.device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(model.device)
    reference = None
    for batch_size in args.batch_sizes:
        fp32, fp32_s, fp32_peak = _classify(model, rois, batch_size, autocast=False)
        bf16, bf16_s, bf16_peak = _classify(model, rois, batch_size, autocast=True)
        p32 = np.stack([r.probabilities for r in fp32])
        p16 = np.stack([r.probabilities for r in bf16])
        reference = p32 if reference is None else reference
        run = {
            "batch_size": batch_size,
            "fp32_s_per_lesion": round(fp32_s, 4),
            "bf16_s_per_lesion": round(bf16_s, 4),
            "fp32_peak_gpu_mib": fp32_peak,
            "bf16_peak_gpu_mib": bf16_peak,
            "max_probability_difference": float(np.abs(p32 - p16).max()),
            "classes_agree": bool((p32.argmax(1) == p16.argmax(1)).all()),
            "fp32_same_as_first_batch_size": float(np.abs(p32 - reference).max()),
        }
        run["bf16_within_tolerance"] = run["max_probability_difference"] <= TOLERANCE and run["classes_agree"]
        print(json.dumps(run), flush=True)
        report["runs"].append(run)
    report["bf16_autocast_ok"] = all(r["bf16_within_tolerance"] for r in report["runs"])
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
