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
"""Parameters and forward GFLOP per sample of LCA-DB, counted by torch.utils.flop_counter on the meta device.

python benchmarks/model_size.py --depth 10 --widen_factor 1.0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
from scripts.network import LCADB, STEMS  # noqa: E402

__all__ = ["count"]


def count(stem: str, **network_kwargs) -> tuple[int, float]:
    """(parameters, forward GFLOP for one sample) of ``LCADB(stem=stem, **network_kwargs)``."""
    with torch.device("meta"):
        network = LCADB(stem=stem, **network_kwargs).eval()
        x = torch.empty(1, network.in_channels, *network.roi_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        network(x)
    return sum(p.numel() for p in network.parameters()), counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--widen_factor", type=float, default=1.0)
    parser.add_argument("--roi_size", type=int, nargs=3, default=(128, 128, 16))
    args = parser.parse_args()
    print("| stem | parameters | forward GFLOP / sample |")
    print("|---|---|---|")
    for stem in STEMS:
        params, gflop = count(stem, depth=args.depth, widen_factor=args.widen_factor, roi_size=args.roi_size)
        print(f"| {stem} | {params / 1e6:.2f} M | {gflop:.1f} |")


if __name__ == "__main__":
    main()
