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
"""The SR in the OHIF viewer: the npm package's prebuilt viewer (``@ohif/app`` 3.13.2, tools/fetch_ohif.py) reads a
real Orthanc over DICOMweb, driven by the system Chromium through Playwright (no browser download).

The app's SR and attention SEG reach Orthanc by STOW-RS; the SR opened in OHIF's SR viewport draws the lesion on its
C+A image with the predicted class's probability as the first of its (at most five) labels and the attention patch
as its own labelled region; accepting "track measurements" turns both into tracked rectangles on the C+A series;
the browser console holds no error or warning from any of it. Screenshots go to ``$LCADB_OHIF_SHOTS`` when set.
"""

from __future__ import annotations

import os
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

    folder, truth = generated_study(tmp_path, "ohif", seed=51, naming_style="siemens", num_lesions=1)
    orthanc.store_folder(folder)
    config = yaml.safe_load((REPO_ROOT / "deploy_app" / "app.yaml").read_text())
    config["pacs"] = {"stowrs": {"enabled": True, "url": orthanc.dicomweb}}
    (tmp_path / "app.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    argv = ["-i", str(folder), "-o", str(out), "-m", str(deploy_model)]
    assert run_app(argv, config=tmp_path / "app.yaml", monkeypatch=monkeypatch) == 0
    (sr_path,) = sr_files(out)
    sr = pydicom.dcmread(sr_path)

    expected = _first_labels(sr)

    shots = SHOTS or tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    console: list[tuple[str, str]] = []
    with OHIFServer(_dist(), orthanc.dicomweb) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=require_tool("chromium"),
            args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"],
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.on("console", lambda message: console.append((message.type, message.text)))
            page.on("pageerror", lambda error: console.append(("pageerror", str(error))))
            page.goto(f"{server.url}/viewer?StudyInstanceUIDs={sr.StudyInstanceUID}", wait_until="networkidle")
            # the first-visit onboarding tour (shepherd.js) would cover the page
            page.add_style_tag(
                content=".shepherd-modal-overlay-container, .shepherd-element {display: none !important}"
            )
            # let the layout's first series finish loading: replacing it mid-load makes OHIF log IMAGE_LOAD_ERROR
            page.locator('[data-cy="viewport-overlay-top-left"]').first.wait_for(timeout=60_000)
            page.wait_for_load_state("networkidle")
            page.locator(f'[data-cy="study-browser-thumbnail-no-image"][data-series="{sr.SeriesNumber}"]').dblclick()
            # the SR viewport draws each lesion on its C+A image, labelled with the predicted class first
            for label in expected:
                page.locator("svg text", has_text=label).first.wait_for(timeout=60_000)
            page.screenshot(path=str(shots / "ohif-sr.png"))
            svg_text = page.locator("svg text tspan").evaluate_all("els => els.map(e => e.textContent || '')")
            for lesion_labels in _lesion_label_lists(svg_text, expected):
                assert lesion_labels[0] in expected, lesion_labels  # the predicted class comes first
                assert len(lesion_labels) == 5  # OHIF's most; the probabilities in descending order
            assert any(text.startswith("Peak network attention") for text in svg_text)
            # "track measurements": accept the prompt; OHIF hydrates the SR into tracked RectangleROI measurements
            page.get_by_role("button", name="Yes").click()
            # tracked: every region drawn with OHIF's statistics, and the C+A images loaded (a fixed wait raced both)
            page.wait_for_function(
                "n => [...document.querySelectorAll('svg text tspan')]"
                ".filter(e => (e.textContent || '').startsWith('Area:')).length >= n",
                arg=len(_tracked_ids(sr)),
                timeout=60_000,
            )
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(shots / "ohif-tracked.png"))
            tracked_text = page.locator("svg text tspan").evaluate_all("els => els.map(e => e.textContent || '')")
            overlay = page.locator('[data-cy="viewport-overlay-top-left"]').inner_text()
            seen = list(console)  # before closing: closing the browser cancels image requests, which OHIF logs
        finally:
            (shots / "console.txt").write_text("\n".join(f"{t}: {m}" for t, m in console))
            browser.close()
    console = seen
    errors = [(kind, text) for kind, text in console if kind in ("error", "pageerror", "warning")]
    assert errors == [], errors
    assert not any("Unable to generate tool state" in text or "went wrong" in text for _, text in console)
    assert "Measurement is not rehydratable" not in "\n".join(text for _, text in console if "Lesion" in text)
    # tracked: the lesion and its attention patch are rectangles (with OHIF's own statistics) on the C+A image
    assert truth.series_descriptions["C+A"] in overlay, overlay
    assert sum(text.startswith("Area:") for text in tracked_text) == len(_tracked_ids(sr)), tracked_text


def _first_labels(sr) -> list[str]:
    """Each lesion's first NUM as OHIF labels it: "<concept meaning>: <value> <unit>"."""
    labels = []
    for container in sr.ContentSequence:
        for group in container.get("ContentSequence", []):
            nums = [item for item in group.get("ContentSequence", []) if item.ValueType == "NUM"]
            if nums and nums[0].ConceptNameCodeSequence[0].CodeMeaning.startswith("Probability of"):
                value = nums[0].MeasuredValueSequence[0]
                unit = value.MeasurementUnitsCodeSequence[0].CodeValue
                labels.append(f"{nums[0].ConceptNameCodeSequence[0].CodeMeaning}: {value.NumericValue} {unit}")
    return labels


def _lesion_label_lists(svg_text: list[str], expected: list[str]) -> list[list[str]]:
    """The runs of consecutive "Probability of" labels drawn in the viewport."""
    runs, current = [], []
    for text in svg_text:
        if text.startswith("Probability of"):
            current.append(text)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert len(runs) == len(expected), svg_text
    return runs


def _tracked_ids(sr) -> list[str]:
    """Identifiers of the groups OHIF tracks: each lesion and its attention."""
    from deploy_app.operators.sr_writer_operator import VIEWER_TOOL_PREFIX, lesion_id_of

    return [
        lesion_id_of(str(item.TextValue))
        for container in sr.ContentSequence
        for group in container.get("ContentSequence", [])
        for item in group.get("ContentSequence", [])
        if item.ValueType == "TEXT" and str(item.TextValue).startswith(VIEWER_TOOL_PREFIX)
    ]
