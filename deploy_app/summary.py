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
"""The result for a PACS or viewer that does not take SR or SEG: a summary page (Secondary Capture) and a Key Object
Selection of the images that matter, built with highdicom.

The **summary page** is one RGB Secondary Capture image per study, drawn with matplotlib: the disclaimer and the
impression at the top, then one row per lesion with its key image (the reference image through the lesion centre,
the lesion box in green, the network attention as a translucent heat map, its attended region outlined in yellow)
beside the diagnosis, the probability of every class as bars, the low-margin flag, the size and where the key image
is. It carries no patient name or ID (those stay in the header), so ``BurnedInAnnotation`` is NO.

The **key object selection** (title "Of Interest", DCM 113000) references each lesion's key image and the summary
page, and its description repeats the disclaimer, so a viewer that shows key images shows these.

Both are written beside the SR; the PACS sender sends them to a destination that refuses the SR or the SEG (or to
every destination, ``pacs.summary: always``).
"""

from __future__ import annotations

import datetime
import textwrap

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_rescale
from pydicom.sr.codedict import codes

from .attention_seg import ATTENTION_LEVEL, attention_volume
from .domain import StudyResult
from .findings import DISCLAIMER_TEXT, LesionFindings, check_one_per_lesion, class_title, impression, short_name
from .lesion_codes import LESION_CODES
from .uids import derived_uid

__all__ = [
    "KEY_OBJECTS_DESCRIPTION",
    "SUMMARY_SERIES_DESCRIPTION",
    "build_key_objects",
    "build_summary_page",
    "render_summary_page",
]

SUMMARY_SERIES_DESCRIPTION = "LCA-DB summary - NOT FOR CLINICAL USE"
KEY_OBJECTS_DESCRIPTION = "LCA-DB key images - NOT FOR CLINICAL USE"

_DPI = 100
_WIDTH_IN = 12.0
_HEADER_IN = 2.6
_ROW_IN = 3.4
_FOOTER_IN = 0.9


def _display_image(image: Dataset) -> np.ndarray:
    """The image's stored values as real-world values, windowed to its 1st-99th percentile, in [0, 1]."""
    values = np.asarray(apply_rescale(image.pixel_array, image), dtype=np.float32)
    low, high = np.percentile(values, [1, 99])
    return np.clip((values - low) / max(float(high - low), 1e-6), 0.0, 1.0)


def _window(box: tuple[int, ...], shape: tuple[int, int]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Column and row limits of a square around the lesion box, 4 times its size and at least 96 pixels wide, inside
    the image: a small lesion stays visible on a large matrix."""
    x0, y0, _, x1, y1, _ = box
    side = max(96.0, 4.0 * max(x1 - x0, y1 - y0))
    limits = []
    for low, high, size in ((x0, x1, shape[1]), (y0, y1, shape[0])):
        start = min(max((low + high - side) / 2, 0.0), max(size - side, 0.0))
        limits.append((start - 0.5, min(start + side, size) - 0.5))
    return limits[0], limits[1]


def render_summary_page(study: StudyResult, findings: list[LesionFindings]) -> np.ndarray:
    """The summary page of ``study`` as an RGB array ``[rows, columns, 3]`` uint8 (see the module docstring).

    Raises:
        ValueError: when ``findings`` does not hold one entry per lesion of ``study``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    check_one_per_lesion(findings, study)
    height = _HEADER_IN + _ROW_IN * len(findings) + _FOOTER_IN
    figure = Figure(figsize=(_WIDTH_IN, height), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(figure)

    def box(left_in: float, top_in: float, width_in: float, height_in: float):  # axes placed in inches from the top
        return figure.add_axes(
            (left_in / _WIDTH_IN, 1 - (top_in + height_in) / height, width_in / _WIDTH_IN, height_in / height)
        )

    figure.text(0.3 / _WIDTH_IN, 1 - 0.25 / height, f"{study.model_name} {study.model_version}: AI result summary",
                fontsize=16, weight="bold", va="top")  # fmt: skip
    figure.text(0.3 / _WIDTH_IN, 1 - 0.65 / height, textwrap.fill(DISCLAIMER_TEXT.upper(), 120), fontsize=10,
                color="#b00000", weight="bold", va="top")  # fmt: skip
    figure.text(0.3 / _WIDTH_IN, 1 - 1.15 / height, textwrap.fill("Impression: " + impression(findings), 125),
                fontsize=10.5, va="top")  # fmt: skip

    shape = study.volume.spatial_shape
    for row, (result, item) in enumerate(zip(study.lesions, findings, strict=True)):
        top = _HEADER_IN + row * _ROW_IN
        image_axes = box(0.3, top + 0.1, 3.1, 3.1)
        image_axes.imshow(_display_image(item.key_image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        attention = attention_volume(result, shape)[:, :, item.slice_index].T  # [rows, columns]
        heat = np.ma.masked_where(attention <= 0, attention)
        image_axes.imshow(heat, cmap="inferno", vmin=0, vmax=1, alpha=0.45, interpolation="nearest")
        if (attention >= ATTENTION_LEVEL).any():
            image_axes.contour(attention >= ATTENTION_LEVEL, levels=[0.5], colors="yellow", linewidths=1.0)
        x0, y0, _, x1, y1, _ = result.lesion.box
        image_axes.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="lime", lw=2))
        (left, right), (top_edge, bottom_edge) = _window(result.lesion.box, attention.shape)
        image_axes.set_xlim(left, right)
        image_axes.set_ylim(bottom_edge, top_edge)
        image_axes.set_axis_off()

        name, percent = item.ranking[0]
        code = LESION_CODES[name]
        lines = [
            item.label,
            f"Diagnosis: {code.meaning} (SNOMED CT {code.value})",
            f"Margin over the next class: {item.margin:.2f} percentage points"
            + ("  -  LOW MARGIN" if item.low_margin else ""),
            f"Size (box on the key image): {item.long_axis_mm:g} x {item.short_axis_mm:g} mm",
            textwrap.fill(f"Key image: {item.location}", 95),
        ]
        figure.text(3.7 / _WIDTH_IN, 1 - (top + 0.15) / height, lines[0], fontsize=13, weight="bold", va="top",
                    color="#b00000" if item.low_margin else "black")  # fmt: skip
        figure.text(3.7 / _WIDTH_IN, 1 - (top + 0.5) / height, "\n".join(lines[1:]), fontsize=9.5, va="top",
                    linespacing=1.4)  # fmt: skip
        bars = box(6.3, top + 1.55, 5.2, 1.6)
        names = [class_title(n) for n, _ in item.ranking][::-1]
        values = [p for _, p in item.ranking][::-1]
        colours = ["#9aa7b5"] * (len(values) - 1) + ["#2e7d32"]
        bars.barh(names, values, color=colours)
        for y, value in enumerate(values):
            bars.text(value + 1, y, f"{value:.2f} %", va="center", fontsize=8)
        bars.set_xlim(0, 115)
        bars.tick_params(labelsize=8)
        bars.set_xlabel("probability (%)", fontsize=8)
        for side in ("top", "right"):
            bars.spines[side].set_visible(False)
    figure.text(0.3 / _WIDTH_IN, 0.25 / height, f"Green box: lesion region. Heat map: network attention (yellow "
                f"outline: at least {ATTENTION_LEVEL:.0%} of the lesion's peak). Weights SHA-256 "
                f"{study.weights_sha256[:16]}... {DISCLAIMER_TEXT}", fontsize=8, va="bottom", wrap=True)  # fmt: skip
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def _uid(study: StudyResult, role: str) -> str:
    return derived_uid(study.content_identity, role)


def build_summary_page(
    study: StudyResult, findings: list[LesionFindings], series_number: int, timestamp: datetime.datetime
) -> hd.sc.SCImage:
    """The summary page as a Secondary Capture image of the study (see the module docstring)."""
    reference = study.volume.reference_slices[0]
    page = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=render_summary_page(study, findings),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        # the page shows several images and text: no patient direction runs along its rows or columns
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=("L", "P"),
        series_instance_uid=_uid(study, "summary-series"),
        series_number=series_number,
        sop_instance_uid=_uid(study, "summary-instance"),
        instance_number=1,
        series_description=SUMMARY_SERIES_DESCRIPTION,
        **study.written_by(timestamp),
    )
    page.PatientOrientation = None  # Type 2: present and empty (see coordinate_system above)
    if reference.get("BodyPartExamined"):
        page.BodyPartExamined = reference.BodyPartExamined
    else:
        page.Laterality = None  # Type 2C, needed when the body part is unknown (it might be a paired one)
    page.ConversionType = "WSD"  # made on a workstation, not digitised (highdicom's default "DI")
    page.BurnedInAnnotation = "NO"  # lesion facts only; no patient name or ID is drawn
    page.ImageComments = DISCLAIMER_TEXT
    return page


def build_key_objects(
    study: StudyResult,
    findings: list[LesionFindings],
    summary_page: Dataset,
    series_number: int,
    timestamp: datetime.datetime,
) -> hd.ko.KeyObjectSelectionDocument:
    """The key object selection: each lesion's key image and the summary page (see the module docstring)."""
    key_images = list({item.key_image.SOPInstanceUID: item.key_image for item in findings}.values())
    referenced = [*key_images, summary_page]
    lesions = ", ".join(f"{item.lesion_id} {short_name(item.predicted)}" for item in findings)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=referenced,
        description=f"LCA-DB key images ({lesions}) and summary page. {DISCLAIMER_TEXT}"[:1024],
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        series_instance_uid=_uid(study, "key-objects-series"),
        series_number=series_number,
        sop_instance_uid=_uid(study, "key-objects-instance"),
        instance_number=1,
        series_description=KEY_OBJECTS_DESCRIPTION,
        **study.written_by(timestamp),
    )
