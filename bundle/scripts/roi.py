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
"""Lesion ROI cropping with the LLD-MMRI margins: the one implementation shared by the synthetic generator,
the LLD-MMRI adapter and the deploy app.

Boxes are half-open voxel indices ``(x0, y0, z0, x1, y1, z1)`` on the array axes ``[X, Y, Z]`` of a channel-first
volume ``[C, X, Y, Z]`` (ITK index order, as MONAI ``LoadImage`` returns NIfTI and DICOM volumes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .constants import ROI_MARGIN

__all__ = [
    "Box",
    "box_from_mask",
    "check_box",
    "crop_lesion_roi",
    "lesion_box_slices",
    "liver_reference_level",
    "roi_slices",
]

#: Half-open voxel box ``(x0, y0, z0, x1, y1, z1)``.
Box = tuple[int, int, int, int, int, int]


def check_box(box: Sequence[int], spatial_shape: Sequence[int]) -> Box:
    """Validate a lesion box against a volume and return it as a tuple of ints.

    Args:
        box: half-open voxel indices ``(x0, y0, z0, x1, y1, z1)``.
        spatial_shape: ``(X, Y, Z)`` of the volume.

    Returns:
        The box as a tuple of six Python ints.

    Raises:
        ValueError: when the box does not have six integer entries, is empty along an axis, or does not lie
            inside the volume (``0 <= lo < hi <= size`` on every axis).
    """
    if len(box) != 6:
        raise ValueError(f"box must have 6 entries (x0, y0, z0, x1, y1, z1), got {tuple(box)}.")
    if len(spatial_shape) != 3:
        raise ValueError(f"spatial_shape must have 3 entries (X, Y, Z), got {tuple(spatial_shape)}.")
    values = []
    for value in box:
        if isinstance(value, (bool, np.bool_)) or float(value) != int(value):
            raise ValueError(f"box entries must be integers, got {tuple(box)}.")
        values.append(int(value))
    out: Box = tuple(values)  # type: ignore[assignment]
    for axis, name in enumerate("xyz"):
        lo, hi, size = out[axis], out[axis + 3], int(spatial_shape[axis])
        if not lo < hi:
            raise ValueError(f"box is empty along {name}: {name}0={lo} must be < {name}1={hi} (box {out}).")
        if lo < 0 or hi > size:
            raise ValueError(
                f"box {out} lies outside the volume of shape {tuple(int(s) for s in spatial_shape)}: "
                f"{name} range [{lo}, {hi}) is not inside [0, {size})."
            )
    return out


def roi_slices(
    box: Sequence[int], spatial_shape: Sequence[int], margin: Sequence[int] = ROI_MARGIN
) -> tuple[tuple[slice, slice, slice], tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
    """Slices of the ROI around ``box`` grown by ``margin`` and clipped to the volume, plus the padding
    ``((before, after),) * 3`` that would restore the full margin where the clip cut it.

    Args:
        box: half-open voxel box ``(x0, y0, z0, x1, y1, z1)``, checked with :func:`check_box`.
        spatial_shape: ``(X, Y, Z)`` of the volume.
        margin: voxels added on each side along ``(x, y, z)``; default ``ROI_MARGIN`` (16, 16, 2).

    Raises:
        ValueError: for an invalid box (see :func:`check_box`) or a negative margin.
    """
    box = check_box(box, spatial_shape)
    if len(margin) != 3 or any(int(m) < 0 for m in margin):
        raise ValueError(f"margin must be 3 non-negative integers (x, y, z), got {tuple(margin)}.")
    slices = []
    pads = []
    for axis in range(3):
        lo = box[axis] - int(margin[axis])
        hi = box[axis + 3] + int(margin[axis])
        size = int(spatial_shape[axis])
        slices.append(slice(max(lo, 0), min(hi, size)))
        pads.append((max(-lo, 0), max(hi - size, 0)))
    return (slices[0], slices[1], slices[2]), (pads[0], pads[1], pads[2])


def crop_lesion_roi(
    image: Any, box: Sequence[int], margin: Sequence[int] = ROI_MARGIN, pad_in_plane: bool = False
) -> Any:
    """Crop the lesion ROI: the box grown by ``margin`` voxels on each side, clipped at the volume border.

    LLD-MMRI2023 (``main/preprocess/crop_roi.py`` of LMMMEng/LLD-MMRI2023) grows the box by 16 voxels in-plane
    and 2 slices, clips the slices and zero-pads the in-plane margin where it leaves the volume; set
    ``pad_in_plane=True`` to reproduce that padding exactly.

    Args:
        image: ``[C, X, Y, Z]`` (or ``[X, Y, Z]``) numpy array or torch tensor (MetaTensor included).
        box: half-open voxel box ``(x0, y0, z0, x1, y1, z1)`` on the spatial axes.
        margin: voxels added on each side along ``(x, y, z)``; default ``ROI_MARGIN`` (16, 16, 2).
        pad_in_plane: zero-pad the x/y margin that falls outside the volume instead of clipping it; default False.

    Returns:
        The cropped array, same type and channel layout as ``image``.

    Raises:
        ValueError: when ``image`` is not 3D/4D, or the box is invalid or outside the volume.
    """
    ndim = len(image.shape)
    if ndim not in (3, 4):
        raise ValueError(f"image must be [C, X, Y, Z] or [X, Y, Z], got shape {tuple(image.shape)}.")
    spatial = tuple(int(s) for s in image.shape[-3:])
    (sx, sy, sz), pads = roi_slices(box, spatial, margin)
    roi = image[..., sx, sy, sz]
    if pad_in_plane and any(p for axis in pads[:2] for p in axis):
        if isinstance(roi, np.ndarray):
            widths = [(0, 0)] * (ndim - 3) + [pads[0], pads[1], (0, 0)]
            roi = np.pad(roi, widths, mode="constant")
        else:  # torch tensor: F.pad takes (last_before, last_after, ...) from the last axis backwards
            import torch.nn.functional as F

            roi = F.pad(roi, (0, 0, pads[1][0], pads[1][1], pads[0][0], pads[0][1]), mode="constant", value=0)
    return roi


def box_from_mask(mask: np.ndarray) -> Box:
    """Half-open bounding box ``(x0, y0, z0, x1, y1, z1)`` of the non-zero voxels of a 3D mask.

    Raises:
        ValueError: when the mask is not 3D or is empty.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D [X, Y, Z], got shape {mask.shape}.")
    nz = np.nonzero(mask)
    if len(nz[0]) == 0:
        raise ValueError("mask is empty: no lesion voxel to box.")
    lo = [int(a.min()) for a in nz]
    hi = [int(a.max()) + 1 for a in nz]
    return (lo[0], lo[1], lo[2], hi[0], hi[1], hi[2])


def lesion_box_slices(spatial_shape: Sequence[int], margin: Sequence[int] = ROI_MARGIN) -> tuple[slice, slice, slice]:
    """Where the lesion box lies inside a ROI crop: the crop minus ``margin`` on each side (the inverse of
    :func:`crop_lesion_roi`); along an axis too short to hold twice the margin (a crop clipped at the volume border),
    the whole axis.

    Args:
        spatial_shape: ``(X, Y, Z)`` of the crop.
        margin: the margin the crop was cut with, default ``ROI_MARGIN`` (16, 16, 2).

    Returns:
        three slices on the crop's spatial axes.

    Raises:
        ValueError: when ``spatial_shape`` or ``margin`` does not have 3 entries.
    """
    if len(spatial_shape) != 3 or len(margin) != 3:
        raise ValueError(f"spatial_shape and margin need 3 entries, got {tuple(spatial_shape)} and {tuple(margin)}.")
    return tuple(  # type: ignore[return-value]
        slice(int(m), int(s) - int(m)) if int(s) > 2 * int(m) else slice(0, int(s))
        for s, m in zip(spatial_shape, margin)
    )


def liver_reference_level(crop: np.ndarray, margin: Sequence[int] = ROI_MARGIN) -> tuple[float, np.ndarray]:
    """The signal level of the tissue around a lesion in one phase's ROI crop ``[X, Y, Z]``: the median of the outer
    in-plane ring of the margin (half its width, mostly liver; a capsule or halo next to the lesion is left out) on
    the lesion's slices, zero voxels (padding outside the image) excluded.

    Args:
        crop: one phase's crop ``[X, Y, Z]``, as cut by :func:`crop_lesion_roi` with ``margin``.
        margin: the margin the crop was cut with, default ``ROI_MARGIN``.

    Returns:
        ``(level, ring)``: the level (at least 1e-3; 1 when the ring is empty) and the ring's voxel values.
    """
    a = np.asarray(crop, dtype=np.float64)
    zs = lesion_box_slices(a.shape, margin)[2]
    ring_mask = np.ones(a.shape[:2], dtype=bool)
    half = [max(int(m) // 2, 1) for m in margin[:2]]
    ring_mask[half[0] : a.shape[0] - half[0], half[1] : a.shape[1] - half[1]] = False
    ring = a[:, :, zs][ring_mask]
    ring = ring[ring > 0] if (ring > 0).any() else ring  # zero padding outside the image is not tissue
    return max(float(np.median(ring)) if ring.size else 1.0, 1e-3), ring
