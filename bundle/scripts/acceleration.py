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
"""Faster execution of LCA-DB without changing its results: frozen TorchScript on CPU, bf16 and channels-last on GPU."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

__all__ = ["freeze_for_cpu_inference", "gpu_autocast", "to_channels_last"]


def freeze_for_cpu_inference(model: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """A frozen TorchScript copy of ``model`` for CPU inference, with BatchNorm folded into the convolutions.

    ``torch.jit.freeze`` inlines the weights and ``torch.jit.optimize_for_inference`` folds
    conv + BN and picks oneDNN kernels; the result matches eager fp32 to rounding error.

    Args:
        model: an ``nn.Module`` (traced with ``example``) or a ``ScriptModule`` (e.g. the bundle's exported
            ``model.ts``); it is not modified.
        example: one input batch on the CPU, used for tracing and to warm the optimised graph up.

    Returns:
        the frozen module, in eval mode on the CPU.
    """
    model = copy.deepcopy(model).eval().cpu()
    with torch.no_grad():
        scripted = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.trace(model, example)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(scripted.eval()))
        frozen(example)  # the first call specialises the graph; do it here, not on the first lesion
    return frozen


def to_channels_last(tensor_or_module):
    """``channels_last_3d`` memory format for a 5-D tensor or every 5-D parameter of a module."""
    return tensor_or_module.to(memory_format=torch.channels_last_3d)


@contextlib.contextmanager
def gpu_autocast(enabled: bool, device: torch.device | str) -> Iterator[None]:
    """bf16 autocast on CUDA when ``enabled``; a no-op on the CPU, where it would change the numbers."""
    device = torch.device(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda"):
        yield
