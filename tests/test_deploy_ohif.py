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

A 3-lesion study, each lesion centred on another C+A image. The app's SR and attention SEG reach Orthanc by STOW-RS
(Orthanc takes both, so no summary page is sent). Before tracking, the SR viewport shows each lesion (stepping with
the viewport's arrows) on its own image, labelled with its class and probability first; after "track measurements"
the measurement panel lists exactly one tracked rectangle per lesion, labelled the same, each on its own image; the
attention SEG loads as an overlay on the C+A series with one segment per lesion. The browser console holds no error
or warning from any of it. Screenshots go to ``$LCADB_OHIF_SHOTS`` when set.
"""

from __future__ import annotations

import os
import re
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
_TIMEOUT_MS = 60_000


def _dist() -> Path:
    import sys

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from fetch_ohif import fetch

    return fetch()


def _lesions(sr: pydicom.Dataset, folder: Path) -> list[tuple[str, str, int]]:
    """Per lesion group of the SR: (Comment label, first NUM label as OHIF writes it, InstanceNumber of the image its
    region is drawn on)."""
    numbers = {}
    for path in folder.rglob("*.dcm"):
        image = pydicom.dcmread(path, stop_before_pixels=True)
        numbers[image.SOPInstanceUID] = int(image.get("InstanceNumber", 0))
    lesions = []
    for container in sr.ContentSequence:
        if container.ConceptNameCodeSequence[0].CodeValue != "126010":  # Imaging Measurements
            continue
        for group in container.ContentSequence:
            items = list(group.ContentSequence)
            (label,) = [str(i.TextValue) for i in items if i.ConceptNameCodeSequence[0].CodeValue == "121106"]
            first = next(i for i in items if i.ValueType == "NUM")
            value = first.MeasuredValueSequence[0]
            unit = value.MeasurementUnitsCodeSequence[0].CodeValue
            probability = f"{first.ConceptNameCodeSequence[0].CodeMeaning}: {float(value.NumericValue):.2f} {unit}"
            (region,) = [i for i in first.ContentSequence if i.ValueType == "SCOORD"]
            image = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            lesions.append((label, probability, numbers[image]))
    return lesions


def _instance_number(page) -> int:
    """The InstanceNumber the viewport shows ("I:5 (12/16)")."""
    text = page.locator('[data-cy="viewport-overlay-bottom-right"]').first.inner_text()
    return int(re.search(r"I:\s*(\d+)", text).group(1))


def _svg_text(page) -> list[str]:
    return page.locator("svg text tspan").evaluate_all("els => els.map(e => e.textContent || '')")


def _open_study(page, url: str) -> None:
    page.goto(url, wait_until="networkidle")
    # the first-visit onboarding tour (shepherd.js) would cover the page
    page.add_style_tag(content=".shepherd-modal-overlay-container, .shepherd-element {display: none !important}")
    # let the layout's first series finish loading: replacing it mid-load makes OHIF log IMAGE_LOAD_ERROR
    page.locator('[data-cy="viewport-overlay-top-left"]').first.wait_for(timeout=_TIMEOUT_MS)
    page.wait_for_load_state("networkidle")


def test_sr_in_ohif(orthanc, deploy_model, tmp_path, monkeypatch):  # noqa: F811
    import yaml
    from ohif_harness import OHIFServer
    from playwright.sync_api import sync_playwright

    # seed 60: the three lesions' centres are on C+A images 5, 10 and 7
    folder, truth = generated_study(tmp_path, "ohif", seed=60, naming_style="siemens", num_lesions=3)
    orthanc.store_folder(folder)
    config = yaml.safe_load((REPO_ROOT / "deploy_app" / "app.yaml").read_text())
    config["pacs"] = {"stowrs": {"enabled": True, "url": orthanc.dicomweb}}
    (tmp_path / "app.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    argv = ["-i", str(folder), "-o", str(out), "-m", str(deploy_model)]
    assert run_app(argv, config=tmp_path / "app.yaml", monkeypatch=monkeypatch) == 0
    (sr_path,) = sr_files(out)
    sr = pydicom.dcmread(sr_path)
    seg_number = pydicom.dcmread(next(out.glob("attention-*.dcm")), stop_before_pixels=True).SeriesNumber
    lesions = _lesions(sr, folder)
    assert len(lesions) == 3 and len({image for *_, image in lesions}) == 3  # every lesion on its own image

    shots = SHOTS or tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    console: list[tuple[str, str]] = []
    sr_thumbnail = f'[data-cy="study-browser-thumbnail-no-image"][data-series="{sr.SeriesNumber}"]'
    seg_thumbnail = f'[data-cy="study-browser-thumbnail-no-image"][data-series="{seg_number}"]'
    with OHIFServer(_dist(), orthanc.dicomweb) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=require_tool("chromium"),
            args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"],
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.on("console", lambda message: console.append((message.type, message.text)))
            page.on("pageerror", lambda error: console.append(("pageerror", str(error))))
            url = f"{server.url}/viewer?StudyInstanceUIDs={sr.StudyInstanceUID}"
            _open_study(page, url)

            # before tracking: the SR viewport, lesion after lesion (its arrows step through the measurements)
            page.locator(sr_thumbnail).dblclick()
            for n, (label, probability, image) in enumerate(lesions, start=1):
                page.locator("svg text", has_text=label).first.wait_for(timeout=_TIMEOUT_MS)
                page.wait_for_function(
                    "n => /I:\\s*(\\d+)/.exec(document.querySelector("
                    "'[data-cy=\"viewport-overlay-bottom-right\"]')?.innerText || '')?.[1] === String(n)",
                    arg=image, timeout=_TIMEOUT_MS,
                )  # fmt: skip
                labels = _svg_text(page)
                # the class and its probability first, then the predicted class's NUM (OHIF draws five labels)
                assert labels[0].startswith(label) and labels[1] == probability, labels
                assert len(labels) == 5 and not any(text.startswith("Area:") for text in labels), labels
                page.screenshot(path=str(shots / f"ohif-sr-lesion{n}.png"))
                page.locator('[data-cy="viewport-action-arrows-right"]').first.click()

            # "track measurements": stepping dismissed the prompt, so open the SR afresh and accept it
            _open_study(page, url)
            page.locator(sr_thumbnail).dblclick()
            page.locator('[data-cy="yes-hydrate-btn"]').click(timeout=_TIMEOUT_MS)
            page.locator('[data-cy="trackedMeasurements-btn"]').click()
            rows = page.locator('[data-cy^="measurement-table-row-"]')
            rows.nth(len(lesions) - 1).wait_for(timeout=_TIMEOUT_MS)
            titles = page.locator('[data-cy="data-row-title"]').all_inner_texts()
            assert titles == [label for label, *_ in lesions], titles  # one tracked measurement per lesion
            for n, (label, _, image) in enumerate(lesions, start=1):
                page.locator('[data-cy="data-row-title"]', has_text=label).click()
                page.wait_for_function(
                    "n => /I:\\s*(\\d+)/.exec(document.querySelector("
                    "'[data-cy=\"viewport-overlay-bottom-right\"]')?.innerText || '')?.[1] === String(n)",
                    arg=image, timeout=_TIMEOUT_MS,
                )  # fmt: skip
                # tracked: a rectangle with OHIF's own statistics on the lesion's C+A image
                page.wait_for_function(
                    "() => [...document.querySelectorAll('svg text tspan')]"
                    ".some(e => (e.textContent || '').startsWith('Area:'))",
                    timeout=_TIMEOUT_MS,
                )
                row = rows.nth(n - 1)
                assert f"I: {image}" in row.locator('[data-cy="data-row-details-secondary"]').inner_text()
                page.screenshot(path=str(shots / f"ohif-tracked-lesion{n}.png"))
            overlay = page.locator('[data-cy="viewport-overlay-top-left"]').first.inner_text()

            # the attention SEG: a binary labelmap overlay on the C+A series, one segment per lesion
            page.locator(seg_thumbnail).dblclick()
            page.locator('[data-cy="yes-hydrate-btn"]').click(timeout=_TIMEOUT_MS)
            page.locator('[data-cy="panelSegmentation-btn"]').click()
            for label, *_ in lesions:
                lesion_id = label.split(":")[0]
                page.get_by_text(f"Attention {lesion_id}", exact=True).wait_for(timeout=_TIMEOUT_MS)
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(shots / "ohif-attention.png"))
            assert "Loading SEG" not in page.locator("body").inner_text()
            seen = list(console)  # before closing: closing the browser cancels image requests, which OHIF logs
        finally:
            (shots / "console.txt").write_text("\n".join(f"{t}: {m}" for t, m in console))
            browser.close()
    errors = [(kind, text) for kind, text in seen if kind in ("error", "pageerror", "warning")]
    assert errors == [], errors
    assert not any("Unable to generate tool state" in text or "went wrong" in text for _, text in seen)
    assert truth.series_descriptions["C+A"] in overlay, overlay
