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
from collections.abc import Iterator, Sequence

import torch

__all__ = [
    "FULL_RESOLUTION_MODULES",
    "cpu_supports_fast_bfloat16",
    "freeze_for_cpu_export",
    "freeze_for_cpu_inference",
    "gpu_autocast",
    "to_channels_last",
]


#: The IA-Net stem and stage 1 run at full resolution and cost about 3/4 of LCA-DB's FLOPs. They form a chain
#: (the stem's output is stage 1's input), see ``chain_bfloat16`` of :func:`freeze_for_cpu_export`.
FULL_RESOLUTION_MODULES = ("image_branch.stem", "image_branch.stages.0")


class _BFloat16Autocast(torch.nn.Module):
    """Runs the wrapped module under CPU bf16 autocast (fp32 accumulation) and hands fp32 on, or the bf16 output
    when ``float_output`` is False (for a next module that runs in bf16 too)."""

    def __init__(self, module: torch.nn.Module, float_output: bool = True) -> None:
        super().__init__()
        self.module = module
        self.float_output = float_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.module(x)
        return y.float() if self.float_output else y


def cpu_supports_fast_bfloat16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def freeze_for_cpu_export(
    model: torch.nn.Module, example: torch.Tensor, bfloat16_modules: Sequence[str] = (), chain_bfloat16: bool = False
) -> torch.jit.ScriptModule:
    """A frozen TorchScript copy of ``model`` for CPU inference that ``torch.jit.save`` can write.

    The model is traced with ``example`` (unless it is a ``ScriptModule`` already) and ``torch.jit.freeze``
    inlines its weights and attributes as constants and folds BatchNorm into the convolutions. Submodules named
    in ``bfloat16_modules`` run in bf16 with fp32 accumulation (:class:`_BFloat16Autocast`): for LCA-DB,
    :data:`FULL_RESOLUTION_MODULES` (chained) move the probabilities by about 1e-4 and make a lesion 1.5x to 2x
    faster on 2 cores (deploy_app/README.md, Benchmark). This is what ``python -m scripts.export_cpu`` saves;
    :func:`freeze_for_cpu_inference` adds the oneDNN passes of ``torch.jit.optimize_for_inference`` for use in
    the same process.

    Args:
        model: an ``nn.Module`` (traced with ``example``) or a ``ScriptModule`` (e.g. the bundle's exported
            ``model.ts``, which cannot take ``bfloat16_modules``); it is not modified.
        example: one input batch on the CPU, used for tracing.
        bfloat16_modules: dotted names of submodules to run in bf16; ignored (fp32 kept) when
            :func:`cpu_supports_fast_bfloat16` is False.
        chain_bfloat16: the modules run in the given order, each taking the previous one's output (as
            :data:`FULL_RESOLUTION_MODULES` do): the activations between them stay in bf16 and only the last
            output is converted to fp32. For LCA-DB this saves an fp32 round trip of the 512-channel
            full-resolution stem output, about 15 % of the time per lesion. Defaults to False (each output fp32).

    Returns:
        the frozen module, in eval mode on the CPU; a frozen module has no ``state_dict``.

    Raises:
        TypeError: when ``bfloat16_modules`` is given with a ``ScriptModule``.
        ValueError: when a name in ``bfloat16_modules`` is not a submodule of ``model``.
    """
    if bfloat16_modules and isinstance(model, torch.jit.ScriptModule):
        raise TypeError('Argument "bfloat16_modules" needs an nn.Module, got a ScriptModule.')
    model = copy.deepcopy(model).eval().cpu()
    if cpu_supports_fast_bfloat16():
        for index, name in enumerate(bfloat16_modules):
            parent_name, _, child = name.rpartition(".")
            try:
                parent = model.get_submodule(parent_name)
                module = parent.get_submodule(child)
            except AttributeError as error:
                raise ValueError(f"{name!r} is not a submodule of {type(model).__name__}.") from error
            last = index == len(bfloat16_modules) - 1
            setattr(parent, child, _BFloat16Autocast(module, float_output=last or not chain_bfloat16))
    with torch.no_grad():
        scripted = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.trace(model, example)
        return torch.jit.freeze(scripted.eval())


def freeze_for_cpu_inference(
    model: torch.nn.Module, example: torch.Tensor, bfloat16_modules: Sequence[str] = (), chain_bfloat16: bool = False
) -> torch.jit.ScriptModule:
    """A frozen TorchScript copy of ``model`` for CPU inference in this process, with BatchNorm folded into the
    convolutions.

    :func:`freeze_for_cpu_export`, then ``torch.jit.optimize_for_inference``, which picks oneDNN kernels (its
    graph cannot be saved), and one call on ``example`` to specialise the graph. Freezing costs about two forwards:
    for a process that classifies a few lesions and exits, export the frozen graph instead
    (``python -m scripts.export_cpu``).

    Args:
        model: an ``nn.Module`` (traced with ``example``) or a ``ScriptModule``; it is not modified.
        example: one input batch on the CPU, used for tracing and to warm the optimised graph up.
        bfloat16_modules: see :func:`freeze_for_cpu_export`.
        chain_bfloat16: see :func:`freeze_for_cpu_export`.

    Returns:
        the frozen module, in eval mode on the CPU.

    Raises:
        TypeError: when ``bfloat16_modules`` is given with a ``ScriptModule``.
        ValueError: when a name in ``bfloat16_modules`` is not a submodule of ``model``.
    """
    frozen = freeze_for_cpu_export(model, example, bfloat16_modules, chain_bfloat16)
    with torch.no_grad():
        frozen = torch.jit.optimize_for_inference(frozen)
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
