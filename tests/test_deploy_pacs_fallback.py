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
"""A PACS that does not take SR or SEG still gets the result, and a PACS that is down costs bounded time.

Real peers only: dcmtk's ``storescp`` configured (``-xf``, its association negotiation profile file) to accept
MR, Secondary Capture and Key Object Selection only, as an image-only archive does; ``storescp`` with its default
profile (it takes SR and SEG); Orthanc checking the called AE title; a STOW-RS "server" that accepts the connection
and never answers (a hung server); a port where nothing listens (a server that is down).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from deploy_fixtures import (  # noqa: F401 - fixtures
    APP_DIR,
    deploy_model,
    free_port,
    generated_study,
    orthanc,
    require_tool,
    run_app,
    sr_files,
)
from deploy_outputs import check_dicom, output_file

pytestmark = pytest.mark.slow

SC = "1.2.840.10008.5.1.4.1.1.7"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"

# dcmtk's association negotiation profile format (the storescp.cfg dcmtk ships in /etc/dcmtk): an archive for MR images,
# secondary captures and key object selections only
_IMAGE_ONLY_PROFILE = """
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[ImageOnlyArchive]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = MRImageStorage\\Uncompressed
PresentationContext3 = SecondaryCaptureImageStorage\\Uncompressed
PresentationContext4 = KeyObjectSelectionDocumentStorage\\Uncompressed

[[Profiles]]
[ImageOnly]
PresentationContexts = ImageOnlyArchive
"""


class StoreSCP:
    """A dcmtk ``storescp`` on a free port of 127.0.0.1, writing what it receives to ``folder``."""

    def __init__(self, root: Path, profile: str | None = None):
        self.folder = root / "received"
        self.folder.mkdir(parents=True)
        self.port = free_port()
        command = [require_tool("storescp"), "-od", str(self.folder), "-aet", "ARCHIVE"]
        if profile is not None:
            (root / "profile.cfg").write_text(profile)
            command += ["-xf", str(root / "profile.cfg"), "ImageOnly"]
        self.log = open(root / "storescp.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([*command, str(self.port)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"storescp did not start: {(root / 'storescp.log').read_text()[-2000:]}")
                time.sleep(0.1)

    def received(self) -> dict[str, pydicom.Dataset]:
        """SOP Class UID -> the instance received of that class."""
        return {str(ds.SOPClassUID): ds for ds in (pydicom.dcmread(p) for p in sorted(self.folder.iterdir()))}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)
        self.log.close()


@pytest.fixture
def image_only_archive(tmp_path):
    scp = StoreSCP(tmp_path / "image-only", _IMAGE_ONLY_PROFILE)
    yield scp
    scp.stop()


@pytest.fixture
def full_archive(tmp_path):
    scp = StoreSCP(tmp_path / "full")
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, deploy_model):  # noqa: F811
    """The app's output folder for a 2-lesion study (no PACS configured)."""
    root = tmp_path_factory.mktemp("pacs_fallback")
    folder, _ = generated_study(root, "pacs-fallback", seed=23, naming_style="siemens", num_lesions=2)
    out = root / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert run_app(["-i", str(folder), "-o", str(out), "-m", str(deploy_model)], monkeypatch=monkeypatch) == 0
    return out


def _datasets(out: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(out.glob("*.dcm"))]


def test_image_only_archive_gets_the_summary_from_the_app(
    image_only_archive,
    deploy_model,  # noqa: F811
    dciodvfy,
    tmp_path,
    monkeypatch,
    capfd,
):
    """End to end: the app sends to an archive that refuses SR and SEG; the log names the refused SOP classes (not
    "destination down"), the archive stores the summary page and the key object selection exactly as written, the
    run succeeds."""
    folder, truth = generated_study(tmp_path, "image-only-study", seed=24, naming_style="ge", num_lesions=3)
    config = yaml.safe_load((APP_DIR / "app.yaml").read_text())
    config["pacs"]["cstore"] = {"enabled": True, "host": "127.0.0.1", "port": image_only_archive.port,
                                "called_ae_title": "ARCHIVE"}  # fmt: skip
    (tmp_path / "app.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    argv = ["-i", str(folder), "-o", str(out), "-m", str(deploy_model)]
    assert run_app(argv, config=tmp_path / "app.yaml", monkeypatch=monkeypatch) == 0
    log = "".join(capfd.readouterr())
    (refusal,) = [line for line in log.splitlines() if "rejected SOP class" in line]
    assert "Comprehensive 3D SR Storage" in refusal and "Segmentation Storage" in refusal, refusal
    assert f"C-STORE ARCHIVE@127.0.0.1:{image_only_archive.port}" in refusal and "destination down" not in log
    received = image_only_archive.received()
    assert set(received) == {SC, KOS}
    for uid, prefix in ((SC, "summary-"), (KOS, "key-images-")):
        written = output_file(out, prefix)
        assert received[uid].SOPInstanceUID == pydicom.dcmread(written).SOPInstanceUID
        stored = next(p for p in image_only_archive.folder.iterdir() if received[uid].SOPInstanceUID in p.name)
        check_dicom(stored, dciodvfy, "SCImage" if uid == SC else "KeyObjectSelectionDocument")
        assert received[uid].StudyInstanceUID == truth.study_instance_uid
    (sr,) = sr_files(out)  # every output stays in the folder
    assert pydicom.dcmread(sr).SOPClassUID == SR


def test_summary_goes_only_where_the_result_is_refused(outputs, image_only_archive, full_archive, caplog):
    """Fallback mode (the default): the archive taking SR and SEG gets those only; the image-only one gets the
    summary. "always": every destination gets the summary too."""
    from deploy_app.operators.pacs_sender_operator import CStoreDestination, send_to_all

    caplog.set_level(logging.INFO)
    destinations = [CStoreDestination("127.0.0.1", scp.port, "ARCHIVE") for scp in (full_archive, image_only_archive)]
    send_to_all(_datasets(outputs), destinations)
    assert set(full_archive.received()) == {SR, SEG}
    assert set(image_only_archive.received()) == {SC, KOS}
    refusals = [r.getMessage() for r in caplog.records if "rejected SOP class" in r.getMessage()]
    assert len(refusals) == 1 and str(image_only_archive.port) in refusals[0]

    for scp in (full_archive, image_only_archive):
        for path in scp.folder.iterdir():
            path.unlink()
    send_to_all(_datasets(outputs), destinations, summary_mode="always")
    assert set(full_archive.received()) == {SR, SEG, SC, KOS}
    assert set(image_only_archive.received()) == {SC, KOS}


def test_hung_stowrs_server_costs_bounded_time(outputs, caplog):
    """A STOW-RS server that accepts the connection and never answers: with the shipped settings (app.yaml) the
    attempts stop within ``max_send_s`` (< 30 s), each logged as "destination down"."""
    from deploy_app.errors import PACSSendError
    from deploy_app.operators.pacs_sender_operator import (
        StowRsDestination,
        destinations_from_config,
        retry_policy_from_config,
        send_to_all,
    )

    shipped = yaml.safe_load((APP_DIR / "app.yaml").read_text())["pacs"]
    policy = retry_policy_from_config(shipped)
    assert policy.max_send_s < 30
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # connections complete in the kernel's backlog; nothing ever reads or answers
    url = f"http://127.0.0.1:{hung.getsockname()[1]}/dicom-web"
    (destination,) = destinations_from_config({**shipped, "stowrs": {**shipped["stowrs"], "enabled": True, "url": url}})
    assert isinstance(destination, StowRsDestination)
    caplog.set_level(logging.INFO)
    start = time.monotonic()
    try:
        with pytest.raises(PACSSendError, match="destination down") as failure:
            send_to_all(_datasets(outputs), [destination], policy)
    finally:
        hung.close()
    elapsed = time.monotonic() - start
    assert policy.max_send_s - 5 < elapsed < policy.max_send_s + 2, elapsed
    assert "1 of 1 PACS destinations failed" in str(failure.value) and url in str(failure.value)
    retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Attempt ")]
    assert retries and all("destination down" in message for message in retries), retries


def test_refused_connection_and_rejected_association_are_told_apart(outputs, orthanc, caplog):  # noqa: F811
    """Nothing listening: "destination down", retried. Orthanc rejecting an unknown called AE title: "association
    rejected by the SCP", permanent, not retried. Neither is a rejected SOP class."""
    from deploy_app.errors import PACSSendError
    from deploy_app.operators.pacs_sender_operator import CStoreDestination, RetryPolicy, send_to_all

    down = CStoreDestination("127.0.0.1", free_port(), "NOBODY", timeout=5)
    wrong_title = CStoreDestination("127.0.0.1", orthanc.dicom_port, "NOT-ORTHANC", timeout=5)
    caplog.set_level(logging.INFO)
    with pytest.raises(PACSSendError) as failure:
        send_to_all(_datasets(outputs), [down, wrong_title], RetryPolicy(retries=2, backoff_s=0.1, max_send_s=10))
    message = str(failure.value)
    assert message.startswith("2 of 2 PACS destinations failed")
    down_part, rejected_part = message.split("; ")
    assert str(down) in down_part and "destination down" in down_part and "(3 attempts)" in down_part
    assert str(wrong_title) in rejected_part and "association rejected by the SCP" in rejected_part
    assert "called ae title not recognised" in rejected_part.lower() and "not retried" in rejected_part
    assert "rejected SOP class" not in caplog.text
