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
"""Synthetic DICOM studies: 8 MR series + SEG + ground truth, all valid per dciodvfy."""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scripts.constants import PHASES
from scripts.synthetic_dicom import NAMING_STYLES, SERIES_DESCRIPTIONS, generate_dicom_study

LABELS = [6, 3]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("dicom") / "study"
    truth = generate_dicom_study(
        out,
        seed=3,
        naming_style="ge",
        site="site_b",
        labels=LABELS,
        matrix=(128, 128),
        num_slices=24,
        mixed_geometry=True,
    )
    return out, truth


def read_series(root: Path) -> dict[str, list[pydicom.Dataset]]:
    series = defaultdict(list)
    for f in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        series[ds.SeriesInstanceUID].append(ds)
    return series


def test_every_file_passes_dciodvfy(study, dciodvfy):
    root, _ = study
    files = sorted(root.rglob("*.dcm"))
    assert len(files) > 8 * 10
    errors = []
    for f in files:
        out = subprocess.run([dciodvfy, str(f)], capture_output=True, text=True, timeout=60)
        errors += [
            f"{f.relative_to(root)}: {line}" for line in (out.stdout + out.stderr).splitlines() if "Error" in line
        ]
    assert errors == []


def test_series_share_frame_of_reference_and_name_phases(study):
    root, truth = study
    series = read_series(root)
    assert len(series) == 9  # 8 MR + 1 SEG
    mr = {uid: dss for uid, dss in series.items() if dss[0].Modality == "MR"}
    assert set(mr) == set(truth.series.values())
    assert {dss[0].FrameOfReferenceUID for dss in series.values()} == {truth.frame_of_reference_uid}
    assert {dss[0].StudyInstanceUID for dss in series.values()} == {truth.study_instance_uid}
    for phase, uid in truth.series.items():
        ds = mr[uid][0]
        assert ds.SeriesDescription == SERIES_DESCRIPTIONS["ge"][phase]
        assert ds.MagneticFieldStrength == 3.0 and ds.Manufacturer == "GE MEDICAL SYSTEMS"
    ca, dwi, t2 = (mr[truth.series[p]] for p in ("C+A", "DWI", "T2WI"))
    assert 20 <= len(ca) <= 60 and ca[0].Rows == ca[0].Columns == 128
    assert float(dwi[0].PixelSpacing[0]) > float(ca[0].PixelSpacing[0])
    assert float(dwi[0].SliceThickness) > float(ca[0].SliceThickness)
    assert [float(v) for v in t2[0].ImageOrientationPatient] != [float(v) for v in ca[0].ImageOrientationPatient]
    assert t2[0].Columns != ca[0].Columns  # mixed geometry: oblique T2 with its own matrix
    assert "ContrastBolusAgent" in ca[0] and "ContrastBolusAgent" not in mr[truth.series["C-pre"]][0]
    in_te = float(mr[truth.series["In Phase"]][0].EchoTime)
    out_te = float(mr[truth.series["Out Phase"]][0].EchoTime)
    assert in_te == pytest.approx(2 * out_te)


def test_seg_and_ground_truth_agree(study):
    import highdicom as hd

    root, truth = study
    gt = json.loads((root / "ground_truth.json").read_text())
    assert gt["study_instance_uid"] == truth.study_instance_uid
    assert set(gt["series"]) == set(PHASES) and gt["reference_phase"] == "C+A"
    assert [les["label"] for les in gt["lesions"]] == LABELS
    seg = hd.seg.segread(root / gt["seg_path"])
    assert seg.SeriesInstanceUID == gt["seg_series_instance_uid"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == gt["series"]["C+A"]
    assert len(seg.SegmentSequence) == len(gt["lesions"])
    reference = sorted(
        (pydicom.dcmread(f, stop_before_pixels=True) for f in (root / gt["series_dirs"]["C+A"]).glob("*.dcm")),
        key=lambda d: int(d.InstanceNumber),
    )
    uids = [d.SOPInstanceUID for d in reference]
    for lesion in gt["lesions"]:
        frames = seg.get_pixels_by_source_instance(
            uids, segment_numbers=[lesion["segment_number"]], ignore_spatial_locations=True
        )[..., 0]  # [slice, row, col]
        z, y, x = np.nonzero(frames)
        box = [int(x.min()), int(y.min()), int(z.min()), int(x.max()) + 1, int(y.max()) + 1, int(z.max()) + 1]
        assert box == lesion["box_voxels"]
        # the centre (LPS mm) maps inside the box on the C+A grid
        ds = reference[0]
        col, row = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
        d = np.asarray(lesion["center_mm"]) - np.asarray(ds.ImagePositionPatient, float)
        i = d @ col / float(ds.PixelSpacing[1])
        j = d @ row / float(ds.PixelSpacing[0])
        k = d @ np.cross(col, row) / float(ds.SpacingBetweenSlices)
        assert box[0] <= i < box[3] and box[1] <= j < box[4] and box[2] - 1 <= k < box[5] + 1


def test_naming_styles_and_determinism(tmp_path):
    assert {"siemens", "ge", "philips", "lldmmri"} <= set(NAMING_STYLES)
    for style, names in SERIES_DESCRIPTIONS.items():
        assert set(names) == set(PHASES) and len(set(names.values())) == 8, style
    a = generate_dicom_study(
        tmp_path / "a", seed=9, num_lesions=1, naming_style="lldmmri", matrix=(48, 48), num_slices=8
    )
    b = generate_dicom_study(
        tmp_path / "b", seed=9, num_lesions=1, naming_style="lldmmri", matrix=(48, 48), num_slices=8
    )
    assert a.to_json() == b.to_json()
    for phase in PHASES:
        first = sorted((tmp_path / "a" / a.series_dirs[phase]).glob("*.dcm"))[0]
        same = tmp_path / "b" / first.relative_to(tmp_path / "a")
        assert first.read_bytes() == same.read_bytes()
        assert pydicom.dcmread(first).SeriesDescription == phase
    assert (tmp_path / "a" / a.seg_path).read_bytes() == (tmp_path / "b" / b.seg_path).read_bytes()


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="naming_style"):
        generate_dicom_study(tmp_path / "x", naming_style="toshiba")
    with pytest.raises(ValueError, match="num_lesions"):
        generate_dicom_study(tmp_path / "x", num_lesions=4)
    with pytest.raises(ValueError, match="labels"):
        generate_dicom_study(tmp_path / "x", labels=[9])
    assert not (tmp_path / "x").exists()
