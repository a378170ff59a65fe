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
"""The SR in the OHIF viewer: the npm package's prebuilt viewer (``@ohif/app``, tools/fetch_ohif.py) reads a real
Orthanc over DICOMweb, driven by the system Chromium through Playwright (no browser download)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from deploy_fixtures import (  # noqa: F401 - fixtures
    REPO_ROOT,
    deploy_model,
    generated_study,
    orthanc,
    require_tool,
    run_app,
    sr_files,
)

pytestmark = pytest.mark.slow

SHOTS = Path(os.environ.get("LCADB_OHIF_SHOTS", "")) if os.environ.get("LCADB_OHIF_SHOTS") else None


def _dist() -> Path:
    import sys

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from fetch_ohif import fetch

    return fetch()


def test_sr_in_ohif(orthanc, deploy_model, tmp_path, monkeypatch):  # noqa: F811
    import yaml
    from ohif_harness import OHIFServer
    from playwright.sync_api import sync_playwright

    folder, truth = generated_study(tmp_path, "ohif", seed=51, naming_style="siemens", num_lesions=2)
    storescu = require_tool("storescu")
    command = [storescu, "-R", "-aec", orthanc.aet, "+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(orthanc.dicom_port)]
    store = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=300)
    assert store.returncode == 0, store.stdout + store.stderr
    config = yaml.safe_load((REPO_ROOT / "deploy_app" / "app.yaml").read_text())
    config["pacs"] = {"stowrs": {"enabled": True, "url": orthanc.dicomweb}}
    (tmp_path / "app.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    argv = ["-i", str(folder), "-o", str(out), "-m", str(deploy_model)]
    assert run_app(argv, config=tmp_path / "app.yaml", monkeypatch=monkeypatch) == 0
    (sr_path,) = sr_files(out)
    sr = pydicom.dcmread(sr_path)

    shots = SHOTS or tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    console = []
    with OHIFServer(_dist(), orthanc.dicomweb) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=require_tool("chromium"),
            args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"],
        )
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.on("console", lambda message: console.append((message.type, message.text)))
        page.on("pageerror", lambda error: console.append(("pageerror", str(error))))
        page.goto(f"{server.url}/viewer?StudyInstanceUIDs={sr.StudyInstanceUID}", wait_until="networkidle")
        page.wait_for_timeout(5000)
        page.screenshot(path=str(shots / "01-study.png"))
        (shots / "01-study.html").write_text(page.content())
        (shots / "console.txt").write_text("\n".join(f"{t}: {m}" for t, m in console))
        page.keyboard.press("Escape")  # the onboarding tour
        page.evaluate("document.querySelectorAll('.shepherd-modal-overlay-container, .shepherd-element')"
                      ".forEach(e => e.remove())")  # fmt: skip
        page.locator('[data-cy="study-browser-thumbnail-no-image"][data-series="101"]').dblclick()
        page.wait_for_timeout(8000)
        page.screenshot(path=str(shots / "02-sr.png"))
        (shots / "02-sr.html").write_text(page.content())
        (shots / "console.txt").write_text("\n".join(f"{t}: {m}" for t, m in console))
        buttons = page.locator("button").all_inner_texts()
        (shots / "buttons.txt").write_text("\n".join(buttons))
        (shots / "console.txt").write_text("\n".join(f"{t}: {m}" for t, m in console))
        browser.close()
