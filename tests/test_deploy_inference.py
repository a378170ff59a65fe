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
"""The app's inference without Holoscan: lesions in chunks give the same answers as one batch, and the prepared GPU
check (benchmarks/gpu_inference.py) runs its CPU path end to end."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from deploy_fixtures import REPO_ROOT, deploy_model  # noqa: F401 - fixture


def test_chunks_give_the_same_results_as_one_batch(deploy_model):  # noqa: F811
    from deploy_app.bundle_access import load_model
    from deploy_app.domain import LesionROI
    from deploy_app.inference import classify_lesions

    model = load_model(deploy_model, "cpu")
    rng = np.random.default_rng(3)
    rois = [
        LesionROI(
            f"L{n}",
            (0, 0, 0, 40, 40, 8),
            rng.normal(100, 30, (8, 40 + 4 * n, 44, 8)).astype(np.float32),
            (2 * n, 3, 1),
            "random",
        )  # fmt: skip
        for n in range(5)
    ]
    whole = classify_lesions(model, rois, batch_size=5)
    chunked = classify_lesions(model, rois, batch_size=2)
    assert [r.lesion.lesion_id for r in chunked] == [f"L{n}" for n in range(5)]
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)
        assert a.class_index == b.class_index and a.patch_box == pytest.approx(b.patch_box)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        classify_lesions(model, rois, batch_size=0)


def test_gpu_check_script_cpu_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import gpu_inference

    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--tiny", "--lesions", "3", "--batch-sizes", "1", "3", "--json", str(out)]
    assert gpu_inference.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["bf16_autocast_ok"] is True
    assert [run["batch_size"] for run in report["runs"]] == [1, 3]
    assert all(run["fp32_same_as_first_batch_size"] < 1e-5 for run in report["runs"])
    sys.modules.pop("gpu_inference", None)
