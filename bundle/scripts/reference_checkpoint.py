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
"""Load checkpoints written by the authors' research code into :class:`~.network.LCADB`."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from .network import LCADB

__all__ = ["load_reference_state_dict", "lcadb_to_reference_key", "reference_to_lcadb_key"]

# The reference names its modules flat (``layer2_compose``, ``bn5``); ours nest them by branch.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("conv1_patch_com.", "patch_branch.stem.conv."),
    ("bn1_patch_com.", "patch_branch.stem.norm."),
    *((f"layer{stage}_patch_com.", f"patch_branch.stages.{stage - 1}.") for stage in range(1, 5)),
    ("conv1_compose.", "image_branch.stem.conv."),
    ("bn1_compose.", "image_branch.stem.norm."),
    *((f"layer{stage}_compose.", f"image_branch.stages.{stage - 1}.") for stage in range(1, 5)),
    ("conv5.", "image_branch.head.0.conv."),
    ("bn5.", "image_branch.head.0.norm."),
    ("conv6.", "image_branch.head.1.conv."),
    ("bn6.", "image_branch.head.1.norm."),
    ("linear1.", "classifier_ia."),
    ("linear2.", "classifier_pa."),
    ("bag_classifier.", "bag_classifier."),
)


def _swap_prefix(name: str, reverse: bool) -> str | None:
    for reference, ours in _PREFIXES:
        old, new = (ours, reference) if reverse else (reference, ours)
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def reference_to_lcadb_key(name: str) -> str | None:
    """The :class:`LCADB` ``state_dict`` name of a reference name, or None when the name is not the reference's."""
    return _swap_prefix(name, reverse=False)


def lcadb_to_reference_key(name: str) -> str | None:
    """The reference name of an :class:`LCADB` ``state_dict`` name, or None when the reference has no such module."""
    return _swap_prefix(name, reverse=True)


def _read_state_dict(checkpoint_or_state_dict: str | os.PathLike | Mapping) -> tuple[Mapping, str]:
    if isinstance(checkpoint_or_state_dict, Mapping):
        source, checkpoint = "the given state dict", checkpoint_or_state_dict
    else:
        source = os.fspath(checkpoint_or_state_dict)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"reference checkpoint {source} does not exist.")
        try:
            checkpoint = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot read reference checkpoint {source}: {error}") from error
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        checkpoint = checkpoint["model"]
    if not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise ValueError(
            f"{source} is neither a state dict nor a checkpoint with a 'model' state dict "
            f"(top-level keys: {sorted(map(str, checkpoint))[:10]})."
        )
    return checkpoint, source


def load_reference_state_dict(checkpoint_or_state_dict: str | os.PathLike | Mapping, **network_kwargs) -> LCADB:
    """Build an :class:`LCADB` holding the weights of a checkpoint written by the authors' code.

    Args:
        checkpoint_or_state_dict: path of a reference checkpoint (``{'model': state_dict, 'epoch', ...}``,
            read with ``torch.load(weights_only=True)``), such a checkpoint already loaded, or a bare
            state dict, with the reference's parameter names.
        network_kwargs: :class:`LCADB` arguments matching the checkpoint, e.g. ``depth=18, widen_factor=0.125``.
            ``stem`` must stay "reference".

    Returns:
        the network in eval mode, on the CPU.

    Raises:
        FileNotFoundError: when the path does not exist.
        ValueError: when the file cannot be read, or names are missing, unexpected or mis-shaped
            (all of them are listed).

    Example:
        >>> net = load_reference_state_dict("best_model.pth", depth=10, widen_factor=1.0)  # doctest: +SKIP
    """
    if network_kwargs.get("stem", "reference") != "reference":
        raise ValueError(f"reference checkpoints need stem='reference', got stem={network_kwargs['stem']!r}.")
    state_dict, source = _read_state_dict(checkpoint_or_state_dict)
    network = LCADB(**network_kwargs)
    expected = network.state_dict()

    renamed: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, value in state_dict.items():
        target = reference_to_lcadb_key(name)
        if target is None or target not in expected:
            unexpected.append(name)
        else:
            renamed[target] = value
    missing = [lcadb_to_reference_key(name) or name for name in expected if name not in renamed]
    mis_shaped = [
        f"{lcadb_to_reference_key(name)}: checkpoint {list(value.shape)}, network {list(expected[name].shape)}"
        for name, value in renamed.items()
        if value.shape != expected[name].shape
    ]
    if missing or unexpected or mis_shaped:
        problems = [
            f"{title} ({len(names)}): {', '.join(names)}"
            for title, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
            if names
        ]
        raise ValueError(
            f"{source} does not match LCADB({', '.join(f'{k}={v!r}' for k, v in network_kwargs.items())}): "
            + "; ".join(problems)
        )
    network.load_state_dict(renamed, strict=True)
    return network.eval()
