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
"""PACS round trip against a real Orthanc: store a synthetic study (dcmtk storescu), fetch it back, run the
app, send the SR and attention SEG by C-STORE and then again by STOW-RS, and read them back from Orthanc's REST
API: the second run replaces the first (same SOP Instance UIDs), it does not add a series. A destination that is
down is retried, reported, and does not stop the others."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
import yaml
from deploy_fixtures import (  # noqa: F401 - fixtures
    APP_DIR,
    deploy_model,
    generated_study,
    orthanc,
    run_app,
    sr_files,
)

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, name: str, pacs: dict) -> Path:
    config = yaml.safe_load((APP_DIR / "app.yaml").read_text())
    config["pacs"] = pacs
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_study_from_orthanc_to_sr_back_into_orthanc(orthanc, deploy_model, tmp_path, monkeypatch):  # noqa: F811
    import highdicom as hd
    import requests
    from pydicom.sr.codedict import codes

    from deploy_app.lesion_codes import DIAGNOSIS, class_for_code

    folder, truth = generated_study(tmp_path, "pacs-study", seed=21, naming_style="lldmmri", num_lesions=2)
    orthanc.store_folder(folder)
    studies = requests.post(
        f"{orthanc.url}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": truth.study_instance_uid}},
        timeout=30,
    ).json()  # fmt: skip
    assert len(studies) == 1
    study_id = studies[0]
    instances = orthanc.get(f"/studies/{study_id}/instances").json()
    assert len(instances) == sum(1 for _ in folder.rglob("*.dcm"))

    # the app's input is the study as the PACS gives it back
    fetched = tmp_path / "from-pacs"
    fetched.mkdir()
    for instance in instances:
        (fetched / f"{instance['ID']}.dcm").write_bytes(orthanc.get(f"/instances/{instance['ID']}/file").content)

    sent = {}
    for route, pacs in {
        "cstore": {"cstore": {"enabled": True, "host": "127.0.0.1", "port": orthanc.dicom_port,
                              "called_ae_title": orthanc.aet, "calling_ae_title": "LCADB"}},
        "stowrs": {"stowrs": {"enabled": True, "url": orthanc.dicomweb}},
    }.items():  # fmt: skip
        out = tmp_path / f"out-{route}"
        argv = ["-i", str(fetched), "-o", str(out), "-m", str(deploy_model)]
        assert run_app(argv, config=_config(tmp_path, route, pacs), monkeypatch=monkeypatch) == 0, route
        (sr_file,) = sr_files(out)
        sent[route] = pydicom.dcmread(sr_file)

    # same study, same model: the same SR and SEG UIDs, so the PACS holds one of each (the later replaced the first)
    assert sent["cstore"].SOPInstanceUID == sent["stowrs"].SOPInstanceUID
    assert sent["cstore"].SeriesInstanceUID == sent["stowrs"].SeriesInstanceUID
    all_series = orthanc.get(f"/studies/{study_id}/series").json()
    series = [s for s in all_series if s["MainDicomTags"]["Modality"] == "SR"]
    assert len(series) == 1 and len(series[0]["Instances"]) == 1
    segs = [s for s in all_series if s["MainDicomTags"].get("SeriesDescription", "").startswith("LCA-DB attention")]
    assert len(segs) == 1 and len(segs[0]["Instances"]) == 1
    (instance_id,) = series[0]["Instances"]
    stored = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{instance_id}/file").content))
    assert stored.SOPInstanceUID == sent["stowrs"].SOPInstanceUID
    (attention_ref,) = {
        item.ReferencedSOPInstanceUID
        for study_item in stored.CurrentRequestedProcedureEvidenceSequence
        for series_item in study_item.ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
        if item.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
        and series_item.SeriesInstanceUID == segs[0]["MainDicomTags"]["SeriesInstanceUID"]
    }
    (seg_instance,) = segs[0]["Instances"]
    assert attention_ref == orthanc.get(f"/instances/{seg_instance}").json()["MainDicomTags"]["SOPInstanceUID"]
    qido = orthanc.get(f"/dicom-web/studies/{truth.study_instance_uid}/series?Modality=SR").json()
    assert len(qido) == 1
    # Orthanc takes the SR and the SEG, so the summary page and key objects (pacs.summary: fallback) are not sent
    assert {s["MainDicomTags"]["Modality"] for s in all_series} == {"MR", "SEG", "SR"}
    for route, ds in sent.items():
        back = hd.sr.Comprehensive3DSR.from_dataset(stored)
        groups = back.content.get_image_measurement_groups(finding_type=codes.SCT.Lesion)
        assert len(groups) == len(truth.lesions), route
        local = hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups(
            finding_type=codes.SCT.Lesion
        )
        for group, mine in zip(groups, local, strict=True):
            (diagnosis,) = group.get_qualitative_evaluations(name=DIAGNOSIS)
            (expected,) = mine.get_qualitative_evaluations(name=DIAGNOSIS)
            assert class_for_code(diagnosis.value.value, "SCT") == class_for_code(expected.value.value, "SCT")
            assert [m.value for m in group.get_measurements()] == pytest.approx(
                [m.value for m in mine.get_measurements()]
            )


def test_every_destination_is_attempted_and_failures_reported(orthanc, deploy_model, tmp_path, monkeypatch, capfd):  # noqa: F811
    """A C-STORE destination that is down comes first: it is retried with backoff and reported, the STOW-RS
    destination after it still gets the result, and the run ends non-zero naming the failed destination."""
    from deploy_fixtures import free_port

    folder, truth = generated_study(tmp_path, "pacs-down", seed=22, naming_style="siemens", num_lesions=1)
    port = free_port()  # nothing listens there
    pacs = {
        "retries": 2,
        "backoff_s": 0.2,
        "cstore": {"enabled": True, "host": "127.0.0.1", "port": port, "called_ae_title": "NOBODY", "timeout": 5},
        "stowrs": {"enabled": True, "url": orthanc.dicomweb},
    }
    out = tmp_path / "out"
    argv = ["-i", str(folder), "-o", str(out), "-m", str(deploy_model)]
    assert run_app(argv, config=_config(tmp_path, "down", pacs), monkeypatch=monkeypatch) == 1
    log = "".join(capfd.readouterr())
    where = f"C-STORE NOBODY@127.0.0.1:{port}"
    assert f"Attempt 1 at {where} failed" in log and "retrying in 0.2 s" in log and "retrying in 0.4 s" in log
    (failure,) = [line for line in log.splitlines() if "LCA-DB app failed" in line]
    assert "1 of 2 PACS destinations failed" in failure and where in failure and "(3 attempts)" in failure
    assert "destination down" in failure and "rejected SOP class" not in log
    assert "STOW-RS" not in failure
    (sr,) = sr_files(out)  # the SR itself is complete and kept
    uid = pydicom.dcmread(sr).SOPInstanceUID
    qido = orthanc.get(f"/dicom-web/studies/{truth.study_instance_uid}/series?Modality=SR").json()
    assert len(qido) == 1  # sent by STOW-RS although the C-STORE destination before it failed
    assert orthanc.get(f"/dicom-web/studies/{truth.study_instance_uid}/instances?SOPInstanceUID={uid}").json()
