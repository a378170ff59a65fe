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
"""Site-side privacy filters of the LCA-DB federation: what every result goes through before it leaves a site.

Two ways in. A job can ask for a filter (``job.py --privacy``): NVFlare then copies this module into each site's
``custom/`` folder. A site enforces its own policy whatever the job says: provisioning (``fl_kits.SitePrivacyBuilder``)
copies this module into the site's startup kit as ``local/custom/lcadb_site_privacy.py`` (a name no job ships, so a
job's own copy cannot shadow it) and lists the filters in the site's ``local/privacy.json``, NVFlare's site privacy
policy: every result of every job leaves through the scope's filters, before the job's own
(nvflare/apis/utils/task_utils.py ``get_filters``).

The model filters work on weight differences (``DataKind.WEIGHT_DIFF``): the training update, and, with full
cross-site evaluation, the site's local model sent as its difference to the last global model (client.py).
:class:`ModelReleaseGuard` refuses what they cannot filter (full weights, arrays hidden in the metadata) and
:class:`SiteReportRedactor` takes absolute paths and case ids out of the text a site sends (its error reports). Each
filter logs at the site what it did, so the effect can be measured. Only NVFlare and numpy are imported here.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy
from nvflare.app_common.filters.svt_privacy import SVTPrivacy

__all__ = [
    "PRIVACY_TASKS",
    "SITE_ERROR_KEY",
    "ChangedPercentilePrivacy",
    "CountingSVTPrivacy",
    "ModelReleaseGuard",
    "SiteReportRedactor",
    "count_elements",
    "redact_text",
]

#: NVFlare tasks whose results carry a model: a training update and (full cross-site evaluation) a site's local model.
PRIVACY_TASKS = ("train", "submit_model")
#: Same key as ``fl_server.SITE_ERROR_KEY``: a result that carries a site's error report instead of weights. Not
#: imported: the server module is never shipped to a site.
SITE_ERROR_KEY = "lcadb_site_error"
#: A file system path in free text: a run of characters with a "/" (absolute or relative, e.g. "images/c_01/t1.nii").
_PATH = re.compile(r"[^\s'\"(),;=<>]*/[^\s'\"(),;<>]*")
#: A case id as the bundle's messages quote it: ``case 'c_0003'`` or ``case "c_0003"``.
_QUOTED_CASE = re.compile(r"\bcase\s+(['\"])(.+?)\1")
PATH_PLACEHOLDER = "<path withheld>"
CASE_PLACEHOLDER = "<case id withheld>"


def redact_text(
    text: str, report_paths: bool = False, report_case_ids: bool = False, case_id_pattern: str | None = None
) -> tuple[str, int, int]:
    """Take file system paths and case ids out of ``text``.

    Args:
        text: free text leaving a site, e.g. an error report.
        report_paths: keep paths. Defaults to False.
        report_case_ids: keep case ids. Defaults to False.
        case_id_pattern: regular expression of the site's case ids, withheld wherever they appear (besides the
            bundle's quoted ``case '<id>'``). Defaults to None.

    Returns:
        The redacted text, the number of paths and the number of case ids withheld.
    """
    cases = 0
    if not report_case_ids:
        # every quoted id is withheld wherever it appears (also inside a path the site may report)
        for case_id in sorted({m.group(2) for m in _QUOTED_CASE.finditer(text)}, key=len, reverse=True):
            text, found = re.subn(rf"(?<![\w-]){re.escape(case_id)}(?![\w-])", CASE_PLACEHOLDER, text)
            cases += found
        if case_id_pattern:
            text, found = re.subn(case_id_pattern, CASE_PLACEHOLDER, text)
            cases += found
    paths = 0
    if not report_paths:
        text, paths = _PATH.subn(PATH_PLACEHOLDER, text)
    return text, paths, cases


def count_elements(data: dict[str, Any]) -> tuple[int, int]:
    """``(zero elements, all elements)`` over the arrays of a DXO's data."""
    zeros = total = 0
    for value in data.values():
        array = np.asarray(value)
        zeros += int(array.size - np.count_nonzero(array))
        total += int(array.size)
    return zeros, total


class ChangedPercentilePrivacy(PercentilePrivacy):
    """NVFlare's ``PercentilePrivacy`` (Shokri and Shmatikov, CCS 2015) with the cutoff taken over changed elements.

    The stock filter takes the ``percentile`` of all per-step absolute changes. In this network more than half of an
    update's elements are exactly 0 (e.g. weights behind inactive units), so at small percentiles the cutoff is 0 and
    nothing is removed. Here the cutoff is the ``percentile`` of the non-zero changes: the smallest ``percentile``
    percent of what a site actually changed is zeroed, the rest clipped to ``[-gamma, gamma]`` per step. It is not
    differential privacy (no noise, no budget).

    Args:
        percentile: percent of the changed elements (smallest per-step change) set to 0, in [0, 100]. Defaults to 10.
        gamma: bound on the absolute per-step change of each element, > 0. Defaults to 0.01.

    Raises:
        ValueError: for a percentile outside [0, 100] or gamma <= 0.
    """

    def __init__(self, percentile: float = 10, gamma: float = 0.01) -> None:
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}.")
        super().__init__(percentile=percentile, gamma=gamma, data_kinds=[DataKind.WEIGHT_DIFF])

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        steps = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, 1) or 1
        per_step = {name: np.asarray(value, dtype=np.float64) / steps for name, value in dxo.data.items()}
        changed = np.concatenate([np.abs(v[v != 0]).ravel() for v in per_step.values() if np.ndim(v) > 0] or [[]])
        if changed.size == 0:
            self.log_info(fl_ctx, "PercentilePrivacy: the update changes nothing; sent as is")
            return dxo
        cutoff = float(np.percentile(changed, self.percentile))
        zeroed = clipped = 0
        filtered = {}
        for name, value in dxo.data.items():
            delta = per_step[name]
            if np.ndim(delta) == 0:
                filtered[name] = value
                continue
            small = (delta != 0) & (np.abs(delta) <= cutoff) if self.percentile > 0 else np.zeros(delta.shape, bool)
            delta = np.where(small, 0.0, delta)
            clipped += int(np.count_nonzero(np.abs(delta) > self.gamma))
            zeroed += int(np.count_nonzero(small))
            filtered[name] = (np.clip(delta, -self.gamma, self.gamma) * steps).astype(np.asarray(value).dtype)
        zeros, total = count_elements(filtered)
        self.log_info(
            fl_ctx,
            f"PercentilePrivacy: zeroed {zeroed} of {changed.size} changed elements (cutoff {cutoff:.3g} per step), "
            f"clipped {clipped} to +-{self.gamma} per step; {total - zeros} of {total} elements sent non-zero",
        )
        dxo.data = filtered
        return dxo


class CountingSVTPrivacy(SVTPrivacy):
    """NVFlare's differential-privacy filter ``SVTPrivacy`` (sparse vector technique), unchanged, on weight
    differences only, logging how many elements it shared.

    Args:
        fraction: fraction of the elements to upload. Defaults to 0.1.
        epsilon: privacy budget of the selection. Defaults to 0.1.
        noise_var: release-noise control (NVFlare's meaning). Defaults to 0.1.
        gamma: clipping bound of each shared element. Defaults to 1e-5.
        tau: threshold offset. Defaults to 1e-6.
    """

    def __init__(
        self,
        fraction: float = 0.1,
        epsilon: float = 0.1,
        noise_var: float = 0.1,
        gamma: float = 1e-5,
        tau: float = 1e-6,
    ) -> None:
        super().__init__(
            fraction=fraction,
            epsilon=epsilon,
            noise_var=noise_var,
            gamma=gamma,
            tau=tau,
            data_kinds=[DataKind.WEIGHT_DIFF],
        )

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        result = super().process_dxo(dxo, shareable, fl_ctx)
        if result is not None:
            zeros, total = count_elements(result.data)
            self.log_info(
                fl_ctx,
                f"SVTPrivacy: {total - zeros} of {total} elements shared with noise (epsilon {self.epsilon}), "
                f"{zeros} withheld; privacy spent so far {self.get_privacy_spent():.4g}",
            )
        return result


class ModelReleaseGuard(Filter):
    """A site's rule that model data leaves only as weight differences, where its model filters apply.

    Refuses a result that carries full model weights (``DataKind.WEIGHTS``, e.g. ``submit_model`` of a job without
    ``--submit_update``) or arrays in its metadata (e.g. SCAFFOLD control variates, which no filter sees): the result
    is replaced by an error report naming the site's policy, so the server drops that result and logs why.
    """

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except ValueError:  # no DXO: an error reply without data
            return shareable
        hidden = sorted(k for k, v in (dxo.meta or {}).items() if _holds_arrays(v))
        if dxo.data_kind != DataKind.WEIGHTS and not hidden:
            return shareable
        what = "full model weights" if dxo.data_kind == DataKind.WEIGHTS else f"arrays in its metadata {hidden}"
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME, "?")
        site = fl_ctx.get_identity_name()
        report = (
            f"Site '{site}': its privacy policy refused the result of task '{task}' ({what}); model data leaves this "
            "site only as weight differences, through its privacy filters (its local/privacy.json)"
        )
        self.log_error(fl_ctx, report)
        return DXO(DataKind.METRICS, data={}, meta={SITE_ERROR_KEY: report}).update_shareable(shareable)


class SiteReportRedactor(Filter):
    """Takes absolute paths and case ids out of every text a site sends (its error reports, any string metadata),
    unless the site's policy allows them. The site's own log keeps the full text.

    Args:
        report_paths: let file system paths leave the site. Defaults to False.
        report_case_ids: let case ids leave the site. Defaults to False.
        case_id_pattern: regular expression of the site's case ids (withheld wherever they appear). Defaults to None.

    Raises:
        ValueError: for a ``case_id_pattern`` that is not a regular expression.
    """

    def __init__(self, report_paths: bool = False, report_case_ids: bool = False, case_id_pattern: str | None = None):
        super().__init__()
        if case_id_pattern:
            try:
                re.compile(case_id_pattern)
            except re.error as e:
                raise ValueError(f"case_id_pattern must be a regular expression, got {case_id_pattern!r}: {e}") from e
        self.report_paths = report_paths
        self.report_case_ids = report_case_ids
        self.case_id_pattern = case_id_pattern

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if self.report_paths and self.report_case_ids:
            return shareable
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            return shareable
        counts = [0, 0]
        dxo.meta = self._redact(dxo.meta, counts)
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            dxo.data = self._redact(dxo.data, counts)
        if not any(counts):
            return shareable
        self.log_info(
            fl_ctx,
            f"SiteReportRedactor: withheld {counts[0]} path(s) and {counts[1]} case id(s) from a result leaving this "
            "site (its local/privacy.json); the site's own log keeps them",
        )
        return dxo.update_shareable(shareable)

    def _redact(self, value: Any, counts: list[int]) -> Any:
        if isinstance(value, str):
            text, paths, cases = redact_text(value, self.report_paths, self.report_case_ids, self.case_id_pattern)
            counts[0] += paths
            counts[1] += cases
            return text
        if isinstance(value, dict):
            return {k: self._redact(v, counts) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._redact(v, counts) for v in value)
        return value


def _holds_arrays(value: Any) -> bool:
    """Whether a metadata value carries array data (a tensor, an array or a container of them)."""
    if isinstance(value, dict):
        return any(_holds_arrays(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_arrays(v) for v in value)
    return hasattr(value, "shape") and getattr(value, "ndim", 0) > 0
