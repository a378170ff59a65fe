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
"""Fast checks of the output wording and the PACS settings, without running the app: the ranking, margin and
low-margin flag at its boundary, the size from the box and the grid spacing, the location words, the impression;
the ``pacs`` settings that are refused, naming the key."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from deploy_fixtures import APP_DIR
from pydicom.dataset import Dataset
from scripts.constants import LESION_CLASSES

CLASSES = tuple(LESION_CLASSES)  # the bundle's class list (bundle/scripts/constants.py)


def _study(probabilities: list[list[float]]):
    """A StudyResult of one lesion per row of ``probabilities`` on a 40 x 30 x 12 grid with 0.8 x 1.5 x 3 mm voxels."""
    from deploy_app.domain import LesionResult, LesionROI, PhaseVolume, StudyResult

    slices = []
    for k in range(12):
        image = Dataset()
        image.SeriesNumber, image.SeriesDescription, image.InstanceNumber = 7, "t1_vibe_arterial", 100 + k
        slices.append(image)
    affine = np.diag([0.8, 1.5, 3.0, 1.0])
    volume = PhaseVolume(np.zeros((8, 40, 30, 12), np.float32), affine, "C+A", slices, "1.2.3", {}, [])
    lesions = []
    for n, row in enumerate(probabilities, start=1):
        roi = LesionROI(f"L{n}", (10, 5, 2, 20, 10, 7), np.zeros((8, 20, 10, 6), np.float32), (5, 3, 1), f"box L{n}")
        p = np.asarray(row, dtype=float)
        lesions.append(LesionResult(roi, p, int(p.argmax()), np.ones((2, 2)), (10.0, 5.0, 2.0, 15.0, 8.0, 7.0)))
    return StudyResult(lesions, volume, CLASSES, "LCA-DB", "0.3.1", "ab" * 32, "cpu")


def test_findings_rank_flag_measure_and_locate():
    from deploy_app.findings import check_one_per_lesion, impression, lesion_findings

    # margins of exactly 10 points (not low) and of 9.99 points (low)
    study = _study([[0.5, 0.4, 0.1, 0, 0, 0, 0], [0.0, 0.0, 0.0, 0.4, 0.3001, 0.2999, 0.0]])
    first, second = (lesion_findings(result, study) for result in study.lesions)
    assert first.ranking[0] == ("hepatic_hemangioma", 50.0) and first.margin == 10.0 and not first.low_margin
    assert second.predicted == "hepatic_metastasis" and second.margin == 9.99 and second.low_margin
    assert [p for _, p in second.ranking] == sorted((p for _, p in second.ranking), reverse=True)
    # box 10 columns x 5 rows: 10 x 0.8 mm and 5 x 1.5 mm
    assert (first.long_axis_mm, first.short_axis_mm) == (8.0, 7.5)
    # the key image is the slice through the box centre: slices 2..6, centre 4, the 5th of 12
    assert first.slice_index == 4 and first.key_image.InstanceNumber == 104
    assert first.location.startswith("series 7 't1_vibe_arterial' (C+A), image 104 (slice 5 of 12)")
    assert first.label == "L1: hemangioma 50.00 %" and second.label == "L2: metastasis 40.00 % (low margin)"
    text = impression([first, second])
    assert text.startswith("2 lesions classified by the LCA-DB network: L1 hemangioma 50.0 % (8 mm); ")
    assert "L2 metastasis 40.0 % (8 mm; low margin: next cyst 30.0 %)" in text
    assert "not for clinical use" in text
    check_one_per_lesion([first, second], study)
    with pytest.raises(ValueError, match=r"expected \['L1', 'L2'\], got \['L2', 'L1'\]"):
        check_one_per_lesion([second, first], study)


def test_class_without_short_name_is_named(monkeypatch):
    from deploy_app import lesion_codes

    monkeypatch.setattr(
        lesion_codes, "SHORT_NAMES", {k: v for k, v in lesion_codes.SHORT_NAMES.items() if k != "hepatic_cyst"}
    )
    with pytest.raises(ValueError, match="without a short name.*hepatic_cyst"):
        lesion_codes.validate_codes(CLASSES)


def test_pacs_settings_refused_name_the_key():
    from deploy_app.operators.pacs_sender_operator import (
        destinations_from_config,
        retry_policy_from_config,
        summary_mode_from_config,
    )

    shipped = yaml.safe_load((APP_DIR / "app.yaml").read_text())["pacs"]
    assert retry_policy_from_config(shipped).max_send_s < 30 and summary_mode_from_config(shipped) == "fallback"
    assert summary_mode_from_config({}) == "fallback" and summary_mode_from_config({"summary": "always"}) == "always"
    with pytest.raises(ValueError, match="pacs.summary .* got 'never'"):
        summary_mode_from_config({"summary": "never"})
    with pytest.raises(ValueError, match="max_send_s must be > 0"):
        retry_policy_from_config({"max_send_s": 0})
    with pytest.raises(ValueError, match="max_send_s must be numbers"):
        retry_policy_from_config({"max_send_s": "soon"})
    with pytest.raises(ValueError, match=r"pacs.stowrs.timeout must be > 0"):
        destinations_from_config({"stowrs": {"enabled": True, "url": "http://h", "timeout": 0}})
    with pytest.raises(ValueError, match=r"pacs.cstore.timeout must be a number"):
        destinations_from_config(
            {"cstore": {"enabled": True, "host": "h", "port": 104, "called_ae_title": "P", "timeout": "x"}}
        )


def test_stow_answer_refusing_sop_classes():
    """A STOW-RS answer as PS3.18 (10.5.3) shapes it: the Failed SOP Sequence with failure reason 0x0122 refuses the
    SR's and SEG's classes (the sender then sends the summary); another reason is a failure naming the instance."""
    from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

    from deploy_app.errors import PACSSendError
    from deploy_app.operators.pacs_sender_operator import stow_outcome

    sent = []
    for uid, sop_class in (("1.2.3.1", SegmentationStorage), ("1.2.3.2", Comprehensive3DSRStorage)):
        ds = Dataset()
        ds.SOPInstanceUID, ds.SOPClassUID = uid, sop_class
        sent.append(ds)

    def answer(reasons: list[int]) -> Dataset:
        failed = []
        for ds, reason in zip(sent, reasons, strict=True):
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
            item.FailureReason = reason
            failed.append(item)
        response = Dataset()
        response.FailedSOPSequence = failed
        return Dataset.from_json(response.to_json_dict())  # as dicomweb-client reads a DICOM JSON body

    delivery = stow_outcome(answer([0x0122, 0x0122]), sent, "STOW-RS test")
    assert delivery.stored == [] and set(delivery.refused) == {SegmentationStorage, Comprehensive3DSRStorage}
    assert stow_outcome(Dataset(), sent, "STOW-RS test").stored == ["1.2.3.1", "1.2.3.2"]  # 200: all stored
    with pytest.raises(PACSSendError, match=r"STOW-RS test: the server refused instances .*1\.2\.3\.2: 0xa700"):
        stow_outcome(answer([0x0122, 0xA700]), sent, "STOW-RS test")
