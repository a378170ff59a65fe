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
"""Checks of what the deploy app writes beside the SR (imported by ``tests/test_deploy_*.py``): every object passes
dciodvfy, has its series date and time and declares every private coding scheme it uses; the attention SEG is a
binary SEG of one segment per lesion; the summary page is a Secondary Capture of the study; the key object
selection references each lesion's key image and the summary page."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

__all__ = [
    "box_on_key_image",
    "check_attention_seg",
    "check_dicom",
    "check_key_objects",
    "check_summary_page",
    "output_file",
    "private_schemes",
]


def output_file(folder: Path, prefix: str) -> Path:
    """The one finished file of ``folder`` whose name starts with ``prefix`` ("attention-", "summary-", ...)."""
    (path,) = sorted(p for p in Path(folder).glob(f"{prefix}*.dcm"))
    return path


def private_schemes(item: Dataset) -> set[str]:
    """Every private coding scheme designator ("99..."; PS3.16 section 8.2) used anywhere in ``item``."""
    found = set()
    for element in item.iterall():
        if element.keyword == "CodingSchemeDesignator" and str(element.value).startswith("99"):
            found.add(str(element.value))
    return found


def check_dicom(path: Path, dciodvfy: str, iod: str) -> Dataset:
    """``path`` passes dciodvfy (no error) as ``iod``, has SeriesDate/SeriesTime, and declares each private coding
    scheme it uses in its Coding Scheme Identification Sequence. Returns the dataset."""
    verified = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
    report = verified.stdout + verified.stderr
    assert iod in report, report
    assert [line for line in report.splitlines() if line.startswith("Error")] == [], report
    ds = pydicom.dcmread(path)
    assert ds.get("SeriesDate") and ds.get("SeriesTime"), path
    declared = {str(item.CodingSchemeDesignator) for item in ds.get("CodingSchemeIdentificationSequence", [])}
    undeclared = private_schemes(ds) - declared
    assert undeclared == set(), f"{path.name} uses undeclared coding schemes {undeclared} (declared: {declared})"
    assert "NOT FOR CLINICAL USE" in str(ds.SeriesDescription)
    return ds


def check_attention_seg(path: Path, truth, dciodvfy: str, lesion_ids: list[str]) -> Dataset:
    """The attention SEG: valid, BINARY (type and description agree: a region, not a probability), one non-empty
    segment "Attention <lesion id>" per lesion, on the C+A images."""
    import highdicom as hd

    ds = check_dicom(path, dciodvfy, "Segmentation")
    assert ds.SegmentationType == "BINARY" and ds.StudyInstanceUID == truth.study_instance_uid
    assert "SegmentationFractionalType" not in ds and "probability" not in str(ds.ContentDescription).lower()
    assert "attention" in str(ds.ContentDescription).lower()
    assert [str(s.SegmentLabel) for s in ds.SegmentSequence] == [f"Attention {lesion_id}" for lesion_id in lesion_ids]
    assert {str(s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator) for s in ds.SegmentSequence} == {
        "99LCADB"
    }
    references = {str(s.SeriesInstanceUID) for s in ds.ReferencedSeriesSequence}
    assert references == {truth.series["C+A"]}
    seg = hd.seg.Segmentation.from_dataset(ds)
    for number in seg.segment_numbers:
        assert seg.get_volume(segment_numbers=[number], combine_segments=False).array.any(), number
    return ds


def check_summary_page(path: Path, truth, dciodvfy: str) -> Dataset:
    """The summary page: a valid RGB Secondary Capture of the study, no patient identity burned in, the disclaimer
    in its comments, and a page (white background, black text, the red disclaimer, grey-scale key images)."""
    ds = check_dicom(path, dciodvfy, "SCImage")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.StudyInstanceUID == truth.study_instance_uid
    assert ds.PhotometricInterpretation == "RGB" and ds.BurnedInAnnotation == "NO"
    assert "not for clinical use" in str(ds.ImageComments).lower()
    pixels = ds.pixel_array.astype(int)
    assert pixels.shape[2] == 3 and pixels.shape[0] >= 600 and pixels.shape[1] >= 1000  # a page, not a thumbnail
    white = (pixels > 245).all(axis=2).mean()
    red = ((pixels[..., 0] > 150) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)).mean()
    assert white > 0.4 and red > 0.001, (white, red)
    return ds


def check_key_objects(path: Path, truth, dciodvfy: str, key_images: set[str], summary_page: Dataset) -> Dataset:
    """The key object selection: valid, titled "Of Interest", referencing exactly the lesions' key images and the
    summary page, its description holding the disclaimer."""
    ds = check_dicom(path, dciodvfy, "KeyObjectSelectionDocument")
    assert ds.StudyInstanceUID == truth.study_instance_uid
    assert ds.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    referenced = {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in ds.ContentSequence
        if item.ValueType in ("IMAGE", "COMPOSITE")
    }
    assert referenced == key_images | {str(summary_page.SOPInstanceUID)}
    (description,) = [str(item.TextValue) for item in ds.ContentSequence if item.ValueType == "TEXT"]
    assert "not for clinical use" in description.lower()
    return ds


def box_on_key_image(region: Dataset) -> np.ndarray:
    """``[x0, y0, x1, y1]`` of a closed POLYLINE region (the lesion box as the SR draws it)."""
    points = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
    return np.concatenate([points.min(axis=0), points.max(axis=0)])
