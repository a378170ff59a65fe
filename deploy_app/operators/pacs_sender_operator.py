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
"""Sending the results to PACS: DICOM C-STORE (pynetdicom) and/or DICOMweb STOW-RS (dicomweb-client).

Destinations come from the ``pacs`` block of the app configuration (``app.yaml``; in a MAP replace it with
``monai-deploy run --config``)::

    pacs:
      retries: 3            # further attempts per destination after a failed one
      backoff_s: 2.0        # wait before the first retry, doubled before each next one
      cstore: {enabled: true, host: pacs.hospital, port: 104, called_ae_title: PACS, calling_ae_title: LCADB}
      stowrs: {enabled: true, url: https://pacs.hospital/dicom-web}

Every destination is attempted, whatever happened at the others; a destination that still fails after its retries
is reported, and when any failed the run ends with one error listing each failed destination and why (the files
stay in the output folder). The SOP Instance UIDs are derived from the study and the model (:mod:`deploy_app.uids`),
so a re-sent result replaces the one the PACS holds where the PACS replaces instances of the same UID.

A STOW-RS server needing HTTP basic authentication gets the user and password from the environment variables
``LCADB_STOWRS_USER`` and ``LCADB_STOWRS_PASSWORD`` (never from the configuration file).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom import dcmread
from pydicom.dataset import Dataset

from ..errors import PACSSendError

__all__ = [
    "CStoreDestination",
    "PACSSenderOperator",
    "RetryPolicy",
    "StowRsDestination",
    "destinations_from_config",
    "retry_policy_from_config",
    "send_to_all",
]


@dataclass(frozen=True)
class CStoreDestination:
    """A DICOM storage SCP."""

    host: str
    port: int
    called_ae_title: str
    calling_ae_title: str = "LCADB"
    timeout: float = 30.0

    def __str__(self) -> str:
        return f"C-STORE {self.called_ae_title}@{self.host}:{self.port}"

    def send(self, datasets: list[Dataset]) -> None:
        """C-STORE ``datasets`` over one association; raises :class:`PACSSendError` naming the destination and
        status on failure. A warning status (0xB000-0xBFFF, e.g. coerced attributes) counts as stored."""
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for context in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}:
            ae.add_requested_context(*context)
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae_title)
        if not assoc.is_established:
            raise PACSSendError(f"{self}: association rejected or aborted (is the SCP up and the AE title right?).")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None or not (code == 0x0000 or 0xB000 <= code <= 0xBFFF):
                    raise PACSSendError(
                        f"{self}: {ds.SOPInstanceUID} failed with status {code if code is None else hex(code)}."
                    )
        finally:
            assoc.release()


@dataclass(frozen=True)
class StowRsDestination:
    """A DICOMweb server's base URL (the STOW-RS endpoint is ``<url>/studies``)."""

    url: str

    def __str__(self) -> str:
        return f"STOW-RS {self.url}"

    def send(self, datasets: list[Dataset]) -> None:
        """STOW-RS ``datasets``; raises :class:`PACSSendError` with the URL and reason on failure."""
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session, create_session_from_user_pass

        user, password = os.environ.get("LCADB_STOWRS_USER"), os.environ.get("LCADB_STOWRS_PASSWORD")
        session = create_session_from_user_pass(user, password) if user else create_session()
        client = DICOMwebClient(url=self.url, session=session)
        try:
            response = client.store_instances(datasets=list(datasets))
        except Exception as err:  # requests/HTTP errors of several types
            raise PACSSendError(f"STOW-RS {self.url}: {err}") from err
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = [getattr(item, "FailureReason", None) for item in failed]
            raise PACSSendError(f"STOW-RS {self.url}: the server refused instances (failure reasons {reasons}).")


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` further attempts after a failed one, waiting ``backoff_s`` before the first, doubled each time."""

    retries: int = 3
    backoff_s: float = 2.0

    def waits(self) -> list[float]:
        return [self.backoff_s * 2**n for n in range(self.retries)]


def retry_policy_from_config(config: dict[str, Any] | None) -> RetryPolicy:
    """The retry policy of the ``pacs`` configuration block (``retries``, ``backoff_s``).

    Raises:
        ValueError: for a negative or non-numeric value.
    """
    config = config or {}
    try:
        policy = RetryPolicy(int(config.get("retries", 3)), float(config.get("backoff_s", 2.0)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"pacs.retries / pacs.backoff_s must be numbers in the app configuration: {err}") from err
    if policy.retries < 0 or policy.backoff_s < 0:
        raise ValueError(f"pacs.retries and pacs.backoff_s must not be negative, got {policy}.")
    return policy


def send_to_all(
    datasets: list[Dataset],
    destinations: list[CStoreDestination | StowRsDestination],
    policy: RetryPolicy = RetryPolicy(),
    logger: logging.Logger | None = None,
) -> None:
    """Send ``datasets`` to every destination, retrying each as ``policy`` says.

    Raises:
        PACSSendError: after all destinations were attempted, listing every one that still failed and why.
    """
    logger = logger or logging.getLogger(__name__)
    failures = []
    for destination in destinations:
        waits = policy.waits()
        for attempt in range(1, len(waits) + 2):
            try:
                destination.send(datasets)
            except PACSSendError as err:
                if attempt > len(waits):
                    logger.error("Giving up on %s after %d attempts: %s", destination, attempt, err)
                    failures.append(f"{err} ({attempt} attempts)")
                    break
                logger.warning("Attempt %d at %s failed (%s); retrying in %.1f s.", attempt, destination, err,
                               waits[attempt - 1])  # fmt: skip
                time.sleep(waits[attempt - 1])
            else:
                logger.info("Sent %d instances to %s (attempt %d).", len(datasets), destination, attempt)
                break
    if failures:
        raise PACSSendError(f"{len(failures)} of {len(destinations)} PACS destinations failed: " + "; ".join(failures))


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
    """Sends the written files (attention SEG, then SR) to every configured destination (see the module docstring).

    Named input:
        output_paths: paths of the files from the SR writer.

    Raises (in ``compute``):
        PACSSendError: listing every destination that failed (the files stay in the output folder).
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        destinations: list[CStoreDestination | StowRsDestination],
        retry_policy: RetryPolicy = RetryPolicy(),
        **kwargs,
    ):
        if not destinations:
            raise ValueError("destinations must not be empty: leave the operator out when nothing is configured.")
        self.destinations = list(destinations)
        self.retry_policy = retry_policy
        self.input_name_paths = "output_paths"
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.input_name_paths)

    def compute(self, op_input, op_output, context):
        datasets = [dcmread(Path(path)) for path in op_input.receive(self.input_name_paths)]
        send_to_all(datasets, self.destinations, self.retry_policy, self._logger)
