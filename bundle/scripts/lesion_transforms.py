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
"""Transforms of the few-case recipe: what the ROI crop's margin says about the lesion, and phase-wise augmentation.

Every lesion ROI of the classification layout is the lesion box grown by ``ROI_MARGIN`` (LLD-MMRI's 16 voxels
in-plane, 2 slices), so the crop itself tells where the lesion is and what the liver around it looks like:

- :class:`LiverRatioNormalize` (``liver_ratio`` in the configs): each phase as the log ratio to the liver around
  the lesion (:func:`~scripts.roi.liver_reference_level`, the reference level of the radiomics baseline) instead of
  a per-crop z-score, so that "brighter than liver" means the same in every case;
- :class:`CropLesionMargin` (``lesion_margin``): a tighter crop, the box grown by a few voxels, so a small lesion
  fills more of the network's input grid;
- :class:`LesionBoxMask` (``lesion_box_channel``): one more input channel, 1 inside the lesion box.

These run before the resize, on every phase key (training, where each phase has its own crop) or on the stacked
``image`` (the deploy app, where all phases share the reference grid). The random ones run on the network input and
leave channels past ``num_phases`` (the box channel) alone:

- :class:`RandPhaseIntensity`: per-phase contrast and brightness (scanner and injection timing differ per phase);
- :class:`RandPhaseShift`: a small independent shift of each phase (breath-hold misregistration left after cropping).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform, SpatialCrop, Transform
from monai.utils import TransformBackends, convert_to_tensor

from .constants import PHASES, ROI_MARGIN
from .roi import lesion_box_slices, liver_reference_level

__all__ = [
    "CropLesionMargin",
    "CropLesionMargind",
    "LesionBoxMask",
    "LesionBoxMaskd",
    "LiverRatioNormalize",
    "LiverRatioNormalized",
    "RandPhaseIntensityd",
    "RandPhaseShiftd",
]

#: Lowest ratio to the liver kept by :class:`LiverRatioNormalize` (log 0.01 = -4.6): zero padding and signal voids.
_MIN_RATIO = 0.01


def _check_margin(margin: Sequence[int], name: str = "margin") -> tuple[int, int, int]:
    if len(margin) != 3 or any(int(m) < 0 for m in margin):
        raise ValueError(f"{name} must be 3 non-negative integers (x, y, z), got {tuple(margin)}.")
    return int(margin[0]), int(margin[1]), int(margin[2])


class LiverRatioNormalize(Transform):
    """Each channel of a lesion ROI crop as ``log(voxel / liver level)``, the level measured on that channel's margin.

    Args:
        margin: the margin the crop was cut with, default ``ROI_MARGIN`` (16, 16, 2).

    Raises:
        ValueError: for a margin that is not 3 non-negative integers.

    Example:
        >>> import torch
        >>> crop = torch.full((1, 40, 40, 6), 100.0)
        >>> crop[:, 16:24, 16:24, 2:4] = 200.0
        >>> out = LiverRatioNormalize()(crop)
        >>> round(float(out[0, 20, 20, 3]), 4), round(float(out[0, 0, 0, 0]), 4)
        (0.6931, 0.0)
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, margin: Sequence[int] = ROI_MARGIN) -> None:
        self.margin = _check_margin(margin)

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        """
        Args:
            img: channel-first crop ``[C, X, Y, Z]``.

        Returns:
            float32 ``[C, X, Y, Z]`` (a ``MetaTensor`` stays one).
        """
        img = convert_to_tensor(img, track_meta=True)
        values = img.detach().cpu().numpy()
        levels = [liver_reference_level(channel, self.margin)[0] for channel in values]
        level = torch.as_tensor(levels, dtype=torch.float32, device=img.device).reshape(-1, 1, 1, 1)
        return torch.log(torch.clamp(img.float() / level, min=_MIN_RATIO))


class CropLesionMargin(Transform):
    """Cut a lesion ROI crop down to the lesion box grown by ``keep`` voxels (from the ``margin`` it was cut with).

    Args:
        keep: margin kept around the box along (x, y, z), default (4, 4, 1).
        margin: the margin the crop was cut with, default ``ROI_MARGIN``.

    Raises:
        ValueError: for margins that are not 3 non-negative integers, or ``keep`` larger than ``margin``.
    """

    backend = SpatialCrop.backend

    def __init__(self, keep: Sequence[int] = (4, 4, 1), margin: Sequence[int] = ROI_MARGIN) -> None:
        self.keep = _check_margin(keep, "keep")
        self.margin = _check_margin(margin)
        if any(k > m for k, m in zip(self.keep, self.margin)):
            raise ValueError(f"keep {self.keep} must not exceed the crop's margin {self.margin}.")

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Crop ``[C, X, Y, Z]``; an axis too short to hold the margin (clipped at the volume border) stays whole."""
        box = lesion_box_slices(img.shape[1:], self.margin)
        size = [int(s) for s in img.shape[1:]]
        slices = [
            slice(max(b.start - k, 0), min(b.stop + k, n)) if b != slice(0, n) else slice(0, n)
            for b, k, n in zip(box, self.keep, size)
        ]
        return SpatialCrop(roi_slices=slices)(img)


class LesionBoxMask(Transform):
    """A one-channel mask of the lesion box inside a lesion ROI crop (1 inside, 0 in the margin).

    Args:
        margin: the margin around the box in the crop, default ``ROI_MARGIN`` (after :class:`CropLesionMargin`:
            its ``keep``).

    Raises:
        ValueError: for a margin that is not 3 non-negative integers.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, margin: Sequence[int] = ROI_MARGIN) -> None:
        self.margin = _check_margin(margin)

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        """The mask ``[1, X, Y, Z]`` (float32, with ``img``'s metadata) of a crop ``[C, X, Y, Z]``."""
        img = convert_to_tensor(img, track_meta=True)
        mask = torch.zeros_like(img[:1], dtype=torch.float32)
        mask[(slice(None), *lesion_box_slices(img.shape[1:], self.margin))] = 1.0
        return mask


class _KeyWise(MapTransform):
    """Apply ``self.transform`` to every key (the dictionary wrappers below)."""

    transform: Transform

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class LiverRatioNormalized(_KeyWise):
    """Dictionary-based :class:`LiverRatioNormalize`.

    Args:
        keys: keys of the crops (each phase key, or the stacked ``image``).
        margin: see :class:`LiverRatioNormalize`.
        allow_missing_keys: don't raise when a key is missing, defaults to False.
    """

    backend = LiverRatioNormalize.backend

    def __init__(self, keys: KeysCollection, margin: Sequence[int] = ROI_MARGIN, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = LiverRatioNormalize(margin)


class CropLesionMargind(_KeyWise):
    """Dictionary-based :class:`CropLesionMargin`.

    Args:
        keys: keys of the crops.
        keep: see :class:`CropLesionMargin`.
        margin: see :class:`CropLesionMargin`.
        allow_missing_keys: don't raise when a key is missing, defaults to False.
    """

    backend = CropLesionMargin.backend

    def __init__(
        self,
        keys: KeysCollection,
        keep: Sequence[int] = (4, 4, 1),
        margin: Sequence[int] = ROI_MARGIN,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = CropLesionMargin(keep, margin)


class LesionBoxMaskd(MapTransform):
    """Dictionary-based :class:`LesionBoxMask`: the mask of ``keys``' (first present) crop stored under ``name``.

    Args:
        keys: key of the crop whose geometry gives the box (the reference phase ``C+A``, or ``image``).
        name: key of the mask, defaults to ``"box"``.
        margin: see :class:`LesionBoxMask`.
        allow_missing_keys: don't raise when a key is missing, defaults to False.
    """

    backend = LesionBoxMask.backend

    def __init__(
        self,
        keys: KeysCollection,
        name: str = "box",
        margin: Sequence[int] = ROI_MARGIN,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.name = name
        self.transform = LesionBoxMask(margin)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.name] = self.transform(d[key])
            break
        return d


class _RandPhaseTransformd(RandomizableTransform, MapTransform):
    """A random transform drawn per phase channel; channels from ``num_phases`` on pass through unchanged."""

    backend = [TransformBackends.TORCH]

    def __init__(self, keys: KeysCollection, prob: float, num_phases: int, allow_missing_keys: bool) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if num_phases < 1:
            raise ValueError(f"num_phases must be >= 1, got {num_phases}.")
        self.num_phases = int(num_phases)

    def apply(self, img: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.apply(convert_to_tensor(d[key], track_meta=isinstance(d[key], torch.Tensor)))
        return d


class RandPhaseIntensityd(_RandPhaseTransformd):
    """Per-phase contrast and brightness: phase ``c`` becomes ``x * (1 + a_c) + b_c``, ``a_c ~ U(-scale, scale)``,
    ``b_c ~ U(-shift, shift)``, drawn independently for each phase (MONAI's ``RandScaleIntensity`` and
    ``RandShiftIntensity`` draw one value for all channels, or act on the box channel too).

    Args:
        keys: key of the network input, e.g. ``"image"``.
        scale: half-range of the relative contrast change, default 0.1.
        shift: half-range of the added offset (in the input's units: z-score or log ratio), default 0.1.
        prob: probability of changing a sample, default 0.5.
        num_phases: leading channels that are phases, default 8.
        allow_missing_keys: don't raise when a key is missing, defaults to False.

    Raises:
        ValueError: for a negative ``scale`` or ``shift``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        scale: float = 0.1,
        shift: float = 0.1,
        prob: float = 0.5,
        num_phases: int = len(PHASES),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, num_phases, allow_missing_keys)
        if scale < 0 or shift < 0:
            raise ValueError(f"scale and shift must be >= 0, got {scale} and {shift}.")
        self.scale = float(scale)
        self.shift = float(shift)

    def apply(self, img: torch.Tensor) -> torch.Tensor:
        n = min(self.num_phases, img.shape[0])
        factors = 1.0 + self.R.uniform(-self.scale, self.scale, n)
        offsets = self.R.uniform(-self.shift, self.shift, n)
        out = img.clone()
        shape = (n,) + (1,) * (img.ndim - 1)
        factors_t = torch.as_tensor(factors, dtype=img.dtype, device=img.device).reshape(shape)
        offsets_t = torch.as_tensor(offsets, dtype=img.dtype, device=img.device).reshape(shape)
        out[:n] = img[:n] * factors_t + offsets_t
        return out


class RandPhaseShiftd(_RandPhaseTransformd):
    """Shift each phase on its own by a whole number of voxels (edge voxels repeated), as phases acquired in separate
    breath-holds stay a little misregistered after cropping.

    Args:
        keys: key of the network input, e.g. ``"image"``.
        max_shift: largest shift along (x, y, z) in voxels of the network input, default (1, 1, 0).
        prob: probability of shifting a sample's phases, default 0.5.
        num_phases: leading channels that are phases, default 8.
        allow_missing_keys: don't raise when a key is missing, defaults to False.

    Raises:
        ValueError: for a ``max_shift`` that is not 3 non-negative integers.
    """

    def __init__(
        self,
        keys: KeysCollection,
        max_shift: Sequence[int] = (1, 1, 0),
        prob: float = 0.5,
        num_phases: int = len(PHASES),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, num_phases, allow_missing_keys)
        self.max_shift = _check_margin(max_shift, "max_shift")

    def apply(self, img: torch.Tensor) -> torch.Tensor:
        n = min(self.num_phases, img.shape[0])
        shifts = np.stack([self.R.randint(-m, m + 1, n) for m in self.max_shift], axis=1)
        out = img.clone()
        for c in range(n):
            channel = img[c]
            for axis, s in enumerate(shifts[c].tolist()):
                if s:
                    size = channel.shape[axis]
                    index = torch.clamp(torch.arange(size, device=img.device) - s, 0, size - 1)
                    channel = channel.index_select(axis, index)
            out[c] = channel
        return out
