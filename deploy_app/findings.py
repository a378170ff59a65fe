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
"""What the app's outputs say about each lesion, worded once: the SR, the summary page and the key-object note all
take their text from here, so they cannot disagree.

Per lesion: the classes ranked by probability (%), the margin of the predicted class over the next one and the
low-margin flag (:data:`deploy_app.lesion_codes.LOW_MARGIN_PERCENT`), the size of its region in mm, the key image
(the reference image through the centre of its box, where its region is drawn) and that image's series and slice in
words. Per study: a one-paragraph impression and the research-use disclaimer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from .domain import LesionResult, StudyResult
from .lesion_codes import LESION_CODES, LOW_MARGIN_PERCENT, SHORT_NAMES

__all__ = [
    "DISCLAIMER_TEXT",
    "LesionFindings",
    "check_one_per_lesion",
    "class_title",
    "impression",
    "key_slice",
    "lesion_findings",
    "short_name",
]

DISCLAIMER_TEXT = (
    "Research use only, not for clinical use: an AI algorithm (LCA-DB) classified these lesions; the result is "
    "unverified and must not be used for diagnosis or treatment."
)


def class_title(class_name: str) -> str:
    """The class as people read it: the meaning of its SNOMED CT code ("Liver cell carcinoma")."""
    return LESION_CODES[class_name].meaning


def short_name(class_name: str) -> str:
    """The class as radiologists abbreviate it ("HCC", "FNH", "hemangioma")."""
    return SHORT_NAMES[class_name]


def key_slice(result: LesionResult) -> int:
    """Index of the reference image through the centre of the lesion's box (where its region is drawn)."""
    _, _, z0, _, _, z1 = result.lesion.box
    return (z0 + z1 - 1) // 2


@dataclass(frozen=True)
class LesionFindings:
    """What the outputs say about one lesion.

    Attributes:
        lesion_id: the lesion's identifier (box file id, SEG segment label or reader's tracking identifier).
        ranking: ``(class name, probability in %)``, highest first, rounded to 0.01 %.
        margin: percentage points by which the predicted class leads the next one.
        low_margin: ``margin`` is below :data:`deploy_app.lesion_codes.LOW_MARGIN_PERCENT`.
        long_axis_mm: the larger in-plane side of the lesion's box on the reference image, in mm.
        short_axis_mm: the smaller one.
        key_image: the reference image through the centre of the box.
        slice_index: its index in the reference series (0 = first along the slice normal).
        location: the key image's series, image and slice and the box's columns and rows, in words.
    """

    lesion_id: str
    ranking: tuple[tuple[str, float], ...]
    margin: float
    low_margin: bool
    long_axis_mm: float
    short_axis_mm: float
    key_image: Dataset
    slice_index: int
    location: str

    @property
    def predicted(self) -> str:
        """The predicted class name."""
        return self.ranking[0][0]

    @property
    def label(self) -> str:
        """One short line naming the lesion, its predicted class and probability, and the low-margin flag (a viewer's
        measurement label: "Lesion 1: HCC 89.61 %")."""
        name, percent = self.ranking[0]
        flag = " (low margin)" if self.low_margin else ""
        return f"{self.lesion_id}: {short_name(name)} {percent:.2f} %{flag}"


def lesion_findings(result: LesionResult, study: StudyResult) -> LesionFindings:
    """The :class:`LesionFindings` of one lesion of ``study``."""
    percents = [round(100.0 * float(p), 2) for p in result.probabilities]
    order = sorted(range(len(study.class_names)), key=lambda c: -float(result.probabilities[c]))
    ranking = tuple((study.class_names[c], percents[c]) for c in order)
    margin = round(ranking[0][1] - ranking[1][1], 2) if len(ranking) > 1 else 100.0
    x0, y0, z0, x1, y1, z1 = result.lesion.box
    spacing = np.linalg.norm(np.asarray(study.volume.affine, dtype=float)[:3, :3], axis=0)  # column, row, slice mm
    sides = sorted(((x1 - x0) * float(spacing[0]), (y1 - y0) * float(spacing[1])), reverse=True)
    slices = study.volume.reference_slices
    z = key_slice(result)
    image = slices[z]
    location = (
        f"series {image.get('SeriesNumber', '?')} '{image.get('SeriesDescription', '')}' "
        f"({study.volume.reference_phase}), image {image.get('InstanceNumber', '?')} (slice {z + 1} of {len(slices)}); "
        f"box columns {x0}-{x1 - 1}, rows {y0}-{y1 - 1}, slices {z0 + 1}-{z1}"
    )
    return LesionFindings(
        lesion_id=result.lesion.lesion_id,
        ranking=ranking,
        margin=margin,
        low_margin=margin < LOW_MARGIN_PERCENT,
        long_axis_mm=round(sides[0], 1),
        short_axis_mm=round(sides[1], 1),
        key_image=image,
        slice_index=z,
        location=location,
    )


def check_one_per_lesion(findings: list[LesionFindings], study: StudyResult) -> None:
    """Raise when ``findings`` is not one :class:`LesionFindings` per lesion of ``study``, in its order.

    Raises:
        ValueError: naming the lesion ids given and expected.
    """
    given = [item.lesion_id for item in findings]
    expected = [result.lesion.lesion_id for result in study.lesions]
    if given != expected or not expected:
        raise ValueError(f"one LesionFindings per lesion is needed, in order: expected {expected}, got {given}.")


def impression(findings: list[LesionFindings]) -> str:
    """One paragraph: the number of lesions, then per lesion its predicted class, probability, size and flag."""
    if not findings:
        raise ValueError("impression needs at least one lesion, got none.")
    parts = []
    for item in findings:
        (name, percent), *rest = item.ranking
        text = f"{item.lesion_id} {short_name(name)} {percent:.1f} % ({item.long_axis_mm:g} mm"
        if item.low_margin and rest:
            text += f"; low margin: next {short_name(rest[0][0])} {rest[0][1]:.1f} %"
        parts.append(text + ")")
    count = f"{len(findings)} lesion{'s' if len(findings) > 1 else ''}"
    return (
        f"{count} classified by the LCA-DB network: " + "; ".join(parts) + ". "
        f"Low margin: the predicted class leads the next one by less than {LOW_MARGIN_PERCENT:g} percentage points. "
        "Research use only, not for clinical use."
    )
