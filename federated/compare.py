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
"""Reproduce the README table: federated methods vs centralized training vs each site alone (synthetic data).

1. ``scripts.synthetic.generate_federated_datasets``: one dataset per site (own scanner profile and class mix) and a
   pooled held-out test set.
2. Every model starts from the same initial weights and trains the same total number of epochs with the bundle's own
   training workflow: **centralized** on the union of the sites' training cases, **each site alone** on its own
   cases (:func:`fl_site.run_site`), and each federated method of ``--methods`` (FedAvg, FedOpt, FedProx, FedBN,
   SCAFFOLD) in NVFlare's simulator (``job.py``: ``num_rounds`` rounds of ``total_epochs / num_rounds`` local epochs,
   started from the same initial weights with ``--initial_ckpt``). FedBN's server model lacks the sites' BatchNorm, so
   its row is the mean over the sites' personalised models.
3. Each final model is evaluated with the bundle's ``evaluate.json`` on the pooled test set, beside two baselines
   trained on the pooled training cases (:func:`baseline_rows`); the table reports macro-F1 (and accuracy, Cohen's
   kappa). ``--summarize`` gives mean and spread over seeds and the gap of the best federated method.

Example (the README's comparison, one data seed of five)::

    python federated/compare.py --work_dir /tmp/lcadb_cmp_r0 --seed 0 --methods fedavg fedopt fedprox fedbn scaffold
    python federated/compare.py --summarize /tmp/lcadb_cmp_r0 /tmp/lcadb_cmp_r1 /tmp/lcadb_cmp_r2

Synthetic data only: this says nothing about real LLD-MMRI performance.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "METHODS",
    "TINY_OVERRIDES",
    "pooled_dataset",
    "baseline_rows",
    "evaluate_checkpoint",
    "format_table",
    "summarize",
    "main",
]

#: job.py arguments of each federated method compared (FedOpt: NVFlare FedOpt's default server momentum).
METHODS = {
    "fedavg": ("FedAvg global model", []),
    "fedopt": ("FedOpt (server momentum 0.6) global model", ["--server_momentum", "0.6"]),
    "fedprox": ("FedProx (mu 0.01) global model", ["--fedprox_mu", "0.01"]),
    "fedbn": ("FedBN site models (mean)", ["--fedbn"]),
    "scaffold": ("SCAFFOLD global model", ["--scaffold"]),
    "fedavg_percentile": ("FedAvg + PercentilePrivacy (10 % of changes zeroed)", ["--privacy", "percentile"]),
    "fedavg_svt": ("FedAvg + SVTPrivacy (NVFlare defaults)", ["--privacy", "svt"]),
}

logger = logging.getLogger("lcadb.federated.compare")

FEDERATED_DIR = Path(__file__).resolve().parent
#: CPU-sized network, data pipeline and learning rate of the README table (the paper size needs a GPU).
TINY_OVERRIDES = {
    "network_def#widen_factor": 0.125,
    "roi_size": [32, 32, 8],
    "patch_size": 16,
    "num_workers": 0,
    "learning_rate": 0.001,
}


def pooled_dataset(
    site_roots: Mapping[str, str | os.PathLike],
    output_dir: str | os.PathLike,
    test_root: str | os.PathLike | None = None,
) -> Path:
    """A dataset root whose ``datalist.json`` lists every site's ``training`` cases (paths relative, no copies).

    Each case keeps its fold, so the pooled validation fold is the union of the sites' validation folds. With
    ``test_root`` its ``test`` cases are listed too, so the models and the baselines are scored on one test split.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: dict[str, list] = {"training": [], "test": []}
    labels = None
    sources = [(site, Path(root), "training") for site, root in site_roots.items()]
    sources += [("pooled_test", Path(test_root), "test")] if test_root is not None else []
    for site, root, section in sources:
        content = json.loads((root / "datalist.json").read_text())
        labels = labels or content.get("labels")
        rel = Path(os.path.relpath(root, out))
        for item in content[section]:
            entry = dict(item)
            for key, value in item.items():
                if isinstance(value, str) and value.startswith("images/"):
                    entry[key] = str(rel / value)
                elif key == "image" and isinstance(value, list):
                    entry[key] = [str(rel / v) for v in value]
            entry.setdefault("site", site)
            sections[section].append(entry)
    datalist = {"name": "pooled cases of every site", "labels": labels, **sections}
    tmp = out / ".datalist.json.tmp"
    tmp.write_text(json.dumps(datalist, indent=1))
    os.replace(tmp, out / "datalist.json")
    return out


def baseline_rows(pooled_root: str | os.PathLike, output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The trivial and the radiomics baseline on the pooled test split, trained on the pooled training cases.

    ``majority``: always the most frequent training class. ``radiomics``: the bundle's
    :func:`scripts.baseline.evaluate_baseline` (85 intensity, texture and size features, random forest), which sees
    every site's cases, so it is a centralized baseline.
    """
    import numpy as np
    from scripts.baseline import evaluate_baseline
    from scripts.constants import LESION_CLASSES
    from scripts.evaluation import classification_scores
    from scripts.training import load_datalist

    train = load_datalist(pooled_root, "training", fold=0, subset="train")
    test_labels = np.array([c["label"] for c in load_datalist(pooled_root, "test")])
    majority = int(np.bincount([c["label"] for c in train], minlength=len(LESION_CLASSES)).argmax())
    one_class = np.zeros((len(test_labels), len(LESION_CLASSES)))
    one_class[:, majority] = 1.0
    rows, metrics_kept = [], ("accuracy", "f1", "kappa", "auc")
    for name, model, trained_on, metrics in [
        (
            "majority",
            f"Trivial: always the majority training class ({LESION_CLASSES[majority]})",
            "pooled training cases",
            classification_scores(one_class, test_labels),
        ),
        (
            "radiomics",
            "Radiomics baseline (random forest)",
            "pooled training cases",
            evaluate_baseline(pooled_root, eval_split="test", output_dir=Path(output_dir) / "radiomics", plots=False),
        ),
    ]:
        # AUC is undefined (None) when no class has both positives and negatives among the test cases
        scores = {f"val_{k}": float("nan") if metrics[k] is None else float(metrics[k]) for k in metrics_kept}
        rows.append({"name": name, "model": model, "trained_on": trained_on, "seconds": None, **scores})
    return rows


def evaluate_checkpoint(
    ckpt: str | os.PathLike,
    test_root: str | os.PathLike,
    bundle_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Run the bundle's ``evaluate.json`` (train.json + evaluate.json) on the ``test`` split of ``test_root``."""
    from monai.bundle import ConfigWorkflow

    bundle_root = Path(bundle_root)
    if str(bundle_root) not in sys.path:
        sys.path.insert(0, str(bundle_root))
    workflow = ConfigWorkflow(
        config_file=[str(bundle_root / "configs" / "train.json"), str(bundle_root / "configs" / "evaluate.json")],
        meta_file=str(bundle_root / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        bundle_root=str(bundle_root),
        dataset_dir=str(test_root),
        ckpt_path=str(ckpt),
        output_dir=str(output_dir),
        **{**dict(overrides or {}), "baseline": False},  # compare.py scores the baselines once (baseline_rows)
    )
    workflow.initialize()
    workflow.run()
    metrics = workflow.parser.get_parsed_content("validate#evaluator").state.metrics
    workflow.finalize()
    return {k: float(v) for k, v in metrics.items()}


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of ``rows`` (``model``, ``trained on``, ``val_f1``, ``val_accuracy``, ``val_kappa``)."""
    lines = [
        "| model | trained on | macro-F1 | accuracy | kappa |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['trained_on']} | {100 * r['val_f1']:.1f} | {100 * r['val_accuracy']:.1f} "
            f"| {r['val_kappa']:.3f} |"
        )
    return "\n".join(lines)


def summarize(work_dirs: Sequence[str | os.PathLike], results_name: str = "results") -> str:
    """Mean and spread over runs (e.g. seeds): a markdown table of macro-F1 and accuracy from each ``results.json``.

    Raises:
        FileNotFoundError: when a work folder has no ``results.json``.
    """
    runs = []
    for folder in work_dirs:
        path = Path(folder) / f"{results_name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no {results_name}.json in {folder}: run compare.py there first")
        runs.append(json.loads(path.read_text()))
    names = [r["name"] for r in runs[0]["rows"]]
    lines = [
        f"| model | macro-F1 mean +- sd (n={len(runs)}) | accuracy mean +- sd | macro-F1 per run |",
        "|---|---|---|---|",
    ]
    mean_f1 = {}
    for name in names:
        rows = [next(r for r in run["rows"] if r["name"] == name) for run in runs]
        f1 = torch.tensor([100 * r["val_f1"] for r in rows], dtype=torch.float64)
        acc = torch.tensor([100 * r["val_accuracy"] for r in rows], dtype=torch.float64)
        mean_f1[name] = float(f1.mean())
        per_run = ", ".join(f"{v:.1f}" for v in f1.tolist())
        lines.append(
            f"| {rows[0]['model']} | {mean_f1[name]:.1f} +- {_sd(f1):.1f} | {float(acc.mean()):.1f} +- "
            f"{_sd(acc):.1f} | {per_run} |"
        )
    federated = [n for n in names if n in METHODS]
    if federated and "centralized" in mean_f1:
        best = max(federated, key=mean_f1.get)
        gap = mean_f1[best] - mean_f1["centralized"]
        lines.append(
            f"\nBest federated method on average: {best}, {gap:+.1f} macro-F1 points from centralized "
            f"(target: within 3 points: {'met' if gap >= -3 else 'not met'})."
        )
    return "\n".join(lines)


def _sd(values: torch.Tensor) -> float:
    """Sample standard deviation (0 for a single run)."""
    return float(values.std()) if len(values) > 1 else 0.0


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default="/tmp/lcadb_compare")
    p.add_argument("--bundle_root", default=str(FEDERATED_DIR.parent / "bundle"))
    p.add_argument("--sites", nargs="+", default=["site_a", "site_b", "site_c"])
    p.add_argument("--cases_per_site", type=int, default=28)
    p.add_argument("--test_cases_per_site", type=int, default=35)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--preset",
        choices=["realistic", "classic"],
        default="realistic",
        help="appearance of the synthetic lesions (scripts.synthetic.PRESETS; each site keeps its own class mix)",
    )
    p.add_argument("--total_epochs", type=int, default=24)
    p.add_argument("--num_rounds", type=int, default=12)
    p.add_argument("--override", action="append", default=[], help="extra bundle override id=value")
    p.add_argument("--methods", nargs="+", default=["fedavg"], choices=list(METHODS), help="federated methods")
    p.add_argument("--results_name", default="results", help="file stem of the results written/summarized")
    p.add_argument("--summarize", nargs="+", default=None, help="only print mean/sd over these work folders")
    p.add_argument("--skip", nargs="*", default=[], choices=["centralized", "sites", *METHODS], help="reuse results")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _build_parser().parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize, args.results_name))
        return []
    sys.path.insert(0, str(FEDERATED_DIR))
    sys.path.insert(0, str(Path(args.bundle_root).resolve()))
    import job
    from fl_site import SiteTrainer, parse_overrides, save_state_dict
    from scripts.synthetic import PRESETS, SynthOptions, generate_federated_datasets

    if args.total_epochs % args.num_rounds:
        raise ValueError(f"total_epochs ({args.total_epochs}) must be a multiple of num_rounds ({args.num_rounds}).")
    local_epochs = args.total_epochs // args.num_rounds
    work = Path(args.work_dir).resolve()
    overrides = {**TINY_OVERRIDES, **parse_overrides(args.override)}
    override_args = [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in overrides.items()]
    timings: dict[str, float] = {}

    # 1. data: one dataset per site plus the pooled test set
    data = work / "data"
    spec = {k: getattr(args, k) for k in ("sites", "cases_per_site", "test_cases_per_site", "seed", "preset")}
    spec_file = data / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) != spec:
        raise ValueError(
            f"{data} holds data generated with {spec_file.read_text().strip()}, not {json.dumps(spec)}: "
            "use another --work_dir or delete that folder."
        )
    if not (data / "pooled_test" / "datalist.json").is_file():
        generate_federated_datasets(
            data,
            args.sites,
            args.cases_per_site,
            args.seed,
            test_cases_per_site=args.test_cases_per_site,
            options=SynthOptions(**PRESETS[args.preset]["options"]),
        )
        spec_file.write_text(json.dumps(spec))
    site_roots = {s: data / s for s in args.sites}
    test_root = data / "pooled_test"
    pooled = pooled_dataset(site_roots, data / "pooled_train", test_root)

    # 2. the same initial weights for every model
    init_ckpt = work / "initial.pt"
    first_site = site_roots[args.sites[0]]
    init_trainer = SiteTrainer("initial", first_site, args.bundle_root, 1, work / "initial", overrides=overrides)
    save_state_dict(init_trainer.local_state_dict(), init_ckpt)
    initial = init_trainer.local_state_dict()
    del init_trainer

    def train_alone(name: str, root: Path, group: str) -> Path:
        ckpt = work / "models" / f"{name}.pt"
        if ckpt.is_file() and group in args.skip:
            return ckpt
        start = time.time()
        trainer = SiteTrainer(name, root, args.bundle_root, args.total_epochs, work / name, overrides=overrides)
        trainer.train_round(initial)
        save_state_dict(trainer.local_state_dict(), ckpt)
        timings[name] = time.time() - start
        return ckpt

    # 3. centralized, each site alone, FedAvg
    ckpts = {"centralized": train_alone("centralized", pooled, "centralized")}
    for site in args.sites:
        ckpts[site] = train_alone(site, site_roots[site], "sites")
    for method in args.methods:
        fed_ckpt = work / "models" / f"{method}.pt"
        if not (fed_ckpt.is_file() and method in args.skip):
            start = time.time()
            job_args = f"--name lcadb_compare_{method} --num_rounds {args.num_rounds} --local_epochs {local_epochs}"
            job_args = job_args.split() + ["--sites", *args.sites, "--data_root", str(data)]
            job_args += ["--initial_ckpt", str(init_ckpt), "--workspace", str(work / "nvflare")]
            job_args += ["--output_ckpt", str(fed_ckpt), "--bundle_root", str(args.bundle_root)]
            job_args += ["--cross_site_eval", "global", "--tracking", "none", *METHODS[method][1]]
            for pair in override_args:
                job_args += ["--override", pair]
            if job.main(job_args) is None:
                raise RuntimeError(f"the {method} job did not produce a global model; logs under {work / 'nvflare'}")
            server_log = work / "nvflare" / f"lcadb_compare_{method}" / "server" / "log.txt"
            if f"Global model starts from {job.INITIAL_CKPT_NAME}" not in server_log.read_text():
                raise RuntimeError(f"the {method} job did not start from {init_ckpt} (see {server_log})")
            timings[method] = time.time() - start
        ckpts[method] = fed_ckpt

    # 4. evaluate every final model on the pooled held-out test set with the bundle's evaluate.json
    rows = []
    schedule = f"{len(args.sites)} sites, {args.num_rounds} rounds x {local_epochs} epochs"
    described = {m: (METHODS[m][0], schedule) for m in args.methods}
    described["centralized"] = ("Centralized", f"pooled training cases, {args.total_epochs} epochs")
    for name in [*args.methods, "centralized", *args.sites]:
        if name == "fedbn":  # the sites' personalised models: global weights + each site's own BatchNorm
            site_models = [
                next((work / "nvflare" / f"lcadb_compare_{name}" / site).rglob(f"model_{site}.pt"))
                for site in args.sites
            ]
            evals = [
                evaluate_checkpoint(m, test_root, args.bundle_root, work / "eval" / f"{name}_{m.stem}", overrides)
                for m in site_models
            ]
            metrics = {k: sum(e[k] for e in evals) / len(evals) for k in evals[0]}
        else:
            metrics = evaluate_checkpoint(ckpts[name], test_root, args.bundle_root, work / "eval" / name, overrides)
        model, trained_on = described.get(name, (f"{name} alone", f"{name} only, {args.total_epochs} epochs"))
        rows.append({"name": name, "model": model, "trained_on": trained_on, "seconds": timings.get(name), **metrics})
    rows += baseline_rows(pooled, work / "eval")
    table = format_table(rows)
    best_site = max(r["val_f1"] for r in rows if r["name"] in args.sites)
    best = max((r for r in rows if r["name"] in args.methods), key=lambda r: r["val_f1"])
    central = next(r["val_f1"] for r in rows if r["name"] == "centralized")
    summary = {
        "best_federated_method": best["name"],
        "best_federated_minus_centralized_points": 100 * (best["val_f1"] - central),
        "best_federated_within_3_points_of_centralized": best["val_f1"] >= central - 0.03,
        "best_federated_above_every_site_alone": best["val_f1"] > best_site,
        "settings": vars(args) | {"overrides": overrides, "local_epochs": local_epochs, "torch": torch.__version__},
        "rows": rows,
    }
    out = work / args.results_name
    tmp = work / f".{args.results_name}.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, out.with_suffix(".json"))
    tmp = work / f".{args.results_name}.md.tmp"
    tmp.write_text(table + "\n")
    os.replace(tmp, out.with_suffix(".md"))
    logger.info(f"Macro-F1 etc. on the pooled test set ({out.with_suffix('.json')}):\n{table}")
    logger.info(
        f"Best federated ({best['name']}) - centralized: {summary['best_federated_minus_centralized_points']:+.1f} "
        f"points (within 3: {summary['best_federated_within_3_points_of_centralized']}); above every site alone: "
        f"{summary['best_federated_above_every_site_alone']}"
    )
    return rows


if __name__ == "__main__":
    main()
