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
"""Loading a checkpoint into the bundle's network with an error that says which config fits it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.handlers import CheckpointLoader

__all__ = ["FittingCheckpointLoader", "fitting_configs", "mismatch_message"]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: Network presets a checkpoint may come from: config files merged on top of ``inference.json``.
PRESETS: dict[str, tuple[str, ...]] = {
    "configs/inference.json (the shipped weights)": (),
    "configs/cpu_light.json": ("cpu_light.json",),
    "configs/paper_size.json (train.json's defaults)": ("paper_size.json",),
}


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def fitting_configs(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The presets of :data:`PRESETS` whose network has exactly the tensors (names and shapes) of ``state_dict``."""
    wanted = _shapes(state_dict)
    fits = []
    for name, extra in PRESETS.items():
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "inference.json"), *(str(CONFIGS / f) for f in extra)])
        network = parser.get_parsed_content("network_def")
        if _shapes(network.state_dict()) == wanted:
            fits.append(name)
    return fits


def mismatch_message(
    path: str | os.PathLike, network_state: Mapping[str, torch.Tensor], checkpoint_state: Mapping[str, torch.Tensor]
) -> str | None:
    """None when ``checkpoint_state`` has the tensor shapes of ``network_state``; else a message naming the file,
    the first differing tensors and the config of this bundle that fits the checkpoint (if any)."""
    ours, theirs = _shapes(network_state), _shapes(checkpoint_state)
    diffs = [f"{k}: checkpoint {theirs.get(k)}, network {ours.get(k)}" for k in ours if ours[k] != theirs.get(k)]
    if not diffs:
        return None
    fits = fitting_configs(checkpoint_state)
    hint = (
        f'it fits {" and ".join(fits)}: merge that config file after the others (--config_file "[..., '
        f"'configs/<file>']\")"
        if fits
        else "no config of this bundle fits it: set roi_size, patch_size and network_def#depth/widen_factor/stem "
        "to the values it was trained with"
    )
    return (
        f"checkpoint {os.fspath(path)} does not fit the network this config builds "
        f"({len(diffs)} tensors differ, e.g. {'; '.join(diffs[:3])}); {hint}"
    )


class FittingCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` that, when the network does not fit the checkpoint, says which config does.

    A checkpoint trained with another network size (e.g. ``train.json``'s paper-size defaults, or
    ``cpu_light.json``) fails with ``ValueError`` naming the file, the first mismatching tensors and the
    config to merge, instead of PyTorch's bare "size mismatch". Arguments as ``monai.handlers.CheckpointLoader``.
    """

    def __call__(self, engine) -> None:
        try:
            super().__call__(engine)
        except RuntimeError as error:
            if "size mismatch" not in str(error) and "Missing key" not in str(error):
                raise
            raise ValueError(self._explain(error)) from error

    def _explain(self, error: RuntimeError) -> str:
        checkpoint = torch.load(self.load_path, map_location="cpu", weights_only=True)
        keys = list(self.load_dict)
        state = checkpoint[keys[0]] if len(keys) == 1 and keys[0] in checkpoint else checkpoint
        message = mismatch_message(self.load_path, self.load_dict[keys[0]].state_dict(), state)
        message = message or f"checkpoint {os.fspath(self.load_path)} does not load"
        return f"{message} ({str(error).splitlines()[0]})"
