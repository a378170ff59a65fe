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
"""How a person sees the SR: dcmtk's ``dsr2html`` rendering, opened in a real headless Chromium (screenshot and
rendered DOM), and the deterministic UIDs that let a PACS replace a re-run's result."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pydicom
import pytest
from deploy_fixtures import (  # noqa: F401 - fixtures
    attention_files,
    deploy_model,
    generated_study,
    require_tool,
    run_app,
    sr_files,
)

pytestmark = pytest.mark.slow


SHOTS = Path(os.environ["LCADB_OHIF_SHOTS"]) if os.environ.get("LCADB_OHIF_SHOTS") else None


@pytest.fixture(scope="module")
def study_and_sr(tmp_path_factory, deploy_model):  # noqa: F811
    root = tmp_path_factory.mktemp("sr_view")
    folder, truth = generated_study(root, "sr-view", seed=31, naming_style="siemens", num_lesions=3)
    out = root / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert run_app(["-i", str(folder), "-o", str(out), "-m", str(deploy_model)], monkeypatch=monkeypatch) == 0
    (sr,) = sr_files(out)
    return folder, truth, sr


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_dsr2html_in_headless_chromium(study_and_sr, tmp_path):
    """dsr2html (dcmtk, unchanged) renders, as Chromium (the Debian package, headless) shows it: the impression
    first, then per lesion its short name, the diagnosis before the probabilities, the low-margin flag, the size and
    the series and slice of its region, all inline; highdicom finds the 3 lesion groups with their regions."""
    import highdicom as hd
    from PIL import Image
    from pydicom.sr.codedict import codes

    from deploy_app.findings import DISCLAIMER_TEXT
    from deploy_app.lesion_codes import (
        DIAGNOSIS,
        LESION_CODES,
        LOW_MARGIN,
        LOW_MARGIN_PERCENT,
        SHORT_NAMES,
        class_for_code,
    )
    from deploy_app.operators.sr_writer_operator import lesion_id_of

    folder, truth, sr_path = study_and_sr
    reference = pydicom.dcmread(next((folder / truth.series_dirs["C+A"]).glob("*.dcm")), stop_before_pixels=True)
    html = tmp_path / "sr.html"
    rendered = subprocess.run([require_tool("dsr2html"), str(sr_path), str(html)], capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    chromium = require_tool("chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    screenshot = (SHOTS or tmp_path) / "sr-dsr2html.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    shot = subprocess.run(
        [chromium, *flags, f"--screenshot={screenshot}", "--window-size=1000,1400", html.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    image = Image.open(screenshot).convert("L")
    assert image.size == (1000, 1400)
    low, high = image.getextrema()
    assert low < 64 and high > 192  # text on a page, not a blank or error screen
    dom = subprocess.run([chromium, *flags, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = _text(dom.stdout)
    body = text.split(" Annex Annex 1 ")[0]  # what is shown inline, before the annexes (long texts)
    assert "Imaging Measurement Report" in body and "Measurement Group" in body

    # the impression and the disclaimer come first, before any lesion
    impression = body.index("Impression:")
    assert impression < body.index("Measurement Group") and impression < body.index("Probability of")
    assert body[impression:].startswith(f"Impression: {len(truth.lesions)} lesions classified")
    assert DISCLAIMER_TEXT in body

    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_image_measurement_groups(finding_type=codes.SCT.Lesion)
    assert len(groups) == len(truth.lesions) == 3
    position = body.index("Measurement Group")
    for group in groups:
        (diagnosis,) = group.get_qualitative_evaluations(name=DIAGNOSIS)
        name = class_for_code(diagnosis.value.value, "SCT")
        measurements = group.get_measurements()
        (region,) = measurements[0].referenced_coordinates  # highdicom finds the lesion's region
        assert region.GraphicType == "POLYLINE"
        lesion_id = lesion_id_of(group.tracking_identifier)
        # short name, diagnosis, flag, probabilities, size, where: in this order, inline
        label = f"Comment: {lesion_id}: {SHORT_NAMES[name]} {measurements[0].value:.2f} %"
        order = [body.index(label, position)]
        order.append(
            body.index(f"Diagnosis: {LESION_CODES[name].meaning} ({LESION_CODES[name].value}, SCT)", order[-1])
        )
        margin = measurements[0].value - measurements[1].value
        if margin < LOW_MARGIN_PERCENT:
            order.append(body.index(f"Classification margin: {LOW_MARGIN.meaning}", order[-1]))
        for measurement in measurements:
            # "Probability of liver cell carcinoma: 87.31 %", "Long axis: 24.0 mm" (the value as the SR stores it)
            pattern = rf"{re.escape(measurement.name.meaning)}: {measurement.value:g}(\.0)? {measurement.unit.value}"
            order.append(re.compile(pattern).search(body, order[-1]).start())
        order.append(body.index(f"Region location: series {reference.SeriesNumber} ", order[-1]))
        assert order == sorted(order), order
        position = order[-1]
    assert not re.search(r"\d 1 \d", text)  # no bare "0.0743 1 0.3549 1" run of values


def test_rerun_writes_the_same_uids(study_and_sr, deploy_model, tmp_path, monkeypatch):  # noqa: F811
    """Same study, same model: same SR and SEG SOP Instance and Series UIDs (a PACS replaces them)."""
    folder, _, first_sr = study_and_sr
    out = tmp_path / "again"
    assert run_app(["-i", str(folder), "-o", str(out), "-m", str(deploy_model)], monkeypatch=monkeypatch) == 0
    (second_sr,) = sr_files(out)
    first, second = pydicom.dcmread(first_sr), pydicom.dcmread(second_sr)
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID"):
        assert first[keyword].value == second[keyword].value
    (first_seg,), (second_seg,) = attention_files(Path(first_sr).parent), attention_files(out)
    assert first_seg.name == second_seg.name
    assert pydicom.dcmread(first_seg).SeriesInstanceUID == pydicom.dcmread(second_seg).SeriesInstanceUID
