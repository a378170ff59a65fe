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
"""The bundle's CPU-optimised TorchScript (``python -m scripts.export_cpu``) against the ``ckpt_export`` one on the
same weights (tiny network of the deploy tests): same outputs, same embedded configs, and the deploy app gives the
same classes and Device Observer UID with either."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from deploy_fixtures import BUNDLE_ROOT, deploy_model, generated_study, run_app, sr_files  # noqa: F401 - fixtures
from monai.bundle import ConfigParser
from monai.data import load_net_with_metadata, save_net_with_metadata
from scripts import export_cpu
from scripts.acceleration import FULL_RESOLUTION_MODULES, cpu_supports_fast_bfloat16
from scripts.export_cpu import CPU_EXPORT_INFO, INFERENCE_CONFIG, export_cpu_model, main

from deploy_app.benchmark import TINY_OVERRIDES
from deploy_app.bundle_access import load_model
from deploy_app.bundle_access import weights_sha256 as app_weights_sha256
from deploy_app.errors import ModelPackageError

CONFIG = BUNDLE_ROOT / "configs" / "inference.json"
METADATA = BUNDLE_ROOT / "configs" / "metadata.json"
EXTRA = (INFERENCE_CONFIG, CPU_EXPORT_INFO)


@pytest.fixture(scope="module")
def cpu_model(deploy_model, tmp_path_factory) -> Path:  # noqa: F811
    """The CPU export of the deploy tests' weights, by the command line, from the bundle's own inference.json with
    the tiny network's overrides (the ckpt_export model embeds a config file with them written in)."""
    out = tmp_path_factory.mktemp("cpu_model") / "model_cpu.ts"
    argv = ["network_def", "--config_file", str(CONFIG), "--ckpt_file", str(deploy_model.parent / "model.pt")]
    argv += ["--meta_file", str(METADATA), "--filepath", str(out)]
    for key, value in TINY_OVERRIDES.items():
        argv += [f"--{key}", json.dumps(value)]
    assert main(argv) == 0
    return out


def test_cpu_export_matches_ckpt_export(deploy_model, cpu_model):  # noqa: F811
    plain, plain_meta, plain_extra = load_net_with_metadata(str(deploy_model), more_extra_files=EXTRA)
    frozen, meta, extra = load_net_with_metadata(str(cpu_model), more_extra_files=EXTRA)
    assert meta == plain_meta and meta["name"]
    ours, theirs = json.loads(extra[INFERENCE_CONFIG]), json.loads(plain_extra[INFERENCE_CONFIG])
    for key in ("network_def", "roi_size", "image_preprocessing", "class_names", "save_attention"):
        assert ours[key] == theirs[key], key
    assert ConfigParser(ours).get_parsed_content("roi_size") == [64, 64, 8]

    info = json.loads(extra[CPU_EXPORT_INFO])
    assert info["weights_sha256"] == app_weights_sha256(plain)  # the unfrozen weights, as the deploy app hashes them
    assert set(info["bfloat16_modules"]) <= set(FULL_RESOLUTION_MODULES) and info["precision"] == "auto"
    first_tried = list(FULL_RESOLUTION_MODULES) if cpu_supports_fast_bfloat16() else []
    assert info["tried"][0]["bfloat16_modules"] == first_tried
    assert info["input_shape"] == [1, 8, 64, 64, 8] and info["max_abs_difference_to_fp32"] <= 1e-3
    assert frozen.state_dict() == {}  # frozen: the weights are constants of the graph

    x = torch.randn(3, 8, 64, 64, 8, generator=torch.Generator().manual_seed(1))  # batch 3, traced with batch 1
    with torch.inference_mode():
        (p_ours, ia_ours, pa_ours), (p_theirs, ia_theirs, pa_theirs) = frozen(x), plain(x)
    torch.testing.assert_close(p_ours, p_theirs, atol=1e-3, rtol=0)
    assert torch.equal(p_ours.argmax(1), p_theirs.argmax(1))
    torch.testing.assert_close(ia_ours, ia_theirs, atol=2e-3, rtol=0)
    torch.testing.assert_close(pa_ours, pa_theirs, atol=2e-3, rtol=0)


def _sr_findings(path: Path) -> tuple[str, list[tuple[str, str, dict[str, float]]]]:
    """Device Observer UID and, per lesion, (tracking id, diagnosis code, probabilities) of an app's SR."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from deploy_app.lesion_codes import DIAGNOSIS

    sr = hd.sr.srread(path)  # whichever SR class the app writes
    (observer,) = [item.value for item in sr.content[0].ContentSequence if item.name == codes.DCM.DeviceObserverUID]
    findings = []
    for group in sr.content.get_image_measurement_groups(finding_type=codes.SCT.Lesion):
        (diagnosis,) = group.get_qualitative_evaluations(name=DIAGNOSIS)
        probabilities = {m.name.meaning: float(m.value) for m in group.get_measurements()}
        findings.append((group.tracking_identifier, diagnosis.value.value, probabilities))
    return observer, findings


@pytest.mark.slow
def test_deploy_app_takes_the_cpu_export(deploy_model, cpu_model, tmp_path_factory, tmp_path, monkeypatch):  # noqa: F811
    folder, truth = generated_study(
        tmp_path_factory.mktemp("cpu_export_study"), "cpu-export-2", seed=21, naming_style="ge", num_lesions=2
    )
    results = {}
    for name, model in (("plain", deploy_model), ("cpu", cpu_model)):
        out = tmp_path / name
        assert run_app(["-i", str(folder), "-o", str(out), "-m", str(model)], monkeypatch=monkeypatch) == 0
        (sr,) = sr_files(out)
        results[name] = _sr_findings(sr)
    (uid_plain, plain), (uid_cpu, cpu) = results["plain"], results["cpu"]
    assert uid_cpu == uid_plain  # same weights, same Device Observer UID
    assert len(cpu) == len(plain) == len(truth.lesions)
    for (lesion, code, probabilities), (lesion_plain, code_plain, probabilities_plain) in zip(cpu, plain):
        assert (lesion, code) == (lesion_plain, code_plain)
        assert probabilities.keys() == probabilities_plain.keys()
        # the SR holds probabilities in % to 2 decimals: 1e-3 of probability, plus rounding
        np.testing.assert_allclose(list(probabilities.values()), list(probabilities_plain.values()), atol=0.11)


def test_missing_or_unfit_checkpoint_writes_nothing(deploy_model, tmp_path):  # noqa: F811
    target, weights = tmp_path / "out" / "model_cpu.ts", deploy_model.parent / "model.pt"
    with pytest.raises(FileNotFoundError, match=r'ckpt_file ".*nowhere\.pt" not found'):
        export_cpu_model(CONFIG, tmp_path / "nowhere.pt", METADATA, target, dict(TINY_OVERRIDES))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r'checkpoint ".*other\.pt" does not fit the network'):
        export_cpu_model(CONFIG, tmp_path / "other.pt", METADATA, target, dict(TINY_OVERRIDES))
    with pytest.raises(ValueError, match=r"has no key 'model'"):
        export_cpu_model(CONFIG, weights, METADATA, target, TINY_OVERRIDES, key_in_ckpt="model")
    assert main(["--ckpt_file", str(tmp_path / "nowhere.pt"), "--filepath", str(target)]) == 1  # logged, no traceback
    assert not target.parent.exists() or not any(target.parent.iterdir())  # neither the file nor a temporary one


def test_fp32_when_the_cpu_has_no_bf16(deploy_model, tmp_path, monkeypatch, caplog):  # noqa: F811
    monkeypatch.setattr(export_cpu, "cpu_supports_fast_bfloat16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="scripts.export_cpu"):
        weights = deploy_model.parent / "model.pt"
        path = export_cpu_model([CONFIG], weights, [METADATA], tmp_path / "fp32", TINY_OVERRIDES)
    assert path == tmp_path / "fp32.ts" and sorted(p.name for p in tmp_path.iterdir()) == ["fp32.ts"]
    assert "no native bf16" in caplog.text
    frozen, _, extra = load_net_with_metadata(str(path), more_extra_files=EXTRA)
    assert json.loads(extra[CPU_EXPORT_INFO])["bfloat16_modules"] == []
    plain = torch.jit.load(str(deploy_model))
    x = torch.randn(2, 8, 64, 64, 8)
    with torch.inference_mode():
        for ours, theirs in zip(frozen(x), plain(x)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_frozen_model_without_weights_hash_is_refused(cpu_model, tmp_path):
    """A frozen graph has no state_dict to hash: without the embedded digest every such model would get one UID."""
    frozen, meta, extra = load_net_with_metadata(str(cpu_model), more_extra_files=(INFERENCE_CONFIG,))
    config = extra[INFERENCE_CONFIG]
    stripped = tmp_path / "stripped.ts"
    save_net_with_metadata(
        frozen,
        str(stripped),
        include_config_vals=False,
        meta_values=meta,
        more_extra_files={INFERENCE_CONFIG: config if isinstance(config, bytes) else config.encode()},
    )
    with pytest.raises(ModelPackageError, match="frozen TorchScript without the SHA-256 of its weights"):
        load_model(stripped, "cpu")


def test_benchmark_compares_the_two_exports(deploy_model, cpu_model):  # noqa: F811
    from deploy_app.benchmark import compare_cpu_export, first_call

    result = compare_cpu_export(deploy_model, cpu_model, repeats=1, fresh_process=False)
    assert result["same_class"] and result["max_abs_probability_difference"] < 1e-3 and result["speedup"] > 0
    assert len(result["plain_runs_s"]) == len(result["cpu_runs_s"]) == 1
    assert set(first_call(cpu_model)) == {"load_s", "first_call_s", "second_call_s"}


SHIPPED_WEIGHTS = BUNDLE_ROOT / "models" / "model.pt"


def _export_shipped(tmp_path: Path, *options: str) -> tuple[torch.jit.ScriptModule, dict]:
    """The README's command on the shipped weights with the configs inference.json uses."""
    out = tmp_path / "model_cpu.ts"
    argv = ["--filepath", str(out), "--ckpt_file", str(SHIPPED_WEIGHTS), "--meta_file", str(METADATA)]
    assert main([*argv, "--config_file", str(CONFIG), "--save_attention", "true", *options]) == 0
    frozen, _, extra = load_net_with_metadata(str(out), more_extra_files=EXTRA)
    return frozen, json.loads(extra[CPU_EXPORT_INFO])


def _eager_shipped() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser["save_attention"] = True
    network = parser.get_parsed_content("network_def").eval()
    network.load_state_dict(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True))
    return network


def test_shipped_weights_export_adapts_to_this_cpu(tmp_path):
    """The shipped weights on a CPU with AVX512-BF16 (this project's machines) exceed 1e-3 with both full-resolution
    modules in bf16 (0.0024): the export moves modules back to fp32, one at a time, the best first, until it holds."""
    frozen, info = _export_shipped(tmp_path)
    assert info["max_abs_difference_to_fp32"] <= 1e-3 and set(info["bfloat16_modules"]) <= set(FULL_RESOLUTION_MODULES)
    tried = info["tried"]
    if not cpu_supports_fast_bfloat16():
        assert info["bfloat16_modules"] == [] and len(tried) == 1
    else:
        assert tried[0]["bfloat16_modules"] == list(FULL_RESOLUTION_MODULES)
        assert (tried[0]["max_abs_difference_to_fp32"] > 1e-3) == (len(tried) > 1)  # only a failed set is reduced
        chosen = [t for t in tried if t["bfloat16_modules"] == info["bfloat16_modules"]][-1]
        same_size = [t for t in tried if len(t["bfloat16_modules"]) == len(chosen["bfloat16_modules"])]
        assert chosen["max_abs_difference_to_fp32"] == min(t["max_abs_difference_to_fp32"] for t in same_size)
    x = torch.randn(4, 8, 32, 32, 8, generator=torch.Generator().manual_seed(3))  # other ROIs than the export's
    with torch.inference_mode():
        (p_ours, *maps_ours), (p_eager, *maps_eager) = frozen(x), _eager_shipped()(x)
    assert torch.equal(p_ours.argmax(1), p_eager.argmax(1))
    for ours, theirs in zip((p_ours, *maps_ours), (p_eager, *maps_eager)):
        torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)


def test_shipped_weights_export_in_fp32(tmp_path):
    frozen, info = _export_shipped(tmp_path, "--precision", "fp32")
    assert info["bfloat16_modules"] == [] and info["precision"] == "fp32" and len(info["tried"]) == 1
    x = torch.randn(2, 8, 32, 32, 8, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        for ours, theirs in zip(frozen(x), _eager_shipped()(x)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_precision_bf16_fails_where_the_tolerance_does_not_hold(deploy_model, tmp_path):  # noqa: F811
    """``--precision bf16`` never drops a module: with a tolerance no bf16 graph meets it fails and writes nothing
    (on a CPU without native bf16 the graph is fp32 and passes)."""
    weights = deploy_model.parent / "model.pt"
    target = tmp_path / "strict.ts"
    if not cpu_supports_fast_bfloat16():
        export_cpu_model(CONFIG, weights, METADATA, target, TINY_OVERRIDES, atol=1e-6, precision="bf16")
        return
    with pytest.raises(RuntimeError, match=r"differs from the eager network by .* > 1e-06 .*--precision auto or fp32"):
        export_cpu_model(CONFIG, weights, METADATA, target, TINY_OVERRIDES, atol=1e-6, precision="bf16")
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="precision must be one of"):
        export_cpu_model(CONFIG, weights, METADATA, target, TINY_OVERRIDES, precision="fp16")
