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
"""Input checks of the LCA-DB bundle: a bad case stops the run with a message naming the case, phase and file.

:class:`CheckLesionROI` (array) and :class:`CheckLesionROId` (dictionary) run inside the transform chains;
:func:`check_case` checks a datalist entry before anything is loaded (all phases named, every file present).
"""

from __future__ import annotations

import atexit
import multiprocessing.pool
import os
import sys
import threading
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

from .constants import PHASES

__all__ = [
    "CheckLesionROI",
    "CheckLesionROId",
    "CheckLesionROID",
    "CheckLesionROIDict",
    "check_case",
    "resolve_case_paths",
]


#: Seconds to wait at exit for each cache-filling thread still running a transform.
CACHE_WORKER_EXIT_WAIT = 120.0


def _join_cache_workers() -> None:
    """Let the worker threads of MONAI's ``CacheDataset`` finish their current case before the interpreter exits.

    When a transform raises while ``CacheDataset`` fills its cache, MONAI's ``ThreadPool`` is terminated but its
    threads are not joined (``multiprocessing.pool`` joins process workers only); the error ends the run while they
    are still inside torch operations, and at interpreter shutdown such a thread aborts the process ("terminate called
    without an active exception", exit status 134) instead of the clear error and exit status 1. Only busy pool
    threads are waited for: an idle one of a pool left open waits for a task forever.
    """
    frames = sys._current_frames()
    for thread in threading.enumerate():
        if not (thread.daemon and thread.name.endswith("(worker)")) or thread is threading.current_thread():
            continue
        frame = frames.get(thread.ident)
        waiting_for_task = frame is not None and frame.f_code is multiprocessing.pool.worker.__code__
        if not waiting_for_task:
            thread.join(CACHE_WORKER_EXIT_WAIT)


atexit.register(_join_cache_workers)


def _source_of(img: NdarrayOrTensor) -> str | None:
    """The file an array was loaded from, when MONAI recorded it."""
    if isinstance(img, MetaTensor):
        source = img.meta.get("filename_or_obj")
        if source:
            return str(source)
    return None


class CheckLesionROI(Transform):
    """Stop on an array that cannot be a lesion ROI: wrong rank, wrong channel count, empty, or non-finite voxels.

    The array passes through unchanged, so the check can sit anywhere in a chain.

    Args:
        num_channels: expected number of channels (1 for a single phase, 8 for the stacked phases);
            None accepts any number, defaults to None.
        spatial_dims: number of spatial dimensions, defaults to 3.

    Raises:
        ValueError: when ``num_channels`` or ``spatial_dims`` is not positive.

    Example:
        >>> import torch
        >>> CheckLesionROI(num_channels=8)(torch.zeros(8, 4, 4, 2)).shape
        torch.Size([8, 4, 4, 2])
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, num_channels: int | None = None, spatial_dims: int = 3) -> None:
        if num_channels is not None and num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer or None, got {num_channels}.")
        if spatial_dims < 1:
            raise ValueError(f"spatial_dims must be a positive integer, got {spatial_dims}.")
        self.num_channels = num_channels
        self.spatial_dims = spatial_dims

    def __call__(self, img: NdarrayOrTensor, name: str | None = None) -> NdarrayOrTensor:
        """
        Args:
            img: channel-first array ``[C, X, Y, Z]``.
            name: what to call the input in error messages (e.g. the case and phase); defaults to the
                file it was loaded from, if known.

        Raises:
            ValueError: when the shape is wrong or a voxel is NaN or infinite; the message names the input.
        """
        source = name or _source_of(img) or "input"
        shape = tuple(img.shape)
        if len(shape) != self.spatial_dims + 1:
            raise ValueError(
                f"{source}: expected a channel-first array with {self.spatial_dims} spatial dimensions "
                f"[C, {', '.join('XYZ'[: self.spatial_dims])}], got shape {list(shape)}."
            )
        if self.num_channels is not None and shape[0] != self.num_channels:
            what = "phases (" + ", ".join(PHASES) + ")" if self.num_channels == len(PHASES) else "channels"
            raise ValueError(f"{source}: expected {self.num_channels} {what}, got {shape[0]} (shape {list(shape)}).")
        if min(shape) < 1:
            raise ValueError(f"{source}: the array is empty (shape {list(shape)}).")
        values = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        nonfinite = ~np.isfinite(values)
        if nonfinite.any():
            bad = int(nonfinite.sum())
            channels = np.flatnonzero(nonfinite.reshape(shape[0], -1).any(1)).tolist()
            raise ValueError(
                f"{source}: {bad} non-finite voxel(s) (NaN or infinite) in channel(s) {channels}; "
                "fix or exclude this case."
            )
        return img


class CheckLesionROId(MapTransform):
    """Dictionary-based wrapper of :class:`CheckLesionROI`; error messages name the case, the key and the file.

    Args:
        keys: keys of the arrays to check, e.g. the phase keys after loading, or ``"image"`` after stacking.
        num_channels: expected number of channels of every key; None accepts any, defaults to None.
        spatial_dims: number of spatial dimensions, defaults to 3.
        case_key: key holding the case name, defaults to ``"case"``.
        allow_missing_keys: don't raise when a key is missing, defaults to False.
    """

    backend = CheckLesionROI.backend

    def __init__(
        self,
        keys: KeysCollection,
        num_channels: int | None = None,
        spatial_dims: int = 3,
        case_key: str = "case",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.checker = CheckLesionROI(num_channels=num_channels, spatial_dims=spatial_dims)
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        case = d.get(self.case_key)
        for key in self.key_iterator(d):
            parts = [f"case '{case}'" if case is not None else "case", f"'{key}'"]
            source = _source_of(d[key])
            if source:
                parts.append(f"({source})")
            d[key] = self.checker(d[key], name=" ".join(parts))
        return d


CheckLesionROID = CheckLesionROIDict = CheckLesionROId


def resolve_case_paths(
    item: Mapping, base_dir: str | os.PathLike | None = None, phases: Sequence[str] = PHASES
) -> dict[str, str]:
    """The absolute file of every phase of a datalist entry.

    Args:
        item: datalist entry with one key per phase holding its file (relative to ``base_dir`` or absolute).
        base_dir: folder the relative paths are relative to; None keeps them as given.
        phases: phase keys in network channel order, defaults to ``constants.PHASES``.

    Returns:
        ``{phase: path}`` for the phases present in ``item``.
    """
    paths = {}
    for phase in phases:
        if phase in item and item[phase] is not None:
            path = Path(os.fspath(item[phase]))
            if base_dir is not None and not path.is_absolute():
                path = Path(base_dir) / path
            paths[phase] = os.path.normpath(path)
    return paths


def check_case(
    item: Mapping,
    base_dir: str | os.PathLike | None = None,
    phases: Sequence[str] = PHASES,
    num_classes: int | None = None,
    case_key: str = "case",
) -> dict[str, str]:
    """Check one datalist entry before loading it: every phase named, every file present, a valid label.

    Args:
        item: datalist entry (``{"case", "label", <phase>: path, ...}``).
        base_dir: folder the relative paths are relative to; None keeps them as given.
        phases: the phases every case must have, defaults to ``constants.PHASES`` (8).
        num_classes: when given, ``label`` (if present) must be an integer in ``[0, num_classes)``.
        case_key: key holding the case name, defaults to ``"case"``.

    Returns:
        ``{phase: absolute path}`` of the case.

    Raises:
        ValueError: when phases are missing or the label is not a valid class index.
        FileNotFoundError: when the file of a phase does not exist.
    """
    case = item.get(case_key, "<unnamed>")
    paths = resolve_case_paths(item, base_dir, phases)
    missing = [phase for phase in phases if phase not in paths]
    if missing:
        raise ValueError(
            f"case '{case}' has {len(paths)} of the {len(phases)} phases: missing {missing}. "
            f"Every case needs all of {list(phases)}."
        )
    for phase, path in paths.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"case '{case}': the file of phase '{phase}' does not exist: {path}")
    if num_classes is not None and "label" in item:
        label = item["label"]
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= int(label) < num_classes:
            raise ValueError(f"case '{case}': label must be an integer in [0, {num_classes}), got {label!r}.")
    return paths
