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
"""LCA-DB speed: the default execution (fp32, NCDHW, eager) and ours, in one process, same device, same weights.

Training step (forward, every loss term, backward, Adam) and inference (batch throughput, batch-1
latency). Ours is bf16 autocast + channels_last_3d (+ torch.compile with --compile) on CUDA and a
frozen TorchScript graph with BatchNorm folded and the full-resolution IA-Net
stem and stage 1 in bf16 on the CPU. Timings alternate between the two
executions (A B A B ...) and report medians, so a busy machine slows both alike.

    python benchmarks/benchmark.py --device cuda                      # paper configuration
    python benchmarks/benchmark.py --device cpu --task infer --batch_sizes 1 --repeats 3
    python benchmarks/benchmark.py --smoke                             # tiny network, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
from scripts.acceleration import (  # noqa: E402
    FULL_RESOLUTION_MODULES,
    freeze_for_cpu_inference,
    gpu_autocast,
    to_channels_last,
)
from scripts.loss import LCADBLoss  # noqa: E402
from scripts.network import LCADB, LCADBInference  # noqa: E402

__all__ = ["benchmark_inference", "benchmark_training"]

SMOKE = {"depth": 10, "widen_factor": 0.0625, "roi_size": (32, 32, 8), "patch_size": 16}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _alternate(runs: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device):
    """Median seconds per call of each run, timed in alternation; the peak CUDA memory of each."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    peak: dict[str, float] = {}
    for name, run in runs.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            run()
        _synchronize(device)
        if device.type == "cuda":
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
    for _ in range(repeats):
        for name, run in runs.items():
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}, peak


def benchmark_training(network_kwargs: dict, batch: int, device: torch.device, repeats: int, compile_model: bool):
    """Training-step throughput of the default execution and ours, and the loss difference on one batch."""
    torch.manual_seed(0)
    default_net = LCADB(**network_kwargs).to(device).train()
    ours_net = LCADB(**network_kwargs).to(device).train()
    ours_net.load_state_dict(default_net.state_dict())
    if device.type == "cuda":
        ours_net = to_channels_last(ours_net)
    ours_forward = torch.compile(ours_net) if compile_model else ours_net
    loss = LCADBLoss()
    x = torch.randn(batch, 8, *default_net.roi_size, device=device)
    y = torch.randint(0, default_net.num_classes, (batch,), device=device)
    x_ours = to_channels_last(x) if device.type == "cuda" else x

    with torch.no_grad():
        reference_terms = loss(default_net(x), y, epoch=30)
        with gpu_autocast(True, device):
            ours_terms = loss(ours_forward(x_ours), y, epoch=30)
    loss_difference = {name: abs(float(ours_terms[name]) - float(reference_terms[name])) for name in reference_terms}

    optimisers = {
        "default": torch.optim.Adam(default_net.parameters(), lr=1e-4),
        "ours": torch.optim.Adam(ours_net.parameters(), lr=1e-4),
    }

    def default_step():
        optimisers["default"].zero_grad(set_to_none=True)
        loss(default_net(x), y, epoch=30)["total"].backward()
        optimisers["default"].step()

    def ours_step():
        optimisers["ours"].zero_grad(set_to_none=True)
        with gpu_autocast(True, device):
            total = loss(ours_forward(x_ours), y, epoch=30)["total"]
        total.backward()
        optimisers["ours"].step()

    seconds, peak = _alternate({"default": default_step, "ours": ours_step}, repeats, 3, device)
    return {
        "task": "train",
        "batch": batch,
        **{f"{name}_ms_per_step": 1e3 * value for name, value in seconds.items()},
        **{f"{name}_samples_per_s": batch / value for name, value in seconds.items()},
        **{f"{name}_peak_gib": value for name, value in peak.items()},
        "speedup": seconds["default"] / seconds["ours"],
        "max_abs_loss_difference": max(loss_difference.values()),
    }


def benchmark_inference(network_kwargs: dict, batch: int, device: torch.device, repeats: int, compile_model: bool):
    """Inference latency and throughput of the default execution and ours, and the probability difference."""
    torch.manual_seed(0)
    network = LCADBInference(**network_kwargs).to(device).eval()
    x = torch.randn(batch, 8, *network.roi_size, device=device)
    if device.type == "cuda":
        ours_net = to_channels_last(LCADBInference(**network_kwargs).to(device).eval())
        ours_net.load_state_dict(network.state_dict())
        ours_forward = torch.compile(ours_net) if compile_model else ours_net
        x_ours = to_channels_last(x)

        def ours():
            with gpu_autocast(True, device):
                return ours_forward(x_ours).float()

    else:
        frozen = freeze_for_cpu_inference(network, x, FULL_RESOLUTION_MODULES, chain_bfloat16=True)

        def ours():
            return frozen(x)

    with torch.inference_mode():
        probability_difference = float((ours() - network(x)).abs().max())
        same_class = bool((ours().argmax(1) == network(x).argmax(1)).all())
        seconds, peak = _alternate({"default": lambda: network(x), "ours": ours}, repeats, 2, device)
    return {
        "task": "infer",
        "batch": batch,
        **{f"{name}_ms_per_batch": 1e3 * value for name, value in seconds.items()},
        **{f"{name}_lesions_per_s": batch / value for name, value in seconds.items()},
        **{f"{name}_peak_gib": value for name, value in peak.items()},
        "speedup": seconds["default"] / seconds["ours"],
        "max_abs_probability_difference": probability_difference,
        "same_class": same_class,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--task", choices=("train", "infer", "all"), default="all")
    parser.add_argument("--stem", choices=("reference", "resnet"), default="reference")
    parser.add_argument("--train_batch", type=int, default=8)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=(32, 1), help="inference batch sizes")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile our execution (CUDA)")
    parser.add_argument("--smoke", action="store_true", help="tiny network, 2 repeats: checks the script runs")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()

    device = torch.device(args.device)
    network_kwargs = dict(SMOKE) if args.smoke else {}
    network_kwargs["stem"] = args.stem
    repeats, train_batch, batch_sizes = args.repeats, args.train_batch, args.batch_sizes
    if args.smoke:
        repeats, train_batch, batch_sizes = 2, 2, (2, 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; network: {network_kwargs}")
    results = []
    if args.task in ("train", "all"):
        results.append(benchmark_training(network_kwargs, train_batch, device, repeats, args.compile))
    if args.task in ("infer", "all"):
        for batch in batch_sizes:
            results.append(benchmark_inference(network_kwargs, batch, device, repeats, args.compile))
    for result in results:
        print(json.dumps({key: round(v, 5) if isinstance(v, float) else v for key, v in result.items()}))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "network": network_kwargs, "results": results}, indent=2))


if __name__ == "__main__":
    main()
