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
"""MONAI's fast-training recipe for the bundle (Project-MONAI/tutorials ``acceleration/fast_training_tutorial.ipynb``).

With ``augment_on_device`` set (``bundle/configs/fast_train.json`` sets it), the training data path becomes:

1. ``CacheDataset`` runs the deterministic transforms once per case and caches the result as a plain tensor on
   the training device (``EnsureTyped(track_meta=False)`` then ``ToDeviced``), with ``copy_cache=False``: the
   random transforms never modify the cached tensor in place.
2. ``ThreadDataLoader`` (no worker processes) runs the random rotation and flip on that device, inside
   :class:`ComposeWithoutMeta`, the tutorial's ``set_track_meta(False)`` limited to these transforms.
3. The trainer runs with bf16 AMP, ``channels_last_3d`` and optionally ``torch.compile`` (keys ``amp``,
   ``channels_last``, ``torch_compile``; each only takes effect on CUDA).

Without the key (the default of ``train.json``) the CPU worker path is unchanged.
"""

from __future__ import annotations

from typing import Any

from monai.data import get_track_meta, set_track_meta
from monai.transforms import Compose

__all__ = ["ComposeWithoutMeta"]


class ComposeWithoutMeta(Compose):
    """``Compose`` whose transforms run with MONAI's metadata tracking switched off: plain tensors in and out.

    MONAI transforms turn a plain tensor into a ``MetaTensor`` (affine, applied-operation list) while tracking is on;
    on a training batch nothing reads that metadata, and building it costs about 1/3 of the host time of the random
    rotation and flip (2.6 instead of 1.8 ms per sample with both applied, paper ROI, host work alone on the
    ``meta`` device). The fast-training tutorial switches tracking off for the
    whole process once the caches are built; here it is switched off only while these transforms run and restored
    afterwards, so caching, validation and the writers of other workflows keep their metadata. The flag is
    process-wide: while a loader thread runs these transforms, MONAI operations in other threads also return plain
    tensors (the trainer's post-processing then gets plain tensors, which it handles alike).

    Same arguments as :class:`monai.transforms.Compose`; randomness (``set_random_state``, worker seeding) is
    inherited, so ``CacheDataset`` caches everything before this transform and runs it for every sample.

    Example:
        >>> import torch
        >>> from monai.transforms import RandFlipd
        >>> out = ComposeWithoutMeta([RandFlipd(keys="image", prob=1.0)])({"image": torch.zeros(1, 4, 4, 2)})
        >>> type(out["image"]).__name__
        'Tensor'
    """

    def __call__(
        self, input_: Any, start: int = 0, end: int | None = None, threading: bool = False, lazy: bool | None = None
    ) -> Any:
        previous = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        finally:
            set_track_meta(previous)
