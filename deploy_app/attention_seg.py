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
"""The network's attention as an overlay: a binary DICOM Segmentation (highdicom) of the attended region on the
reference series.

One segment per lesion ("Attention <lesion id>"). LCA-DB scores ``attention.shape`` in-plane patches of the
network input, each spanning the whole depth of the lesion ROI; the network input is the ROI resized linearly,
so patch ``(i, j)`` covers the ROI's columns ``[i * X / gh, (i + 1) * X / gh)`` and rows
``[j * Y / gw, (j + 1) * Y / gw)`` on every slice of the ROI. The segment is every patch whose attention (mean of
IA-Net and PA-Net) is at least :data:`ATTENTION_LEVEL` of the lesion's most-attended patch: where the network
looked, not an outline of the lesion (the segment's property is a local "Network attention map" code, declared in
the SEG's Coding Scheme Identification Sequence).

Why binary: OHIF 3.13's SEG loader (``@cornerstonejs/adapters`` ``Segmentation/labelmapImagesFromBuffer``) refuses
fractional SEGs ("Fractional segmentations are not yet supported") and its viewport stays on "Loading SEG...";
binary SEGs load as a labelmap overlay on the reference series (``tests/test_deploy_ohif.py``). The graded map is
drawn as a heat map on the summary page (:mod:`deploy_app.summary`); no consumer of a fractional SEG was found that
the tests could run, so none is written.
"""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from .domain import LesionResult, StudyResult
from .lesion_codes import ATTENTION_CATEGORY, ATTENTION_TYPE, local_coding_scheme
from .multiframe import segmentation_sources
from .uids import derived_uid

__all__ = [
    "ATTENTION_DESCRIPTION",
    "ATTENTION_LEVEL",
    "SERIES_DESCRIPTION",
    "attention_volume",
    "build_attention_seg",
    "segment_label",
]

#: A patch belongs to the attended region when its attention is at least this share of the lesion's peak.
ATTENTION_LEVEL = 0.5
ATTENTION_DESCRIPTION = f"Network attention: patches at or above {ATTENTION_LEVEL:.0%} of the lesion's peak"
SERIES_DESCRIPTION = "LCA-DB attention map - NOT FOR CLINICAL USE"
#: Display colours of the attention segments, lesion after lesion: warm colours, unlike a lesion outline's usual green.
_DISPLAY_COLORS = [hd.color.CIELabColor.from_rgb(*rgb) for rgb in ((255, 210, 0), (255, 120, 0), (255, 0, 190))]


def segment_label(lesion_id: str) -> str:
    """Label of the lesion's attention segment (LO: at most 64 characters)."""
    return f"Attention {lesion_id}"[:64]


def attention_volume(result: LesionResult, spatial_shape: tuple[int, int, int]) -> np.ndarray:
    """The lesion's attention on the reference grid, divided by its peak, ``[X, Y, Z]`` float32, 0 outside its ROI."""
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


def build_attention_seg(
    study: StudyResult, series_number: int, timestamp: datetime.datetime | None = None
) -> hd.seg.Segmentation:
    """The binary SEG of every lesion's attended region (see the module docstring); UIDs are derived from the
    study and the weights (:mod:`deploy_app.uids`), so a re-run replaces it."""
    volume = study.volume
    timestamp = timestamp or datetime.datetime.now()
    shape = volume.spatial_shape
    z_lo = min(r.lesion.roi_origin[2] for r in study.lesions)
    z_hi = max(r.lesion.roi_origin[2] + r.lesion.roi.shape[3] for r in study.lesions)
    # [frames = slices z_lo..z_hi, rows = Y, columns = X, segments]
    pixels = np.zeros((z_hi - z_lo, shape[1], shape[0], len(study.lesions)), dtype=bool)
    for s, result in enumerate(study.lesions):
        attended = attention_volume(result, shape)[:, :, z_lo:z_hi] >= ATTENTION_LEVEL
        pixels[..., s] = attended.transpose(2, 1, 0)
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
            display_color=_DISPLAY_COLORS[(s - 1) % len(_DISPLAY_COLORS)],
        )
        for s, result in enumerate(study.lesions, start=1)
    ]
    sources, positions = segmentation_sources(volume.reference_slices[z_lo:z_hi])
    return hd.seg.Segmentation(
        source_images=sources,
        plane_positions=positions,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(study.content_identity, "attention-region-series"),
        series_number=series_number,
        sop_instance_uid=derived_uid(study.content_identity, "attention-region-instance"),
        instance_number=1,
        device_serial_number=study.weights_sha256[:16],
        content_description=ATTENTION_DESCRIPTION,
        content_label="ATTENTION",
        series_description=SERIES_DESCRIPTION,
        coding_schemes=[local_coding_scheme()],
        **study.written_by(timestamp),
    )
