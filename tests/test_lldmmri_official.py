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
"""The LLD-MMRI adapter on a fixture in the official release format, checked against the official tools' output.

``tests/data/lldmmri_official`` (built by its ``make_fixture.py``) follows LMMMEng/LLD-MMRI2023@e6809b0:
``images/<patient>/<studyUID>/<seriesUID>.nii.gz`` and ``labels/Annotation.json`` (main/README.md lines 35-72,
main/preprocess/crop_roi.py lines 17-30), validation lesions with ``category: -1`` (main/README.md line 70), the
space-separated ``classification_dataset/labels/*.txt`` (main/README.md lines 100-143). Its
``classification_dataset/images`` were written by the unchanged official ``crop_roi.py`` and its ``*_fold<k>.txt``
by the unchanged official ``gene_cross_val.py --seed 66``; neither script is in this repository.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts import lldmmri
from scripts.constants import PHASES
from scripts.lldmmri import (
    InvalidCaseError,
    convert_lldmmri,
    index_classification_dataset,
    official_folds,
    read_label_file,
    read_split_dir,
)
from scripts.training import load_datalist

FIXTURE = Path(__file__).parent / "data" / "lldmmri_official"
RELEASED = FIXTURE / "released"
SPLITS = RELEASED / "classification_dataset" / "labels"
VALIDATION_LABELS = RELEASED / "labels" / "labels_val.txt"


def official_val_folds(folder: Path) -> dict[str, int]:
    return {case: k - 1 for k in range(1, 6) for case, _ in read_label_file(folder / f"val_fold{k}.txt")}


def load(path: Path) -> nib.Nifti1Image:
    return nib.load(str(path))


@pytest.mark.parametrize("folder", [FIXTURE / "folds", SPLITS], ids=["40-cases", "release-fixture"])
def test_official_folds_reproduce_gene_cross_val(folder):
    """gene_cross_val.py lines 8-37, 72: random.seed(66), per-class shuffle, contiguous chunks."""
    cases = read_label_file(folder / "labels.txt")
    assert official_folds(cases, num_folds=5, seed=66) == official_val_folds(folder)
    if len(cases) > 20:  # the seed matters (the tiny release fixture has too few cases per class to show it)
        assert official_folds(cases, num_folds=5, seed=1) != official_val_folds(folder)


def test_read_split_dir_and_errors(tmp_path):
    placed = read_split_dir(SPLITS)
    assert {c: f for c, (s, f, _) in placed.items() if s == "training"} == official_val_folds(SPLITS)
    assert {c: (s, lab) for c, (s, _, lab) in placed.items() if s == "validation"} == {
        "MR210008": ("validation", -1),
        "MR210009": ("validation", -1),
    }
    bad = Path(shutil.copytree(SPLITS, tmp_path / "labels"))
    (bad / "train_fold2.txt").write_text("MR210002 0\n")
    with pytest.raises(ValueError, match="train_fold2.txt is not labels.txt minus val_fold2.txt"):
        read_split_dir(bad)
    shutil.copy(SPLITS / "train_fold2.txt", bad / "train_fold2.txt")
    (bad / "val_fold3.txt").write_text("MR999999 1\n")
    with pytest.raises(ValueError, match="val_fold3.txt: case 'MR999999' is not in"):
        read_split_dir(bad)
    (bad / "val_fold3.txt").write_text("MR210002\n")
    with pytest.raises(ValueError, match=r"val_fold3.txt:1: expected '<case> <label>'"):
        read_split_dir(bad)


def test_convert_official_release_as_published(tmp_path):
    """-1 labels filled from the label files, splits and folds as released, crops equal to crop_roi.py's."""
    out = tmp_path / "cls"
    result = convert_lldmmri(
        RELEASED,
        out,
        label_files=[VALIDATION_LABELS],
        split_dir=SPLITS,
        box_policy="official",
        progress=False,
    )
    assert result.skipped == []
    datalist = json.loads(result.datalist.read_text())
    training = {i["case"]: (i["label"], i["fold"]) for i in datalist["training"]}
    assert training == {c: (lab, official_val_folds(SPLITS)[c]) for c, lab in read_label_file(SPLITS / "labels.txt")}
    assert {i["case"]: i["label"] for i in datalist["validation"]} == {"MR210008": 6, "MR210009": 0}
    assert datalist["test"] == []
    for case in list(training) + ["MR210008", "MR210009"]:
        for phase in PHASES:
            ours = np.asarray(load(out / "images" / case / f"{phase}.nii.gz").dataobj)
            official = np.asarray(
                load(RELEASED / "classification_dataset" / "images" / case / f"{phase}.nii.gz").dataobj
            )
            np.testing.assert_array_equal(ours, official, err_msg=f"{case} {phase}")
    # Annotation.json's spacing (main/README.md line 57), not the 1 mm NIfTI header of MR210003
    assert load(out / "images" / "MR210003" / "C+A.nii.gz").header.get_zooms() == pytest.approx((1.25, 1.25, 6.0))
    assert load(out / "images" / "MR210003" / "DWI.nii.gz").header.get_zooms() == pytest.approx((2.5, 2.5, 8.0))
    header = tmp_path / "header"
    convert_lldmmri(RELEASED, header, split_dir=SPLITS, box_policy="official", annotated_spacing=False, progress=False)
    assert load(header / "images" / "MR210003" / "C+A.nii.gz").header.get_zooms() == pytest.approx((1.0, 1.0, 1.0))
    # loads through the bundle's own reader, all three sections
    assert len(load_datalist(out, "training", fold=0, subset="val")) == 7
    assert [c["label"] for c in load_datalist(out, "validation")] == [6, 0]


def test_strict_box_policy_names_the_case_and_file(tmp_path):
    """MR210004's C+V box ends one voxel past the image: crop_roi.py (lines 64-73) clips it, strict stops."""
    with pytest.raises(InvalidCaseError, match="outside the volume") as err:
        convert_lldmmri(RELEASED, tmp_path / "strict", split_dir=SPLITS, progress=False)
    assert err.value.case == "MR210004" and err.value.file.endswith(".7.nii.gz")  # C+V = 7th series
    assert not (tmp_path / "strict").exists()
    result = convert_lldmmri(RELEASED, tmp_path / "skip", split_dir=SPLITS, skip_invalid=True, progress=False)
    assert [s.case for s in result.skipped] == ["MR210004"]


def test_unlabelled_validation_cases_do_not_stop_the_conversion(tmp_path):
    """Without label files: -1 cases go to 'validation' without a label; folds are the official ones."""
    result = convert_lldmmri(RELEASED, tmp_path / "cls", box_policy="official", progress=False)
    datalist = json.loads(result.datalist.read_text())
    assert [(i["case"], "label" in i) for i in datalist["validation"]] == [("MR210008", False), ("MR210009", False)]
    folds = {i["case"]: i["fold"] for i in datalist["training"]}
    # Annotation.json lists the patients in labels.txt order here, so the folds are the released ones
    assert folds == official_val_folds(SPLITS)


def test_case_missing_from_the_split_files_is_an_error(tmp_path):
    labels = Path(shutil.copytree(SPLITS, tmp_path / "labels"))
    for name in ["labels.txt"] + [f"{s}_fold{k}.txt" for s in ("train", "val") for k in range(1, 6)]:
        lines = [line for line in (labels / name).read_text().splitlines(True) if not line.startswith("MR210005 ")]
        (labels / name).write_text("".join(lines))
    with pytest.raises(InvalidCaseError, match="in none of the split files") as err:
        convert_lldmmri(RELEASED, tmp_path / "cls", split_dir=labels, box_policy="official", progress=False)
    assert err.value.case == "MR210005"
    test_list = tmp_path / "test.txt"
    test_list.write_text("MR210005\n")
    result = convert_lldmmri(
        RELEASED, tmp_path / "cls", split_dir=labels, test_lists=[test_list], box_policy="official", progress=False
    )
    assert [(i["case"], i["label"]) for i in json.loads(result.datalist.read_text())["test"]] == [("MR210005", 3)]


def test_label_file_conflict(tmp_path):
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("MR210002 4\n")
    with pytest.raises(InvalidCaseError, match="class 0 in Annotation.json but 4"):
        convert_lldmmri(RELEASED, tmp_path / "cls", label_files=[wrong], box_policy="official", progress=False)


def test_index_pre_cropped_classification_dataset(tmp_path):
    root = Path(shutil.copytree(RELEASED / "classification_dataset", tmp_path / "classification_dataset"))
    assert lldmmri.main(["index", str(root), "--labels", str(VALIDATION_LABELS)]) == 0
    datalist = json.loads((root / "datalist.json").read_text())
    assert {i["case"]: i["fold"] for i in datalist["training"]} == official_val_folds(SPLITS)
    assert {i["case"]: i["label"] for i in datalist["validation"]} == {"MR210008": 6, "MR210009": 0}
    assert len(load_datalist(root, "training", fold=0, subset="train")) == 1
    with pytest.raises(FileExistsError):
        index_classification_dataset(root)
    (root / "images" / "MR210005" / "C+V.nii.gz").unlink()
    assert lldmmri.main(["index", str(root), "--overwrite"]) == 1
    with pytest.raises(InvalidCaseError, match="phase C\\+V file is missing") as err:
        index_classification_dataset(root, overwrite=True)
    assert err.value.case == "MR210005"
    # without fold files the official algorithm makes the same folds
    for f in root.glob("labels/*_fold*.txt"):
        f.unlink()
    (root / "images" / "MR210005" / "C+V.nii.gz").write_bytes(
        (RELEASED / "classification_dataset" / "images" / "MR210005" / "C+V.nii.gz").read_bytes()
    )
    path = index_classification_dataset(root, overwrite=True)
    assert {i["case"]: i["fold"] for i in json.loads(path.read_text())["training"]} == official_val_folds(SPLITS)


def test_empty_split_is_a_clear_error(tmp_path):
    """The official release has no test cases: evaluating its (empty) test split names the datalist and sections."""
    out = tmp_path / "cls"
    convert_lldmmri(RELEASED, out, split_dir=SPLITS, box_policy="official", progress=False)
    with pytest.raises(ValueError, match=r"'test' holds no case; cases per section: .*'training': 8"):
        load_datalist(out, "test")
