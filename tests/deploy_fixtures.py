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
"""Fixtures and helpers of the deploy app tests (imported by ``tests/test_deploy_*.py``).

Expensive objects (the exported tiny model, generated studies) are built once per test process: the
fixtures are imported into several modules, so they keep their results in this module's cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
APP_DIR = REPO_ROOT / "deploy_app"
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

__all__ = [
    "OrthancServer",
    "app_env",
    "attention_files",
    "deploy_model",
    "export_tiny_model",
    "free_port",
    "generated_study",
    "orthanc",
    "require_tool",
    "run_app",
    "run_orthanc",
    "run_app_subprocess",
    "sr_files",
]

_CACHE: dict[str, object] = {}


def require_tool(name: str) -> str:
    """Path of a Debian tool the tests need (dicom3tools, dcmtk, orthanc); fails, not skips, when absent."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install -y dicom3tools dcmtk orthanc orthanc-dicomweb")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------- the model
def export_tiny_model(out_dir: Path) -> Path:
    """The bundle's TorchScript export (``monai.bundle.ckpt_export``, metadata and inference config embedded) of a
    tiny, randomly initialised LCA-DB returning its attention maps."""
    from deploy_app.benchmark import TINY_OVERRIDES, export_bundle_model

    return export_bundle_model(out_dir, TINY_OVERRIDES, BUNDLE_ROOT)


@pytest.fixture(scope="session")
def deploy_model(tmp_path_factory) -> Path:
    """The exported tiny model (built once per test process)."""
    if "model" not in _CACHE:
        _CACHE["model"] = export_tiny_model(tmp_path_factory.mktemp("deploy_model"))
    return _CACHE["model"]  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- studies
def generated_study(tmp_root: Path, name: str, **kwargs):
    """A synthetic DICOM study from the data generator (small matrix), cached by ``name``: ``(folder, StudyTruth)``.

    The folder keeps the generator's ``ground_truth.json`` next to the DICOM files: the app must ignore it.
    """
    if name not in _CACHE:
        from scripts.synthetic_dicom import generate_dicom_study

        options = {"matrix": (96, 96), "num_slices": 16}
        options.update(kwargs)
        truth = generate_dicom_study(tmp_root / name, **options)
        _CACHE[name] = (tmp_root / name, truth)
    return _CACHE[name]


# ----------------------------------------------------------------------------------------- running it
def app_env(config: Path | None = None) -> dict[str, str]:
    """Environment of an app run: the app config, and no GPU use in tests."""
    env = {**os.environ}
    if config is not None:
        env["HOLOSCAN_CONFIG_PATH"] = str(config)
    return env


def run_app(argv: list[str], config: Path | None = None, monkeypatch=None) -> int:
    """Run the app in this process (as ``python -m deploy_app <argv>``); returns its exit status."""
    from deploy_app.__main__ import main

    if monkeypatch is not None:
        if config is None:
            monkeypatch.delenv("HOLOSCAN_CONFIG_PATH", raising=False)
        else:
            monkeypatch.setenv("HOLOSCAN_CONFIG_PATH", str(config))
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        return main(["deploy_app", *argv])
    finally:
        # the SDK configures the root logger for each run, with a stream handler on the stderr pytest captured for
        # this test; left in place it would write to a closed stream in the next test's run
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)


def run_app_subprocess(args: list[str], env: dict[str, str], cwd: Path = REPO_ROOT, timeout: float = 300):
    """Run ``python <args>`` in a fresh process with a 32 MB stack (Holoscan's recommendation)."""
    cmd = " ".join(["ulimit -s 32768 2>/dev/null;", "exec", _quote(sys.executable), *map(_quote, args)])
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _quote(value: str) -> str:
    import shlex

    return shlex.quote(str(value))


def rewrite_dicom(paths, **attributes) -> None:
    """Set DICOM attributes (by keyword) in each file of ``paths``, in place: a study edited into a bad or unusual
    input."""
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def sr_files(folder: Path) -> list[Path]:
    """Every file left in an output folder (hidden ones included) but the finished attention SEG, summary page and
    key object selection."""
    return [p for p in _all_files(folder) if not p.name.startswith(("attention-", "summary-", "key-images-"))]


def attention_files(folder: Path) -> list[Path]:
    """The finished attention SEG(s) of an output folder."""
    return [p for p in _all_files(folder) if p.name.startswith("attention-")]


def _all_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).exists() else []


# ---------------------------------------------------------------------------------------------- Orthanc
@dataclass
class OrthancServer:
    """An Orthanc of the test session: DICOM and HTTP on free ports of 127.0.0.1."""

    aet: str
    dicom_port: int
    http_port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def store_folder(self, folder: Path) -> None:
        """C-STORE every ``*.dcm`` under ``folder`` with dcmtk's ``storescu``."""
        # -R: propose only the SOP classes present (the SEG is not in storescu's default list)
        command = [require_tool("storescu"), "-R", "-aec", self.aet, "+sd", "+r", "+sp", "*.dcm"]
        command += ["127.0.0.1", str(self.dicom_port), str(folder)]
        store = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert store.returncode == 0, store.stdout + store.stderr

    def get(self, path: str):
        import requests

        response = requests.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response


@contextlib.contextmanager
def run_orthanc(root: Path, **settings) -> Iterator[OrthancServer]:
    """A real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) with its own configuration and storage under
    ``root``; ``settings`` are added to its configuration (none: Orthanc's defaults, e.g. ``OverwriteInstances``
    false)."""
    exe = require_tool("Orthanc")
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if not plugin.is_file():
        pytest.fail(f"{plugin} is missing: apt-get install -y orthanc-dicomweb")
    root.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "lcadb-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": True,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "SaveJobs": False,
        **settings,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen([exe, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    server = OrthancServer("ORTHANC", dicom_port, http_port, process)
    deadline = time.monotonic() + 60
    while True:
        try:
            if server.get("/system").json().get("Name") == "lcadb-test":
                break
        except Exception:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"Orthanc did not start:\n{(root / 'orthanc.log').read_text()[-3000:]}")
        time.sleep(0.2)
    try:
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory) -> Iterator[OrthancServer]:
    """An Orthanc of the test session that replaces a re-sent instance (``OverwriteInstances: true``)."""
    with run_orthanc(tmp_path_factory.mktemp("orthanc"), OverwriteInstances=True) as server:
        yield server
