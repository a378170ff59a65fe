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
"""Lesion ROIs: one per box of a ``lesion_boxes.json`` file, per region a reader marked in a measurement SR of the
study (:mod:`deploy_app.reader_sr`), or per segment of the study's DICOM SEG, in this order of precedence.

The box file sits in the input folder next to the DICOM files::

    {"lesions": [
        {"id": "L1", "box_mm": [x0, y0, z0, x1, y1, z1]},
        {"id": "L2", "series_instance_uid": "1.2.3...", "box_voxels": [i0, j0, k0, i1, j1, k1]}
    ]}

``box_mm`` gives two opposite corners in DICOM patient coordinates (LPS, mm). ``box_voxels`` gives a half-open
voxel box on the named series: ``i`` column index, ``j`` row index, ``k`` slice index counted along the slice
normal (the order of ``ImagePositionPatient`` projected on the normal), as ``scripts.roi`` boxes. Either way the
box is mapped onto the reference grid (the smallest grid box holding it), must lie inside the volume, and is
cropped with ``scripts.roi.crop_lesion_roi`` (the bundle's ROI margin).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.dataset import Dataset

from ..domain import MANUFACTURER, LesionROI, PhaseVolume
from ..errors import StudyInputError
from ..multiframe import frames_of
from ..reader_sr import is_reader_measurement_sr, reader_boxes
from .phase_volume_operator import series_geometry

__all__ = [
    "BOX_FILE_NAME",
    "LesionROIOperator",
    "lesion_rois",
    "read_box_file",
    "segment_boxes",
    "unreferenced_images",
]

#: Name of the lesion box file in the input folder.
BOX_FILE_NAME = "lesion_boxes.json"
_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _grid_box(points_mm: np.ndarray, affine: np.ndarray, inside: bool = False) -> tuple[int, int, int, int, int, int]:
    """Half-open reference-grid box of ``points_mm``: the voxels nearest to the points (voxel centres of another
    grid), or with ``inside`` the voxels whose centres lie within the points' extent (corners of a box in mm)."""
    homogeneous = np.c_[points_mm, np.ones(len(points_mm))]
    index = (np.linalg.inv(affine) @ homogeneous.T)[:3].T
    if inside:
        lo = np.ceil(index.min(axis=0) - 1e-6).astype(int)
        hi = np.floor(index.max(axis=0) + 1e-6).astype(int) + 1
    else:
        lo = np.floor(index.min(axis=0) + 0.5).astype(int)
        hi = np.floor(index.max(axis=0) + 0.5).astype(int) + 1
    return (int(lo[0]), int(lo[1]), int(lo[2]), int(hi[0]), int(hi[1]), int(hi[2]))


def _corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])], float)


def _numbers(value, where: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=float)
    except (TypeError, ValueError) as err:
        raise StudyInputError(f"{where}: the box must be 6 numbers, got {value!r}.") from err


def read_box_file(path: Path, volume: PhaseVolume) -> list[tuple[str, tuple[int, ...], str]]:
    """Boxes of a ``lesion_boxes.json`` on the reference grid, as ``(lesion id, box, source)``.

    Raises:
        StudyInputError: naming the file and lesion for malformed entries or unknown series.
    """
    try:
        entries = json.loads(Path(path).read_text())["lesions"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise StudyInputError(f"cannot read {path}: {err!r}; expected {{'lesions': [...]}}.") from err
    if not isinstance(entries, list) or not entries:
        raise StudyInputError(f"no lesion given: {path} lists no lesion.")
    series: dict[str, list[Dataset]] = {}
    for ds in volume.study_datasets:
        series.setdefault(str(ds.SeriesInstanceUID), []).extend(frames_of(ds))
    out = []
    for n, entry in enumerate(entries, start=1):
        lesion_id = str(entry.get("id", f"L{n}")) if isinstance(entry, dict) else f"L{n}"
        where = f"{path} lesion {lesion_id!r}"
        if not isinstance(entry, dict):
            raise StudyInputError(f"{where}: each lesion must be an object, got {entry!r}.")
        if "box_mm" in entry:
            corners = _numbers(entry["box_mm"], where)
            if corners.shape != (6,):
                raise StudyInputError(f"{where}: box_mm must be [x0, y0, z0, x1, y1, z1] in mm.")
            points = _corners(np.minimum(corners[:3], corners[3:]), np.maximum(corners[:3], corners[3:]))
            box = _grid_box(points, volume.affine, inside=True)
        elif "box_voxels" in entry and "series_instance_uid" in entry:
            uid = str(entry["series_instance_uid"])
            if uid not in series:
                raise StudyInputError(f"{where}: series {uid} is not in the study.")
            voxels = _numbers(entry["box_voxels"], where)
            if voxels.shape != (6,) or np.any(voxels[3:] <= voxels[:3]):
                raise StudyInputError(f"{where}: box_voxels must be half-open [i0, j0, k0, i1, j1, k1].")
            affine, _ = series_geometry(series[uid], f"{where}: series {uid}")
            centres = _corners(voxels[:3], voxels[3:] - 1)
            points = (affine @ np.c_[centres, np.ones(len(centres))].T)[:3].T
            box = _grid_box(points, volume.affine)
        else:
            raise StudyInputError(f"{where}: give 'box_mm', or 'series_instance_uid' with 'box_voxels'.")
        out.append((lesion_id, box, f"{Path(path).name} {lesion_id}"))
    return out


def segment_boxes(seg: Dataset, volume: PhaseVolume) -> list[tuple[str, tuple[int, ...], int]]:
    """Reference-grid box of every segment of a DICOM SEG, as ``(lesion id, box, segment number)``.

    Raises:
        StudyInputError: naming the SEG file and segment for an empty segment, a different Frame of Reference or
            a SEG whose frames do not form a volume.
    """
    import highdicom as hd

    name = str(getattr(seg, "filename", None) or seg.SOPInstanceUID)
    if str(getattr(seg, "FrameOfReferenceUID", "")) != volume.frame_of_reference_uid:
        raise StudyInputError(
            f"SEG {name} is in Frame of Reference {getattr(seg, 'FrameOfReferenceUID', None)}, the phases in "
            f"{volume.frame_of_reference_uid}."
        )
    try:
        segmentation = hd.seg.Segmentation.from_dataset(seg, copy=False)
    except Exception as err:  # highdicom raises several types for malformed SEGs
        raise StudyInputError(f"cannot read SEG {name}: {err}") from err
    out = []
    for number in segmentation.segment_numbers:
        description = segmentation.get_segment_description(number)
        lesion_id = str(getattr(description, "SegmentLabel", "") or f"Segment {number}")
        try:
            seg_volume = segmentation.get_volume(segment_numbers=[number], combine_segments=False, dtype=np.uint8)
        except Exception as err:
            raise StudyInputError(f"SEG {name} segment {number}: its frames do not form a volume ({err}).") from err
        index = np.argwhere(seg_volume.array[..., 0] > 0)
        if len(index) == 0:
            raise StudyInputError(f"SEG {name} segment {number} ({lesion_id}) is empty.")
        points = seg_volume.map_indices_to_reference(index)
        out.append((lesion_id, _grid_box(points, volume.affine), int(number)))
    return out


def unreferenced_images(seg: Dataset, study_datasets: list[Dataset]) -> list[str]:
    """The SOP Instance UIDs a SEG's Referenced Series Sequence names that are not among ``study_datasets``."""
    present = {str(ds.SOPInstanceUID) for ds in study_datasets}
    return [
        str(item.ReferencedSOPInstanceUID)
        for series in seg.get("ReferencedSeriesSequence", [])
        for item in series.get("ReferencedInstanceSequence", [])
        if str(item.ReferencedSOPInstanceUID) not in present
    ]


def lesion_rois(volume: PhaseVolume, input_folder: Path | None) -> list[LesionROI]:
    """Crop one ROI per lesion (see the module docstring for where lesions come from).

    Raises:
        StudyInputError: when no lesion is given, a box lies (partly) outside the volume, or as the readers.
    """
    from scripts.roi import check_box, crop_lesion_roi, roi_slices

    box_file = Path(input_folder) / BOX_FILE_NAME if input_folder is not None else None
    # the attention SEG and SR of an earlier run may be in a study fetched back from the PACS: never lesion sources
    segs = [
        ds
        for ds in volume.study_datasets
        if str(ds.SOPClassUID) == _SEG_SOP_CLASS and str(ds.get("Manufacturer", "")) != MANUFACTURER
    ]
    reports = [ds for ds in volume.study_datasets if is_reader_measurement_sr(ds)]
    marks = reader_boxes(reports, volume.study_datasets) if reports else []
    found: list[tuple[str, tuple[int, ...], str, Dataset | None, int | None]] = []
    sources: dict[str, Dataset] = {}
    if box_file is not None and box_file.is_file():
        if segs or marks:
            logging.getLogger(__name__).info("Using %s; the study's SEG / measurement SR are not used.", box_file)
        found = [(lid, box, source, None, None) for lid, box, source in read_box_file(box_file, volume)]
    elif marks:
        if segs:
            logging.getLogger(__name__).info("Using the reader's measurement SR; the study's SEG is not used.")
        for lesion_id, corners, where, report in marks:
            box = _grid_box(corners, volume.affine, inside=True)
            shape = volume.spatial_shape
            box = (*(max(0, v) for v in box[:3]), *(min(n, v) for n, v in zip(shape, box[3:], strict=True)))
            found.append((lesion_id, box, where, None, None))
            sources[where] = report
    elif len(segs) == 1:
        missing = unreferenced_images(segs[0], volume.study_datasets)
        if missing:
            logging.getLogger(__name__).warning(
                "The lesion SEG %s references %d image(s) that are not in the study (e.g. %s): its segments are "
                "placed by its own geometry in Frame of Reference %s, which the phases share; the SR cites a SEG whose "
                "source images the PACS may not hold.",
                getattr(segs[0], "filename", None) or segs[0].SOPInstanceUID,
                len(missing),
                ", ".join(missing[:3]),
                volume.frame_of_reference_uid,
            )
        found = [
            (lid, box, f"SEG segment {number}", segs[0], number) for lid, box, number in segment_boxes(segs[0], volume)
        ]
    elif len(segs) > 1:
        raise StudyInputError(
            f"the study holds {len(segs)} SEG instances; keep one, or give the lesions in {BOX_FILE_NAME}."
        )
    if not found:
        raise StudyInputError(
            f"no lesion given: the study has no DICOM SEG, no measurement SR with a region, and the input folder "
            f"has no {BOX_FILE_NAME}."
        )
    rois = []
    for lesion_id, box, source, seg, number in found:
        try:
            box = check_box(box, volume.spatial_shape)
        except ValueError as err:
            raise StudyInputError(
                f"lesion {lesion_id!r} ({source}) lies outside the {volume.reference_phase} volume: {err}"
            ) from err
        (sx, sy, sz), _ = roi_slices(box, volume.spatial_shape)
        roi = crop_lesion_roi(volume.image, box)
        rois.append(
            LesionROI(
                lesion_id=lesion_id,
                box=box,
                roi=np.ascontiguousarray(roi),
                roi_origin=(sx.start, sy.start, sz.start),
                source=source,
                segmentation=seg,
                segment_number=number,
                source_report=sources.get(source),
            )
        )
    return rois


class LesionROIOperator(Operator):
    """Cuts one 8-phase ROI per lesion of the study (see the module docstring).

    Named input:
        phase_volume: the :class:`deploy_app.domain.PhaseVolume` of the study.

    Named output:
        lesion_rois: a list of :class:`deploy_app.domain.LesionROI`.
    """

    def __init__(self, fragment: Fragment, *args, input_folder: Path, **kwargs):
        self.input_folder = Path(input_folder)
        self.input_name_volume = "phase_volume"
        self.output_name_rois = "lesion_rois"
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.input_name_volume)
        spec.output(self.output_name_rois)

    def compute(self, op_input, op_output, context):
        volume = op_input.receive(self.input_name_volume)
        if not isinstance(volume, PhaseVolume):
            raise ValueError(f"{self.input_name_volume} must be a PhaseVolume, got {type(volume).__name__}.")
        rois = lesion_rois(volume, self.input_folder)
        for roi in rois:
            self._logger.info("Lesion %s (%s): box %s, ROI %s.", roi.lesion_id, roi.source, roi.box, roi.roi.shape[1:])
        op_output.emit(rois, self.output_name_rois)
