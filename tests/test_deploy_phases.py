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
"""Phase identification from what the images are: every vendor style and layout of the generator (with localizer,
coronal T2, multi-b DWI, ADC, subtraction and MIP distractors) through ``python -m deploy_app phases`` and, for
some, the whole app and a real Orthanc; every problem listed at once; names that lie; site overrides; strict
loading; fail-fast checks; the log."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from deploy_fixtures import (  # noqa: F401 - fixtures
    APP_DIR,
    attention_files,
    deploy_model,
    generated_study,
    orthanc,
    rewrite_dicom,
    run_app,
    sr_files,
)
from scripts.constants import PHASES
from scripts.synthetic_dicom import LAYOUTS, NAMING_STYLES

from deploy_app.errors import StudyInputError

VARIANTS = [(style, layout) for style in NAMING_STYLES for layout in LAYOUTS]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("phase_studies")


def vendor_study(root: Path, style: str, layout: str, distractors: bool = True):
    """A small study of the generator; the separate layout also has an oblique T2 and a shifted C+Delay."""
    return generated_study(
        root,
        f"phases-{style}-{layout}-{int(distractors)}",
        seed=31,
        naming_style=style,
        layout=layout,
        distractors=distractors,
        num_lesions=1,
        matrix=(64, 64),
        num_slices=16,
        mixed_geometry=layout == "separate",
    )


def identify(folder: Path, rules: bool = True, series_phases: dict | None = None, rules_data: dict | None = None):
    from deploy_app.operators.phase_selector_operator import DEFAULT_RULES_FILE, load_phase_rules
    from deploy_app.operators.study_loader_operator import read_study_folder
    from deploy_app.phase_identification import identify_phases

    study = read_study_folder(folder)
    selected_rules = rules_data if rules_data is not None else load_phase_rules(DEFAULT_RULES_FILE, PHASES)
    return identify_phases(study.get_all_series(), PHASES, selected_rules if rules else None, series_phases)


def chosen_instances(identification) -> dict[str, list[str]]:
    return {p: sorted(str(ds.SOPInstanceUID) for ds in s.datasets) for p, s in identification.chosen.items()}


def expected_instances(truth) -> dict[str, list[str]]:
    return {p: sorted(uids) for p, uids in truth.phase_instance_uids.items()}


def phases_command(args: list[str], capsys) -> tuple[int, str]:
    from deploy_app.__main__ import main

    status = main(["deploy_app", "phases", *args])
    return status, capsys.readouterr().out


# ------------------------------------------------------------------------------- every style and layout
@pytest.mark.slow
@pytest.mark.parametrize(("style", "layout"), VARIANTS, ids=[f"{s}-{v}" for s, v in VARIANTS])
def test_every_vendor_style_and_layout(style, layout, root, dciodvfy, capsys):
    """All 8 phases right, with the shipped name rules and from DICOM attributes alone; every kind of file the
    generator wrote passes dciodvfy (one instance per series and ImageType: the instances of one volume are written
    by the same code with the same attributes)."""
    folder, truth = vendor_study(root, style, layout)
    assert set(truth.distractors) == {"loc", "t2cor", "adc", "sub", "mip"}

    status, out = phases_command(["-i", str(folder)], capsys)
    assert status == 0, out
    assert "All 8 phases identified." in out and "PROBLEM" not in out
    for phase in PHASES:
        assert f"phase {phase!r} <- series" in out
    with_names = identify(folder)
    assert chosen_instances(with_names) == expected_instances(truth)
    attributes_only = identify(folder, rules=False)
    assert attributes_only.problems == []
    assert chosen_instances(attributes_only) == expected_instances(truth)
    excluded = {s.series_instance_uid for s in with_names.image_sets if s.excluded}
    assert {truth.distractors[k] for k in ("loc", "adc", "sub", "mip")} <= excluded

    kinds: dict[tuple, Path] = {}
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        kinds.setdefault((ds.SeriesInstanceUID, tuple(ds.get("ImageType", []))), path)
    errors = []
    for path in kinds.values():
        report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        lines = (report.stdout + report.stderr).splitlines()
        errors += [f"{path.relative_to(folder)}: {line}" for line in lines if "Error" in line]
    assert errors == []


# ------------------------------------------------------------------------------------------ problems
def test_every_problem_is_listed_at_once(root, tmp_path, capsys):
    folder, truth = vendor_study(root, "siemens", "separate", distractors=False)
    study = tmp_path / "study"
    shutil.copytree(folder, study, ignore=shutil.ignore_patterns(truth.series_dirs["C+V"]))
    t2 = sorted((study / truth.series_dirs["T2WI"]).glob("*.dcm"))
    t2[7].unlink()  # a gap in T2WI
    dwi = sorted((study / truth.series_dirs["DWI"]).glob("*.dcm"))
    duplicate = dwi[0].parent / "IM_9000.dcm"
    shutil.copy(dwi[3], duplicate)  # the same slice position twice in DWI
    rewrite_dicom([duplicate], SOPInstanceUID="1.2.3.4.5.6.7.9000", InstanceNumber=9000)

    status, out = phases_command(["-i", str(study)], capsys)
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert status == 1 and len(problems) == 3, out
    assert any("phase 'C+V' not found" in p for p in problems)
    assert any("phase 'T2WI'" in p and "missing slice" in p and "instances 7 and 9" in p for p in problems)
    assert any("phase 'DWI'" in p and "1 duplicated slice position" in p and "9000" in p for p in problems)
    assert out.strip().endswith("3 problem(s).")


def test_names_that_lie_do_not_override_attributes(root, tmp_path):
    """Arterial and portal-venous series with each other's names: acquisition times after the injection decide."""
    folder, truth = vendor_study(root, "ge", "separate", distractors=False)
    study = tmp_path / "study"
    shutil.copytree(folder, study)
    arterial, venous = (sorted((study / truth.series_dirs[p]).glob("*.dcm")) for p in ("C+A", "C+V"))
    rewrite_dicom(arterial, SeriesDescription=truth.series_descriptions["C+V"])
    rewrite_dicom(venous, SeriesDescription=truth.series_descriptions["C+A"])
    identification = identify(study)
    assert identification.problems == []
    assert chosen_instances(identification) == expected_instances(truth)
    reasons = " ".join(identification.chosen["C+A"].reasons("C+A"))
    assert "after the injection" in reasons


def test_dynamic_series_split_by_trigger_time(root, tmp_path):
    """A single-series dynamic numbered by TriggerTime (no TemporalPositionIdentifier) is still split in four."""
    folder, truth = vendor_study(root, "siemens", "single-series", distractors=False)
    study = tmp_path / "study"
    shutil.copytree(folder, study)
    for path in sorted((study / truth.series_dirs["C+A"]).glob("*.dcm")):
        ds = pydicom.dcmread(path)
        position = int(ds.TemporalPositionIdentifier)
        del ds.TemporalPositionIdentifier, ds.NumberOfTemporalPositions
        ds.TriggerTime = (position - 1) * 30000
        ds.save_as(path)
    identification = identify(study, rules=False)
    assert identification.problems == []
    assert chosen_instances(identification) == expected_instances(truth)
    assert "trigger time" in identification.chosen["C+V"].part


def test_b0_volume_of_a_diffusion_series_is_not_t2(root, tmp_path):
    """As in Philips' own DWI files (dcm2niix's dcm_qa_philips_dwi): the b=0 volume is a plain spin-echo image with
    b=0, TE 69 ms, ImageType M_SE; it belongs to the DWI, it is no T2WI candidate."""
    folder, truth = vendor_study(root, "philips", "separate", distractors=False)
    study = tmp_path / "study"
    shutil.copytree(folder, study)
    for k, path in enumerate(sorted((study / truth.series_dirs["DWI"]).glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        ds.ScanningSequence = "SE"
        ds.save_as(path)
        ds.SOPInstanceUID, ds.InstanceNumber = f"1.2.3.4.5.6.7.8.{k}", 100 + k
        ds.DiffusionBValue = 0.0
        ds.private_block(0x2001, "Philips Imaging DD 001").add_new(0x03, "FL", 0.0)
        ds.save_as(path.parent / f"IM_b0_{k:04d}.dcm")
    identification = identify(study, rules=False)
    assert identification.problems == []
    assert chosen_instances(identification) == expected_instances(truth)
    (b0,) = [s for s in identification.image_sets if s.part == "b=0"]
    assert b0.score("T2WI") <= 0 and b0.score("DWI") > 0


def test_site_overrides(root):
    """The SeriesInstanceUID -> phase map and a decisive (weighted) name rule both beat the attributes."""
    from deploy_app.operators.phase_selector_operator import DEFAULT_RULES_FILE

    folder, truth = vendor_study(root, "siemens", "separate")
    coronal = truth.distractors["t2cor"]
    by_map = identify(folder, series_phases={coronal: "T2WI"})
    assert by_map.problems == [] and by_map.chosen["T2WI"].series_instance_uid == coronal
    assert "site map" in " ".join(by_map.chosen["T2WI"].reasons("T2WI"))

    rules = json.loads(DEFAULT_RULES_FILE.read_text())
    for selection in rules["selections"]:
        if selection["name"] == "T2WI":
            selection.update(conditions={"SeriesDescription": "_cor_"}, weight=100)
    by_rule = identify(folder, rules_data=rules)
    assert by_rule.problems == [] and by_rule.chosen["T2WI"].series_instance_uid == coronal


def test_unknown_phase_in_series_map_is_refused():
    from deploy_app.operators.phase_selector_operator import load_series_phases

    with pytest.raises(StudyInputError, match=r"unknown phases \{'1.2.3': 'Arterial'\}"):
        load_series_phases({"1.2.3": "Arterial"}, PHASES)


def test_damaged_files_stop_the_run_where_they_may_matter(root, tmp_path, capsys):
    folder, truth = vendor_study(root, "philips", "separate", distractors=False)
    study = tmp_path / "study"
    shutil.copytree(folder, study)
    series = study / truth.series_dirs["T2WI"]
    (series / "notes.txt").write_text("not DICOM")
    source = sorted(series.glob("*.dcm"))[2]
    corrupt = series / "IM_9001.dcm"
    data = bytearray(source.read_bytes())
    data[140:340] = b"\xff" * 200  # the header after the DICM prefix
    corrupt.write_bytes(bytes(data))
    truncated = sorted((study / truth.series_dirs["C+A"]).glob("*.dcm"))[5]
    truncated.write_bytes(truncated.read_bytes()[:-1000])

    # a damaged file whose series cannot be read from it stops the loader; the text file is only skipped
    status, out = phases_command(["-i", str(study)], capsys)
    assert status == 1
    assert f"{corrupt} has no SOPClassUID" in out and "its series cannot be told" in out
    assert "1 problem(s) with the study files" in out and "notes.txt" not in out
    # without it: the truncated file is named as a problem of the phase its series serves
    corrupt.unlink()
    status, out = phases_command(["-i", str(study)], capsys)
    assert status == 1
    assert f"SKIPPED: {series / 'notes.txt'}: not DICOM (no DICM prefix)" in out
    (problem,) = [line for line in out.splitlines() if str(truncated) in line]
    assert problem.startswith("PROBLEM: phase(s) ['C+A']") and "has truncated pixel data" in problem


# ------------------------------------------------------------------------------------------ fail fast
@pytest.mark.parametrize("case", ["model", "output", "pacs"])
def test_fail_fast_before_the_study_is_read(case, root, deploy_model, tmp_path, monkeypatch, capfd, caplog):  # noqa: F811
    import yaml

    folder, _ = vendor_study(root, "siemens", "separate", distractors=False)
    model, out, config = deploy_model, tmp_path / "out", None
    if case == "model":
        model = tmp_path / "model.ts"
        model.write_text("not a model")
        expected = f"model file {model} is not a TorchScript archive"
    elif case == "output":
        blocker = tmp_path / "file"
        blocker.write_text("a file where the output folder should be")
        out = blocker / "out"
        expected = f"Not a directory: '{out}'"  # the SDK's -o parser creates the folder; check_output_folder below
    else:
        settings = yaml.safe_load((APP_DIR / "app.yaml").read_text())
        settings["pacs"] = {"cstore": {"enabled": True, "host": "127.0.0.1", "port": 104}}
        config = tmp_path / "app.yaml"
        config.write_text(yaml.safe_dump(settings))
        expected = "called_ae_title"
    caplog.set_level("INFO")
    status = run_app(["-i", str(folder), "-o", str(out), "-m", str(model)], config=config, monkeypatch=monkeypatch)
    # the SDK reconfigures logging when the app starts: its records reach stderr, or pytest's handler before that
    log = "".join(capfd.readouterr()) + "\n".join(record.getMessage() for record in caplog.records)
    assert status == 1
    assert any("LCA-DB app failed" in line and expected in line for line in log.splitlines()), log[-3000:]
    assert "Read study" not in log and "stage study_loader" not in log
    assert not out.exists() or sr_files(out) == []


# ------------------------------------------------------------------------------------------ end to end
def _seg_uid(folder: Path, truth) -> str:
    return str(pydicom.dcmread(folder / truth.seg_path, stop_before_pixels=True).SOPInstanceUID)


def _check_run(truth, seg_uid: str, out: Path, log: str, dciodvfy: str) -> None:
    """The SR and the attention SEG are valid, the SR's evidence is exactly the instances of the 8 phases, the
    lesion SEG and the attention SEG, and the log names each phase's series and times each stage without the
    selector's per-attribute chatter."""
    (sr,) = sr_files(out)
    (attention,) = attention_files(out)
    for written in (sr, attention):
        report = subprocess.run([dciodvfy, str(written)], capture_output=True, text=True, timeout=120)
        assert [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")] == []
    ds = pydicom.dcmread(sr)
    evidence = {
        item.ReferencedSOPInstanceUID
        for study_item in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    attention_uid = str(pydicom.dcmread(attention, stop_before_pixels=True).SOPInstanceUID)
    assert evidence == {uid for uids in truth.phase_instance_uids.values() for uid in uids} | {seg_uid, attention_uid}
    for phase in PHASES:
        assert f"Phase {phase:<9} <- series" in log and truth.series[phase] in log
    for stage in ("study_loader", "phase_selector", "phase_volume", "lesion_roi", "inference", "sr_writer"):
        assert f"stage {stage}" in log
    assert "(deploy_app.phase_identification)" not in log  # attribute chatter is DEBUG


E2E = [("canon", "single-series"), ("uih", "separate"), ("philips", "single-series")]


@pytest.mark.slow
@pytest.mark.parametrize(("style", "layout"), E2E, ids=[f"{s}-{v}" for s, v in E2E])
def test_app_end_to_end(style, layout, root, deploy_model, dciodvfy, tmp_path, monkeypatch, capfd):  # noqa: F811
    folder, truth = vendor_study(root, style, layout)
    out = tmp_path / "out"
    assert run_app(["-i", str(folder), "-o", str(out), "-m", str(deploy_model)], monkeypatch=monkeypatch) == 0
    _check_run(truth, _seg_uid(folder, truth), out, "".join(capfd.readouterr()), dciodvfy)


@pytest.mark.slow
def test_study_through_orthanc(orthanc, root, deploy_model, dciodvfy, tmp_path, monkeypatch, capfd):  # noqa: F811
    """A GE-style single-series study with distractors, stored in a real Orthanc (storescu) and read back over its
    REST API, as a PACS gives it: the app picks the same 8 image sets."""
    folder, truth = vendor_study(root, "ge", "single-series")
    orthanc.store_folder(folder)
    import requests

    (study_id,) = requests.post(
        f"{orthanc.url}/tools/find",
        json={"Level": "Study", "Query": {"StudyInstanceUID": truth.study_instance_uid}},
        timeout=30,
    ).json()
    fetched = tmp_path / "from-pacs"
    fetched.mkdir()
    instances = orthanc.get(f"/studies/{study_id}/instances").json()
    assert len(instances) == sum(1 for _ in folder.rglob("*.dcm"))
    for instance in instances:
        (fetched / f"{instance['ID']}.dcm").write_bytes(orthanc.get(f"/instances/{instance['ID']}/file").content)
    out = tmp_path / "out"
    assert run_app(["-i", str(fetched), "-o", str(out), "-m", str(deploy_model)], monkeypatch=monkeypatch) == 0
    _check_run(truth, _seg_uid(folder, truth), out, "".join(capfd.readouterr()), dciodvfy)


def test_output_folder_check(tmp_path):
    from deploy_app.preflight import check_output_folder

    assert check_output_folder(tmp_path / "new" / "out").is_dir()
    assert list((tmp_path / "new" / "out").iterdir()) == []  # the probe file is gone
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StudyInputError, match=f"output folder {blocker / 'out'} cannot be written"):
        check_output_folder(blocker / "out")
