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
"""What a PACS sends besides the generator's classic studies: Enhanced and Legacy Converted Enhanced MR, every
transfer syntax, a phase on its own grid, files the study does not need; and the identity of what the app writes
(a rerun with other lesions reaches a default Orthanc as a second SR).

Every input is derived from held-out generator studies (seeds no other test uses) by tools we did not write:
highdicom's legacy converter, dcmtk's ``dcmcjpeg`` / ``dcmcjpls`` / ``dcmcrle`` / ``dcmconv``, pydicom's JPEG 2000
encoder (openjpeg), or built from the standard's module definitions (``tests/enhanced_mr.py``); dciodvfy checks
them and everything the app writes."""

from __future__ import annotations

import copy
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from deploy_fixtures import (  # noqa: F401 - fixtures
    APP_DIR,
    REPO_ROOT,
    attention_files,
    deploy_model,
    generated_study,
    require_tool,
    run_app,
    run_orthanc,
    sr_files,
)
from enhanced_mr import enhanced_study
from scripts.constants import PHASES

HELD_OUT_SEED = 47
LEGACY_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.4"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("input_studies")


def held_out(root: Path, style: str, layout: str, distractors: bool = True, lesions: int = 1):
    return generated_study(
        root,
        f"inputs-{style}-{layout}-{int(distractors)}-{lesions}",
        seed=HELD_OUT_SEED,
        naming_style=style,
        layout=layout,
        distractors=distractors,
        num_lesions=lesions,
        matrix=(64, 64),
        num_slices=16,
    )


def identify(folder: Path, rules: bool = True):
    from deploy_app.operators.phase_selector_operator import DEFAULT_RULES_FILE, load_phase_rules
    from deploy_app.operators.study_loader_operator import read_study_folder
    from deploy_app.phase_identification import identify_phases

    study = read_study_folder(folder)
    return identify_phases(
        study.get_all_series(), PHASES, load_phase_rules(DEFAULT_RULES_FILE, PHASES) if rules else None
    )


def phases_command(args: list[str], capsys) -> tuple[int, str]:
    from deploy_app.__main__ import main

    status = main(["deploy_app", "phases", *args])
    return status, capsys.readouterr().out


def dciodvfy_errors(dciodvfy: str, paths) -> list[str]:
    errors = []
    for path in paths:
        report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
        errors += [
            f"{path.name}: {line}" for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")
        ]
    return errors


def mr_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*.dcm")) if pydicom.dcmread(p, stop_before_pixels=True).Modality == "MR"]


# ---------------------------------------------------------------------------------------------- Enhanced MR
def legacy_converted(source: Path, target: Path) -> None:
    """Every MR series of ``source`` as one highdicom ``LegacyConvertedEnhancedMRImage`` (the SEG is copied)."""
    import highdicom as hd

    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
        (target / folder.name).mkdir(parents=True)
        if datasets[0].Modality != "MR":
            shutil.copytree(folder, target / folder.name, dirs_exist_ok=True)
            continue
        image = hd.legacy.LegacyConvertedEnhancedMRImage(
            datasets, series_instance_uid=hd.UID(), series_number=int(datasets[0].SeriesNumber),
            sop_instance_uid=hd.UID(), instance_number=1,
        )  # fmt: skip
        image.save_as(target / folder.name / "LEGACY.dcm")


def test_legacy_converted_enhanced_mr(root, tmp_path, dciodvfy, capsys):
    """highdicom's Legacy Converted Enhanced MR of a held-out single-series study (the dynamic's four temporal
    positions and the Dixon's four images in one instance each): the right 8 phases, each frame traced back to
    its classic instance through the Conversion Source Attributes Sequence."""
    folder, truth = held_out(root, "siemens", "single-series")
    study = tmp_path / "legacy"
    legacy_converted(folder, study)
    converted = sorted(study.rglob("LEGACY.dcm"))
    assert len(converted) == 9 and all(pydicom.dcmread(p).SOPClassUID == LEGACY_ENHANCED_MR for p in converted)
    # The Legacy Converted Enhanced MR IOD (PS3.3 A.71) makes the Common Instance Reference module mandatory (it
    # lists the converted instances, referenced per frame by the Conversion Source Attributes Sequence);
    # dciodvfy only counts references it knows and reports that one error, nothing else.
    unknown_reference = "ReferencedSeriesSequence present but Instance does not reference Instances"
    assert [e for e in dciodvfy_errors(dciodvfy, converted) if unknown_reference not in e] == []

    status, out = phases_command(["-i", str(study)], capsys)
    assert status == 0 and "All 8 phases identified." in out, out
    for rules in (True, False):
        identification = identify(study, rules=rules)
        assert identification.problems == []
        chosen = {
            p: sorted(str(ds.ReferencedSOPInstanceUID) for ds in s.datasets) for p, s in identification.chosen.items()
        }
        assert chosen == {p: sorted(uids) for p, uids in truth.phase_instance_uids.items()}
    assert "temporal position 2" in identification.chosen["C+A"].part


@pytest.fixture(scope="module")
def enhanced(root, tmp_path_factory):
    """A held-out separate-layout study rebuilt as true Enhanced MR (``tests/enhanced_mr.py``)."""
    folder, truth = held_out(root, "philips", "separate")
    target = tmp_path_factory.mktemp("enhanced") / "study"
    frames = enhanced_study(folder, truth, target)
    return target, truth, frames


def test_enhanced_mr_from_the_standard(enhanced, dciodvfy, capsys):
    """Enhanced MR Image Storage built from PS3.3's modules: valid for dciodvfy; the four dynamic phases of one
    instance are split by Temporal Position Index, in- and opposed-phase by FrameType, the DWI's b-values by the
    MR Diffusion macro; with and without name rules the frames chosen are exactly each phase's."""
    study, truth, frames = enhanced
    written = sorted(study.rglob("ENHANCED.dcm"))
    assert len(written) == 8
    assert dciodvfy_errors(dciodvfy, written) == []
    status, out = phases_command(["-i", str(study), "--no-rules"], capsys)
    assert status == 0 and "All 8 phases identified." in out, out
    for rules in (True, False):
        identification = identify(study, rules=rules)
        assert identification.problems == []
        chosen = {
            p: {(str(ds.SOPInstanceUID), ds.frame_number) for ds in s.datasets}
            for p, s in identification.chosen.items()
        }
        assert chosen == frames
    dynamic = {identification.chosen[p].series_instance_uid for p in ("C-pre", "C+A", "C+V", "C+Delay")}
    assert len(dynamic) == 1
    assert any("ContrastBolusAgentPhase ARTERIAL" in r for r in identification.chosen["C+A"].reasons("C+A"))


@pytest.mark.slow
def test_enhanced_mr_end_to_end(enhanced, deploy_model, dciodvfy, tmp_path, monkeypatch, capfd):  # noqa: F811
    """The app on the Enhanced study: a valid SR whose lesion region points at a frame of the dynamic instance,
    a valid attention SEG on that instance; the lesion SEG (drawn on the classic images) is used with a warning."""
    study, truth, frames = enhanced
    out = tmp_path / "out"
    assert run_app(["-i", str(study), "-o", str(out), "-m", str(deploy_model)], monkeypatch=monkeypatch) == 0
    log = "".join(capfd.readouterr())
    (sr,) = sr_files(out)
    (attention,) = attention_files(out)
    assert dciodvfy_errors(dciodvfy, [sr, attention]) == []
    assert "references 16 image(s) that are not in the study" in log
    arterial = {number for uid, number in frames["C+A"]}
    (dynamic_uid,) = {uid for uid, _ in frames["C+A"]}
    references = [
        item
        for item in _nested_items(pydicom.dcmread(sr))
        if item.get("ReferencedSOPInstanceUID") == dynamic_uid and "ReferencedFrameNumber" in item
    ]
    assert references and all(int(item.ReferencedFrameNumber) in arterial for item in references)
    seg = pydicom.dcmread(attention)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == dynamic_uid


def _nested_items(ds):
    """Every item of every sequence in ``ds``, depth first."""
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield item
                yield from _nested_items(item)


# ---------------------------------------------------------------------------------------------- transfer syntaxes
SYNTAXES = {  # name: (how, transfer syntax UID, lossless)
    "jpeg-lossless-sv1": (["dcmcjpeg", "+e1"], "1.2.840.10008.1.2.4.70", True),
    "jpeg-lossless-p14": (["dcmcjpeg", "+el"], "1.2.840.10008.1.2.4.57", True),
    "jpeg-ls-lossless": (["dcmcjpls", "+el"], "1.2.840.10008.1.2.4.80", True),
    "jpeg-ls-near-lossless": (["dcmcjpls", "+en"], "1.2.840.10008.1.2.4.81", False),
    "jpeg2000-lossless": ("openjpeg", "1.2.840.10008.1.2.4.90", True),
    "jpeg2000-lossy": ("openjpeg", "1.2.840.10008.1.2.4.91", False),
    "rle": (["dcmcrle"], "1.2.840.10008.1.2.5", True),
    "deflate": (["dcmconv", "+td"], "1.2.840.10008.1.2.1.99", True),
    "big-endian": (["dcmconv", "+tb"], "1.2.840.10008.1.2.2", True),
    "implicit-le": (["dcmconv", "+ti"], "1.2.840.10008.1.2", True),
}


def transcode(paths, how, syntax: str) -> None:
    """Rewrite ``paths`` in place in ``syntax``: with a dcmtk command, or pydicom's encoder (openjpeg) for JPEG 2000."""
    for path in paths:
        if how == "openjpeg":
            ds = pydicom.dcmread(path)
            ds.compress(syntax, **({} if syntax.endswith(".90") else {"j2k_cr": [15]}))
            ds.save_as(path)
        else:
            command = [require_tool(how[0]), *how[1:], str(path), str(path) + ".new"]
            subprocess.run(command, check=True, capture_output=True, timeout=60)
            Path(str(path) + ".new").replace(path)


@pytest.mark.parametrize("name", list(SYNTAXES))
def test_every_transfer_syntax_decodes(name, root, tmp_path, dciodvfy):
    """The C+A series of a held-out study in each syntax a PACS sends for MR: read by the app's own volume code,
    identical to the uncompressed volume (lossless) or close to it (lossy), and still the C+A phase."""
    from deploy_app.operators.phase_volume_operator import series_volume

    how, syntax, lossless = SYNTAXES[name]
    folder, truth = held_out(root, "canon", "separate", distractors=False)
    study = tmp_path / "study"
    shutil.copytree(folder, study)
    paths = sorted((study / truth.series_dirs["C+A"]).glob("*.dcm"))
    transcode(paths, how, syntax)
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in paths} == {syntax}
    if name != "deflate":  # dciodvfy does not read Deflated Explicit VR Little Endian ("Dicom dataset read failed")
        assert dciodvfy_errors(dciodvfy, paths[:1]) == []

    identification = identify(study, rules=False)
    assert identification.problems == []
    chosen = identification.chosen["C+A"]  # lossy encoders give new SOP Instance UIDs: the files tell
    assert sorted(Path(ds.filename) for ds in chosen.datasets) == paths
    decoded, _, _ = series_volume(chosen.datasets, "C+A")
    original, _, _ = series_volume(
        [pydicom.dcmread(p) for p in (folder / truth.series_dirs["C+A"]).glob("*.dcm")], "C+A"
    )
    if lossless:
        np.testing.assert_array_equal(decoded, original)
    else:
        error = np.abs(decoded - original)
        assert 0 < error.max() and error.mean() < 0.02 * float(np.ptp(original)), (error.max(), error.mean())


@pytest.mark.slow
def test_jpeg_lossless_study_end_to_end(root, deploy_model, dciodvfy, tmp_path, monkeypatch):  # noqa: F811
    """A whole held-out study through dcmtk's ``dcmcjpeg`` (JPEG Lossless SV1, the PACS's most common lossless
    syntax): the app gives the SR of the uncompressed study, UIDs included (same images, same content)."""
    folder, truth = held_out(root, "canon", "separate")
    study = tmp_path / "study"
    shutil.copytree(folder, study)
    transcode(mr_files(study), ["dcmcjpeg", "+e1"], "1.2.840.10008.1.2.4.70")
    reports = {}
    for name, source in (("uncompressed", folder), ("jpeg-lossless", study)):
        out = tmp_path / f"out-{name}"
        assert run_app(["-i", str(source), "-o", str(out), "-m", str(deploy_model)], monkeypatch=monkeypatch) == 0
        assert dciodvfy_errors(dciodvfy, sr_files(out) + attention_files(out)) == []
        (sr,) = sr_files(out)
        reports[name] = pydicom.dcmread(sr)
    assert reports["jpeg-lossless"].SOPInstanceUID == reports["uncompressed"].SOPInstanceUID
    values = {
        name: [
            float(item.MeasuredValueSequence[0].NumericValue)
            for item in _nested_items(ds)
            if "MeasuredValueSequence" in item
        ]
        for name, ds in reports.items()
    }
    # 7 probabilities, then the long and short axis of the lesion box
    assert values["jpeg-lossless"] == values["uncompressed"] and len(values["uncompressed"]) == 9


def test_undecodable_series_is_named_before_any_work(root, tmp_path):
    """Without pylibjpeg (as before it was a dependency), a JPEG Lossless SV1 phase series is named by ``phases``
    (exit 1) before any pixel is decoded; the same syntax in a series that serves no phase is only a warning."""
    folder, truth = held_out(root, "canon", "separate")
    study = tmp_path / "study"
    shutil.copytree(folder, study)
    arterial = sorted((study / truth.series_dirs["C+A"]).glob("*.dcm"))
    mip = sorted((study / f"series_{15:03d}").glob("*.dcm"))
    transcode([*arterial, *mip], ["dcmcjpeg", "+e1"], "1.2.840.10008.1.2.4.70")
    script = (
        "import sys; sys.modules['pylibjpeg'] = None; sys.path[:0] = ['bundle', '.']\n"
        "from deploy_app.__main__ import main; sys.exit(main(['deploy_app', 'phases', '-i', sys.argv[1]]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(study)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
    )
    out = result.stdout
    assert result.returncode == 1, out + result.stderr[-2000:]
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == len(arterial), problems
    assert all(
        "phase(s) ['C+A']" in p and "1.2.840.10008.1.2.4.70" in p and "no installed decoder" in p for p in problems
    )
    assert {str(p) for p in arterial} == {p.split(": ", 2)[2].split(" is in transfer")[0] for p in problems}
    warnings = [line for line in out.splitlines() if line.startswith("WARNING (series 15 serves no phase)")]
    assert len(warnings) == len(mip)


# ---------------------------------------------------------------------------------------------- own grid
def regrid_series(paths: list[Path], matrix: int, spacing_scale: float, thickness: float, shift_mm: float) -> None:
    """Re-acquire a series on another grid, as a scanner would for a separate delayed acquisition: the volume
    resampled (MONAI ``SpatialResample``) onto ``matrix`` x ``matrix`` pixels of ``spacing_scale`` times the pixel
    spacing, ``thickness`` mm slices, shifted ``shift_mm`` along x and the slice normal; new files, new UIDs."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from deploy_app.operators.phase_volume_operator import series_volume

    datasets = [pydicom.dcmread(p) for p in paths]
    volume, affine, ordered = series_volume(datasets, "regrid")
    first = ordered[0]
    spacing = np.asarray(first.PixelSpacing, float) * spacing_scale
    extent = (np.asarray(volume.shape) - 1) * np.linalg.norm(affine[:3, :3], axis=0)
    slices = int(extent[2] // thickness) + 1
    new_affine = affine.copy()
    new_affine[:3, 0] = affine[:3, 0] / np.linalg.norm(affine[:3, 0]) * spacing[1]
    new_affine[:3, 1] = affine[:3, 1] / np.linalg.norm(affine[:3, 1]) * spacing[0]
    new_affine[:3, 2] = affine[:3, 2] / np.linalg.norm(affine[:3, 2]) * thickness
    centre = affine[:3, :3] @ ((np.asarray(volume.shape) - 1) / 2) + affine[:3, 3]
    new_affine[:3, 3] = centre - new_affine[:3, :3] @ ((np.array([matrix, matrix, slices]) - 1) / 2)
    new_affine[:3, 3] += np.array([shift_mm, 0, 0]) + new_affine[:3, 2] / thickness * shift_mm
    image = MetaTensor(torch.from_numpy(volume)[None], affine=torch.as_tensor(affine))
    out = SpatialResample(mode="bilinear", padding_mode="zeros")(
        image, dst_affine=torch.as_tensor(new_affine), spatial_size=(matrix, matrix, slices)
    )[0].numpy()
    for path in paths:
        path.unlink()
    series_uid = pydicom.uid.generate_uid()
    for k in range(slices):
        ds = copy.deepcopy(first)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = k + 1
        ds.Rows = ds.Columns = matrix
        ds.PixelSpacing = [f"{v:.6g}" for v in spacing]
        ds.SliceThickness = ds.SpacingBetweenSlices = f"{thickness:g}"
        position = new_affine[:3, 3] + k * new_affine[:3, 2]
        ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
        ds.SliceLocation = f"{float(position @ (new_affine[:3, 2] / thickness)):.6g}"
        ds.PixelData = np.clip(np.rint(out[:, :, k].T), 0, 65535).astype(np.uint16).tobytes()
        ds.save_as(paths[0].parent / f"IM_{k + 1:04d}.dcm", enforce_file_format=True)


@pytest.fixture(scope="module")
def own_grid(root, tmp_path_factory):
    """A held-out UIH-style study whose C+Delay was acquired on its own grid: 80 x 80 instead of 64 x 64 pixels
    (as 288 instead of 256), 1.25 x the field of view, 4 mm slices, shifted 6 mm; no site map."""
    folder, truth = held_out(root, "uih", "separate")
    study = tmp_path_factory.mktemp("own_grid") / "study"
    shutil.copytree(folder, study)
    delay = sorted((study / truth.series_dirs["C+Delay"]).glob("*.dcm"))
    regrid_series(delay, matrix=80, spacing_scale=1.25, thickness=4.0, shift_mm=6.0)
    return study, truth


def test_phase_on_its_own_grid(own_grid, capsys):
    study, truth = own_grid
    delay = study / truth.series_dirs["C+Delay"]
    assert {pydicom.dcmread(p, stop_before_pixels=True).Rows for p in delay.glob("*.dcm")} == {80}
    status, out = phases_command(["-i", str(study), "--no-rules"], capsys)
    assert status == 0 and "All 8 phases identified." in out, out
    identification = identify(study, rules=False)
    chosen = identification.chosen["C+Delay"]
    assert {p.name for p in delay.glob("*.dcm")} == {Path(ds.filename).name for ds in chosen.datasets}
    assert any("own grid" in r for r in chosen.reasons("C+Delay"))
    for phase in ("C-pre", "C+A", "C+V"):
        assert sorted(str(ds.SOPInstanceUID) for ds in identification.chosen[phase].datasets) == sorted(
            truth.phase_instance_uids[phase]
        )


@pytest.mark.slow
def test_phase_on_its_own_grid_end_to_end(own_grid, deploy_model, dciodvfy, tmp_path, monkeypatch):  # noqa: F811
    """The app runs the study without a site map; the C+Delay channel is resampled onto the C+A grid and holds
    the image inside its field of view."""
    from deploy_app.operators.phase_selector_operator import DEFAULT_RULES_FILE, load_phase_rules, select_phases
    from deploy_app.operators.phase_volume_operator import assemble_phases
    from deploy_app.operators.study_loader_operator import read_study_folder

    study, truth = own_grid
    selection, _ = select_phases(read_study_folder(study), PHASES, load_phase_rules(DEFAULT_RULES_FILE, PHASES), None)
    volume = assemble_phases(selection, PHASES)
    delay = volume.image[PHASES.index("C+Delay")]
    assert delay.shape == volume.spatial_shape and float(np.mean(delay > 0)) > 0.5
    out = tmp_path / "out"
    assert run_app(["-i", str(study), "-o", str(out), "-m", str(deploy_model)], monkeypatch=monkeypatch) == 0
    assert dciodvfy_errors(dciodvfy, sr_files(out) + attention_files(out)) == []


# ---------------------------------------------------------------------------------------------- stray files
def test_files_the_study_does_not_need(root, tmp_path, capsys):
    """A PACS export / CD: README.txt, Thumbs.db, an .xml, a DICOMDIR (dcmtk's dcmmkdir), a byte-identical copy of
    an image, a truncated localizer image and a localizer image with another content under the same SOP Instance
    UID: the 8 phases are found, each of these files is named once, nothing stops."""
    folder, truth = held_out(root, "ge", "separate")
    study = tmp_path / "study"
    shutil.copytree(folder, study)
    (study / "README.txt").write_text("Exported by a PACS\n")
    (study / "Thumbs.db").write_bytes(np.random.default_rng(0).bytes(4096))
    (study / "export.xml").write_text("<export><study/></export>")
    localizer = sorted((study / "series_001").glob("*.dcm"))
    copy = study / "copies" / "IM_0003.dcm"
    copy.parent.mkdir()
    shutil.copy(localizer[2], copy)
    localizer[0].write_bytes(localizer[0].read_bytes()[:-500])
    other = study / "series_001" / "IM_0099.dcm"
    ds = pydicom.dcmread(localizer[1])
    ds.InstanceNumber = 99
    ds.save_as(other)
    # a CD layout: ISO 9660 file names under a DICOMDIR (dcmtk's dcmmkdir), copies of the T2 series' files
    cd = study / "CD"
    (cd / "IMG").mkdir(parents=True)
    t2 = sorted((study / truth.series_dirs["T2WI"]).glob("*.dcm"))
    for k, path in enumerate(t2, start=1):
        shutil.copy(path, cd / "IMG" / f"I{k:04d}")
    dicomdir = subprocess.run(
        [require_tool("dcmmkdir"), "-Pgp", "+r", "IMG"], capture_output=True, text=True, cwd=cd, timeout=120
    )
    assert (cd / "DICOMDIR").is_file(), dicomdir.stderr

    status, out = phases_command(["-i", str(study)], capsys)
    assert status == 0 and "All 8 phases identified." in out, out
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    for path in (study / "README.txt", study / "Thumbs.db", study / "export.xml", cd / "DICOMDIR"):
        assert sum(f"{path}:" in line for line in skipped) == 1, skipped
    pairs = [(copy, localizer[2]), *zip(sorted((cd / "IMG").iterdir()), t2)]
    for first, second in pairs:  # whichever of the two is read second is the one skipped
        assert sum(str(first) in line and str(second) in line and "byte-identical" in line for line in skipped) == 1
    warnings = [line for line in out.splitlines() if line.startswith("WARNING (series 1 ")]
    assert any(str(localizer[0]) in w and "truncated pixel data" in w for w in warnings), warnings
    assert any(str(other) in w and "with other content" in w for w in warnings), warnings
    identification = identify(study)
    assert {p: sorted(str(d.SOPInstanceUID) for d in s.datasets) for p, s in identification.chosen.items()} == {
        p: sorted(u) for p, u in truth.phase_instance_uids.items()
    }


def test_damage_in_a_phase_series_stops_the_run(root, tmp_path, capsys):
    """The same damage in the T2WI series stops ``phases``, naming the files and the phase."""
    folder, truth = held_out(root, "ge", "separate", distractors=False)
    study = tmp_path / "study"
    shutil.copytree(folder, study)
    t2 = sorted((study / truth.series_dirs["T2WI"]).glob("*.dcm"))
    t2[-1].write_bytes(t2[-1].read_bytes()[:-500])  # the last slice: no gap would show it
    ds = pydicom.dcmread(t2[3])
    ds.InstanceNumber = 99
    ds.save_as(t2[3].parent / "IM_0099.dcm")
    status, out = phases_command(["-i", str(study)], capsys)
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert status == 1
    assert any("phase(s) ['T2WI']" in p and str(t2[-1]) in p and "truncated" in p for p in problems), problems
    assert any("phase(s) ['T2WI']" in p and "IM_0099.dcm" in p and "other content" in p for p in problems)


def test_two_studies_in_one_folder_stop_the_run(root, tmp_path, capsys):
    """Files of two studies are not a stray file: the run stops and names both studies."""
    first, first_truth = held_out(root, "ge", "separate", distractors=False)
    second, second_truth = held_out(root, "lldmmri", "separate", distractors=False)
    study = tmp_path / "study"
    shutil.copytree(first, study / "a")
    shutil.copytree(second / second_truth.series_dirs["T2WI"], study / "b")
    status, out = phases_command(["-i", str(study)], capsys)
    assert status == 1 and "holds 2 studies, one is expected" in out
    assert first_truth.study_instance_uid in out and second_truth.study_instance_uid in out


# ---------------------------------------------------------------------------------------------- identity
def test_content_identity_follows_what_shapes_the_content(root, deploy_model):  # noqa: F811
    """Same inputs, same UIDs; other lesions, boxes, phases, weights, device or app version: other UIDs."""
    import dataclasses

    from deploy_app.domain import LesionResult, LesionROI, PhaseVolume, StudyResult
    from deploy_app.uids import content_identity, derived_uid

    folder, truth = held_out(root, "lldmmri", "separate", distractors=False)
    slices = [
        pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((folder / truth.series_dirs["C+A"]).glob("*.dcm"))
    ]
    volume = PhaseVolume(
        image=np.zeros((8, 4, 4, 4), np.float32), affine=np.eye(4), reference_phase="C+A", reference_slices=slices,
        frame_of_reference_uid=truth.frame_of_reference_uid, phase_series_uids=dict(truth.series),
        source_datasets=slices, phase_images={p: sorted(u) for p, u in truth.phase_instance_uids.items()},
    )  # fmt: skip

    def result(boxes, **changes) -> StudyResult:
        lesions = [
            LesionResult(
                LesionROI(f"L{k}", box, np.zeros((8, 1, 1, 1)), (0, 0, 0), f"lesion_boxes.json L{k}"),
                np.full(7, 1 / 7), 0, np.zeros((2, 2)), (0, 0, 0, 1, 1, 1),
            )
            for k, box in enumerate(boxes, start=1)
        ]  # fmt: skip
        study = StudyResult(lesions, volume, tuple("abcdefg"), "lcadb", "0.3.1", "ab" * 32, "cpu")
        return dataclasses.replace(study, **changes)

    three = [(1, 1, 1, 3, 3, 3), (5, 5, 1, 7, 7, 3), (9, 9, 1, 11, 11, 3)]
    base = result(three)
    assert base.content_identity == result(three).content_identity == content_identity(base)
    assert derived_uid(base.content_identity, "sr-instance") == derived_uid(
        result(three).content_identity, "sr-instance"
    )
    assert derived_uid(base.content_identity, "sr-instance") != derived_uid(base.content_identity, "kos-instance")
    others = [
        result(three[:2]),
        result([(1, 1, 1, 3, 3, 4), *three[1:]]),
        result(three, weights_sha256="cd" * 32),
        result(three, device="cuda:0"),
        result(three, volume=dataclasses.replace(volume, phase_images={**volume.phase_images, "C+V": ["1.2.3"]})),
    ]
    identities = {base.content_identity, content_identity(base, app_version="9.9.9")} | {
        r.content_identity for r in others
    }
    assert len(identities) == 2 + len(others)
    assert result(three, device="cuda:1").content_identity == others[3].content_identity  # the kind, not the index
    with pytest.raises(ValueError, match="non-empty"):
        derived_uid(base.content_identity, "")


@pytest.mark.slow
def test_rerun_with_other_lesions_reaches_a_default_orthanc(root, deploy_model, tmp_path, monkeypatch):  # noqa: F811
    """Orthanc with its default configuration (``OverwriteInstances: false``: a re-sent UID is acknowledged and
    dropped). The SEG's 3 lesions, then a ``lesion_boxes.json`` of 2: two SRs and two attention SEGs in Orthanc.
    The first run repeated: the same UIDs, still two."""
    folder, truth = held_out(root, "lldmmri", "separate", distractors=False, lesions=3)
    assert len(truth.lesions) == 3
    with run_orthanc(tmp_path / "orthanc") as orthanc:
        config = yaml.safe_load((APP_DIR / "app.yaml").read_text())
        config["pacs"] = {"cstore": {"enabled": True, "host": "127.0.0.1", "port": orthanc.dicom_port,
                                     "called_ae_title": orthanc.aet, "calling_ae_title": "LCADB"}}  # fmt: skip
        config_file = tmp_path / "app.yaml"
        config_file.write_text(yaml.safe_dump(config))
        with_boxes = tmp_path / "with-boxes"
        shutil.copytree(folder, with_boxes)
        reference = truth.reference_series_instance_uid
        boxes = [
            {"id": f"L{k}", "series_instance_uid": reference, "box_voxels": lesion.box_voxels}
            for k, lesion in enumerate(truth.lesions[:2], start=1)
        ]
        (with_boxes / "lesion_boxes.json").write_text(json.dumps({"lesions": boxes}))
        sent = {}
        for run, study in (("seg", folder), ("boxes", with_boxes), ("seg-again", folder)):
            out = tmp_path / f"out-{run}"
            argv = ["-i", str(study), "-o", str(out), "-m", str(deploy_model)]
            assert run_app(argv, config=config_file, monkeypatch=monkeypatch) == 0, run
            (sr,) = sr_files(out)
            sent[run] = pydicom.dcmread(sr)
        assert sent["seg"].SOPInstanceUID == sent["seg-again"].SOPInstanceUID
        assert sent["seg"].SOPInstanceUID != sent["boxes"].SOPInstanceUID
        assert sent["seg"].SeriesInstanceUID != sent["boxes"].SeriesInstanceUID
        srs = orthanc.get(f"/dicom-web/studies/{truth.study_instance_uid}/instances?Modality=SR").json()
        assert len(srs) == 2
        stored = {}
        for item in srs:
            uid = item["00080018"]["Value"][0]
            instance = [i for i in orthanc.get(f"/studies/{_study_id(orthanc, truth)}/instances").json()
                        if i["MainDicomTags"]["SOPInstanceUID"] == uid]  # fmt: skip
            stored[uid] = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{instance[0]['ID']}/file").content))
        lesion_groups = {uid: _lesion_count(ds) for uid, ds in stored.items()}
        assert lesion_groups == {sent["seg"].SOPInstanceUID: 3, sent["boxes"].SOPInstanceUID: 2}
        segs = [s for s in orthanc.get(f"/studies/{_study_id(orthanc, truth)}/series").json()
                if s["MainDicomTags"].get("SeriesDescription", "").startswith("LCA-DB attention")]  # fmt: skip
        assert len(segs) == 2


def _study_id(orthanc, truth) -> str:
    import requests

    (study_id,) = requests.post(
        f"{orthanc.url}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": truth.study_instance_uid}},
        timeout=30,
    ).json()  # fmt: skip
    return study_id


def _lesion_count(ds) -> int:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    report = hd.sr.Comprehensive3DSR.from_dataset(ds)
    return len(report.content.get_image_measurement_groups(finding_type=codes.SCT.Lesion))
