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
      backoff_s: 1.0        # wait before the first retry, doubled before each next one
      max_send_s: 25        # all attempts at one destination, waits included, end within this many seconds
      summary: fallback     # the summary page and key objects: only where the SR or SEG is refused, or "always"
      cstore: {enabled: true, host: pacs.hospital, port: 104, called_ae_title: PACS, calling_ae_title: LCADB}
      stowrs: {enabled: true, url: https://pacs.hospital/dicom-web}

What is sent: the **result** (the attention SEG, then the SR) to every destination. A destination that refuses the
SR's or the SEG's SOP class (C-STORE: the presentation context is rejected in association negotiation, or a store
returns 0x0122 "SOP class not supported"; STOW-RS: failure reason 0x0122) is sent the **summary** instead: the
Secondary Capture summary page and the Key Object Selection (:mod:`deploy_app.summary`), which any image archive
takes. The log says "rejected SOP class" with the class names; that is not a failure when the summary got through.

Failures are told apart: a destination that is **down** (no connection, timeout, aborted association, HTTP 5xx) is
retried with backoff, within ``max_send_s`` in all (each attempt's network timeout is cut to the time left); an
association **rejected** by the SCP (e.g. an unknown called AE title) or an HTTP 4xx is reported without retrying
when permanent. Every destination is attempted, whatever happened at the others; when any failed, the run ends with
one error listing each failed destination and why (the files stay in the output folder). The SOP Instance UIDs are
derived from the study and the model (:mod:`deploy_app.uids`), so a re-sent result replaces the one the PACS holds
where the PACS replaces instances of the same UID.

A STOW-RS server needing HTTP basic authentication gets the user and password from the environment variables
``LCADB_STOWRS_USER`` and ``LCADB_STOWRS_PASSWORD`` (never from the configuration file).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, KeyObjectSelectionDocumentStorage, SecondaryCaptureImageStorage

from ..errors import PACSSendError

__all__ = [
    "SUMMARY_MODES",
    "SUMMARY_SOP_CLASSES",
    "CStoreDestination",
    "Delivery",
    "DestinationUnavailable",
    "PACSSenderOperator",
    "RetryPolicy",
    "StowRsDestination",
    "destinations_from_config",
    "retry_policy_from_config",
    "send_to_all",
    "stow_outcome",
    "summary_mode_from_config",
]

#: SOP classes of the summary (sent where the result is refused): Secondary Capture and Key Object Selection.
SUMMARY_SOP_CLASSES = frozenset({SecondaryCaptureImageStorage, KeyObjectSelectionDocumentStorage})
#: ``pacs.summary``: send the summary only to a destination that refuses the result, or to every destination.
SUMMARY_MODES = ("fallback", "always")
_SOP_CLASS_NOT_SUPPORTED = 0x0122
_VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (C-ECHO)


class DestinationUnavailable(PACSSendError):
    """The destination could not be reached or did not answer (down, timed out, aborted): worth another attempt."""


@dataclass
class Delivery:
    """What one attempt at a destination achieved.

    Attributes:
        stored: SOP Instance UIDs the destination stored.
        refused: SOP Class UID -> how the destination refused that class (it does not take it: no retry helps).
    """

    stored: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def _class_name(uid: str) -> str:
    return f"{UID(uid).name} ({uid})"


@dataclass(frozen=True)
class CStoreDestination:
    """A DICOM storage SCP."""

    host: str
    port: int
    called_ae_title: str
    calling_ae_title: str = "LCADB"
    timeout: float = 10.0

    def __str__(self) -> str:
        return f"C-STORE {self.called_ae_title}@{self.host}:{self.port}"

    def send(self, datasets: list[Dataset], timeout: float | None = None) -> Delivery:
        """C-STORE ``datasets`` over one association; the SOP classes the SCP refuses are reported, not sent.

        A warning status (0xB000-0xBFFF, e.g. coerced attributes) counts as stored. ``timeout`` (default: the
        destination's) bounds connecting and each network exchange.

        Raises:
            DestinationUnavailable: no association (connection refused, timeout, abort) or a transient rejection.
            PACSSendError: the SCP rejected the association permanently, or a store failed with another status.
        """
        from pynetdicom import AE

        timeout = self.timeout if timeout is None else timeout
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        # Verification keeps the association up when every storage class is refused, so the refusal is seen for
        # what it is rather than as "no accepted presentation contexts"
        ae.add_requested_context(_VERIFICATION)
        for context in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}:
            ae.add_requested_context(*context)
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae_title)
        delivery = Delivery()
        for context in assoc.rejected_contexts:
            delivery.refused[str(context.abstract_syntax)] = "presentation context rejected in association negotiation"
        if assoc.is_rejected:
            answer = assoc.acceptor.primitive
            reason = f"{answer.result_str}, source {answer.source_str}, reason {answer.reason_str}"
            error = DestinationUnavailable if answer.result == 0x02 else PACSSendError
            raise error(f"{self}: association rejected by the SCP ({reason}).")
        if not assoc.is_established:
            if delivery.refused:  # nothing it takes was proposed
                return delivery
            raise DestinationUnavailable(
                f"{self}: destination down: no association (connection refused, no answer within {timeout:g} s, or "
                "aborted)."
            )
        accepted = {str(context.abstract_syntax) for context in assoc.accepted_contexts}
        try:
            for ds in datasets:
                sop_class = str(ds.SOPClassUID)
                if sop_class not in accepted:
                    continue
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None:
                    raise DestinationUnavailable(f"{self}: no answer to the C-STORE of {ds.SOPInstanceUID}.")
                if code == _SOP_CLASS_NOT_SUPPORTED:
                    delivery.refused[sop_class] = "C-STORE status 0x0122 (SOP class not supported)"
                elif code == 0x0000 or 0xB000 <= code <= 0xBFFF:
                    delivery.stored.append(str(ds.SOPInstanceUID))
                else:
                    raise PACSSendError(f"{self}: {ds.SOPInstanceUID} failed with status {code:#06x}.")
        finally:
            if assoc.is_established:
                assoc.release()
        return delivery


@dataclass(frozen=True)
class StowRsDestination:
    """A DICOMweb server's base URL (the STOW-RS endpoint is ``<url>/studies``)."""

    url: str
    timeout: float = 10.0

    def __str__(self) -> str:
        return f"STOW-RS {self.url}"

    def send(self, datasets: list[Dataset], timeout: float | None = None) -> Delivery:
        """STOW-RS ``datasets`` in one request; the SOP classes the server refuses (failure reason 0x0122, in a 202
        or 409 answer) are reported. ``timeout`` (default: the destination's) bounds connecting and waiting for the
        answer.

        Raises:
            DestinationUnavailable: no connection, a timeout or an HTTP 5xx/408/429 answer.
            PACSSendError: another HTTP error, or instances refused for another reason.
        """
        import requests
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session, create_session_from_user_pass

        user, password = os.environ.get("LCADB_STOWRS_USER"), os.environ.get("LCADB_STOWRS_PASSWORD")
        session = create_session_from_user_pass(user, password) if user else create_session()
        client = DICOMwebClient(url=self.url, session=session, timeout=self.timeout if timeout is None else timeout)
        client.set_http_retry_params(retry=False)  # attempts and their total time are the caller's (RetryPolicy)
        try:
            answer = client.store_instances(datasets=list(datasets))
        except (requests.ConnectionError, requests.Timeout) as err:
            raise DestinationUnavailable(f"{self}: destination down: {type(err).__name__}: {err}") from err
        except requests.HTTPError as err:
            code = err.response.status_code if err.response is not None else 0
            refusal = _json_answer(err.response) if code == 409 else None  # 409: none stored, reasons in the body
            if refusal is not None and refusal.get("FailedSOPSequence"):
                return stow_outcome(refusal, datasets, str(self))
            error = DestinationUnavailable if code >= 500 or code in (408, 429) else PACSSendError
            raise error(f"{self}: HTTP {code}: {err}") from err
        return stow_outcome(answer, datasets, str(self))


def _json_answer(response) -> Dataset | None:
    """The DICOM JSON body of an HTTP answer, or None when it has none."""
    try:
        return Dataset.from_json(response.json())
    except ValueError:  # not JSON (an XML or HTML body): no reasons to read
        return None


def stow_outcome(answer: Dataset | None, datasets: list[Dataset], where: str) -> Delivery:
    """What a STOW-RS answer (PS3.18 store instances response: 200, 202 or 409) says of ``datasets``: every instance
    not in its Failed SOP Sequence was stored; failure reason 0x0122 refuses the instance's SOP class.

    Raises:
        PACSSendError: naming the instances refused for another reason and the reasons.
    """
    delivery = Delivery(stored=[str(ds.SOPInstanceUID) for ds in datasets])
    others = []
    for item in (answer.get("FailedSOPSequence") if answer is not None else None) or []:
        reason = int(getattr(item, "FailureReason", 0) or 0)
        uid = str(getattr(item, "ReferencedSOPInstanceUID", ""))
        if uid in delivery.stored:
            delivery.stored.remove(uid)
        if reason == _SOP_CLASS_NOT_SUPPORTED:
            delivery.refused[str(item.ReferencedSOPClassUID)] = "STOW-RS failure reason 0x0122"
        else:
            others.append(f"{uid}: {reason:#06x}")
    if others:
        raise PACSSendError(f"{where}: the server refused instances (failure reasons {others}).")
    return delivery


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` further attempts after a failed one, waiting ``backoff_s`` before the first, doubled each time,
    all within ``max_send_s`` seconds per destination."""

    retries: int = 3
    backoff_s: float = 1.0
    max_send_s: float = 25.0

    def waits(self) -> list[float]:
        return [self.backoff_s * 2**n for n in range(self.retries)]


def retry_policy_from_config(config: dict[str, Any] | None) -> RetryPolicy:
    """The retry policy of the ``pacs`` configuration block (``retries``, ``backoff_s``, ``max_send_s``).

    Raises:
        ValueError: for a negative or non-numeric value, or a ``max_send_s`` of 0.
    """
    config = config or {}
    defaults = RetryPolicy()
    try:
        policy = RetryPolicy(
            int(config.get("retries", defaults.retries)),
            float(config.get("backoff_s", defaults.backoff_s)),
            float(config.get("max_send_s", defaults.max_send_s)),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"pacs.retries, backoff_s and max_send_s must be numbers in the app configuration: {err}"
        ) from err
    if policy.retries < 0 or policy.backoff_s < 0 or policy.max_send_s <= 0:
        raise ValueError(f"pacs.retries and backoff_s must not be negative and max_send_s must be > 0: {policy}.")
    return policy


def summary_mode_from_config(config: dict[str, Any] | None) -> str:
    """``pacs.summary``: ``"fallback"`` (default) or ``"always"``.

    Raises:
        ValueError: for any other value.
    """
    mode = str((config or {}).get("summary", "fallback"))
    if mode not in SUMMARY_MODES:
        raise ValueError(f"pacs.summary must be one of {list(SUMMARY_MODES)} in the app configuration, got {mode!r}.")
    return mode


def _attempts(destination, datasets: list[Dataset], policy: RetryPolicy, deadline: float, logger) -> Delivery:
    """Send ``datasets`` to ``destination``, retrying while it is unavailable, until ``deadline``.

    Raises:
        PACSSendError: the last failure, with the number of attempts.
    """
    waits = policy.waits()
    attempt = 0
    while True:
        attempt += 1
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise DestinationUnavailable(f"{destination}: the {policy.max_send_s:g} s to send were used up.")
            return destination.send(datasets, timeout=min(destination.timeout, left))
        except DestinationUnavailable as err:
            wait = waits[attempt - 1] if attempt <= len(waits) else None
            if wait is None or time.monotonic() + wait >= deadline:
                raise PACSSendError(f"{err} ({attempt} attempt{'s' if attempt > 1 else ''})") from err
            logger.warning("Attempt %d at %s failed (%s); retrying in %.1f s.", attempt, destination, err, wait)
            time.sleep(wait)
        except PACSSendError as err:
            raise PACSSendError(f"{err} ({attempt} attempt{'s' if attempt > 1 else ''}, not retried)") from err


def _deliver(destination, result: list[Dataset], summary: list[Dataset], mode: str, policy, logger) -> None:
    """The result, and the summary where the result is refused (or always), to one destination.

    Raises:
        PACSSendError: the destination failed, or took neither the result nor the summary.
    """
    deadline = time.monotonic() + policy.max_send_s
    first = result + summary if mode == "always" else result
    delivery = _attempts(destination, first, policy, deadline, logger)
    refused = {uid: why for uid, why in delivery.refused.items() if uid not in SUMMARY_SOP_CLASSES}
    if not refused:
        logger.info("Sent %d instances to %s.", len(delivery.stored), destination)
        return
    names = ", ".join(f"{_class_name(uid)}: {why}" for uid, why in refused.items())
    if not summary:
        raise PACSSendError(f"{destination}: rejected SOP class {names}; no summary to send instead.")
    logger.warning(
        "%s rejected SOP class %s; sending the summary page (Secondary Capture) and the key object selection%s.",
        destination, names, "" if mode == "always" else " instead",
    )  # fmt: skip
    if mode != "always":
        delivery = _attempts(destination, summary, policy, deadline, logger)
    missing = [ds for ds in summary if str(ds.SOPInstanceUID) not in delivery.stored]
    if missing:
        classes = ", ".join(sorted({_class_name(str(ds.SOPClassUID)) for ds in missing}))
        raise PACSSendError(f"{destination}: rejected SOP class {names}, and the summary was not stored ({classes}).")
    logger.info(
        "Sent the summary to %s (%d instances; the destination does not take %s).",
        destination, len(summary), ", ".join(_class_name(uid) for uid in refused),
    )  # fmt: skip


def send_to_all(
    datasets: list[Dataset],
    destinations: list[CStoreDestination | StowRsDestination],
    policy: RetryPolicy = RetryPolicy(),
    logger: logging.Logger | None = None,
    summary_mode: str = "fallback",
) -> None:
    """Send ``datasets`` to every destination (see the module docstring): those of :data:`SUMMARY_SOP_CLASSES`
    are the summary, the others the result.

    Raises:
        ValueError: for an unknown ``summary_mode``.
        PACSSendError: after all destinations were attempted, listing every one that still failed and why.
    """
    if summary_mode not in SUMMARY_MODES:
        raise ValueError(f"summary_mode must be one of {list(SUMMARY_MODES)}, got {summary_mode!r}.")
    logger = logger or logging.getLogger(__name__)
    result = [ds for ds in datasets if str(ds.SOPClassUID) not in SUMMARY_SOP_CLASSES]
    summary = [ds for ds in datasets if str(ds.SOPClassUID) in SUMMARY_SOP_CLASSES]
    failures = []
    for destination in destinations:
        try:
            _deliver(destination, result, summary, summary_mode, policy, logger)
        except PACSSendError as err:
            logger.error("Giving up: %s", err)
            failures.append(str(err))
    if failures:
        raise PACSSendError(f"{len(failures)} of {len(destinations)} PACS destinations failed: " + "; ".join(failures))


def _timeout(block: dict[str, Any], key: str) -> float:
    try:
        value = float(block.get("timeout", 10.0))
    except (TypeError, ValueError) as err:
        raise ValueError(f"pacs.{key}.timeout must be a number of seconds in the app configuration: {err}") from err
    if value <= 0:
        raise ValueError(f"pacs.{key}.timeout must be > 0 seconds, got {value}.")
    return value


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
                timeout=_timeout(cstore, "cstore"),
            )
        )
    stowrs = config.get("stowrs") or {}
    if stowrs.get("enabled", False):
        if not stowrs.get("url"):
            raise ValueError("pacs.stowrs is enabled but has no 'url' in the app configuration.")
        out.append(StowRsDestination(url=str(stowrs["url"]).rstrip("/"), timeout=_timeout(stowrs, "stowrs")))
    return out


class PACSSenderOperator(Operator):
    """Sends the written files to every configured destination: the attention SEG and the SR, and the summary page and
    key object selection where those are refused or ``summary_mode`` is ``"always"`` (see the module docstring).

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
        summary_mode: str = "fallback",
        **kwargs,
    ):
        if not destinations:
            raise ValueError("destinations must not be empty: leave the operator out when nothing is configured.")
        if summary_mode not in SUMMARY_MODES:
            raise ValueError(f"summary_mode must be one of {list(SUMMARY_MODES)}, got {summary_mode!r}.")
        self.destinations = list(destinations)
        self.retry_policy = retry_policy
        self.summary_mode = summary_mode
        self.input_name_paths = "output_paths"
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.input_name_paths)

    def compute(self, op_input, op_output, context):
        datasets = [dcmread(Path(path)) for path in op_input.receive(self.input_name_paths)]
        send_to_all(datasets, self.destinations, self.retry_policy, self._logger, self.summary_mode)
