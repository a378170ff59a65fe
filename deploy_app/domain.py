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
"""Typed objects passed between the operators of the app.

Geometry convention (as the rest of the project, contracts.md): volumes are ``[C, X, Y, Z]`` with X the DICOM
column index, Y the row index and Z the slice index ascending along the slice normal; an ``affine`` maps the
voxel index ``(x, y, z, 1)`` to DICOM patient coordinates (LPS, mm).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

__all__ = ["MANUFACTURER", "LesionResult", "LesionROI", "PhaseVolume", "StudyResult"]

#: Manufacturer of what the app writes (SR, attention SEG, summary page, key object selection).
MANUFACTURER = "LCA-DB MONAI plugin contributors"


@dataclass
class PhaseVolume:
    """The 8 phases of one study resampled onto the reference grid.

    Attributes:
        image: ``[8, X, Y, Z]`` float32, phases in network channel order (``PHASES``).
        affine: 4x4 voxel index -> LPS mm of the reference grid.
        reference_phase: the phase whose series defines the grid.
        reference_slices: the reference series' instances, index = z.
        frame_of_reference_uid: shared by all phases.
        phase_series_uids: phase -> SeriesInstanceUID.
        source_datasets: every instance of the 8 selected series (SR evidence), headers only are used.
        study_datasets: every instance loaded from the study folder (the SEG, if any, is among them).
        phase_sources: phase -> which image set served it, in words, for the log and the SR: the series number and
            description, and the part of the series when a series holds several volumes (e.g.
            ``"series 12 't1_vibe_dynamic' [temporal position 2]"``). Empty when the volume was built without the
            phase selector.
        phase_images: phase -> its images, ``"<SOPInstanceUID>"`` or ``"<SOPInstanceUID>:<frame number>"`` for a
            frame of a multi-frame image, sorted (part of the run's content identity, :mod:`deploy_app.uids`).
    """

    image: np.ndarray
    affine: np.ndarray
    reference_phase: str
    reference_slices: list[Dataset]
    frame_of_reference_uid: str
    phase_series_uids: dict[str, str]
    source_datasets: list[Dataset]
    study_datasets: list[Dataset] = field(default_factory=list)
    phase_sources: dict[str, str] = field(default_factory=dict)
    phase_images: dict[str, list[str]] = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]


@dataclass
class LesionROI:
    """One lesion: its box on the reference grid and the 8-phase ROI cut around it.

    Attributes:
        lesion_id: identifier shown in the SR (tracking identifier).
        box: half-open voxel box ``(x0, y0, z0, x1, y1, z1)`` on the reference grid.
        roi: ``[8, x, y, z]`` crop of :attr:`PhaseVolume.image` (``scripts.roi.crop_lesion_roi``).
        roi_origin: reference-grid index of the crop's first voxel.
        source: where the lesion came from, for messages ("SEG segment 2", "lesion_boxes.json L1").
        segmentation: the SEG dataset when the lesion is a segment of it (added to the SR evidence).
        segment_number: that segment's number.
        source_report: the reader's measurement SR when the lesion is a region marked in it (SR evidence).
    """

    lesion_id: str
    box: tuple[int, int, int, int, int, int]
    roi: np.ndarray
    roi_origin: tuple[int, int, int]
    source: str
    segmentation: Dataset | None = None
    segment_number: int | None = None
    source_report: Dataset | None = None


@dataclass
class LesionResult:
    """The model's answer for one lesion.

    Attributes:
        lesion: the input ROI.
        probabilities: ``[num_classes]`` softmax output.
        class_index: argmax of :attr:`probabilities`.
        attention: ``[H / patch, W / patch]`` mean of the IA-Net and PA-Net attention maps.
        patch_box: most-attended patch mapped back to the reference grid, ``(x0, y0, z0, x1, y1, z1)``
            as floats (voxel-edge coordinates: voxel ``i`` spans ``[i, i + 1)``).
    """

    lesion: LesionROI
    probabilities: np.ndarray
    class_index: int
    attention: np.ndarray
    patch_box: tuple[float, float, float, float, float, float]


@dataclass
class StudyResult:
    """Everything the SR writer needs: per-lesion results, the model identity and the study geometry."""

    lesions: list[LesionResult]
    volume: PhaseVolume
    class_names: tuple[str, ...]
    model_name: str
    model_version: str
    weights_sha256: str
    device: str

    @cached_property
    def content_identity(self) -> str:
        """The run's content identity, computed once (:func:`deploy_app.uids.content_identity`): every UID of what
        the app writes is ``deploy_app.uids.derived_uid(study.content_identity, role)``."""
        from .uids import content_identity

        return content_identity(self)

    def written_by(self, timestamp: datetime.datetime) -> dict[str, Any]:
        """Keyword arguments of every highdicom object the app writes for this result: the app as manufacturer, the
        model as model name and software version, and ``timestamp`` as series and content date and time."""
        return {
            "manufacturer": MANUFACTURER,
            "manufacturer_model_name": self.model_name,
            "software_versions": self.model_version,
            "series_date": timestamp.date(),
            "series_time": timestamp.time(),
            "content_date": timestamp.date(),
            "content_time": timestamp.time(),
        }
