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
"""Site-side privacy filters of the LCA-DB job: what every model result goes through before it leaves a site.

NVFlare copies this module into each site's ``custom/`` folder when the job is exported. Both filters work on weight
differences (``DataKind.WEIGHT_DIFF``): the training update, and, with full cross-site evaluation, the site's local
model sent as its difference to the last global model (client.py), so no full local model leaves a site unfiltered.
Each filter logs what it did (elements zeroed, clipped, shared) so the effect can be measured.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy
from nvflare.app_common.filters.svt_privacy import SVTPrivacy

__all__ = ["PRIVACY_TASKS", "ChangedPercentilePrivacy", "CountingSVTPrivacy", "count_elements"]

#: NVFlare tasks whose results carry a model: a training update and (full cross-site evaluation) a site's local model.
PRIVACY_TASKS = ("train", "submit_model")


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
