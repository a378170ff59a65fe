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
"""Federated training (federated/): site logic without NVFlare, job export, NVFlare simulator, PoC, provisioning.

Real NVFlare, MONAI and bundle runs on tiny synthetic data (depth 10, widen 0.125, ROI 32x32x8); nothing is mocked.
The simulator and PoC runs are marked slow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FEDERATED = REPO_ROOT / "federated"
BUNDLE = REPO_ROOT / "bundle"
if str(FEDERATED) not in sys.path:
    sys.path.insert(0, str(FEDERATED))

import compare  # noqa: E402
import fl_server  # noqa: E402
import fl_site  # noqa: E402
import job  # noqa: E402
import poc  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

SITES = ("site_a", "site_b", "site_c")
TINY = {**compare.TINY_OVERRIDES, "batch_size": 4}
TINY_ARGS = [a for k, v in TINY.items() for a in ("--override", f"{k}={json.dumps(v, separators=(',', ':'))}")]
#: The global model in a PoC server's job folder (BundleCheckpointPersistor writes it after every round).
GLOBAL_MODEL = Path("app_server") / "models" / "model.pt"
#: job.py arguments that keep a simulator run short (no TensorBoard receiver, final global evaluation only)
FAST_JOB_ARGS = ["--local_epochs", "1", "--tracking", "none", *TINY_ARGS]


@pytest.fixture(scope="session")
def fed_data(tmp_path_factory) -> dict[str, Path]:
    """Three synthetic sites (7 cases each, own scanner profile and class mix) and a pooled test set."""
    from scripts.synthetic import generate_federated_datasets

    root = tmp_path_factory.mktemp("fed_data")
    return generate_federated_datasets(root, SITES, cases_per_site=7, seed=0, test_cases_per_site=1, progress=False)


def tiny_network() -> torch.nn.Module:
    """The bundle's network_def with the tiny overrides, built from train.json like the bundle does."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update(TINY)
    return parser.get_parsed_content("network_def")


def load_bundle_checkpoint(path: Path) -> torch.nn.Module:
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = tiny_network()
    net.load_state_dict(state, strict=True)
    return net


def assert_parameters_equal(global_state: dict, reference: dict) -> None:
    """Every trainable parameter of ``global_state`` equals ``reference`` exactly (buffers such as BatchNorm running
    statistics move even at learning rate 0, so they are not compared)."""
    names = [n for n, _ in tiny_network().named_parameters()]
    assert names and set(names) <= set(global_state)
    different = [n for n in names if not torch.equal(global_state[n].float(), reference[n].float())]
    assert not different, (
        f"{len(different)} of {len(names)} parameters differ from the checkpoint, e.g. {different[:3]}"
    )


# ---------------------------------------------------------------------------------------------------------------
# site logic, no NVFlare
# ---------------------------------------------------------------------------------------------------------------


def test_check_site_data_names_site_and_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Site 'site_x': dataset folder does not exist: .*nowhere"):
        fl_site.check_site_data("site_x", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"Site 'site_x': .* has no datalist: .*datalist.json is missing"):
        fl_site.check_site_data("site_x", tmp_path)
    (tmp_path / "datalist.json").write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match=r"Site 'site_x': the datalist .*datalist.json has no 'training' cases"):
        fl_site.check_site_data("site_x", tmp_path)
    with pytest.raises(ValueError, match=r"Site 'site_x': no dataset configured.*LCADB_DATA_ROOT"):
        fl_site.check_site_data("site_x", None)


def test_exchanged_keys_fedbn_keeps_batchnorm_local():
    net = tiny_network()
    state = net.state_dict()
    bn = fl_site.batchnorm_keys(net)
    bn3d = [(n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert bn3d and bn == {f"{n}.{k}" for n, m in bn3d for k in m.state_dict()}
    shared = fl_site.exchanged_keys(net)
    assert not any(k.endswith("num_batches_tracked") for k in shared)
    assert set(shared) == {k for k in state if not k.endswith("num_batches_tracked")}
    fedbn = fl_site.exchanged_keys(net, fedbn=True)
    assert set(fedbn) == set(shared) - bn and any("running_mean" in k for k in bn)


def test_describe_error_reports_the_innermost_reason():
    """What the coordinator sees: the site, the innermost error (the case and the reason), and MONAI's wrapper."""
    try:
        try:
            raise ValueError("case 'c_01' in /d/datalist.json 'training' has no 'label' (a class index is required).")
        except ValueError as e:
            raise RuntimeError("Failed to instantiate component 'scripts.training.load_datalist'") from e
    except RuntimeError as wrapped:
        text = fl_site.describe_error("site_c", wrapped)
    assert text.startswith("Site 'site_c': ValueError: case 'c_01' in /d/datalist.json 'training' has no 'label'")
    assert "(while: Failed to instantiate component 'scripts.training.load_datalist')" in text
    assert fl_site.describe_error("site_c", FileNotFoundError("Site 'site_c': gone")) == "Site 'site_c': gone"


def test_parse_overrides():
    assert fl_site.parse_overrides(["a#b=0.5", "roi_size=[32,32,8]", "name=text"]) == {
        "a#b": 0.5,
        "roi_size": [32, 32, 8],
        "name": "text",
    }
    with pytest.raises(ValueError, match="id=value"):
        fl_site.parse_overrides(["novalue"])


def test_fedprox_handler_adds_proximal_term():
    """The handler adds mu/2 ||w - w_global||^2 to a MONAI SupervisedTrainer's loss before backward."""
    from monai.engines import SupervisedTrainer

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    data = [{"image": torch.randn(4, 3), "label": torch.randint(0, 2, (4,))}]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
        loss_function=torch.nn.CrossEntropyLoss(),
    )
    handler = fl_site.FedProxHandler()
    handler.attach(trainer)
    handler.set_reference(net, 0.5)
    with torch.no_grad():
        net.weight += 1.0  # move away from the anchor: ||w - w_global||^2 = 6 (weights) + 0 (bias)
    plain = torch.nn.functional.cross_entropy(net(data[0]["image"]), data[0]["label"])
    trainer.run()
    loss = trainer.state.output[0]["loss"]  # decollated: a tensor or a float
    loss = loss.item() if torch.is_tensor(loss) else float(loss)
    assert loss == pytest.approx(float(plain) + 0.5 / 2 * 6, rel=1e-5)
    with pytest.raises(ValueError, match="mu must be >= 0"):
        handler.set_reference(net, -1.0)


def test_run_site_without_nvflare(fed_data, tmp_path):
    """One round of the bundle's own training on one site: a weight difference over the exchanged keys."""
    initial = tiny_network().state_dict()
    result = fl_site.run_site("site_a", fed_data["site_a"], BUNDLE, 1, initial, work_dir=tmp_path, overrides=TINY)
    net = tiny_network()
    assert list(result.weight_diff) == fl_site.exchanged_keys(net)
    assert result.num_steps > 0
    assert "global_val_accuracy" in result.metrics and "train_loss" in result.metrics
    assert any(float(d.abs().max()) > 0 for d in result.weight_diff.values())
    # the site's bundle outputs land in work_dir, not in the bundle
    assert (tmp_path / "models" / "model_final.pt").is_file()
    # FedBN: BatchNorm parameters and statistics are neither sent nor overwritten
    fedbn = fl_site.SiteTrainer("site_b", fed_data["site_b"], BUNDLE, 1, tmp_path / "b", overrides=TINY, fedbn=True)
    before = {k: v.clone() for k, v in fedbn.network.state_dict().items()}
    fedbn.load_global({k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in initial.items()})
    after = fedbn.network.state_dict()
    bn = fl_site.batchnorm_keys(fedbn.network)
    assert all(torch.equal(after[k], before[k]) for k in bn)
    assert all(torch.all(after[k] == 0.5) for k in fedbn.keys if after[k].is_floating_point())
    with pytest.raises(ValueError, match="Site 'site_b': global weight .* has shape"):
        fedbn.load_global({k: torch.zeros(1) for k in initial})


def test_privacy_filters_measurably_change_a_real_update(fed_data, tmp_path):
    """Both filters on a real site update (one bundle round): count what each zeroed, clipped or withheld."""
    import fl_privacy
    from nvflare.apis.dxo import DXO, DataKind, MetaKey
    from nvflare.apis.fl_context import FLContext

    result = fl_site.run_site(
        "site_a", fed_data["site_a"], BUNDLE, 1, tiny_network().state_dict(), work_dir=tmp_path, overrides=TINY
    )
    update = {k: v.numpy() for k, v in result.weight_diff.items()}
    zeros_before, total = fl_privacy.count_elements(update)
    changed = total - zeros_before

    def filtered(privacy_filter):
        dxo = DXO(DataKind.WEIGHT_DIFF, data={k: v.copy() for k, v in update.items()})
        dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, result.num_steps)
        return privacy_filter.process_dxo(dxo, dxo.to_shareable(), FLContext()).data

    out = filtered(fl_privacy.ChangedPercentilePrivacy())  # defaults: 10 % of the changed elements, gamma 0.01
    zeros_after, _ = fl_privacy.count_elements(out)
    assert 0.08 * changed <= zeros_after - zeros_before <= 0.12 * changed
    assert all(np.all(np.abs(out[k]) <= 0.01 * result.num_steps + 1e-9) for k in out)
    out = filtered(fl_privacy.CountingSVTPrivacy())  # NVFlare's SVT defaults: about 10 % of the elements, noised
    zeros_svt, _ = fl_privacy.count_elements(out)
    assert 0.8 * total <= zeros_svt < total
    shared = [k for k in out if np.count_nonzero(out[k])]
    assert any(not np.allclose(out[k][out[k] != 0], update[k][out[k] != 0]) for k in shared)  # noise was added


def test_run_site_missing_data_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Site 'site_z': dataset folder does not exist: .*missing_site"):
        fl_site.run_site("site_z", tmp_path / "missing_site", BUNDLE, 1, overrides=TINY)


# ---------------------------------------------------------------------------------------------------------------
# job definition (exported, not run)
# ---------------------------------------------------------------------------------------------------------------


def test_job_export_ships_bundle_and_per_site_data(tmp_path):
    args = job.resolve_paths(
        job.build_arg_parser().parse_args(
            "--sites site_a site_b --fedprox_mu 0.01 --fedbn --privacy_percentile 10 --min_clients 1".split()
            + ["--server_momentum", "0.6"]
            + ["--data_root", str(tmp_path / "data"), "--site_data", f"site_b={tmp_path / 'elsewhere'}", *TINY_ARGS]
        )
    )
    roots = job.site_data_roots(args.sites, args.data_root, args.site_data)
    assert roots == {"site_a": str(tmp_path / "data" / "site_a"), "site_b": str(tmp_path / "elsewhere")}
    with job.in_job_dir():
        recipe = job.build_recipe(args, roots, job.stage_bundle(BUNDLE, tmp_path / "stage"))
        recipe.export(str(tmp_path / "exported"))
    exported = tmp_path / "exported" / args.name
    meta = json.loads((exported / "meta.json").read_text())
    assert meta["min_clients"] == 1
    server = (exported / "app_server" / "config" / "config_fed_server.json").read_text()
    assert "fl_server.ResilientFedAvg" in server and "fl_server.BundleCheckpointPersistor" in server
    assert '"fedprox_mu": 0.01' in server and '"widen_factor": 0.125' in server and '"server_momentum": 0.6' in server
    assert "fl_server.LiveSitesCrossSiteModelEval" in server
    assert (exported / "app_server" / "custom" / "scripts" / "network.py").is_file()
    for site in args.sites:
        app = exported / f"app_{site}"
        for name in ("client.py", "fl_site.py", "configs/train.json", "scripts/network.py"):
            assert (app / "custom" / name).is_file(), name
        assert not (app / "custom" / "models").exists()
        client = (app / "config" / "config_fed_client.json").read_text()
        command = json.loads(client)["executors"][0]["executor"]["args"]["command"]  # a separate training process
        assert command[command.index("--data_root") + 1] == roots[site] and "--fedbn" in command
        assert "--submit_update" in command and command[0] == sys.executable
        assert "fl_privacy.ChangedPercentilePrivacy" in client
        assert '"submit_model"' in client and (app / "custom" / "fl_privacy.py").is_file()


def test_fedopt_server_step_is_torch_sgd_with_momentum():
    """Two server rounds of FedOpt equal torch.optim.SGD(lr, momentum) fed with the negative averaged updates."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4))
    start = weight.detach().clone()
    optimizer = torch.optim.SGD([weight], lr=0.5, momentum=0.6)
    updates = [torch.randn(4), torch.randn(4)]
    velocity, ours = {}, start.clone()
    for update in updates:
        optimizer.zero_grad()
        weight.grad = -update
        optimizer.step()
        stats = torch.randn(4)
        step = fl_server.fedopt_sgd_step({"w": update, "bn.running_mean": stats}, velocity, 0.5, 0.6)
        assert torch.equal(step["bn.running_mean"], stats)  # statistics are averaged, not accelerated
        ours = ours + step["w"]
    assert torch.allclose(ours, weight.detach(), atol=1e-6)


def test_site_data_rejects_unknown_site_and_spaces():
    with pytest.raises(ValueError, match="site=path"):
        job.site_data_roots(["site_a"], None, ["site_q=/x"])
    with pytest.raises(ValueError, match="whitespace"):
        job.site_data_roots(["site_a"], None, ["site_a=/a b"])


def test_build_recipe_rejects_bad_settings(tmp_path):
    parser = job.build_arg_parser()
    for argv, message in [
        (["--sites", "site_a", "--min_clients", "2"], "min_clients must be in"),
        (["--local_epochs", "0"], "num_rounds and local_epochs must be >= 1"),
        (["--privacy_percentile", "120"], "privacy_percentile must be in"),
        (["--privacy", "svt", "--svt_fraction", "0"], "svt_fraction must be in"),
        (["--scaffold", "--privacy", "svt"], "do not combine it with --privacy"),
        (["--server_momentum", "1.5"], "server_momentum in"),
        (["--initial_ckpt_on_server", "relative.pt"], "must be absolute"),
    ]:
        with pytest.raises(ValueError, match=message):
            job.build_recipe(parser.parse_args(argv), {}, tmp_path)


def test_project_yml_provisions_every_hospital(tmp_path):
    """`nvflare provision -p federated/project.yml -c federated` builds a startup kit per hospital, server and admin.
    The server kit keeps its job store and snapshots in its own workspace and lists the fl_kits components (module
    shipped); each hospital kit holds its privacy policy, which NVFlare's own privacy configurator loads: the scopes
    ``percentile`` (default) and ``svt``, each with the guard, the model filter and the report redactor; any other
    scope is not allowed; the site's error log is not streamed to the server."""
    from nvflare.apis.workspace import Workspace
    from nvflare.private.fed.app.fl_conf import create_privacy_manager
    from nvflare.private.privacy_manager import PrivacyService

    nvflare = Path(sys.executable).parent / "nvflare"
    subprocess.run(
        [str(nvflare), "provision", "-p", str(FEDERATED / "project.yml"), "-c", str(FEDERATED), "-w", str(tmp_path)],
        check=True,
    )
    prod = tmp_path / "lcadb_federation" / "prod_00"
    for kit in ("fl-server.example.org", "hospital-a", "hospital-b", "hospital-c"):
        assert (prod / kit / "startup" / "start.sh").is_file(), kit
    assert (prod / "admin@coordinating-center.example.org" / "startup").is_dir()
    server = prod / "fl-server.example.org"
    resources = json.loads((server / "local" / "resources.json.default").read_text())
    paths = {c["id"]: c["path"] for c in resources["components"]}
    for name in ("RejoinedSiteHandler", "LostSiteHandler", "JobResumer", "DeploymentRefusalLogger"):
        assert f"fl_kits.{name}" in paths.values(), name
    assert (server / "local" / "custom" / "fl_kits.py").read_text() == (FEDERATED / "fl_kits.py").read_text()
    job_store = next(c for c in resources["components"] if c["id"] == "job_manager")["args"]["uri_root"]
    snapshots = resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"]
    assert job_store == str(server / "jobs-storage") and snapshots == str(server / "snapshot-storage")
    for hospital in ("hospital-a", "hospital-b", "hospital-c"):
        local = prod / hospital / "local"
        assert json.loads((local / "resources.json.default").read_text())["allow_log_streaming"] is False
        assert (local / "custom" / "lcadb_site_privacy.py").read_text() == (FEDERATED / "fl_privacy.py").read_text()
    sys.path.insert(0, str(prod / "hospital-a" / "local" / "custom"))  # as NVFlare puts it for the site's processes
    try:
        manager = create_privacy_manager(Workspace(str(prod / "hospital-a")), names_only=False)
    finally:
        sys.path.remove(str(prod / "hospital-a" / "local" / "custom"))
    assert sorted(manager.name_to_scopes) == ["percentile", "svt"] and manager.default_scope.name == "percentile"
    filters = [type(f).__name__ for f in manager.get_scope("percentile").task_result_filters["out"]]
    assert filters == ["ModelReleaseGuard", "ChangedPercentilePrivacy", "SiteReportRedactor"]
    PrivacyService.initialize(manager)
    try:
        assert PrivacyService.is_scope_allowed("") and PrivacyService.is_scope_allowed("svt")
        assert not PrivacyService.is_scope_allowed("none")
    finally:
        PrivacyService.initialize(None)


def test_site_policy_guard_and_redactor_on_results():
    """A site's release rules on results as its job process hands them over: full weights and arrays in the metadata
    are refused with an error report naming the policy; an error report leaves without paths and case ids (kept when
    the policy allows them); weight differences pass unchanged."""
    import fl_privacy
    from nvflare.apis.dxo import DXO, DataKind, from_shareable
    from nvflare.apis.fl_context import FLContext

    guard, redactor = fl_privacy.ModelReleaseGuard(), fl_privacy.SiteReportRedactor()
    weights = {"w": np.ones((2, 3), np.float32)}
    out = from_shareable(guard.process(DXO(DataKind.WEIGHTS, data=weights).to_shareable(), FLContext()))
    assert out.data_kind == DataKind.METRICS and not out.data
    assert (
        "refused the result" in out.meta[fl_privacy.SITE_ERROR_KEY]
        and "full model weights" in out.meta[fl_privacy.SITE_ERROR_KEY]
    )
    hidden = DXO(DataKind.WEIGHT_DIFF, data=weights, meta={"scaffold_c_diff": {"w": np.ones(3)}}).to_shareable()
    assert (
        "arrays in its metadata" in from_shareable(guard.process(hidden, FLContext())).meta[fl_privacy.SITE_ERROR_KEY]
    )
    diff = DXO(DataKind.WEIGHT_DIFF, data=weights, meta={"NUM_STEPS_CURRENT_ROUND": 2}).to_shareable()
    assert from_shareable(guard.process(diff, FLContext())).data_kind == DataKind.WEIGHT_DIFF
    report = "Site 'site_c': ValueError: case 'c_0003' in /data/lcadb/site_c/datalist.json 'training' has no 'label'"
    error = DXO(DataKind.METRICS, data={}, meta={fl_privacy.SITE_ERROR_KEY: report}).to_shareable()
    sent = from_shareable(redactor.process(error, FLContext())).meta[fl_privacy.SITE_ERROR_KEY]
    assert sent == "Site 'site_c': ValueError: case '<case id withheld>' in <path withheld> 'training' has no 'label'"
    full = fl_privacy.SiteReportRedactor(report_paths=True, report_case_ids=True)
    error = DXO(DataKind.METRICS, data={}, meta={fl_privacy.SITE_ERROR_KEY: report}).to_shareable()
    assert from_shareable(full.process(error, FLContext())).meta[fl_privacy.SITE_ERROR_KEY] == report
    text, paths, cases = fl_privacy.redact_text("case 'c_1': no file /x/images/c_1/t2.nii.gz", report_paths=True)
    assert text == "case '<case id withheld>': no file /x/images/<case id withheld>/t2.nii.gz" and (paths, cases) == (
        0,
        2,
    )
    with pytest.raises(ValueError, match="case_id_pattern must be a regular expression"):
        fl_privacy.SiteReportRedactor(case_id_pattern="(")


def test_sites_on_one_machine_share_its_cores(tmp_path):
    """Simulator and PoC: each site's training process gets its share of the cores (three torch pools of all cores
    on two cores spend their time spin-waiting); an explicit --site_threads wins; production passes nothing."""
    parser = job.build_arg_parser()
    shared = job.share_cores(parser.parse_args([]), 3)
    assert shared.site_threads == max(1, (os.cpu_count() or 1) // 3)
    assert job.share_cores(parser.parse_args(["--site_threads", "4"]), 3).site_threads == 4
    for site_threads, expected in [(2, ["--torch_threads", "2"]), (None, [])]:
        args = parser.parse_args(["--sites", "site_a", "--name", f"t{site_threads}", *TINY_ARGS])
        args.site_threads = site_threads
        with job.in_job_dir():
            recipe = job.build_recipe(
                args, {"site_a": "/data"}, job.stage_bundle(BUNDLE, tmp_path / f"s{site_threads}")
            )
            recipe.export(str(tmp_path / "exported"))
        client = json.loads(
            (tmp_path / "exported" / args.name / "app_site_a" / "config" / "config_fed_client.json").read_text()
        )
        command = client["executors"][0]["executor"]["args"]["command"]
        found = command[command.index("--torch_threads") :][:2] if "--torch_threads" in command else []
        assert found == expected


def test_compare_scores_models_and_baselines_on_one_pooled_test_split(fed_data, tmp_path):
    """compare.py's pooled dataset lists every site's training cases and the pooled test cases; the trivial and the
    radiomics baseline are trained on the pooled training cases and scored on that test split."""
    from sklearn.metrics import f1_score

    sites = {s: fed_data[s] for s in SITES}
    pooled = compare.pooled_dataset(sites, tmp_path / "pooled", fed_data["pooled_test"])
    datalist = json.loads((pooled / "datalist.json").read_text())
    site_cases = sum(len(json.loads((r / "datalist.json").read_text())["training"]) for r in sites.values())
    test = json.loads((fed_data["pooled_test"] / "datalist.json").read_text())["test"]
    assert len(datalist["training"]) == site_cases and len(datalist["test"]) == len(test)
    for case in datalist["training"] + datalist["test"]:
        paths = [v for v in case.values() if isinstance(v, str) and v.endswith(".nii.gz")]
        assert len(paths) == 8 and all((pooled / path).is_file() for path in paths)
    rows = {r["name"]: r for r in compare.baseline_rows(pooled, tmp_path / "eval")}
    labels = [c["label"] for c in test]
    majority = rows["majority"]
    predicted = [int(np.bincount([c["label"] for c in datalist["training"] if c["fold"] != 0]).argmax())] * len(labels)
    assert majority["val_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert 0.0 <= rows["radiomics"]["val_f1"] <= 1.0
    assert (tmp_path / "eval" / "radiomics" / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# NVFlare runs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_simulator_two_sites_two_rounds(fed_data, tmp_path):
    initial = tiny_network().state_dict()
    init_ckpt = fl_site.save_state_dict(initial, tmp_path / "initial.pt")
    ckpt = job.main(
        "--name sim2 --sites site_a site_b --num_rounds 2 --privacy_percentile 10 --cross_site_eval full".split()
        + ["--data_root", str(fed_data["site_a"].parent), "--initial_ckpt", str(init_ckpt)]
        + ["--workspace", str(tmp_path / "ws"), "--output_ckpt", str(tmp_path / "out" / "model.pt"), *FAST_JOB_ARGS]
    )
    assert ckpt == tmp_path / "out" / "model.pt"
    final = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert list(final) == list(initial)
    assert all(final[k].dtype == initial[k].dtype for k in final)
    changed = [k for k in final if final[k].is_floating_point() and not torch.equal(final[k], initial[k])]
    assert len(changed) > len(final) // 2
    load_bundle_checkpoint(ckpt)
    # the bundle's ckpt_export accepts it (TorchScript with the inference config, what the deploy app loads)
    from monai.bundle import ckpt_export

    ts = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(ckpt),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        config_file=str(BUNDLE / "configs" / "inference.json"),
        use_trace=True,
        input_shape=[1, 8, 32, 32, 8],
        **{k: v for k, v in TINY.items() if k not in ("num_workers", "batch_size")},
    )
    probabilities = torch.jit.load(str(ts))(torch.randn(1, 8, 32, 32, 8))
    assert probabilities.shape == (1, 7) and torch.allclose(probabilities.sum(), torch.tensor(1.0), atol=1e-4)
    # the final global model was evaluated on every site
    result = tmp_path / "ws" / "sim2" / "server" / "simulate_job"
    cse = json.loads((result / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(cse) == {"site_a", "site_b"} and all("val_accuracy" in m["SRV_FL_global_model.pt"] for m in cse.values())
    assert all("val_accuracy" in cse[s][other] for s in cse for other in ("site_a", "site_b"))  # local models too
    for site in ("site_a", "site_b"):  # the privacy filter ran on both training rounds and on the submitted model
        site_log = (tmp_path / "ws" / "sim2" / site / "log.txt").read_text()
        assert site_log.count("PercentilePrivacy: zeroed") == 3, site
    # the global checkpoint carries the settings it was trained with: train.json + model_config.json rebuild it
    settings = tmp_path / "out" / "model_config.json"
    assert json.loads(settings.read_text())["network_def#widen_factor"] == TINY["network_def#widen_factor"]
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json"), str(settings)])
    parser.get_parsed_content("network_def").load_state_dict(final, strict=True)

    # warm start / continuation: a second job starts from this global model. With learning rate 0 no site changes a
    # weight, so the global weights after its first round are exactly the checkpoint's (a random server start fails)
    ckpt2 = job.main(
        "--name sim_continue --sites site_a site_b --num_rounds 1 --cross_site_eval none".split()
        + ["--data_root", str(fed_data["site_a"].parent), "--initial_ckpt", str(ckpt)]
        + ["--workspace", str(tmp_path / "ws"), "--output_ckpt", str(tmp_path / "out2" / "model.pt"), *FAST_JOB_ARGS]
        + ["--override", "learning_rate=0.0"]
    )
    assert_parameters_equal(torch.load(ckpt2, map_location="cpu", weights_only=True), final)
    server_log = (tmp_path / "ws" / "sim_continue" / "server" / "log.txt").read_text()
    assert "Global model starts from initial_model.pt" in server_log


@pytest.mark.slow
def test_simulator_broken_site_job_finishes_with_min_clients(fed_data, tmp_path):
    """site_c's datalist has a case without a label: the coordinator's log names the site, the case and the reason
    (not only MONAI's "Failed to instantiate component"), and the other two sites finish the job."""
    broken = tmp_path / "site_c_broken"
    shutil.copytree(fed_data["site_c"], broken)
    datalist = json.loads((broken / "datalist.json").read_text())
    case = datalist["training"][0]
    del case["label"]
    (broken / "datalist.json").write_text(json.dumps(datalist))
    reason = f"case '{case['case']}' in {broken / 'datalist.json'} 'training' has no 'label'"
    ckpt = job.main(
        ["--name", "broken", "--sites", *SITES, "--min_clients", "2", "--num_rounds", "2"]
        + ["--server_momentum", "0.6", "--scaffold"]
        + ["--data_root", str(fed_data["site_a"].parent), "--site_data", f"site_c={broken}"]
        + ["--workspace", str(tmp_path / "ws"), *FAST_JOB_ARGS]
    )
    assert ckpt is not None and ckpt.is_file()
    load_bundle_checkpoint(ckpt)
    server_log = (tmp_path / "ws" / "broken" / "server" / "log.txt").read_text()
    assert "Site site_c failed in round 0" in server_log
    assert f"Site 'site_c': ValueError: {reason}" in server_log
    assert "Round 1: training on sites ['site_a', 'site_b']" in server_log
    assert "Round 1: FedOpt server update (SGD lr 1.0, momentum 0.6)" in server_log  # FedOpt and SCAFFOLD together
    assert "Round 1: SCAFFOLD global controls updated from 2 site(s)" in server_log


@pytest.mark.slow
def test_simulator_fails_clearly_below_min_clients(fed_data, tmp_path):
    with pytest.raises(RuntimeError, match="Simulation failed"):
        job.main(
            "--name toofew --sites site_a site_b --num_rounds 1 --cross_site_eval none".split()
            + ["--data_root", str(fed_data["site_a"].parent), "--site_data", f"site_b={tmp_path / 'gone'}"]
            + ["--workspace", str(tmp_path / "ws"), *FAST_JOB_ARGS]
        )
    server_log = (tmp_path / "ws" / "toofew" / "server" / "log.txt").read_text()
    assert "only 1 site(s) delivered a model, fewer than min_clients=2" in server_log


@pytest.mark.slow
def test_poc_real_processes_on_localhost(fed_data, tmp_path):
    ckpt = poc.main(
        "--name poc2 --sites site_a site_b --num_rounds 1 --timeout 600".split()
        + ["--data_root", str(fed_data["site_a"].parent), "--workspace", str(tmp_path / "ws")]
        + ["--poc_workspace", str(tmp_path / "poc"), *FAST_JOB_ARGS]
    )
    assert ckpt is not None and ckpt.is_file()
    load_bundle_checkpoint(ckpt)
    assert not (tmp_path / "poc").exists()  # PoC stopped and cleaned up


@contextlib.contextmanager
def running_poc(root: Path, sites, port: int, server_kit: dict | None = None, site_policy: dict | None = None):
    """A PoC federation started with NVFlare's own CLI (``nvflare poc prepare/start/stop``): a server on
    127.0.0.1:``port`` and one client process per site, provisioned with the project's kit builders (``server_kit``,
    ``site_policy``: their arguments). Yields the admin startup kit and the CLI environment. At the end, besides
    ``nvflare poc stop`` (which stops nothing once the server is gone), every process left in a kit is killed."""
    nvflare = str(Path(sys.executable).parent / "nvflare")
    env = {**os.environ, "NVFLARE_POC_WORKSPACE": str(root / "poc")}
    project = poc.write_poc_project(root / "project.yml", sites, port, server_kit=server_kit, site_policy=site_policy)
    subprocess.run(  # the project's builders import fl_kits from federated/
        [nvflare, "poc", "prepare", "-i", str(project), "--force"],
        env={**env, "PYTHONPATH": os.pathsep.join([str(FEDERATED), os.environ.get("PYTHONPATH", "")])},
        check=True,
        timeout=120,
    )
    prod = root / "poc" / "lcadb_poc" / "prod_00"
    try:
        subprocess.run([nvflare, "poc", "start", "-ex", poc.POC_ADMIN], env=env, check=True, timeout=180)
        yield prod / poc.POC_ADMIN, env
    finally:
        subprocess.run([nvflare, "poc", "stop"], env=env, timeout=180)
        for kit in [poc.LOOPBACK, *sites]:
            kill_site_processes(prod / kit)


def site_processes(workspace: Path) -> list[int]:
    """Every process of an NVFlare site (or server) on this machine: those whose command line names its workspace or
    whose working directory lies in it (the kit's ``sub_start.sh`` loop, the NVFlare client, its job processes, which
    NVFlare starts in their own session, and the training processes they launch from the job's folder), and every
    process below them."""
    workspace = str(workspace.resolve())
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # already dead, waiting to be reaped
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = os.readlink(proc / "cwd")
            inside = [a for a in [*args, cwd] if a == workspace or a.startswith(workspace + os.sep)]
            if inside:
                found.add(int(proc.name))
    for pid in list(found):
        found.update(_descendants(pid))
    return sorted(found)


def kill_site_processes(workspace: Path, timeout: float = 30.0) -> list[int]:
    """Kill a site the way a crashed machine does: SIGKILL to every process of it at once (:func:`site_processes`),
    then wait until they are gone from the process table (a restarted kit's ``sub_start.sh`` refuses to start while
    the PID in its ``daemon_pid.fl`` exists, even as a zombie). Returns the PIDs killed."""
    pids = site_processes(workspace)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


def wait_for_job(
    admin_kit: Path, job_id: str, timeout: float, download_to: Path | None = None
) -> tuple[str, Path | None]:
    """Wait for a job to end through NVFlare's admin API (as the admin console does) and download its result (unless
    ``download_to`` is None). The server may still be starting (``timeout`` covers the connection too)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    session = new_secure_session("admin@nvidia.com", str(admin_kit), timeout=min(timeout, 120.0))
    try:
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            status = session.get_job_meta(job_id).get("status", "")
            if status.startswith("FINISHED"):
                break
            time.sleep(2)
        if download_to is None:
            return status, None
        download_to.mkdir(parents=True, exist_ok=True)
        return status, Path(session.download_job_result(job_id, str(download_to)))
    finally:
        session.close()


def _training_pid(data_root: Path) -> int:
    """PID of the site training process (client.py, launched by the site's NVFlare job process) of ``data_root``."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if any(a.endswith(b"client.py") for a in args) and str(data_root).encode() in args:
                pids.append(int(proc.name))
    assert len(pids) == 1, f"training processes of {data_root}: {pids}"
    return pids[0]


def _export_job(tmp_path: Path, name: str, sites, job_args) -> Path:
    """The job as ``job.py --export`` writes it (``recipe.export``), for ``nvflare job submit``."""
    args = job.resolve_paths(job.build_arg_parser().parse_args(["--name", name, "--sites", *sites, *job_args]))
    with job.in_job_dir():
        recipe = job.build_recipe(
            args, job.site_data_roots(sites, args.data_root, []), job.stage_bundle(BUNDLE, tmp_path / "s" / name)
        )
        recipe.export(str(tmp_path / "exported"))
    return tmp_path / "exported" / name


def _submit(admin_kit: Path, exported: Path, env: dict) -> str:
    """``nvflare job submit`` with the admin's startup kit; returns the job id."""
    submitted = subprocess.run(
        [str(Path(sys.executable).parent / "nvflare"), "job", "submit", "-j", str(exported)]
        + ["--startup-kit", str(admin_kit)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    return re.search(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", submitted.stdout).group(0)


def _wait_for_log(log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (log.is_file() and text in log.read_text()):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {log}"
        time.sleep(0.5)


def _client_pid(site_workspace: Path) -> int | None:
    """PID of the NVFlare client process (``client_train``, started by the kit's ``sub_start.sh``) of a PoC site."""
    workspace = str(site_workspace.resolve()).encode()
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if b"nvflare.private.fed.app.client.client_train" in args and workspace in args:
                pids.append(int(proc.name))
    assert len(pids) <= 1, f"client processes of {site_workspace}: {pids}"
    return pids[0] if pids else None


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (its job process, the training process it launched, ...)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.slow
def test_poc_killed_and_hung_sites_leave_the_job_finishing(tmp_path):
    """The production path in PoC: the exported job, submitted with `nvflare job submit` and the admin's startup kit
    to running PoC processes (4 sites, min_clients 2) and followed through the admin API.

    Warm start: the exported job ships and names the start checkpoint; at learning rate 0 no site changes a weight,
    so the global weights equal that checkpoint exactly (a random server start fails). Lost sites: in round 1 site_c's
    training process is killed (SIGKILL by PID) and site_d's frozen (SIGSTOP: hung). The job completes with site_a
    and site_b, the server log names each dropped site and why, and the final evaluation runs on the live sites only
    instead of waiting for the lost ones."""
    from scripts.synthetic import generate_federated_datasets

    sites = ["site_a", "site_b", "site_c", "site_d"]
    data = generate_federated_datasets(tmp_path / "data", sites[:3], cases_per_site=7, seed=3, progress=False)
    data["site_d"] = tmp_path / "data" / "site_d"  # the generator has three site profiles: site_d gets site_a's
    shutil.copytree(data["site_a"], data["site_d"])
    torch.manual_seed(7)
    start = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in tiny_network().state_dict().items()
    }
    start_ckpt = fl_site.save_state_dict(start, tmp_path / "start.pt")
    exported = _export_job(
        tmp_path,
        "lossy",
        sites,
        ["--min_clients", "2", "--num_rounds", "3", "--wait_after_min", "15", "--eval_timeout", "120"]
        + ["--data_root", str(tmp_path / "data"), "--initial_ckpt", str(start_ckpt)]
        + [*FAST_JOB_ARGS, "--override", "learning_rate=0.0"],
    )
    server_config = json.loads((exported / "app_server" / "config" / "config_fed_server.json").read_text())
    persistor = next(c for c in server_config["components"] if c["path"].endswith("BundleCheckpointPersistor"))
    assert persistor["args"]["source_ckpt_file_full_name"] == job.INITIAL_CKPT_NAME
    assert (exported / "app_server" / "custom" / job.INITIAL_CKPT_NAME).is_file()
    assert not list(exported.rglob("*.conf"))  # `nvflare job submit` parses every *.conf as an NVFlare config
    frozen = None
    with running_poc(tmp_path, sites, port=8132) as (admin_kit, env):
        job_id = _submit(admin_kit, exported, env)
        server_log = tmp_path / "poc" / "lcadb_poc" / "prod_00" / "localhost" / job_id / "log.txt"
        deadline = time.monotonic() + 300
        _wait_for_log(server_log, "Round 1: training on sites", 300)
        os.kill(_training_pid(data["site_c"]), signal.SIGKILL)
        frozen = _training_pid(data["site_d"])
        os.kill(frozen, signal.SIGSTOP)
        try:
            while "Site site_d failed" not in server_log.read_text():
                assert time.monotonic() < deadline + 120, "the hung site was never dropped"
                time.sleep(0.5)
        finally:
            os.kill(frozen, signal.SIGKILL)  # it was dropped while hung; now let its site's job process end quickly
        status, result = wait_for_job(admin_kit, job_id, 400, tmp_path / "result")
    assert status == "FINISHED:COMPLETED", status
    log = (
        next(result.rglob("log.txt")).read_text()
        if not (result / "log.txt").is_file()
        else (result / "log.txt").read_text()
    )
    assert re.search(r"Site site_c failed in round [12] .*NVFlare return code EXECUTION_EXCEPTION", log)
    assert re.search(r"Site site_d failed in round 1 .*no result within the round", log)
    assert "Round 2: training on sites ['site_a', 'site_b']" in log
    assert "left out (failed during training)" in log
    assert "Global model starts from initial_model.pt" in log
    ckpt = job.find_global_checkpoint(result)
    assert ckpt is not None and (ckpt.parent / "model_config.json").is_file()
    assert_parameters_equal(torch.load(ckpt, map_location="cpu", weights_only=True), start)
    cse = json.loads(next(result.rglob("cross_val_results.json")).read_text())
    assert set(cse) == {"site_a", "site_b"}


@pytest.mark.slow
def test_poc_restarted_client_rejoins_without_holding_the_job(fed_data, tmp_path):
    """A site's machine crashes in round 1: its NVFlare client process and every process below it (the site's job
    process, its training process) are SIGKILLed by PID. The startup kit's ``sub_start.sh`` loop restarts the client
    from the kit and it registers again with the server. The job still completes with the two other sites: the server
    log names site_c and why, round 2 and the final evaluation leave it out instead of waiting for it (the job ends
    far sooner than the default 600 s straggler wait or 600 s evaluation timeout), and the global model is there.
    site_c does not take part again in this job: NVFlare deploys a job only when it dispatches it."""
    sites = list(SITES)
    exported = _export_job(
        tmp_path,
        "restart",
        sites,
        ["--min_clients", "2", "--num_rounds", "3", "--eval_timeout", "240", "--dead_site_grace", "10"]
        + ["--data_root", str(fed_data["site_a"].parent), *FAST_JOB_ARGS],
    )
    with running_poc(tmp_path, sites, port=8142) as (admin_kit, env):
        prod = admin_kit.parent
        job_id = _submit(admin_kit, exported, env)
        server_log = prod / "localhost" / job_id / "log.txt"
        _wait_for_log(server_log, "Round 1: training on sites ['site_a', 'site_b', 'site_c']", 300)
        client = _client_pid(prod / "site_c")
        crashed = [client, *_descendants(client)]
        assert len(crashed) >= 3, crashed  # client, its job process, the training process (client.py)
        for pid in crashed:  # the whole machine goes down at once
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        parent_log = prod / "localhost" / "log.txt"  # the server's parent process: registrations, job outcomes
        registrations = parent_log.read_text().count("Re-login the client with a new token")
        deadline = killed_at + 120
        while _client_pid(prod / "site_c") in (None, client):  # sub_start.sh checks every 5 s
            assert time.monotonic() < deadline, "sub_start.sh did not restart site_c's client"
            time.sleep(0.5)
        while parent_log.read_text().count("Re-login the client with a new token") <= registrations:
            assert time.monotonic() < deadline, "the restarted site_c never registered again"
            time.sleep(0.5)
        status, result = wait_for_job(admin_kit, job_id, 400, tmp_path / "result")
        kill_to_end = time.monotonic() - killed_at
        server_parent_log = parent_log.read_text()
    # without fl_kits.RejoinedSiteHandler NVFlare's server fails the finished job here: "Failing job ...: terminal
    # outcome unavailable from site_c: missing job on client" (FINISHED:ABNORMAL)
    assert status == "FINISHED:COMPLETED", status
    assert f"Site site_c registered again while job {job_id} it was started on is running" in server_parent_log
    # it was the kit's own supervisor loop (startup/sub_start.sh, output in the PoC console log) that restarted it
    assert f"start fl because process of {client} does not exist" in (prod / "site_c" / "poc_console.log").read_text()
    log = next(p for p in result.rglob("log.txt") if "Round 0" in p.read_text()).read_text()
    # RejoinedSiteHandler reported site_c's job dead when it registered again: the round dropped it 10 s later
    # (--dead_site_grace), not after the default 600 s straggler wait
    assert re.search(r"Site site_c failed in round 1 .*no result; NVFlare deemed it disconnected", log)
    assert "Round 2: training on sites ['site_a', 'site_b']" in log
    assert "left out (failed during training)" in log
    cse = json.loads(next(result.rglob("cross_val_results.json")).read_text())
    assert set(cse) == {"site_a", "site_b"}
    assert job.find_global_checkpoint(result) is not None
    print(f"restarted client: kill to job end {kill_to_end:.0f} s (load average {os.getloadavg()[0]:.1f})")
    # the restart (sub_start.sh checks every 5 s), the 10 s grace, one round and the evaluation; an evaluation
    # waiting for site_c would take its 240 s timeout, and the straggler wait alone 600 s
    assert kill_to_end < 150, kill_to_end


@pytest.mark.slow
def test_poc_py_failed_job_exits_1_and_keeps_the_workspace(fed_data, tmp_path):
    """``poc.py`` (its CLI, as a user runs it) on a job that cannot complete: 2 sites, min_clients = all, site_b's
    datalist has a case without a label. It exits 1 with an error naming the job status, the server log names the
    site and the reason but, by site_b's privacy policy, neither the case id nor the path (site_b's own log keeps
    them), and the PoC workspace with all logs is kept."""
    broken = tmp_path / "site_b_broken"
    shutil.copytree(fed_data["site_b"], broken)
    datalist = json.loads((broken / "datalist.json").read_text())
    case = datalist["training"][0]
    del case["label"]
    (broken / "datalist.json").write_text(json.dumps(datalist))
    poc_ws = tmp_path / "poc"
    try:
        run = subprocess.run(
            [sys.executable, str(FEDERATED / "poc.py"), "--name", "nolabel", "--sites", "site_a", "site_b"]
            + ["--num_rounds", "1", "--cross_site_eval", "none", "--port", "8152", "--timeout", "300"]
            + ["--data_root", str(fed_data["site_a"].parent), "--site_data", f"site_b={broken}"]
            + ["--workspace", str(tmp_path / "ws"), "--poc_workspace", str(poc_ws), *FAST_JOB_ARGS],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=480,
        )
    finally:
        if poc_ws.is_dir():  # poc.py stops its processes itself; this only matters when it was killed by the timeout
            subprocess.run(
                [str(Path(sys.executable).parent / "nvflare"), "poc", "stop"],
                env={**os.environ, "NVFLARE_POC_WORKSPACE": str(poc_ws)},
                capture_output=True,
                timeout=180,
            )
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    error = re.search(r"ERROR lcadb\.federated\.poc: PoC job \S+ did not complete \(status (\S+)\)", output)
    assert error and error.group(1) != job.COMPLETED, output
    assert f"PoC workspace kept with all logs: {poc_ws}" in output
    assert (poc_ws / "lcadb_poc" / "prod_00" / "localhost" / "startup").is_dir()  # kept, kits and logs included
    # the server kit (parent logs) and the job's server workspace as the server hands it out (downloaded by poc.py;
    # NVFlare archives it in the job store and removes it from the kit when the job ends)
    prod = poc_ws / "lcadb_poc" / "prod_00"
    server_files = [
        p for d in (prod / "localhost", prod / poc.POC_ADMIN / "transfer") for p in d.rglob("*") if p.is_file()
    ]
    server_logs = [p.read_text() for p in server_files if p.name == "log.txt" and "ResilientFedAvg" in p.read_text()]
    assert server_logs, f"no server job log under {prod}"
    assert "Site site_b failed in round 0" in server_logs[0]
    assert "only 1 site(s) delivered a model, fewer than min_clients=2" in server_logs[0]
    # site_b's policy (provisioned by poc.py) let its report leave without the case id and the path: the server names
    # the site and the reason; no server file holds the case id, no server log the site's data path
    reason = f"case '{case['case']}' in {broken / 'datalist.json'} 'training' has no 'label'"
    assert (
        "Site 'site_b': ValueError: case '<case id withheld>' in <path withheld> 'training' has no 'label'"
        in (server_logs[0])
    )
    assert not [p for p in server_files if case["case"].encode() in p.read_bytes()]
    assert not [p for p in server_files if p.suffix == ".txt" and str(broken) in p.read_text()]  # the job has it
    site_b_log = next(
        p for p in (poc_ws / "lcadb_poc" / "prod_00" / "site_b").rglob("log.txt") if reason in p.read_text()
    )
    assert "SiteReportRedactor: withheld 1 path(s) and 1 case id(s)" in site_b_log.read_text()  # the site keeps it


@pytest.mark.slow
def test_poc_site_lost_for_good_job_completes_without_it(fed_data, tmp_path):
    """A site's machine goes down for good in round 1: every process of site_c (the kit's ``sub_start.sh`` loop, its
    NVFlare client, its job process, its training process) is SIGKILLed and none is left. The server kit's
    ``LostSiteHandler`` logs site_c out after ``lost_site_after`` s of silence, the job drops it after its
    ``--dead_site_grace`` and completes with the two others (status COMPLETED, not FINISHED:ABNORMAL after NVFlare's
    600 s heartbeat timeout), and the server log and the job summary (what job.py / poc.py print) name site_c. Each
    site's privacy policy (provisioned, not in the job) filtered its updates."""
    sites = list(SITES)
    lost_after, grace = 25, 5
    exported = _export_job(
        tmp_path,
        "lost",
        sites,
        ["--min_clients", "2", "--num_rounds", "2", "--eval_timeout", "240", "--dead_site_grace", str(grace)]
        + ["--data_root", str(fed_data["site_a"].parent), *FAST_JOB_ARGS],
    )
    with running_poc(tmp_path, sites, port=8162, server_kit={"lost_site_after": lost_after}) as (admin_kit, env):
        prod = admin_kit.parent
        job_id = _submit(admin_kit, exported, env)
        _wait_for_log(
            prod / "localhost" / job_id / "log.txt", "Round 1: training on sites ['site_a', 'site_b', 'site_c']", 300
        )
        killed = kill_site_processes(prod / "site_c")
        killed_at = time.monotonic()
        time.sleep(1.0)
        assert len(killed) >= 4, killed  # sub_start.sh, client_train, the job process (worker_process), client.py
        assert not site_processes(prod / "site_c"), "processes of site_c survived the kill"
        status, result = wait_for_job(admin_kit, job_id, 400, tmp_path / "result")
        kill_to_end = time.monotonic() - killed_at
        parent_log = (prod / "localhost" / "log.txt").read_text()
        site_a_log = (prod / "site_a" / job_id / "log.txt").read_text()
    assert status == job.COMPLETED, status
    assert re.search(r"Site site_c lost: no message from its NVFlare client for \d+ s", parent_log)
    log = next(p for p in result.rglob("log.txt") if "Round 0" in p.read_text()).read_text()
    assert re.search(r"Site site_c failed in round 1 .*NVFlare deemed it disconnected", log)
    summary = json.loads(next(result.rglob(fl_server.SUMMARY_FILE)).read_text())
    assert [r["sites"] for r in summary["rounds"]] == [["site_a", "site_b", "site_c"], ["site_a", "site_b"]]
    assert set(summary["left_out"]) == {"site_c"} and summary["left_out"]["site_c"]["round"] == 1
    assert "left out: site_c (round 1: no result; NVFlare deemed it disconnected" in job.describe_job_summary(result)
    assert set(json.loads(next(result.rglob("cross_val_results.json")).read_text())) == {"site_a", "site_b"}
    # the site's own policy (privacy.json, default scope) filtered site_a's updates; the job asked for no filter
    assert "PercentilePrivacy: zeroed" in site_a_log
    assert "Privacy" not in (exported / "app_site_a" / "config" / "config_fed_client.json").read_text()
    # lost after lost_after s of silence (+ up to one 10 s heartbeat), dropped after the grace, then the last round's
    # aggregation and the final evaluation on two sites; NVFlare alone would take 600 s and fail the job
    print(f"site lost for good: kill to job end {kill_to_end:.0f} s (load average {os.getloadavg()[0]:.1f})")
    assert kill_to_end < lost_after + 10 + grace + 120, kill_to_end


@pytest.mark.slow
def test_poc_server_crash_job_resumes_with_all_rounds(fed_data, tmp_path):
    """The server's machine crashes in round 1 of 2: every process of the server kit (its ``sub_start.sh`` loop, the
    server, the job's server process) is SIGKILLed, then the server is started again from its kit
    (``startup/start.sh``). The kit's ``JobResumer`` sets the crashed job FINISHED:ABNORMAL and clones it (NVFlare's
    ``clone_job``); the clone resumes at round 1 from the crashed job's snapshot (the global model of round 0, the one
    the server had saved as ``model.pt``) and ends COMPLETED with both rounds, both sites in each; then the
    snapshots are deleted."""
    sites = ["site_a", "site_b"]
    exported = _export_job(
        tmp_path,
        "crash",
        sites,
        ["--num_rounds", "2", "--cross_site_eval", "none", "--data_root", str(fed_data["site_a"].parent)]
        + FAST_JOB_ARGS,
    )
    with running_poc(tmp_path, sites, port=8172, server_kit={"resume_wait": 60}) as (admin_kit, env):
        server = admin_kit.parent / "localhost"
        job_id = _submit(admin_kit, exported, env)
        _wait_for_log(server / job_id / "log.txt", "Round 1: training on sites", 300)
        killed = kill_site_processes(server)
        crashed_at = time.monotonic()
        assert len(killed) >= 3, killed  # sub_start.sh, server_train, the job's runner_process
        assert not site_processes(server), "processes of the server survived the kill"
        snapshots = tmp_path / "poc" / "snapshot-storage"
        assert (snapshots / job_id / "data").is_file(), "no job snapshot in the PoC server's snapshot storage"
        round0 = fl_server.weights_digest(torch.load(server / job_id / GLOBAL_MODEL, map_location="cpu"))
        path = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # start.sh runs python3 from PATH
        subprocess.run(["bash", str(server / "startup" / "start.sh")], env={**env, "PATH": path}, check=True)
        resumed = re.compile(rf"Job {job_id} resumes as job (\S+) \(cloned from it\)")
        _wait_for_log(server / "log.txt", f"Job {job_id} resumes as job", 240)
        clone = resumed.search((server / "log.txt").read_text()).group(1)
        crashed_status, _ = wait_for_job(admin_kit, job_id, 60)
        status, result = wait_for_job(admin_kit, clone, 600, tmp_path / "result")
        crash_to_end = time.monotonic() - crashed_at
    assert crashed_status == "FINISHED:ABNORMAL" and status == job.COMPLETED, (crashed_status, status)
    log = next(p for p in result.rglob("log.txt") if "ResilientFedAvg" in p.read_text()).read_text()
    assert (
        f"resumes at round 1 of 2 from the snapshot of job {job_id} after round 0 (global model digest {round0};"
    ) in log
    assert "Round 1: training on sites ['site_a', 'site_b']" in log
    summary = json.loads(next(result.rglob(fl_server.SUMMARY_FILE)).read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert all(r["sites"] == sites for r in summary["rounds"]) and not summary["left_out"]
    assert summary["resumed"] == [{"at_round": 1, "snapshot_round": 0, "snapshot_of": job_id}]
    final = torch.load(job.find_global_checkpoint(result), map_location="cpu", weights_only=True)
    assert fl_server.weights_digest(final) != round0  # round 1 trained on
    assert not (snapshots / job_id).exists() and not (snapshots / clone).exists()  # deleted once the clone ended
    print(f"server crash: crash to job end {crash_to_end:.0f} s (load average {os.getloadavg()[0]:.1f})")


@pytest.mark.slow
def test_poc_site_policy_filters_every_result_and_refuses_other_scopes(fed_data, tmp_path):
    """Each site enforces its own privacy policy, provisioned into its kit (``privacy.json``), whatever the job says.
    The sites accept only the scope ``percentile`` and zero 100 % of the changed elements. A job that asks for no
    filter still has every update filtered at the sites: its global model leaves round 0 exactly as it started,
    although each site changed its weights (the site logs count the changes it zeroed). A job that asks for the
    scope ``none`` is refused by both sites at deployment and never runs; the server log names each site and why."""
    sites = ["site_a", "site_b"]
    torch.manual_seed(11)
    start = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in tiny_network().state_dict().items()
    }
    start_ckpt = fl_site.save_state_dict(start, tmp_path / "start.pt")
    common = ["--num_rounds", "1", "--cross_site_eval", "none", "--data_root", str(fed_data["site_a"].parent)]
    unfiltered = _export_job(tmp_path, "nofilter", sites, [*common, "--initial_ckpt", str(start_ckpt), *FAST_JOB_ARGS])
    weaker = _export_job(tmp_path, "weaker", sites, [*common, "--scope", "none", *FAST_JOB_ARGS])
    assert json.loads((weaker / "meta.json").read_text())["scope"] == "none"
    policy = {"scopes": ["percentile"], "default_scope": "percentile", "percentile": 100}
    with running_poc(tmp_path, sites, port=8182, site_policy=policy) as (admin_kit, env):
        prod = admin_kit.parent
        first = _submit(admin_kit, unfiltered, env)
        status, result = wait_for_job(admin_kit, first, 400, tmp_path / "result")
        refused = _submit(admin_kit, weaker, env)
        refused_status, _ = wait_for_job(admin_kit, refused, 120)
        parent_log = (prod / "localhost" / "log.txt").read_text()
        site_logs = {site: (prod / site / first / "log.txt").read_text() for site in sites}
    assert status == job.COMPLETED, status
    final = torch.load(job.find_global_checkpoint(result), map_location="cpu", weights_only=True)
    floats = [k for k in final if final[k].is_floating_point()]
    assert floats and all(torch.equal(final[k], start[k]) for k in floats)  # every change was withheld
    for site, site_log in site_logs.items():
        zeroed = re.search(r"PercentilePrivacy: zeroed (\d+) of (\d+) changed elements", site_log)
        assert zeroed and int(zeroed.group(1)) == int(zeroed.group(2)) > 1000, site  # the site did train
    assert refused_status == "FINISHED:FAILED_TO_RUN", refused_status
    for site in sites:
        assert re.search(rf"Site {site} refused job {refused}: .*privacy scope 'none' is not allowed", parent_log)
