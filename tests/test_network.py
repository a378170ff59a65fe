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
"""LCA-DB network and loss: the reference's numbers, shapes, gradients, export parity and errors."""

from __future__ import annotations

import pytest
import torch
from scripts import LCADB, LCADBInference, LCADBLoss, LCADBOutput, load_reference_state_dict
from scripts.loss import rampup_weight

TINY = {"depth": 10, "widen_factor": 0.125, "roi_size": (64, 64, 8)}


@pytest.fixture(scope="module")
def vectors(test_data):
    return torch.load(test_data / "lcadb_reference_vectors.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference_state_dict(vectors):
    return {name[len("state_dict.") :]: value for name, value in vectors.items() if name.startswith("state_dict.")}


@pytest.fixture(scope="module")
def reference_output(vectors, reference_state_dict):
    network = load_reference_state_dict(reference_state_dict, depth=10, widen_factor=0.125)
    with torch.no_grad():
        return network(vectors["input"].float())


def test_reference_outputs_reproduced(vectors, reference_output):
    assert isinstance(reference_output, LCADBOutput)
    for field in LCADBOutput._fields:
        expected = vectors[f"expected.{field}"]
        torch.testing.assert_close(getattr(reference_output, field), expected, atol=1e-4, rtol=0, msg=field)


@pytest.mark.parametrize("epoch", [0, 5, 30])
def test_reference_loss_terms_reproduced(vectors, reference_output, epoch):
    terms = LCADBLoss()(reference_output, vectors["labels"], epoch=epoch)
    prefix = f"expected.loss.epoch{epoch}."
    expected_names = {name[len(prefix) :] for name in vectors if name.startswith(prefix)}
    assert set(terms) == expected_names
    for name in expected_names:
        torch.testing.assert_close(terms[name], vectors[prefix + name], atol=1e-4, rtol=0, msg=name)


def test_loss_epoch_attribute_and_batch_normalised_cross_terms(reference_output, vectors):
    loss = LCADBLoss(normalize_cross_by_batch=True)
    loss.epoch = 30
    terms = loss(reference_output, vectors["labels"].reshape(-1, 1))
    batch = vectors["labels"].numel()
    expected = (
        terms["focal"]
        + 0.2 * (terms["instance_ia"] + terms["instance_pa"]) / batch
        + 0.25 * 0.2 * (terms["cross_ia"] + terms["cross_pa"]) / batch
        + 0.25 * terms["similarity"]
    )
    torch.testing.assert_close(terms["total"], expected)


def test_rampup_schedule():
    assert rampup_weight(0) == 0.0
    assert rampup_weight(24) == rampup_weight(99) == 0.2
    assert 0 < rampup_weight(5) < rampup_weight(12) < 0.2


def _full_size_state_dict(test_data) -> dict[str, torch.Tensor]:
    state_dict = {}
    for line in (test_data / "lcadb_reference_state_dict_keys.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, dtype = line.split("\t")
        dims = [int(d) for d in shape.strip("[]").split(",") if d.strip()]
        state_dict[name] = torch.zeros(dims, dtype=getattr(torch, dtype))
    return state_dict


def test_full_size_reference_key_listing_loads(test_data, tmp_path):
    state_dict = _full_size_state_dict(test_data)
    path = tmp_path / "reference_best.pth"
    torch.save({"epoch": 3, "model": state_dict, "best_acc": 0.5, "best_f1": 0.4, "optimizer": {}}, path)
    network = load_reference_state_dict(path)
    assert not network.training
    assert len(network.state_dict()) == len(state_dict)
    assert network.image_branch.stem.conv.weight.shape == (512, 8, 3, 3, 3)


def test_bad_checkpoints_are_reported(reference_state_dict, tmp_path):
    broken = dict(reference_state_dict)
    broken.pop("conv5.weight")
    broken["extra_head.weight"] = torch.zeros(1)
    broken["linear1.weight"] = torch.zeros(7, 3)
    with pytest.raises(ValueError) as error:
        load_reference_state_dict(broken, depth=10, widen_factor=0.125)
    message = str(error.value)
    assert "missing (1): conv5.weight" in message
    assert "unexpected (1): extra_head.weight" in message
    assert "linear1.weight: checkpoint [7, 3], network [7, 64]" in message

    with pytest.raises(ValueError, match="does not match"):
        load_reference_state_dict(reference_state_dict, depth=18, widen_factor=0.125)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_reference_state_dict(tmp_path / "nowhere.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read reference checkpoint .*corrupt.pth"):
        load_reference_state_dict(corrupt)
    with pytest.raises(ValueError, match="stem='reference'"):
        load_reference_state_dict(reference_state_dict, widen_factor=0.125, stem="resnet")


@pytest.mark.parametrize(
    "kwargs, instances",
    [
        ({"depth": 18, "widen_factor": 0.125, "roi_size": (64, 64, 8)}, 4),
        ({"depth": 34, "widen_factor": 0.0625, "roi_size": (32, 64, 16)}, 2),
        ({"depth": 50, "widen_factor": 0.0625, "roi_size": (64, 64, 8)}, 4),
        ({"depth": 10, "widen_factor": 0.125, "roi_size": (96, 64, 24), "stem": "resnet"}, 6),
        ({"depth": 10, "widen_factor": 0.125, "roi_size": (32, 32, 4), "patch_size": 16}, 4),
    ],
)
def test_output_shapes(kwargs, instances):
    network = LCADB(num_classes=5, **kwargs).eval()
    with torch.no_grad():
        output = network(torch.randn(2, 8, *kwargs["roi_size"]))
    assert output.logits.shape == output.logits_ia.shape == output.logits_pa.shape == (2, 5)
    assert output.instance_logits_ia.shape == output.instance_logits_pa.shape == (2, instances, 5)
    assert output.attention_ia.shape == output.attention_pa.shape == (2, instances)
    torch.testing.assert_close(output.attention_ia.sum(1), torch.ones(2))
    torch.testing.assert_close(output.attention_pa.sum(1), torch.ones(2))


def test_stems_differ_in_width():
    reference = LCADB(**TINY)
    resnet = LCADB(stem="resnet", **TINY)
    assert reference.image_branch.stem.conv.out_channels == 64
    assert resnet.image_branch.stem.conv.out_channels == 8
    assert sum(p.numel() for p in resnet.parameters()) < sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("depth", [10, 50])
def test_gradients_reach_both_branches(depth):
    network = LCADB(depth=depth, widen_factor=0.0625, roi_size=(64, 64, 8)).train()
    terms = LCADBLoss()(network(torch.randn(2, 8, 64, 64, 8)), torch.tensor([1, 4]), epoch=30)
    terms["total"].backward()
    for branch in (network.image_branch, network.patch_branch):
        grad = branch.stem.conv.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    for head in (network.classifier_ia, network.classifier_pa, network.bag_classifier):
        assert head.weight.grad.abs().sum() > 0


def test_torchscript_trace_and_onnx_match_eager(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    network = LCADBInference(return_attention=True, **TINY).eval()
    x = torch.randn(2, 8, 64, 64, 8)
    with torch.no_grad():
        eager = network(x)
        traced = torch.jit.trace(network, x)
        for ours, theirs in zip(traced(x), eager):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    assert eager[0].shape == (2, 7) and eager[1].shape == eager[2].shape == (2, 2, 2)
    torch.testing.assert_close(eager[0].sum(1), torch.ones(2))
    path = tmp_path / "lcadb.onnx"
    torch.onnx.export(
        network,
        (x,),
        str(path),
        input_names=["image"],
        output_names=["probabilities", "attention_ia", "attention_pa"],
        dynamic_axes={"image": {0: "batch"}},
        dynamo=False,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for ours, theirs in zip(session.run(None, {"image": x.numpy()}), eager):
        torch.testing.assert_close(torch.from_numpy(ours), theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("return_attention", [False, True])
def test_torchscript_script_matches_eager(return_attention, tmp_path):
    """``torch.jit.script`` (what the model zoo's ``ckpt_export`` uses) compiles both networks, same numerics."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 64, 64, 8)
    for network in (LCADB(**TINY).eval(), LCADBInference(return_attention=return_attention, **TINY).eval()):
        scripted = torch.jit.script(network)
        torch.jit.save(scripted, str(tmp_path / "net.ts"))
        loaded = torch.jit.load(str(tmp_path / "net.ts"))
        with torch.no_grad():
            eager = network(x)
            eager = (eager,) if isinstance(eager, torch.Tensor) else tuple(eager)
            for compiled in (scripted, loaded):
                out = compiled(x)
                out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
                assert len(out) == len(eager)
                for ours, theirs in zip(out, eager):
                    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        expected = r"expects input of shape \[B, 8, 64, 64, 8\].*got \[1, 8, 64, 64, 16\]"
        with pytest.raises(torch.jit.Error, match=expected):
            loaded(torch.randn(1, 8, 64, 64, 16))


def test_probabilities_only_by_default():
    network = LCADBInference(**TINY).eval()
    with torch.no_grad():
        probabilities = network(torch.randn(1, 8, 64, 64, 8))
    assert isinstance(probabilities, torch.Tensor) and probabilities.shape == (1, 7)


def test_wrong_input_shape_states_expected_shape():
    network = LCADB(**TINY)
    with pytest.raises(ValueError, match=r"expects input of shape \[B, 8, 64, 64, 8\].*got \[1, 8, 64, 64, 16\]"):
        network(torch.randn(1, 8, 64, 64, 16))
    with pytest.raises(ValueError, match=r"got \[8, 64, 64, 8\]"):
        network(torch.randn(8, 64, 64, 8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depth": 11}, "11"),
        ({"stem": "wide"}, "wide"),
        ({"widen_factor": 0.001}, "widen_factor"),
        ({"roi_size": (100, 128, 16)}, "multiples of patch_size=32"),
        ({"roi_size": (128, 128, 40)}, "at most 32 slices"),
        ({"roi_size": (128, 128)}, "three positive integers"),
        ({"patch_size": 12}, "patch_size must be a positive multiple of 8, got 12"),
        ({"num_classes": 1}, "num_classes must be >= 2"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LCADB(**kwargs)


def test_loss_validation():
    with pytest.raises(ValueError, match="cross_weight must be >= 0, got -1"):
        LCADBLoss(cross_weight=-1)
    with pytest.raises(ValueError, match="rampup_length must be >= 1"):
        LCADBLoss(rampup_length=0)
    output = LCADB(**TINY)(torch.randn(2, 8, 64, 64, 8))
    with pytest.raises(ValueError, match="one class index per sample"):
        LCADBLoss()(output, torch.tensor([1, 2, 3]))
