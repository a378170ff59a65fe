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
"""Federated training of the LCA-DB bundle with NVFlare 2.9: build the job and run it.

Runs in NVFlare's simulator by default (``SimEnv``); ``--startup_kit`` submits the same job to a provisioned
(production) system with ``ProdEnv``; ``--export --export-dir DIR`` writes the job folder instead of running it
(NVFlare's own flags). ``poc.py`` runs it with ``PocEnv``. Example (synthetic data from ``scripts.synthetic``)::

    python federated/job.py --data_root /tmp/lcadb_fed --sites site_a site_b site_c --num_rounds 5 --local_epochs 2

Every site gets ``--data_root <data_root>/<site>`` (or the path given with ``--site_data site=path``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nvflare
from fl_privacy import PRIVACY_TASKS, ChangedPercentilePrivacy, CountingSVTPrivacy
from fl_server import SUMMARY_FILE, BundleCheckpointPersistor, LCADBFedAvgRecipe
from fl_site import parse_overrides
from nvflare.apis.fl_constant import ConfigVarName
from nvflare.apis.job_def import JobMetaKey
from nvflare.recipe import ProdEnv, SimEnv
from nvflare.recipe.utils import add_experiment_tracking, set_per_site_config, set_recipe_meta

__all__ = [
    "FEDERATED_DIR",
    "DEFAULT_BUNDLE_ROOT",
    "build_arg_parser",
    "build_recipe",
    "build_privacy_filter",
    "bundle_parser",
    "default_key_metric",
    "describe_job_summary",
    "in_job_dir",
    "find_global_checkpoint",
    "copy_global_checkpoint",
    "network_model_config",
    "network_settings",
    "resolve_paths",
    "share_cores",
    "site_data_roots",
    "stage_bundle",
    "main",
]

logger = logging.getLogger("lcadb.federated.job")

FEDERATED_DIR = Path(__file__).resolve().parent
DEFAULT_BUNDLE_ROOT = FEDERATED_DIR.parent / "bundle"
#: NVFlare minor version the job is written for (pinned in pyproject.toml; the job API changed in 2.7).
NVFLARE_VERSION = "2.9"
#: Status of a job that ran to its end (NVFlare's RunStatus string).
COMPLETED = "FINISHED:COMPLETED"
#: Name of the bundle checkpoint the server writes in its app folder (see BundleCheckpointPersistor).
GLOBAL_CKPT = Path("app_server") / "models" / "model.pt"


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--name", default="lcadb_fedavg", help="job name")
    p.add_argument("--sites", nargs="+", default=["site_a", "site_b", "site_c"], help="site names")
    p.add_argument("--data_root", default=None, help="folder with one dataset per site: <data_root>/<site>")
    p.add_argument("--site_data", action="append", default=[], help="site=path, per-site dataset (repeatable)")
    p.add_argument("--bundle_root", default=str(DEFAULT_BUNDLE_ROOT), help="the MONAI bundle shipped with the job")
    p.add_argument("--config_file", action="append", default=None, help="bundle config(s) relative to bundle root")
    p.add_argument("--override", action="append", default=[], help="bundle override id=value (repeatable)")
    p.add_argument(
        "--initial_ckpt",
        default=None,
        help="bundle checkpoint (state_dict, e.g. a previous job's global model.pt) to start from; shipped in the job",
    )
    p.add_argument(
        "--initial_ckpt_on_server",
        default=None,
        help="absolute path of the start checkpoint on the server machine (production; not shipped)",
    )
    p.add_argument("--num_rounds", type=int, default=5)
    p.add_argument("--local_epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--min_clients", type=int, default=None, help="fewest sites a round needs (default: all)")
    p.add_argument("--wait_after_min", type=int, default=600, help="seconds to wait for stragglers per round")
    p.add_argument("--round_timeout", type=int, default=0, help="seconds a round may last in all (0: no limit)")
    p.add_argument("--eval_timeout", type=int, default=600, help="seconds a site may take for a final evaluation")
    p.add_argument(
        "--dead_site_grace",
        type=float,
        default=10.0,
        help="seconds the job still waits for a site NVFlare reported dead (lost or restarted) before dropping it",
    )
    p.add_argument(
        "--scope",
        default=None,
        help="privacy scope the job asks the sites for (their privacy.json); default: each site's default scope",
    )
    p.add_argument("--fedprox_mu", type=float, default=0.0, help="FedProx proximal coefficient (0: FedAvg)")
    p.add_argument("--server_momentum", type=float, default=0.0, help="FedOpt: server SGD momentum (e.g. 0.6)")
    p.add_argument("--server_lr", type=float, default=1.0, help="FedOpt: server SGD learning rate")
    p.add_argument("--scaffold", action="store_true", help="SCAFFOLD control variates (Karimireddy et al., 2020)")
    p.add_argument("--fedbn", action="store_true", help="keep BatchNorm parameters and statistics at each site")
    p.add_argument(
        "--privacy",
        choices=["none", "percentile", "svt"],
        default=None,
        help="filter on every model result leaving a site: percentile (PercentilePrivacy, not DP) or svt "
        "(NVFlare's differential-privacy SVTPrivacy); default none, or percentile when --privacy_percentile is given",
    )
    p.add_argument("--privacy_percentile", type=float, default=None, help="percent of changed elements zeroed (10)")
    p.add_argument("--privacy_gamma", type=float, default=0.01, help="PercentilePrivacy per-step clipping bound")
    p.add_argument("--svt_fraction", type=float, default=0.1, help="SVTPrivacy: fraction of elements shared")
    p.add_argument("--svt_epsilon", type=float, default=0.1, help="SVTPrivacy: privacy budget of the selection")
    p.add_argument("--svt_noise_var", type=float, default=0.1, help="SVTPrivacy: release noise control")
    p.add_argument("--svt_gamma", type=float, default=1e-5, help="SVTPrivacy: clipping bound")
    p.add_argument("--svt_tau", type=float, default=1e-6, help="SVTPrivacy: threshold offset")
    p.add_argument(
        "--cross_site_eval",
        choices=["global", "full", "none"],
        default="global",
        help="global: final global model on every site; full: also every site's model on every site",
    )
    p.add_argument("--key_metric", default=None, help="client metric for the best global model (e.g. global_val_f1)")
    p.add_argument(
        "--in_process",
        action="store_true",
        help="train inside the NVFlare client job process (faster start; a crash then fails the whole job)",
    )
    p.add_argument(
        "--site_python",
        default=None,
        help="Python the sites run the training with (default: this interpreter; production: e.g. python3)",
    )
    p.add_argument("--tracking", choices=["tensorboard", "none"], default="tensorboard")
    p.add_argument("--workspace", default="/tmp/nvflare/lcadb", help="SimEnv workspace root")
    p.add_argument("--threads", type=int, default=None, help="SimEnv: sites trained in parallel (default: all)")
    p.add_argument(
        "--site_threads",
        type=int,
        default=None,
        help="torch CPU threads of each site's training process (default: this machine's cores shared among the "
        "sites in the simulator and PoC, torch's default in production)",
    )
    p.add_argument("--startup_kit", default=None, help="admin startup kit: submit to a provisioned system (ProdEnv)")
    p.add_argument("--username", default="admin@nvidia.com", help="admin user for --startup_kit")
    p.add_argument("--output_ckpt", default=None, help="copy the final global bundle checkpoint here")
    return p


def site_data_roots(sites: Sequence[str], data_root: str | None, site_data: Sequence[str]) -> dict[str, str]:
    """Per-site dataset roots: ``--site_data site=path`` wins over ``<data_root>/<site>``.

    Paths are not checked here (in production they exist only at the sites); each site checks its own.

    Raises:
        ValueError: for a malformed pair, an unknown site, a path with whitespace, or a site without data.
    """
    roots = {s: str(Path(data_root) / s) for s in sites} if data_root else {}
    for pair in site_data:
        site, sep, path = pair.partition("=")
        if not sep or site not in sites:
            raise ValueError(f"--site_data must be 'site=path' with a site of {list(sites)}, got {pair!r}.")
        roots[site] = path
    for site, path in roots.items():
        if any(c.isspace() for c in path):
            raise ValueError(f"Site '{site}': NVFlare splits script arguments on whitespace; data path {path!r}.")
    if set(roots) != set(sites):
        # a site without a path still gets a task: it reports the missing configuration (or reads LCADB_DATA_ROOT)
        logger.warning(f"no data path for site(s) {sorted(set(sites) - set(roots))}: they use $LCADB_DATA_ROOT")
    return roots


def bundle_parser(
    bundle_root: str | os.PathLike, config_files: Sequence[str], overrides: Mapping[str, Any] | None = None
):
    """The bundle's ``ConfigParser`` with the configs and overrides the sites use (nothing instantiated)."""
    from monai.bundle import ConfigParser

    bundle_root = Path(bundle_root)
    parser = ConfigParser()
    parser.read_config([str(bundle_root / c) for c in config_files])
    meta = bundle_root / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    parser.update({"bundle_root": str(bundle_root), **(overrides or {})})
    return parser


def network_model_config(
    bundle_root: str | os.PathLike, config_files: Sequence[str], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The server's copy of the network: ``{"class_path", "args"}`` from the bundle's resolved ``network_def``.

    Resolving the same configs and overrides the sites use guarantees that server and sites build one network.

    Raises:
        ValueError: when ``network_def`` has no plain ``_target_`` class path.
    """
    from monai.bundle import ConfigItem

    config = bundle_parser(bundle_root, config_files, overrides).get_parsed_content("network_def", instantiate=False)
    if isinstance(config, ConfigItem):  # a component with its references resolved
        config = config.get_config()
    target = config.get("_target_") if isinstance(config, Mapping) else None
    if not isinstance(target, str) or target.startswith(("$", "@")):
        raise ValueError(f"the bundle's network_def must have a plain '_target_' class path, got {target!r}.")
    args = {k: v for k, v in config.items() if not k.startswith("_")}
    return {"class_path": target, "args": json.loads(json.dumps(args))}


def default_key_metric(
    bundle_root: str | os.PathLike, config_files: Sequence[str], overrides: Mapping[str, Any] | None = None
) -> str:
    """``global_val_<key_metric_name>``: the bundle's key validation metric of the global model, as sites report it."""
    parser = bundle_parser(bundle_root, config_files, overrides)
    name = parser.get_parsed_content("key_metric_name") if "key_metric_name" in parser else "accuracy"
    return f"global_val_{name}"


#: Bundle files never shipped: ``nvflare job submit`` parses every ``*.conf``/``*.json``/``*.yml`` in ``custom/`` as
#: an NVFlare config and rejects the bundle's INI ``logging.conf`` (sites never apply it: ``logging_file=False``).
STAGE_IGNORE = ("__pycache__", "*.pyc", "logging.conf", "*.yml", "*.yaml")
#: Name of the shipped start checkpoint inside the server app's ``custom/`` folder.
INITIAL_CKPT_NAME = "initial_model.pt"


def stage_bundle(bundle_root: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy the bundle's ``configs/`` and ``scripts/`` (no checkpoints, caches or ``logging.conf``) to ``dest``.

    NVFlare copies ``dest``'s content into every app's ``custom/`` folder, which is on the app's ``sys.path``:
    the server imports ``scripts.network`` from there and each site's ``custom/`` is a complete bundle root.
    """
    bundle_root, dest = Path(bundle_root), Path(dest)
    for sub in ("configs", "scripts"):
        if not (bundle_root / sub).is_dir():
            raise FileNotFoundError(f"bundle folder missing: {bundle_root / sub}")
        shutil.copytree(bundle_root / sub, dest / sub, ignore=shutil.ignore_patterns(*STAGE_IGNORE))
    return dest


def network_settings(
    bundle_root: str | os.PathLike, config_files: Sequence[str], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The bundle settings a job trains with on top of ``configs/train.json``: the content of every further
    (override-style) config file, then the ``--override`` values, as one config the bundle can merge again.

    Written beside the global checkpoint (``model_config.json``), so evaluating or exporting it takes
    ``--config_file configs/train.json --config_file <that file>`` and nothing remembered.
    """
    settings: dict[str, Any] = {}
    for config in config_files:
        if Path(config).as_posix() == "configs/train.json":
            continue
        content = json.loads((Path(bundle_root) / config).read_text())
        if not isinstance(content, dict):
            raise ValueError(f"bundle config {config} must hold a JSON object, got {type(content).__name__}.")
        settings.update(content)
    settings.update(overrides or {})
    return json.loads(json.dumps(settings))


def build_privacy_filter(args: argparse.Namespace) -> ChangedPercentilePrivacy | CountingSVTPrivacy | None:
    """The site output filter chosen with ``--privacy`` (``--privacy_percentile`` alone selects ``percentile``).

    Raises:
        ValueError: for filter settings out of range.
    """
    kind = args.privacy or ("percentile" if args.privacy_percentile is not None else "none")
    if kind == "percentile":
        percentile = 10.0 if args.privacy_percentile is None else args.privacy_percentile
        if not (0 <= percentile <= 100 and args.privacy_gamma > 0):
            raise ValueError(
                f"privacy_percentile must be in [0, 100] and privacy_gamma > 0, got {percentile} and "
                f"{args.privacy_gamma}."
            )
        return ChangedPercentilePrivacy(percentile=percentile, gamma=args.privacy_gamma)
    if kind == "svt":
        if not (0 < args.svt_fraction <= 1 and args.svt_epsilon > 0 and args.svt_noise_var > 0 and args.svt_gamma > 0):
            raise ValueError(
                "svt_fraction must be in (0, 1] and svt_epsilon, svt_noise_var, svt_gamma > 0, got "
                f"{args.svt_fraction}, {args.svt_epsilon}, {args.svt_noise_var}, {args.svt_gamma}."
            )
        return CountingSVTPrivacy(
            fraction=args.svt_fraction,
            epsilon=args.svt_epsilon,
            noise_var=args.svt_noise_var,
            gamma=args.svt_gamma,
            tau=args.svt_tau,
        )
    return None


def _arg(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if any(c.isspace() for c in text):
        raise ValueError(f"NVFlare splits script arguments on whitespace; argument {text!r} has some.")
    return text


def build_recipe(args: argparse.Namespace, data_roots: Mapping[str, str], staged_bundle: str | os.PathLike):
    """Build the NVFlare recipe of the LCA-DB job from parsed :func:`build_arg_parser` arguments."""
    config_files = args.config_file or ["configs/train.json"]
    overrides = parse_overrides(args.override)
    min_clients = args.min_clients or len(args.sites)
    if not 1 <= min_clients <= len(args.sites):
        raise ValueError(f"min_clients must be in [1, {len(args.sites)}] (the number of sites), got {min_clients}.")
    if args.num_rounds < 1 or args.local_epochs < 1:
        raise ValueError(f"num_rounds and local_epochs must be >= 1, got {args.num_rounds} and {args.local_epochs}.")
    if args.dead_site_grace < 0:
        raise ValueError(f"dead_site_grace must be >= 0, got {args.dead_site_grace}.")
    privacy_filter = build_privacy_filter(args)

    train_args = [f"--local_epochs {args.local_epochs}"]
    if args.site_threads:
        train_args.append(f"--torch_threads {int(args.site_threads)}")
    train_args += [f"--config_file {_arg(c)}" for c in config_files]
    train_args += [f"--override {_arg(k)}={_arg(v)}" for k, v in overrides.items()]
    if args.fedbn:
        train_args.append("--fedbn")
    if args.scaffold:
        if privacy_filter is not None:
            raise ValueError(
                "--scaffold sends control variates no privacy filter sees; do not combine it with --privacy."
            )
        train_args.append("--scaffold")
    if privacy_filter is not None or args.cross_site_eval == "full":
        # local models for cross-site evaluation leave as differences, through the job's and the site's filters (a
        # site's policy refuses full weights: fl_privacy.ModelReleaseGuard)
        train_args.append("--submit_update")
    shared_args = " ".join(train_args)

    model = network_model_config(args.bundle_root, config_files, overrides)
    if args.initial_ckpt and args.initial_ckpt_on_server:
        raise ValueError("give --initial_ckpt (shipped with the job) or --initial_ckpt_on_server, not both.")
    start_ckpt = None
    if args.initial_ckpt:
        if not Path(args.initial_ckpt).is_file():
            raise FileNotFoundError(f"--initial_ckpt: checkpoint file not found: {args.initial_ckpt}")
        start_ckpt = INITIAL_CKPT_NAME
    elif args.initial_ckpt_on_server:
        if not os.path.isabs(args.initial_ckpt_on_server):
            raise ValueError(f"--initial_ckpt_on_server must be absolute, got {args.initial_ckpt_on_server!r}.")
        start_ckpt = args.initial_ckpt_on_server
    persistor = BundleCheckpointPersistor(
        model={"path": model["class_path"], "args": model["args"]},
        source_ckpt_file_full_name=start_ckpt,
        network_config=network_settings(args.bundle_root, config_files, overrides),
    )
    recipe = LCADBFedAvgRecipe(
        name=args.name,
        min_clients=min_clients,
        num_rounds=args.num_rounds,
        model_persistor=persistor,
        train_script="client.py",  # relative: resolved in FEDERATED_DIR now, in custom/ at the sites
        train_args=shared_args,
        fedprox_mu=args.fedprox_mu,
        wait_time_after_min_received=args.wait_after_min,
        round_timeout=args.round_timeout,
        server_lr=args.server_lr,
        server_momentum=args.server_momentum,
        scaffold=args.scaffold,
        key_metric=args.key_metric or default_key_metric(args.bundle_root, config_files, overrides),
        # a separate training process: a killed or crashed trainer fails that site's task, not the whole job
        launch_external_process=not args.in_process,
        command=f"{_arg(args.site_python or sys.executable)} -u",
    )
    # per-site data: only the data path differs between sites
    site_args = {site: shared_args for site in args.sites}
    site_args.update({site: f"{shared_args} --data_root {_arg(path)}" for site, path in data_roots.items()})
    set_per_site_config(recipe, {site: {"train_args": a} for site, a in site_args.items()})
    recipe.add_server_file(str(staged_bundle))
    recipe.add_client_file(str(staged_bundle))
    if start_ckpt == INITIAL_CKPT_NAME:
        # shipped in the server app's custom/ folder only, and named relative to it: the same job runs in the
        # simulator, PoC and production; the sites receive the start weights from the server
        shipped = Path(staged_bundle).parent / "server_only" / INITIAL_CKPT_NAME
        shipped.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.initial_ckpt, shipped)
        recipe.add_server_file(str(shipped))
    if privacy_filter is not None:
        recipe.add_client_output_filter(privacy_filter, tasks=list(PRIVACY_TASKS))
    if args.scope:
        set_recipe_meta(recipe, JobMetaKey.SCOPE, args.scope)
    # a site NVFlare reports dead (fl_kits.LostSiteHandler, RejoinedSiteHandler) is dropped after this grace
    recipe.add_server_config({ConfigVarName.DEAD_CLIENT_GRACE_PERIOD: args.dead_site_grace})
    if args.tracking == "tensorboard":
        add_experiment_tracking(recipe, "tensorboard")
    if args.cross_site_eval != "none":
        recipe.add_site_evaluation(
            full=args.cross_site_eval == "full",
            validation_timeout=args.eval_timeout,
            submit_model_timeout=args.eval_timeout,
        )
    return recipe


@contextlib.contextmanager
def in_job_dir():
    """Work in ``federated/`` while the recipe is built and run: NVFlare resolves ``client.py`` (and its imports)
    relative to the working directory, and the sites run it from their ``custom/`` folder under the same name."""
    previous = os.getcwd()
    os.chdir(FEDERATED_DIR)
    try:
        yield FEDERATED_DIR
    finally:
        os.chdir(previous)


def resolve_paths(args: argparse.Namespace) -> argparse.Namespace:
    """Make the path arguments absolute (relative to the caller's directory) before :func:`in_job_dir`."""
    for name in ("data_root", "bundle_root", "workspace", "startup_kit", "output_ckpt", "initial_ckpt"):
        value = getattr(args, name, None)
        if value:
            setattr(args, name, str(Path(value).expanduser().resolve()))
    args.site_data = [
        f"{site}={Path(path).expanduser().resolve()}" if sep else pair
        for pair in args.site_data
        for site, sep, path in [pair.partition("=")]
    ]
    return args


def find_global_checkpoint(result_dir: str | os.PathLike) -> Path | None:
    """The server's bundle checkpoint (``app_server/models/model.pt``) inside a job result folder, if any."""
    matches = sorted(Path(result_dir).rglob(str(GLOBAL_CKPT)))
    return matches[0] if matches else None


def copy_global_checkpoint(ckpt: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy a global bundle checkpoint and its ``*_config.json`` network settings to ``dest`` (atomic renames)."""
    ckpt, dest = Path(ckpt), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    pairs = [(ckpt, dest), (ckpt.with_name(f"{ckpt.stem}_config.json"), dest.with_name(f"{dest.stem}_config.json"))]
    for src, dst in pairs:
        if src.is_file():
            tmp = dst.with_name(f".{dst.name}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    return dest


def describe_job_summary(result_dir: str | os.PathLike) -> str | None:
    """One line on what the job did, from the server's summary (``fl_server.SUMMARY_FILE``) in a job result folder:
    rounds done, the sites of the last round, the sites left out (when and why) and any resume after a server restart.
    None when the result has no summary (e.g. the job failed before its first round)."""
    found = sorted(Path(result_dir).rglob(SUMMARY_FILE))
    if not found:
        return None
    summary = json.loads(found[0].read_text())
    rounds = summary.get("rounds") or []
    done = f"{len(rounds)} of {summary.get('num_rounds')} rounds done"
    last = f"sites in the last round: {rounds[-1]['sites']}" if rounds else "no round finished"
    left_out = summary.get("left_out") or {}
    lost = "; ".join(f"{site} (round {info['round']}: {info['reason']})" for site, info in sorted(left_out.items()))
    resumed = "; ".join(
        f"resumed at round {r['at_round']} after a server restart (snapshot of job {r.get('snapshot_of')} after "
        f"round {r['snapshot_round']})"
        for r in summary.get("resumed") or []
    )
    parts = [done, last, f"left out: {lost}" if lost else "no site left out", resumed]
    return "; ".join(p for p in parts if p)


def share_cores(args: argparse.Namespace, parallel_sites: int) -> argparse.Namespace:
    """Sites on one machine (simulator, PoC): give each site's training process its share of the cores.

    Each process otherwise starts torch's default thread pool of all cores; three such pools on two cores wait on each
    other (measured in federated/README.md, "Sites sharing one machine": a 6-round job took 110 s instead of 50 s).
    An explicit ``--site_threads`` wins.
    """
    if args.site_threads is None:
        args.site_threads = max(1, (os.cpu_count() or 1) // max(1, parallel_sites))
        logger.info(f"{parallel_sites} site(s) share this machine: {args.site_threads} torch thread(s) per site")
    return args


def main(argv: Sequence[str] | None = None) -> Path | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not nvflare.__version__.startswith(NVFLARE_VERSION):
        logger.warning(f"written for NVFlare {NVFLARE_VERSION}.x (recipe API), found {nvflare.__version__}")
    args = resolve_paths(build_arg_parser().parse_args(argv))
    if not args.startup_kit:
        share_cores(args, min(args.threads or len(args.sites), len(args.sites)))
    data_roots = site_data_roots(args.sites, args.data_root, args.site_data)
    with tempfile.TemporaryDirectory(prefix="lcadb_bundle_") as tmp, in_job_dir():
        recipe = build_recipe(args, data_roots, stage_bundle(args.bundle_root, Path(tmp) / "bundle"))
        if args.startup_kit:
            env = ProdEnv(startup_kit_location=args.startup_kit, username=args.username)
        else:
            env = SimEnv(clients=list(args.sites), num_threads=args.threads, workspace_root=args.workspace)
        run = recipe.execute(env)
        logger.info(f"Job {run.get_job_id()} submitted; waiting for it to finish")
        result = run.get_result()
    status = run.get_status()  # None in the simulator, which raises instead when the job fails
    logger.info(f"Job status: {status or 'finished'}; results (logs, TensorBoard events, cross-site metrics): {result}")
    summary = describe_job_summary(result) if result else None
    if summary:
        logger.info(f"Job {run.get_job_id()}: {summary}")
    if status is not None and status != COMPLETED:
        logger.error(f"Job {run.get_job_id()} did not complete: {status}; see the server and site logs in {result}")
        return None
    ckpt = find_global_checkpoint(result) if result else None
    if ckpt is None:
        logger.error("No global bundle checkpoint found in the job result.")
        return None
    if args.output_ckpt:
        Path(args.output_ckpt).parent.mkdir(parents=True, exist_ok=True)
        ckpt = copy_global_checkpoint(ckpt, args.output_ckpt)
    logger.info(f"Global model (bundle checkpoint, network state_dict): {ckpt}")
    return ckpt


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
