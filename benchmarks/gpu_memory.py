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
"""Peak GPU memory per bundle config, for the model card: one training step and one inference batch.

Each config's network, ROI and batch size come from the bundle's own config files (``train.json`` defaults =
paper size; ``+ cpu_light.json``; ``inference.json`` = the shipped weights). Peak = ``torch.cuda.max_memory_allocated``
(tensors only; the CUDA context adds a few hundred MB that ``nvidia-smi`` shows on top).

    python benchmarks/gpu_memory.py --json gpu_memory.json      # needs a CUDA device
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))
from monai.bundle import ConfigParser  # noqa: E402
from scripts.loss import LCADBLoss  # noqa: E402

CONFIGS = {
    "train.json (paper size)": ["train.json"],
    "train.json + cpu_light.json": ["train.json", "cpu_light.json"],
    "inference.json (shipped weights)": ["inference.json"],
}


def measure(files: list[str], device: torch.device) -> dict:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in files])
    network = parser.get_parsed_content("network_def").to(device)
    roi, batch = parser.get_parsed_content("roi_size"), parser.get_parsed_content("batch_size")
    result = {"roi_size": roi, "batch_size": batch}
    x = torch.randn(batch, 8, *roi, device=device)
    if "train.json" in files:
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
        torch.cuda.reset_peak_memory_stats(device)
        loss = LCADBLoss()(network.train()(x), torch.randint(0, 7, (batch,), device=device), epoch=0)["total"]
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize(device)
        result["train_step_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        del optimizer, loss
    network.eval()
    for name, size in (("infer_batch1_peak_gib", 1), (f"infer_batch{batch}_peak_gib", batch)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            network(x[:size])
        torch.cuda.synchronize(device)
        result[name] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_memory.py needs a CUDA device.")
    device = torch.device("cuda:0")
    results = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__}
    for name, files in CONFIGS.items():
        results[name] = measure(files, device)
        print(name, json.dumps(results[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
