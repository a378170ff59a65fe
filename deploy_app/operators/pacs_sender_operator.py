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
"""Sending the SR to PACS: DICOM C-STORE (pynetdicom) and/or DICOMweb STOW-RS (dicomweb-client).

Destinations come from the ``pacs`` block of the app configuration (``app.yaml``; in a MAP replace it with
``monai-deploy run --config``)::

    pacs:
      cstore: {enabled: true, host: pacs.hospital, port: 104, called_ae_title: PACS, calling_ae_title: LCADB}
      stowrs: {enabled: true, url: https://pacs.hospital/dicom-web}

A STOW-RS server needing HTTP basic authentication gets the user and password from the environment variables
``LCADB_STOWRS_USER`` and ``LCADB_STOWRS_PASSWORD`` (never from the configuration file).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom import dcmread
from pydicom.dataset import Dataset

from ..errors import PACSSendError

__all__ = ["CStoreDestination", "PACSSenderOperator", "StowRsDestination", "destinations_from_config"]


@dataclass(frozen=True)
class CStoreDestination:
    """A DICOM storage SCP."""

    host: str
    port: int
    called_ae_title: str
    calling_ae_title: str = "LCADB"
    timeout: float = 30.0

    def send(self, ds: Dataset) -> None:
        """C-STORE ``ds``; raises :class:`PACSSendError` with the destination and status on failure."""
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        where = f"C-STORE {self.called_ae_title}@{self.host}:{self.port}"
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae_title)
        if not assoc.is_established:
            raise PACSSendError(f"{where}: association rejected or aborted (is the SCP up and the AE title right?).")
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code != 0x0000:
            raise PACSSendError(f"{where}: failed with status {code if code is None else hex(code)}.")


@dataclass(frozen=True)
class StowRsDestination:
    """A DICOMweb server's base URL (the STOW-RS endpoint is ``<url>/studies``)."""

    url: str

    def send(self, ds: Dataset) -> None:
        """STOW-RS ``ds``; raises :class:`PACSSendError` with the URL and reason on failure."""
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session, create_session_from_user_pass

        user, password = os.environ.get("LCADB_STOWRS_USER"), os.environ.get("LCADB_STOWRS_PASSWORD")
        session = create_session_from_user_pass(user, password) if user else create_session()
        client = DICOMwebClient(url=self.url, session=session)
        try:
            response = client.store_instances(datasets=[ds])
        except Exception as err:  # requests/HTTP errors of several types
            raise PACSSendError(f"STOW-RS {self.url}: {err}") from err
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = [getattr(item, "FailureReason", None) for item in failed]
            raise PACSSendError(f"STOW-RS {self.url}: the server refused the SR (failure reasons {reasons}).")


def destinations_from_config(config: dict[str, Any] | None) -> list[CStoreDestination | StowRsDestination]:
    """Enabled destinations of the ``pacs`` configuration block.

    Raises:
        ValueError: naming the key that is missing or wrong.
    """
    config = config or {}
    out: list[CStoreDestination | StowRsDestination] = []
    cstore = config.get("cstore") or {}
    if cstore.get("enabled", False):
        missing = [k for k in ("host", "port", "called_ae_title") if not cstore.get(k)]
        if missing:
            raise ValueError(f"pacs.cstore is enabled but has no {missing} in the app configuration.")
        out.append(
            CStoreDestination(
                host=str(cstore["host"]),
                port=int(cstore["port"]),
                called_ae_title=str(cstore["called_ae_title"]),
                calling_ae_title=str(cstore.get("calling_ae_title", "LCADB")),
                timeout=float(cstore.get("timeout", 30.0)),
            )
        )
    stowrs = config.get("stowrs") or {}
    if stowrs.get("enabled", False):
        if not stowrs.get("url"):
            raise ValueError("pacs.stowrs is enabled but has no 'url' in the app configuration.")
        out.append(StowRsDestination(url=str(stowrs["url"]).rstrip("/")))
    return out


class PACSSenderOperator(Operator):
    """Sends the written SR to every configured destination.

    Named input:
        sr_path: path of the SR file from the SR writer.

    Raises (in ``compute``):
        PACSSendError: naming the destination that failed (the SR stays in the output folder).
    """

    def __init__(self, fragment: Fragment, *args, destinations: list[CStoreDestination | StowRsDestination], **kwargs):
        if not destinations:
            raise ValueError("destinations must not be empty: leave the operator out when nothing is configured.")
        self.destinations = list(destinations)
        self.input_name_path = "sr_path"
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.input_name_path)

    def compute(self, op_input, op_output, context):
        path = Path(op_input.receive(self.input_name_path))
        ds = dcmread(path)
        for destination in self.destinations:
            destination.send(ds)
            self._logger.info("Sent %s to %s.", path.name, destination)
