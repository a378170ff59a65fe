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
"""The network's attention as an overlay: a fractional DICOM Segmentation (highdicom) on the reference series.

One segment per lesion ("Attention <lesion id>"). LCA-DB scores ``attention.shape`` in-plane patches of the
network input, each spanning the whole depth of the lesion ROI; the network input is the ROI resized linearly,
so patch ``(i, j)`` covers the ROI's columns ``[i * X / gh, (i + 1) * X / gh)`` and rows
``[j * Y / gw, (j + 1) * Y / gw)`` on every slice of the ROI. The pixel value is the patch's attention (mean of
IA-Net and PA-Net) divided by the lesion's largest one, so 1 marks the most-attended patch; it is stored as a
FRACTIONAL segmentation of type PROBABILITY, the closest type the standard offers for a saliency map (the segment
label and the content description say that it is attention, not a probability of tissue).

A viewer shows it as a colour overlay on the reference (C+A) images; the SR lists it in its evidence, and each
lesion's "attention" measurement group in the SR names the most-attended patch.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from .domain import MANUFACTURER, LesionResult, StudyResult
from .lesion_codes import ATTENTION_CATEGORY, ATTENTION_TYPE
from .multiframe import segmentation_sources
from .uids import derived_uid

__all__ = ["ATTENTION_DESCRIPTION", "attention_volume", "build_attention_seg", "segment_label"]

ATTENTION_DESCRIPTION = "Network attention, 1 = most attended patch; not a probability"
SERIES_DESCRIPTION = "LCA-DB attention map - NOT FOR CLINICAL USE"


def segment_label(lesion_id: str) -> str:
    """Label of the lesion's attention segment (LO: at most 64 characters)."""
    return f"Attention {lesion_id}"[:64]


def attention_volume(result: LesionResult, spatial_shape: tuple[int, int, int]) -> np.ndarray:
    """The lesion's normalised attention on the reference grid, ``[X, Y, Z]`` float32, 0 outside its ROI."""
    attention = np.asarray(result.attention, dtype=np.float32)
    gh, gw = attention.shape
    ox, oy, oz = result.lesion.roi_origin
    rx, ry, rz = result.lesion.roi.shape[1:]
    i = (np.arange(rx) * gh) // rx  # patch row of each ROI column, as most_attended_patch maps it
    j = (np.arange(ry) * gw) // ry
    peak = float(attention.max())
    plane = attention[np.ix_(i, j)] / peak if peak > 0 else np.zeros((rx, ry), np.float32)
    volume = np.zeros(spatial_shape, dtype=np.float32)
    volume[ox : ox + rx, oy : oy + ry, oz : oz + rz] = plane[:, :, None]
    return volume


def build_attention_seg(study: StudyResult, series_number: int) -> hd.seg.Segmentation:
    """The fractional SEG holding every lesion's attention (see the module docstring); UIDs are derived from the
    study and the weights (:mod:`deploy_app.uids`), so a re-run replaces it."""
    volume = study.volume
    shape = volume.spatial_shape
    z_lo = min(r.lesion.roi_origin[2] for r in study.lesions)
    z_hi = max(r.lesion.roi_origin[2] + r.lesion.roi.shape[3] for r in study.lesions)
    # [frames = slices z_lo..z_hi, rows = Y, columns = X, segments]
    pixels = np.zeros((z_hi - z_lo, shape[1], shape[0], len(study.lesions)), dtype=np.float32)
    for s, result in enumerate(study.lesions):
        pixels[..., s] = attention_volume(result, shape)[:, :, z_lo:z_hi].transpose(2, 1, 0)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=study.model_name, family=codes.cid7162.ArtificialIntelligence, version=study.model_version
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=s,
            segment_label=segment_label(result.lesion.lesion_id),
            segmented_property_category=ATTENTION_CATEGORY,
            segmented_property_type=ATTENTION_TYPE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=derived_uid(study.content_identity, f"attention-tracking {result.lesion.lesion_id}"),
            tracking_id=segment_label(result.lesion.lesion_id),
        )
        for s, result in enumerate(study.lesions, start=1)
    ]
    sources, positions = segmentation_sources(volume.reference_slices[z_lo:z_hi])
    seg = hd.seg.Segmentation(
        source_images=sources,
        plane_positions=positions,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(study.content_identity, "attention-series"),
        series_number=series_number,
        sop_instance_uid=derived_uid(study.content_identity, "attention-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=study.model_name,
        software_versions=study.model_version,
        device_serial_number=study.weights_sha256[:16],
        content_description=ATTENTION_DESCRIPTION,
        content_label="ATTENTION",
        series_description=SERIES_DESCRIPTION,
    )
    return seg
