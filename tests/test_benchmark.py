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
"""The benchmark script runs (CPU smoke mode), and the CPU fast path gives the eager numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from scripts.acceleration import FULL_RESOLUTION_MODULES, freeze_for_cpu_inference
from scripts.network import LCADBInference


def test_frozen_cpu_inference_matches_eager_for_module_and_torchscript():
    torch.manual_seed(0)
    network = LCADBInference(return_attention=True, widen_factor=0.125, roi_size=(64, 64, 8)).eval()
    x = torch.randn(2, 8, 64, 64, 8)
    with torch.no_grad():
        eager = network(x)
        for model in (network, torch.jit.trace(network, x)):
            frozen = freeze_for_cpu_inference(model, x)
            for ours, theirs in zip(frozen(x), eager):
                torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        reduced = freeze_for_cpu_inference(network, x, FULL_RESOLUTION_MODULES)(x)
    torch.testing.assert_close(reduced[0], eager[0], atol=1e-3, rtol=0)
    assert torch.equal(reduced[0].argmax(1), eager[0].argmax(1))
    assert isinstance(network.image_branch.stem, torch.nn.Sequential), "the input model must stay unchanged"


def test_reduced_precision_needs_known_modules_of_an_nn_module():
    network = LCADBInference(widen_factor=0.125, roi_size=(64, 64, 8)).eval()
    x = torch.randn(1, 8, 64, 64, 8)
    with pytest.raises(ValueError, match="'image_branch.nowhere' is not a submodule"):
        freeze_for_cpu_inference(network, x, ["image_branch.nowhere"])
    with pytest.raises(TypeError, match="bfloat16_modules"):
        freeze_for_cpu_inference(torch.jit.trace(network, x), x, FULL_RESOLUTION_MODULES)


def test_benchmark_smoke_mode(tmp_path):
    result_file = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "benchmark.py"), "--smoke", "--json", str(result_file)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(result_file.read_text())["results"]
    assert [r["task"] for r in results] == ["train", "infer", "infer"]
    assert all(r["speedup"] > 0 for r in results)
    assert all(r["same_class"] and r["max_abs_probability_difference"] < 1e-3 for r in results[1:])


@pytest.mark.slow
def test_data_pipeline_benchmark_smoke(tmp_path):
    """All four data paths of the pipeline benchmark run from the bundle's configs (tiny ROI, 8 samples each)."""
    result_file = tmp_path / "pipeline.json"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "data_pipeline.py"), "--json", str(result_file)]
    command += ["--cases_per_class", "1", "--samples", "8", "--batch", "4", "--workers", "1", "--roi", "32", "32", "8"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    results = json.loads(result_file.read_text())["results"]
    assert [r["path"] for r in results] == ["authors", "cached_cpu_aug", "cached_device_aug", "cached_device_aug_host"]
    # CPU time comes in clock ticks (10 ms): 8 tiny samples may round to 0 ms per sample
    assert all(r["samples"] >= 8 and r["samples_per_s"] > 0 and r["cpu_ms_per_sample"] >= 0 for r in results)
    assert results[-1]["device"] == "meta" and results[-1]["workers"] == 0


@pytest.mark.slow
def test_gpu_check_script_smoke_mode(tmp_path):
    """The prepared GPU run's steps and summary, on the CPU with a tiny network (the same script, --smoke)."""
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = ["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "failed" not in completed.stdout, completed.stdout[-3000:]
    trainer = json.loads((tmp_path / "trainer.json").read_text())
    assert [run["execution"] for run in trainer["runs"]] == ["before", "after"]
    assert all(run["epochs"] == 2 and run["steady_samples_per_s"] > 0 for run in trainer["runs"])
    pipeline = json.loads((tmp_path / "pipeline.json").read_text())["results"]
    assert [r["path"] for r in pipeline] == ["cached_cpu_aug", "cached_device_aug"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {row["goal"]: row for row in summary["rows"]}
    assert rows["trainer_samples_per_s_batch8"]["ours"] > 0 and rows["inference_ms_batch1"]["ours"] > 0
    assert rows["inference_lesions_per_s_batch32"]["met"] is None  # smoke mode runs batch 2, not 32
    assert "| goal | target |" in (tmp_path / "summary.md").read_text()
