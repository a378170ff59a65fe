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
"""Lesions marked by a reader: the planar ROIs of a TID 1500 measurement SR in the study.

A radiologist who draws a region around a lesion in a web viewer and saves the measurements gets an SR like this
(what OHIF writes through dcmjs, ``src/utilities/TID300/TID300Measurement.js`` and ``Ellipse.js``/``Polyline.js``/
``Point.js`` of dcmjs-org/dcmjs; highdicom's TID 1410 groups put the region at the group level instead)::

    Imaging Measurement Report (126000, DCM)
      Imaging Measurements (126010, DCM)
        Measurement Group (125007, DCM)
          Tracking Identifier (TEXT), Tracking Unique Identifier (UIDREF), [Finding, Finding Site]
          NUM Area / Length / ... with, INFERRED FROM, SCOORD ELLIPSE | POLYLINE | POLYGON | CIRCLE | POINT
              (SELECTED FROM the image it was drawn on)   -- or the SCOORD (SCOORD3D) directly in the group

Each group with a region becomes one lesion: the first SCOORD/SCOORD3D of the group, depth first (the one a viewer
draws). Its in-plane extent on the image it was drawn on (for an ELLIPSE the bounding box of the rotated ellipse,
for a CIRCLE the circle's) gives the lesion box in that plane; a POINT or MULTIPOINT needs a size: the group's
first NUM in mm (a diameter or length). A 2-D mark says nothing about the lesion's extent across slices, so the box
spans the larger in-plane size along the slice normal too (a roughly round lesion), centred on the marked image,
and is clipped to the volume. The SRs the app writes itself (``Manufacturer`` is the app's) are never read.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from .domain import MANUFACTURER
from .errors import StudyInputError

__all__ = ["is_reader_measurement_sr", "reader_boxes"]

_SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
}
_REPORT = ("126000", "DCM")
_MEASUREMENTS = ("126010", "DCM")
_GROUP = ("125007", "DCM")
_TRACKING_ID = ("112039", "DCM")


def _concept(item: Dataset) -> tuple[str, str]:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return ("", "")
    return (str(seq[0].get("CodeValue", "")), str(seq[0].get("CodingSchemeDesignator", "")))


def is_reader_measurement_sr(ds: Dataset) -> bool:
    """Whether ``ds`` is a TID 1500 measurement report that the app did not write itself."""
    return (
        str(ds.get("SOPClassUID", "")) in _SR_CLASSES
        and _concept(ds) == _REPORT
        and str(ds.get("Manufacturer", "")) != MANUFACTURER
    )


def _walk(item: Dataset):
    for child in item.get("ContentSequence", []):
        yield child
        yield from _walk(child)


def _groups(ds: Dataset) -> list[Dataset]:
    return [
        group
        for container in ds.get("ContentSequence", [])
        if _concept(container) == _MEASUREMENTS
        for group in container.get("ContentSequence", [])
        if group.get("ValueType") == "CONTAINER" and _concept(group) == _GROUP
    ]


def _image_geometry(image: Dataset, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(origin, column direction * column spacing, row direction * row spacing, unit normal) of an image."""
    try:
        position = np.asarray(image.ImagePositionPatient, float)
        orientation = np.asarray(image.ImageOrientationPatient, float)
        row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
    except (AttributeError, TypeError, ValueError) as err:
        raise StudyInputError(f"{where}: the image it was drawn on has no usable plane geometry ({err}).") from err
    along_row, along_column = orientation[:3], orientation[3:]
    return position, along_row * column_spacing, along_column * row_spacing, np.cross(along_row, along_column)


def _in_plane_extent(graphic_type: str, points: np.ndarray, size: float | None, where: str) -> tuple[np.ndarray, ...]:
    """(lower, upper) corners of the mark's bounding box in image coordinates (column, row)."""
    if graphic_type in ("POLYLINE", "POLYGON") and len(points) >= 2:
        return points.min(axis=0), points.max(axis=0)
    if graphic_type == "ELLIPSE" and len(points) == 4:
        centre = points.mean(axis=0)
        a, b = (points[1] - points[0]) / 2, (points[3] - points[2]) / 2  # semi-axes
        half = np.sqrt(a**2 + b**2)
        return centre - half, centre + half
    if graphic_type == "CIRCLE" and len(points) == 2:
        radius = float(np.linalg.norm(points[1] - points[0]))
        return points[0] - radius, points[0] + radius
    if graphic_type in ("POINT", "MULTIPOINT"):
        if size is None:
            raise StudyInputError(f"{where}: a {graphic_type} needs a size: give the group a NUM in mm (diameter).")
        return points.min(axis=0), points.max(axis=0)
    raise StudyInputError(f"{where}: cannot make a lesion box from a {graphic_type} of {len(points)} points.")


def _size_mm(group: Dataset) -> float | None:
    for item in _walk(group):
        if item.get("ValueType") == "NUM" and item.get("MeasuredValueSequence"):
            value = item.MeasuredValueSequence[0]
            units = value.get("MeasurementUnitsCodeSequence")
            if units and str(units[0].CodeValue) == "mm":
                return float(value.NumericValue)
    return None


def _box_corners_mm(group: Dataset, images: dict[str, Dataset], where: str) -> np.ndarray:
    """The 8 corners (LPS mm) of the lesion box of one measurement group."""
    scoord = next((i for i in _walk(group) if i.get("ValueType") in ("SCOORD", "SCOORD3D")), None)
    if scoord is None:
        raise LookupError(where)
    graphic_type = str(scoord.GraphicType)
    size = _size_mm(group)
    if scoord.ValueType == "SCOORD3D":
        points = np.asarray(scoord.GraphicData, float).reshape(-1, 3)
        if graphic_type in ("POINT", "MULTIPOINT"):
            if size is None:
                raise StudyInputError(f"{where}: a {graphic_type} needs a size: give the group a NUM in mm.")
            lo, hi = points.min(axis=0) - size / 2, points.max(axis=0) + size / 2
        else:
            lo, hi = points.min(axis=0), points.max(axis=0)
            extent = float(np.max(hi - lo))
            lo, hi = lo - (extent - (hi - lo)) / 2, hi + (extent - (hi - lo)) / 2  # as deep as it is wide
        return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    references = [i for i in scoord.get("ContentSequence", []) if i.get("ValueType") == "IMAGE"]
    if not references:
        raise StudyInputError(f"{where}: its {graphic_type} names no image it was drawn on.")
    uid = str(references[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    if uid not in images:
        raise StudyInputError(f"{where}: it was drawn on image {uid}, which is not in the study.")
    origin, column_step, row_step, normal = _image_geometry(images[uid], where)
    points = np.asarray(scoord.GraphicData, float).reshape(-1, 2)
    lo, hi = _in_plane_extent(graphic_type, points, size, where)
    if graphic_type in ("POINT", "MULTIPOINT"):
        spacing = np.array([np.linalg.norm(column_step), np.linalg.norm(row_step)])
        lo, hi = lo - size / 2 / spacing, hi + size / 2 / spacing
    depth = float(max((hi[0] - lo[0]) * np.linalg.norm(column_step), (hi[1] - lo[1]) * np.linalg.norm(row_step)))
    corners = []
    for column in (lo[0], hi[0]):
        for row in (lo[1], hi[1]):
            # SCOORD (0, 0) is the outer corner of the first pixel, ImagePositionPatient that pixel's centre
            in_plane = origin + (column - 0.5) * column_step + (row - 0.5) * row_step
            corners += [in_plane - normal * depth / 2, in_plane + normal * depth / 2]
    return np.asarray(corners)


def reader_boxes(reports: list[Dataset], study_datasets: list[Dataset]) -> list[tuple[str, np.ndarray, str, Dataset]]:
    """The lesions marked in ``reports``: ``(lesion id, 8 box corners in LPS mm, source, report)`` per measurement
    group with a region (groups without one, e.g. a text finding, are skipped).

    Raises:
        StudyInputError: naming the SR and group for a region that references an image not in the study, has no
            geometry, or is a point without a size.
    """
    images = {str(ds.SOPInstanceUID): ds for ds in study_datasets if "ImagePositionPatient" in ds}
    marks = []
    for report in reports:
        name = str(getattr(report, "filename", None) or report.SOPInstanceUID)
        for n, group in enumerate(_groups(report), start=1):
            tracking = next(
                (str(i.TextValue) for i in group.get("ContentSequence", []) if _concept(i) == _TRACKING_ID), ""
            )
            where = f"measurement SR {name} group {n}" + (f" ({tracking!r})" if tracking else "")
            try:
                corners = _box_corners_mm(group, images, where)
            except LookupError:
                continue
            marks.append((tracking or f"Group {n}", corners, where, report))
    counts: dict[str, int] = {}
    for lesion_id, *_ in marks:
        counts[lesion_id] = counts.get(lesion_id, 0) + 1
    # viewers often use the tool name as tracking identifier: number the groups when identifiers repeat
    return [
        (lesion_id if counts[lesion_id] == 1 else f"{lesion_id} #{n}", corners, where, report)
        for n, (lesion_id, corners, where, report) in enumerate(marks, start=1)
    ]
