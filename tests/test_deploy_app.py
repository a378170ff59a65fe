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
"""End-to-end runs of the deploy app on generated DICOM studies: the SR (dciodvfy, dsrdump, highdicom),
lesion boxes against the generator's truth, the box-file input, the MAP layout, and every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from deploy_fixtures import (  # noqa: F401 - fixtures
    APP_DIR,
    BUNDLE_ROOT,
    app_env,
    deploy_model,
    generated_study,
    require_tool,
    rewrite_dicom,
    run_app,
    run_app_subprocess,
    sr_files,
)
from deploy_outputs import (
    box_on_key_image,
    check_attention_seg,
    check_dicom,
    check_key_objects,
    check_summary_page,
    output_file,
)

pytestmark = pytest.mark.slow

# naming style, lesions, mixed geometry: the three vendor styles, 1-3 lesions, oblique T2WI / shifted C+Delay
STUDIES = {
    "siemens-1": {"seed": 11, "naming_style": "siemens", "num_lesions": 1, "mixed_geometry": False},
    "ge-2-mixed": {"seed": 12, "naming_style": "ge", "num_lesions": 2, "mixed_geometry": True},
    "philips-3-mixed": {"seed": 13, "naming_style": "philips", "num_lesions": 3, "mixed_geometry": True},
}


@pytest.fixture(scope="module")
def studies_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deploy_studies")


def study(root: Path, name: str):
    return generated_study(root, name, **STUDIES[name])


def copy_study(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop) if drop else None)
    return dst


def check_sr(
    path: Path, truth, model_path: Path, study_folder: Path, dciodvfy: str, boxes_from_truth: bool = True
) -> dict:
    """Validate one SR file and the attention SEG, summary page and key object selection beside it (``dciodvfy``:
    the conftest fixture's path); returns {lesion id: predicted class}."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from deploy_app.bundle_access import load_model
    from deploy_app.lesion_codes import (
        CLASSIFICATION_MARGIN,
        COMMENT,
        DIAGNOSIS,
        IMPRESSION,
        LOW_MARGIN_PERCENT,
        REGION_LOCATION,
        SHORT_NAMES,
        class_for_code,
    )
    from deploy_app.operators.sr_writer_operator import (
        MANUFACTURER,
        SERIES_DESCRIPTION,
        VIEWER_TOOL_PREFIX,
        device_uid,
        lesion_id_of,
    )

    ds = check_dicom(path, dciodvfy, "Comprehensive3DSR")
    dsrdump = subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=120)
    assert dsrdump.returncode == 0 and "Imaging Measurement Report" in dsrdump.stdout, dsrdump.stderr
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.StudyInstanceUID == truth.study_instance_uid
    assert ds.VerificationFlag == "UNVERIFIED" and ds.CompletionFlag == "COMPLETE"
    assert ds.SeriesDescription == SERIES_DESCRIPTION and "NOT FOR CLINICAL USE" in ds.SeriesDescription
    model = load_model(model_path, "cpu")
    (equipment,) = [  # IHE AI Results: the algorithm as processing equipment (highdicom adds scanner and itself)
        item
        for item in ds.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
        and item.Manufacturer == MANUFACTURER
    ]
    assert equipment.ManufacturerModelName == model.name and equipment.SoftwareVersions == model.version
    evidence = {
        item.ReferencedSOPInstanceUID
        for study_item in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    images = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study_folder.rglob("*.dcm")}

    def containers(item):
        if item.ValueType == "CONTAINER":
            yield item
        for child in item.get("ContentSequence", []):
            yield from containers(child)

    assert {c.ContinuityOfContent for c in containers(ds)} == {"SEPARATE"}  # dsr2html renders each item labelled
    sr = hd.sr.srread(path)
    observer = [item.value for item in sr.content[0].ContentSequence if item.name == codes.DCM.DeviceObserverUID]
    assert observer == [device_uid(model.weights_sha256)]
    all_groups = sr.content.get_image_measurement_groups()  # TID 1501: what OHIF tracks (sr_writer_operator.py)
    groups = sr.content.get_image_measurement_groups(finding_type=codes.SCT.Lesion)
    assert len(groups) == len(all_groups) == len(truth.lesions)  # no attention group any more: the SEG holds it
    reference_series = [
        pydicom.dcmread(p, stop_before_pixels=True) for p in (study_folder / truth.series_dirs["C+A"]).glob("*.dcm")
    ]
    reference = {image.SOPInstanceUID for image in reference_series}
    spacing = [float(v) for v in reference_series[0].PixelSpacing]  # row, column
    predicted, uids, key_images = {}, set(), set()
    for group, lesion in zip(groups, truth.lesions, strict=True):
        assert group.tracking_identifier.startswith(VIEWER_TOOL_PREFIX) and group.tracking_uid  # OHIF tracks it
        lesion_id = lesion_id_of(group.tracking_identifier)
        uids.add(group.tracking_uid)
        assert [site.value for site in group.finding_sites] == [codes.SCT.Liver]
        (diagnosis,) = group.get_qualitative_evaluations(name=DIAGNOSIS)
        name = class_for_code(diagnosis.value.value, diagnosis.value.scheme_designator)
        measurements = group.get_measurements()
        probabilities = {
            class_for_code(m.name.value, m.name.scheme_designator): m.value for m in measurements if m.unit.value == "%"
        }
        assert set(probabilities) == set(model.class_names)
        assert sum(probabilities.values()) == pytest.approx(100.0, abs=0.05)
        # the predicted class first (a viewer's first NUM label), then descending
        assert (
            class_for_code(measurements[0].name.value, "99LCADB") == name == max(probabilities, key=probabilities.get)
        )
        assert [m.value for m in measurements[: len(probabilities)]] == sorted(probabilities.values(), reverse=True)
        ranked = sorted(probabilities.values(), reverse=True)
        flags = group.get_qualitative_evaluations(name=CLASSIFICATION_MARGIN)
        assert len(flags) == (1 if ranked[0] - ranked[1] < LOW_MARGIN_PERCENT else 0)
        # the lesion's one region, in the first NUM (INFERRED FROM), where a viewer tracking the measurement finds it
        (region,) = measurements[0].referenced_coordinates
        assert region.RelationshipType == "INFERRED FROM" and region.GraphicType == "POLYLINE"
        key_image = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert key_image in reference
        key_images.add(key_image)
        scoords = [item for item in _walk(group[0]) if getattr(item, "ValueType", None) == "SCOORD"]
        assert len(scoords) == 1  # nothing else is drawn as part of the lesion
        x0, y0, x1, y1 = box_on_key_image(region)
        if boxes_from_truth:
            np.testing.assert_allclose([x0, y0, x1, y1], np.asarray(lesion.box_voxels)[[0, 1, 3, 4]], atol=1)
        # the size of that box in mm (long and short axis), and where it is in words
        sizes = {m.name.meaning: m.value for m in measurements if m.unit.value == "mm"}
        sides = sorted(((x1 - x0) * spacing[1], (y1 - y0) * spacing[0]), reverse=True)
        assert [sizes["Long axis"], sizes["Short axis"]] == pytest.approx(sides, abs=0.06)
        # reading order: the label (a viewer's measurement label), the diagnosis, then the probabilities
        items = list(group[0].ContentSequence)
        contains = [item for item in items if item.RelationshipType == "CONTAINS"]
        assert contains[0].ConceptNameCodeSequence[0].CodeValue == COMMENT.value
        assert contains[1].ConceptNameCodeSequence[0].CodeValue == DIAGNOSIS.value
        label = str(contains[0].TextValue)
        assert label.startswith(f"{lesion_id}: {SHORT_NAMES[name]} {probabilities[name]:.2f} %"), label
        (location,) = [
            str(i.TextValue) for i in items if i.ConceptNameCodeSequence[0].CodeValue == REGION_LOCATION.value
        ]
        assert location.startswith(f"series {reference_series[0].SeriesNumber} "), location
        predicted[lesion_id] = name
    assert len(uids) == len(groups)
    # the report's impression and disclaimer, before the measurements (dsr2html renders in document order)
    root = list(ds.ContentSequence)
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in root if item.ValueType == "CONTAINER"]
    assert names == ["C0034375", "126010"]  # Qualitative Evaluations, then Imaging Measurements
    texts = {item.ConceptNameCodeSequence[0].CodeValue: str(item.TextValue) for item in root[-2].ContentSequence}
    assert texts[IMPRESSION.value].startswith(f"{len(truth.lesions)} lesion")
    for lesion_id, name in predicted.items():
        assert f"{lesion_id} {SHORT_NAMES[name]}" in texts[IMPRESSION.value]
    assert "not for clinical use" in texts["DISCLAIMER"].lower()

    attention = check_attention_seg(output_file(path.parent, "attention-"), truth, dciodvfy, list(predicted))
    assert evidence == images | {attention.SOPInstanceUID}  # the 8 phases, the SEG when it was used, the attention
    page = check_summary_page(output_file(path.parent, "summary-"), truth, dciodvfy)
    check_key_objects(output_file(path.parent, "key-images-"), truth, dciodvfy, key_images, page)
    return predicted


def _walk(item):
    for child in item.get("ContentSequence", []):
        yield child
        yield from _walk(child)


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_study_to_sr(name, studies_root, deploy_model, dciodvfy, tmp_path, monkeypatch):  # noqa: F811
    folder, truth = study(studies_root, name)
    out = tmp_path / "out"
    assert run_app(["-i", str(folder), "-o", str(out), "-m", str(deploy_model)], monkeypatch=monkeypatch) == 0
    files = sr_files(out)
    assert len(files) == 1 and files[0].suffix == ".dcm", files  # no partial or temporary file left
    predicted = check_sr(files[0], truth, deploy_model, folder, dciodvfy)
    assert list(predicted) == [f"Lesion {lesion.segment_number}" for lesion in truth.lesions]


def test_lesion_box_file_instead_of_seg(studies_root, deploy_model, dciodvfy, tmp_path, monkeypatch):  # noqa: F811
    folder, truth = study(studies_root, "ge-2-mixed")
    src = copy_study(folder, tmp_path / "study", drop=("series_100",))  # no SEG
    first, second = truth.lesions
    half = second.diameter_mm / 2
    boxes = {
        "lesions": [
            {"id": "A", "series_instance_uid": truth.series["C+A"], "box_voxels": first.box_voxels},
            {"id": "B", "box_mm": [*(np.asarray(second.center_mm) - half), *(np.asarray(second.center_mm) + half)]},
        ]
    }
    (src / "lesion_boxes.json").write_text(json.dumps(boxes))
    out = tmp_path / "out"
    assert run_app(["-i", str(src), "-o", str(out), "-m", str(deploy_model)], monkeypatch=monkeypatch) == 0
    (sr,) = sr_files(out)
    predicted = check_sr(sr, truth, deploy_model, src, dciodvfy, boxes_from_truth=False)
    assert list(predicted) == ["A", "B"]


def test_map_layout_with_environment_variables(studies_root, deploy_model, dciodvfy, tmp_path):  # noqa: F811
    """As a MAP runs it: ``python3 /opt/holoscan/app``, the bundle's ``scripts`` in ``/opt/holoscan/lib`` (what
    ``monai-deploy package --add <folder holding scripts/>`` does) on PYTHONPATH, paths from HOLOSCAN_INPUT_PATH /
    HOLOSCAN_OUTPUT_PATH / HOLOSCAN_MODEL_PATH / HOLOSCAN_CONFIG_PATH, the model nested under the models folder."""
    folder, truth = study(studies_root, "siemens-1")
    opt = tmp_path / "opt" / "holoscan"
    app = opt / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(BUNDLE_ROOT / "scripts", opt / "lib" / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    (opt / "models" / "lcadb").mkdir(parents=True)
    shutil.copy(deploy_model, opt / "models" / "lcadb" / "model.ts")
    shutil.copy(APP_DIR / "app.yaml", tmp_path / "app.yaml")  # the packager's /var/holoscan/app.yaml
    env = app_env(tmp_path / "app.yaml")
    env.update(
        HOLOSCAN_INPUT_PATH=str(folder),
        HOLOSCAN_OUTPUT_PATH=str(tmp_path / "output"),
        HOLOSCAN_MODEL_PATH=str(opt / "models"),
        PYTHONPATH=str(opt / "lib"),
    )
    proc = run_app_subprocess([str(app)], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sr,) = sr_files(tmp_path / "output")
    check_sr(sr, truth, deploy_model, folder, dciodvfy)


# ------------------------------------------------------------------------------------------ bad input
def _missing_phase(src, truth, dst):
    return copy_study(src, dst, drop=(truth.series_dirs["C+V"],)), ["phase 'C+V' not found"]


def _only_ct(src, truth, dst):
    dst.mkdir()
    shutil.copytree(src / truth.series_dirs["C+A"], dst / "ct")
    rewrite_dicom(sorted((dst / "ct").glob("*.dcm")), Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")
    return dst, ["no MR series", "'CT'"]


def _other_frame_of_reference(src, truth, dst):
    copy_study(src, dst)
    rewrite_dicom(sorted((dst / truth.series_dirs["DWI"]).glob("*.dcm")), FrameOfReferenceUID="1.2.3.4.5.6.7.8.9")
    return dst, ["phases ['DWI'] are in a different Frame of Reference"]


def _not_dicom(src, truth, dst):
    copy_study(src, dst)
    (dst / truth.series_dirs["T2WI"] / "IM_9999.dcm").write_text("not a DICOM file")
    return dst, ["IM_9999.dcm is not a DICOM file"]


def _truncated(src, truth, dst):
    copy_study(src, dst)
    victim = sorted((dst / truth.series_dirs["C+A"]).glob("*.dcm"))[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 2000])
    return dst, [f"{victim} has truncated pixel data"]


def _no_lesion(src, truth, dst):
    return copy_study(src, dst, drop=("series_100",)), ["no lesion given"]


def _roi_outside(src, truth, dst):
    copy_study(src, dst, drop=("series_100",))
    (dst / "lesion_boxes.json").write_text(
        json.dumps({"lesions": [{"id": "far", "box_mm": [400, 400, 400, 420, 420, 420]}]})
    )
    return dst, ["lesion 'far'", "outside the C+A volume"]


def _ambiguous_phase(src, truth, dst):
    copy_study(src, dst)
    extra = dst / "series_099"
    shutil.copytree(dst / truth.series_dirs["C+A"], extra)
    for k, path in enumerate(sorted(extra.glob("*.dcm"))):  # a second copy of C+A: same time, same geometry
        rewrite_dicom([path], SeriesInstanceUID="1.2.3.4.5.6.7.8.10", SeriesNumber=99, SOPInstanceUID=f"1.2.3.4.99.{k}")
    return dst, ["phase 'C+A' is ambiguous"]


BAD_INPUTS = {
    "missing-phase": _missing_phase,
    "only-ct": _only_ct,
    "other-frame-of-reference": _other_frame_of_reference,
    "not-dicom-file": _not_dicom,
    "truncated-file": _truncated,
    "no-lesion": _no_lesion,
    "roi-outside-volume": _roi_outside,
    "ambiguous-phase": _ambiguous_phase,
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_clearly_and_writes_nothing(case, studies_root, deploy_model, tmp_path, monkeypatch, capfd):  # noqa: F811
    folder, truth = study(studies_root, "siemens-1")
    src, messages = BAD_INPUTS[case](folder, truth, tmp_path / "study")
    out = tmp_path / "out"
    status = run_app(["-i", str(src), "-o", str(out), "-m", str(deploy_model)], monkeypatch=monkeypatch)
    captured = capfd.readouterr()
    log = captured.out + captured.err
    assert status == 1
    failure = [line for line in log.splitlines() if "LCA-DB app failed" in line]
    assert failure, log[-3000:]
    for message in messages:
        assert message in failure[0], failure[0]
    assert sr_files(out) == []


def test_command_line_exit_status(studies_root, deploy_model, tmp_path):  # noqa: F811
    folder, truth = study(studies_root, "siemens-1")
    src, _ = _missing_phase(folder, truth, tmp_path / "study")
    out = tmp_path / "out"
    args = ["-m", "deploy_app", "-i", str(src), "-o", str(out), "-m", str(deploy_model)]
    proc = run_app_subprocess(args, app_env())
    assert proc.returncode == 1
    assert "phase 'C+V' not found" in proc.stdout + proc.stderr
    assert sr_files(out) == []
