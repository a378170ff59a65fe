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
"""The CPU MAP, built by the README's one command with holoscan-cli's packager and run as a program.

Needs root: ``tools/map_env.sh up`` installs and starts Docker, buildx and a registry on 127.0.0.1 (and stops at
the end what it started). The study is not one the generator wrote: a Canon-style study (the generator's default is
Siemens) rewritten by dcmtk (``dcmconv`` to implicit VR little endian, ``dcmodify``: other patient and institution,
private data erased), as a study exported by another PACS would come.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from deploy_fixtures import REPO_ROOT, attention_files, generated_study, require_tool, run_app_subprocess, sr_files

pytestmark = pytest.mark.slow

MAP_BUILD = [sys.executable, "-m", "deploy_app.map", "build", "--variant", "cpu"]
MAP_RUN = [sys.executable, "-m", "deploy_app.map", "run"]
#: where the build leaves the model it packaged (its default work folder)
PACKAGED_MODEL = REPO_ROOT / "build" / "map" / "cpu" / "models" / "model_cpu.ts"


@pytest.fixture(scope="module")
def map_host():
    """Docker, buildx, the registry and debootstrap, installed and started by the repository's script."""
    from deploy_app.map import environment_problems

    if os.geteuid() != 0:
        pytest.fail("the MAP test needs root (apt-get, dockerd): run it as root, as CI does")
    already_up = not environment_problems()
    subprocess.run(["bash", str(REPO_ROOT / "tools" / "map_env.sh"), "up"], check=True, timeout=1800)
    yield
    if not already_up:  # leave a daemon and registry that were running before as they were
        subprocess.run(["bash", str(REPO_ROOT / "tools" / "map_env.sh"), "stop"], timeout=120)


@pytest.fixture(scope="module")
def cpu_map(map_host) -> str:
    """The CPU MAP's tag: the last word of the build command's last line."""
    start = time.perf_counter()
    built = subprocess.run(MAP_BUILD, cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-5000:]
    tag = built.stdout.strip().splitlines()[-1].split()[-1]
    size = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True, text=True)
    assert size.returncode == 0, size.stderr
    print(f"\nMAP {tag}: built in {time.perf_counter() - start:.0f} s, {int(size.stdout) / 2**30:.2f} GiB")
    return tag


@pytest.fixture(scope="module")
def held_out_study(tmp_path_factory) -> tuple[Path, object]:
    """A Canon-style 2-lesion study rewritten by dcmtk (implicit VR, other patient and institution, no private
    data), without the generator's ground_truth.json."""
    source, truth = generated_study(
        tmp_path_factory.mktemp("map_source"), "map-canon-2", seed=31, naming_style="canon", num_lesions=2
    )
    study = tmp_path_factory.mktemp("map_study") / "study"
    shutil.copytree(source, study, ignore=shutil.ignore_patterns("ground_truth.json"))
    files = sorted(str(p) for p in study.rglob("*.dcm"))
    dcmconv, dcmodify = require_tool("dcmconv"), require_tool("dcmodify")
    for path in files:
        subprocess.run([dcmconv, "+ti", path, path], check=True, capture_output=True)
    edits = ["-ma", "(0010,0010)=HELD^OUT", "-ma", "(0010,0020)=HELDOUT-31", "-ma", "(0008,0080)=Other Hospital"]
    subprocess.run([dcmodify, "-nb", "-ep", *edits, *files], check=True, capture_output=True)
    sample = pydicom.dcmread(files[0])
    assert sample.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2" and sample.PatientName == "HELD^OUT"
    return study, truth


def _run_map(tag: str, study: Path, output: Path, *options: str) -> subprocess.CompletedProcess:
    command = [*MAP_RUN, "--image", tag, "-i", str(study), "-o", str(output), *options]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)


def _dciodvfy_errors(dciodvfy: str, path: Path) -> list[str]:
    verified = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (verified.stdout + verified.stderr).splitlines() if line.startswith("Error")]


def _findings(path: Path) -> tuple:
    """UIDs, and every lesion's tracking id, diagnosis and numbers, of an SR."""
    import highdicom as hd

    from deploy_app.lesion_codes import DIAGNOSIS

    ds = pydicom.dcmread(path)
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    groups = []
    for group in sr.content.get_image_measurement_groups():
        diagnoses = group.get_qualitative_evaluations(name=DIAGNOSIS)
        numbers = [(m.name.meaning, float(m.value)) for m in group.get_measurements()]
        groups.append((group.tracking_identifier, [d.value.value for d in diagnoses], numbers))
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, groups


def _segment_data(path: Path) -> tuple:
    ds = pydicom.dcmread(path)
    return ds.SOPInstanceUID, [s.SegmentLabel for s in ds.SegmentSequence], ds.PixelData


def test_map_run_equals_host_run(cpu_map, held_out_study, tmp_path, dciodvfy):
    study, truth = held_out_study
    assert PACKAGED_MODEL.is_file()
    host = run_app_subprocess(
        ["-m", "deploy_app", "-i", str(study), "-o", str(tmp_path / "host"), "-m", str(PACKAGED_MODEL)], os.environ
    )
    assert host.returncode == 0, host.stderr[-3000:]
    start = time.perf_counter()
    ran = _run_map(cpu_map, study, tmp_path / "map")
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-4000:]
    print(f"\nMAP run: {time.perf_counter() - start:.1f} s; {ran.stderr.strip().splitlines()[-1]}")

    (map_sr,), (host_sr,) = sr_files(tmp_path / "map"), sr_files(tmp_path / "host")
    (map_seg,), (host_seg,) = attention_files(tmp_path / "map"), attention_files(tmp_path / "host")
    assert map_sr.name == host_sr.name and map_seg.name == host_seg.name  # named by their SOP Instance UIDs
    for path in (map_sr, map_seg):
        assert _dciodvfy_errors(dciodvfy, path) == [], path
        assert path.stat().st_uid == os.getuid()  # written as the caller
    uids, groups = _findings(map_sr)[:3], _findings(map_sr)[3]
    assert _findings(host_sr) == (*uids, groups)
    assert uids[0] == truth.study_instance_uid and len([g for g in groups if g[1]]) == len(truth.lesions) == 2
    assert _segment_data(map_seg) == _segment_data(host_seg)


def test_bad_study_fails_the_container(cpu_map, held_out_study, tmp_path):
    study, truth = held_out_study
    broken = tmp_path / "broken"
    shutil.copytree(study, broken)
    victim = sorted((broken / truth.series_dirs["C+A"]).glob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:-2000])  # a transfer cut short
    ran = _run_map(cpu_map, broken, tmp_path / "out")
    assert ran.returncode == 1, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert "LCA-DB app failed:" in ran.stderr and f"{victim.name} has truncated pixel data" in ran.stderr
    assert not any((tmp_path / "out").iterdir())


def test_readme_docker_run_line_as_another_user_with_a_site_config(cpu_map, held_out_study, tmp_path):
    """The README's ``docker run`` line for a CPU host, as a uid with no account in the image, with the site's
    settings mounted on /var/holoscan/app.yaml: here a PACS that cannot be reached, so the run ends with status 1
    naming it, and the SR and SEG, complete, stay in the output folder, owned by that uid."""
    import yaml

    study, _ = held_out_study
    settings = yaml.safe_load((REPO_ROOT / "deploy_app" / "app.yaml").read_text())
    settings["pacs"].update(retries=0, cstore={**settings["pacs"]["cstore"], "enabled": True, "port": 11112})
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump(settings))
    output = tmp_path / "out"
    output.mkdir()
    os.chown(output, 4321, 4321)
    command = ["docker", "run", "--rm", "--network", "none", "--user", "4321:4321", "--ulimit", "stack=33554432"]
    command += ["-v", f"{study}:/var/holoscan/input:ro", "-v", f"{output}:/var/holoscan/output"]
    command += ["-v", f"{config}:/var/holoscan/app.yaml:ro", cpu_map]
    ran = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert ran.returncode == 1, ran.stdout[-2000:] + ran.stderr[-3000:]
    assert "1 of 1 PACS destinations failed: C-STORE PACS@127.0.0.1:11112" in ran.stderr
    written = sr_files(output) + attention_files(output)
    assert len(written) == 2 and {p.stat().st_uid for p in written} == {4321}
    assert not [p for p in written if p.name.startswith(".")]  # complete files, no temporary one left
