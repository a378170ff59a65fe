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
"""LLD-MMRI adapter on a small dataset the generator writes in the released layout; bad input handling."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts import lldmmri
from scripts.constants import PHASES
from scripts.lldmmri import InvalidCaseError, convert_lldmmri, read_annotations, read_fold_csvs
from scripts.synthetic import write_released_layout


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    return write_released_layout(
        tmp_path_factory.mktemp("lld") / "released",
        num_patients=4,
        seed=2,
        matrix=(64, 64),
        num_slices=12,
        progress=False,
    )


@pytest.fixture()
def copy(released, tmp_path) -> Path:
    return Path(shutil.copytree(released, tmp_path / "released"))


def fold_csvs(root: Path) -> list[Path]:
    return sorted((root / "labels").glob("fold*.csv"))


def edit_annotation(root: Path, edit) -> None:
    path = root / "labels" / "Annotation.json"
    data = json.loads(path.read_text())
    edit(data["Annotation_info"])
    path.write_text(json.dumps(data))


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temporary folder left"


def test_released_layout_structure(released):
    info = json.loads((released / "labels" / "Annotation.json").read_text())["Annotation_info"]
    assert len(info) == 4
    for patient, items in info.items():
        assert sorted(i["phase"] for i in items) == sorted(PHASES)
        for item in items:
            assert (released / "images" / patient / item["studyUID"] / f"{item['seriesUID']}.nii.gz").is_file()
            box = item["annotation"]["lesion"]["0"]["bbox"]["3D_box"]
            assert set(box) == {"x_min", "y_min", "z_min", "x_max", "y_max", "z_max"}
    with open(fold_csvs(released)[0], newline="") as f:
        assert next(csv.reader(f)) == ["lesion_classifier", "dataset", "label"]


def test_convert_with_fold_csvs(released, tmp_path):
    result = convert_lldmmri(released, tmp_path / "cls", fold_csvs=fold_csvs(released), progress=False)
    records = {r.case: r for r in read_annotations(released)}
    splits = read_fold_csvs(fold_csvs(released))
    assert result.skipped == [] and sorted(result.cases) == sorted(records)
    datalist = json.loads(result.datalist.read_text())
    assert {i["case"] for i in datalist["test"]} == {c for c, s in splits.items() if s[0] == "test"}
    for item in datalist["training"]:
        assert item["fold"] == splits[item["case"]][1] or splits[item["case"]][1] is None
        assert item["label"] == records[item["case"]].label
        assert item["image"] == [item[p] for p in PHASES]
    # crops: box + 16 voxels in-plane (zero-padded outside the image) and +-2 slices, values from the source
    rec = records[datalist["training"][0]["case"]]
    for phase in ("C+A", "DWI"):
        source = np.asarray(nib.load(str(rec.series[phase])).dataobj)
        crop = np.asarray(nib.load(str(tmp_path / "cls" / "images" / rec.case / f"{phase}.nii.gz")).dataobj)
        x0, y0, z0, x1, y1, z1 = rec.boxes[phase]
        assert crop.shape[:2] == (x1 - x0 + 32, y1 - y0 + 32)
        assert crop.shape[2] == min(z1 + 2, source.shape[2]) - max(z0 - 2, 0)
        assert crop.dtype == source.dtype
        np.testing.assert_array_equal(crop[16:-16, 16:-16, :], source[x0:x1, y0:y1, max(z0 - 2, 0) : z1 + 2])


def test_convert_without_csvs_assigns_stratified_folds(released, tmp_path):
    result = convert_lldmmri(released, tmp_path / "cls", num_folds=2, progress=False)
    datalist = json.loads(result.datalist.read_text())
    assert datalist["test"] == [] and {i["fold"] for i in datalist["training"]} == {0, 1}


@pytest.mark.parametrize("problem", ["missing_phase", "box_outside", "unknown_class", "unreadable", "missing_file"])
def test_bad_input_stops_or_skips(copy, tmp_path, problem):
    patient = "MR100001"
    info = json.loads((copy / "labels" / "Annotation.json").read_text())["Annotation_info"][patient]
    cv = next(i for i in info if i["phase"] == "C+V")
    series = copy / "images" / patient / cv["studyUID"] / f"{cv['seriesUID']}.nii.gz"
    if problem == "missing_phase":
        edit_annotation(copy, lambda d: d[patient].remove(next(i for i in d[patient] if i["phase"] == "C+V")))
        match, file = "missing phase", "Annotation.json"
    elif problem == "box_outside":
        edit_annotation(
            copy,
            lambda d: next(i for i in d[patient] if i["phase"] == "C+V")["annotation"]["lesion"]["0"]["bbox"][
                "3D_box"
            ].update(z_max=500),
        )
        match, file = "outside the volume", series.name
    elif problem == "unknown_class":
        edit_annotation(copy, lambda d: [i["annotation"]["lesion"]["0"].update(category=9) for i in d[patient]])
        match, file = "unknown class", "Annotation.json"
    elif problem == "unreadable":
        series.write_bytes(b"not a nifti file")
        match, file = "unreadable", series.name
    else:
        series.unlink()
        match, file = "missing", series.name
    out = tmp_path / "cls"
    with pytest.raises(InvalidCaseError, match=match) as err:
        convert_lldmmri(copy, out, fold_csvs=fold_csvs(copy), progress=False)
    assert err.value.case.startswith(patient) and file in err.value.file
    assert patient in str(err.value) and file in str(err.value)
    assert isinstance(err.value, ValueError)
    assert_nothing_written(out)

    result = convert_lldmmri(copy, out, fold_csvs=fold_csvs(copy), skip_invalid=True, progress=False)
    skipped = {s.case for s in result.skipped}
    assert patient in skipped and skipped <= {patient, f"{patient}_1"}
    assert result.cases and not set(result.cases) & skipped
    datalist = json.loads(result.datalist.read_text())
    listed = {i["case"] for i in datalist["training"] + datalist["test"]}
    assert listed == set(result.cases) and not listed & {s.case for s in result.skipped}
    assert json.loads((out / "skipped.json").read_text())[0]["case"] == result.skipped[0].case


def test_bad_csv_and_cli(copy, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("case,split\nMR1,Train\n")
    with pytest.raises(ValueError, match="lesion_classifier"):
        read_fold_csvs([bad])
    bad.write_text("lesion_classifier,dataset,label\nMR1,Holdout,0\n")
    with pytest.raises(ValueError, match="Holdout"):
        read_fold_csvs([bad])
    (copy / "images" / "MR100002").rename(copy / "gone")
    out = tmp_path / "cli"
    assert lldmmri.main([str(copy), str(out), "--fold-csv", *map(str, fold_csvs(copy)), "--skip-invalid"]) == 0
    printed = capsys.readouterr().out
    assert "skipped MR100002" in printed and (out / "datalist.json").is_file()


def test_unlabelled_cases_take_the_fold_csv_label(copy, tmp_path):
    """category -1 (main/README.md line 70 of LMMMEng/LLD-MMRI2023) with the label in the authors' CSVs."""
    patient = "MR100001"
    edit_annotation(copy, lambda d: [i["annotation"]["lesion"]["0"].update(category=-1) for i in d[patient]])
    csv_labels = {c: s[2] for c, s in read_fold_csvs(fold_csvs(copy)).items()}
    result = convert_lldmmri(copy, tmp_path / "cls", fold_csvs=fold_csvs(copy), progress=False)
    datalist = json.loads(result.datalist.read_text())
    items = {i["case"]: i for i in datalist["training"] + datalist["test"]}
    assert result.skipped == [] and items[patient]["label"] == csv_labels[patient]
