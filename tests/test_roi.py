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
"""Lesion ROI cropping: margins, clipping, LLD-MMRI padding, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scripts.constants import ROI_MARGIN
from scripts.roi import box_from_mask, check_box, crop_lesion_roi, roi_slices


@pytest.fixture()
def volume() -> np.ndarray:
    return np.arange(2 * 100 * 90 * 20, dtype=np.float32).reshape(2, 100, 90, 20)


def reference_crop(image_zyx: np.ndarray, box: dict, xy_extension: int = 16, z_extension: int = 2) -> np.ndarray:
    """LLD-MMRI2023 main/preprocess/crop_roi.py, transcribed for one lesion of a SimpleITK array [z, y, x]."""
    x_min, y_min, z_min = box["x_min"], box["y_min"], box["z_min"]
    x_max, y_max, z_max = box["x_max"], box["y_max"], box["z_max"]
    shape = image_zyx.shape
    xpl = abs(x_min - xy_extension) if x_min - xy_extension < 0 else 0
    ypl = abs(y_min - xy_extension) if y_min - xy_extension < 0 else 0
    xph = abs(x_max + xy_extension - shape[2]) if x_max + xy_extension > shape[2] else 0
    yph = abs(y_max + xy_extension - shape[1]) if y_max + xy_extension > shape[1] else 0
    x_min, y_min = max(x_min - xy_extension, 0), max(y_min - xy_extension, 0)
    x_max, y_max = min(x_max + xy_extension, shape[2]), min(y_max + xy_extension, shape[1])
    z_min, z_max = max(z_min - z_extension, 0), min(z_max + z_extension, shape[0])
    roi = image_zyx[z_min : z_max + 1, y_min:y_max, x_min:x_max]
    return np.pad(roi, ((0, 0), (ypl, yph), (xpl, xph)), "constant")


def test_crop_inside_adds_margin(volume):
    box = (40, 30, 5, 50, 45, 9)
    roi = crop_lesion_roi(volume, box)
    assert ROI_MARGIN == (16, 16, 2)
    assert roi.shape == (2, 10 + 32, 15 + 32, 4 + 4)
    np.testing.assert_array_equal(roi, volume[:, 24:66, 14:61, 3:11])


def test_crop_clips_at_border(volume):
    roi = crop_lesion_roi(volume, (2, 80, 0, 10, 90, 3))
    assert roi.shape == (2, 26, 26, 5)
    np.testing.assert_array_equal(roi, volume[:, 0:26, 64:90, 0:5])


def test_pad_in_plane_matches_lldmmri_reference(volume):
    img = volume[0]
    for box in [(2, 80, 0, 10, 90, 3), (40, 30, 5, 50, 45, 9), (0, 0, 17, 100, 90, 20)]:
        ref_box = dict(zip(("x_min", "y_min", "z_min", "x_max", "y_max", "z_max"), box))
        ref_box["z_max"] = box[5] - 1  # crop_roi.py's z_max is the last slice (inclusive)
        expected = reference_crop(np.transpose(img, (2, 1, 0)), ref_box)
        got = crop_lesion_roi(img, box, pad_in_plane=True)
        np.testing.assert_array_equal(np.transpose(got, (2, 1, 0)), expected)


def test_torch_input_keeps_type(volume):
    t = torch.as_tensor(volume)
    box = (2, 80, 0, 10, 90, 3)
    roi = crop_lesion_roi(t, box)
    assert isinstance(roi, torch.Tensor)
    np.testing.assert_array_equal(roi.numpy(), crop_lesion_roi(volume, box))
    padded = crop_lesion_roi(t, box, pad_in_plane=True)
    assert isinstance(padded, torch.Tensor)
    np.testing.assert_array_equal(padded.numpy(), crop_lesion_roi(volume, box, pad_in_plane=True))


def test_three_dimensional_input(volume):
    assert crop_lesion_roi(volume[0], (40, 30, 5, 50, 45, 9)).shape == (42, 47, 8)


@pytest.mark.parametrize(
    "box, match",
    [
        ((40, 30, 5, 50, 45, 25), "outside the volume"),
        ((-1, 30, 5, 50, 45, 9), "outside the volume"),
        ((40, 30, 5, 40, 45, 9), "empty along x"),
        ((40, 30, 5, 50, 45), "6 entries"),
        ((40.5, 30, 5, 50, 45, 9), "integers"),
    ],
)
def test_invalid_boxes_raise(volume, box, match):
    with pytest.raises(ValueError, match=match):
        crop_lesion_roi(volume, box)


def test_invalid_image_and_margin(volume):
    with pytest.raises(ValueError, match=r"\[C, X, Y, Z\]"):
        crop_lesion_roi(volume[0, :, :, 0], (1, 1, 0, 2, 2, 1))
    with pytest.raises(ValueError, match="margin"):
        roi_slices((1, 1, 1, 2, 2, 2), (10, 10, 10), (1, -1, 0))


def test_box_from_mask_round_trip():
    mask = np.zeros((20, 30, 10), dtype=bool)
    mask[3:7, 10:21, 2:5] = True
    box = box_from_mask(mask)
    assert box == (3, 10, 2, 7, 21, 5)
    assert check_box(np.array(box), mask.shape) == box
    with pytest.raises(ValueError, match="empty"):
        box_from_mask(np.zeros((4, 4, 4)))
