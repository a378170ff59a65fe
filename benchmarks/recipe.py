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
"""The few-case recipe measured piece by piece: every number of the README's "Learning from few cases" section.

Each run trains the bundle's own workflow (``train.json`` + ``cpu_light.json`` + the variant's config ids, what
``./run_training.sh`` runs) in a fresh process with one torch thread, then scores three checkpoints of it on the test
split and the validation fold with the official macro-F1 (:func:`scripts.evaluation.classification_scores`): the best
epoch by validation macro-F1 (``model.pt``, the bundle's selection), the best by validation accuracy (the selection
before it) and the last epoch (``model_final.pt``). The radiomics baseline (``scripts/baseline.py``, random forest
seeded like the network) is fitted on the same training cases. Every run writes ``<work_dir>/runs/<run>.json``
(scores, per-case probabilities of test and validation cases, timings, load average) as soon as it ends; a study
skips the runs already there, so an interrupted study resumes.

Studies (``--study``):

- ``curve``: learning curves of the network and the baseline on the embedded dataset with its extra training cases
  (``--extra_cases``, same 70 test cases, validation fold 0), training on the first 112 / 224 / 670 / 1120 cases;
- ``pieces``: each piece of the recipe alone against the plain recipe, at ``--train_cases`` (default 224) cases;
- ``folds``: 5-fold cross-validation on the official folds of a dataset (``--dataset realistic``: the 280 training
  cases of the embedded preset), each fold's model on the test split and the ensemble of the 5 (mean probability);
- ``fusion`` is computed by ``report`` from the saved probabilities: network and baseline averaged with the weight
  that gives the best validation log-loss (a learned late fusion, ``scripts.fusion``).

Usage (from the repository root; ``--jobs 2`` runs two trainings at a time)::

    .venv/bin/python benchmarks/recipe.py run --study curve --seeds 0 1 2 --jobs 2
    .venv/bin/python benchmarks/recipe.py run --study pieces --seeds 0 1 2 --variants f1 liver_ratio box
    .venv/bin/python benchmarks/recipe.py report --json benchmarks/recipe_results.json --plot docs/learning_curve.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
sys.path.insert(0, str(REPO / "bundle"))

__all__ = ["VARIANTS", "run_one", "main"]

#: The plain recipe (every piece off), under every variant, so that a variant means the same whatever the configs'
#: defaults are.
PLAIN: dict = {
    "lesion_margin": [],
    "liver_ratio": False,
    "lesion_box_channel": False,
    "augment_phase_intensity": False,
    "augment_phase_shift": False,
    "mixup_alpha": 0.0,
}
#: Config ids of each variant, on top of train.json + cpu_light.json and :data:`PLAIN`.
VARIANTS: dict[str, dict] = {
    "f1": {},
    "liver_ratio": {"liver_ratio": True},
    "margin4": {"lesion_margin": [4, 4, 1]},
    "box": {"lesion_box_channel": True},
    "intensity": {"augment_phase_intensity": True},
    "shift": {"augment_phase_shift": True},
    "mixup": {"mixup_alpha": 0.4},
    "margin2": {"lesion_margin": [2, 2, 1]},
    "margin8": {"lesion_margin": [8, 8, 1]},
    # starts from `python -m scripts.pretrain ... --output <work_dir>/pretrained_margin2.pt` (README)
    "margin2_ssl": {"lesion_margin": [2, 2, 1], "resume_from": "{work_dir}/pretrained_margin2.pt"},
    "margin1": {"lesion_margin": [1, 1, 1]},
    "margin0": {"lesion_margin": [0, 0, 0]},
    "margin2_box": {"lesion_margin": [2, 2, 1], "lesion_box_channel": True},
    "margin4_ratio": {"lesion_margin": [4, 4, 1], "liver_ratio": True},
    "margin4_box": {"lesion_margin": [4, 4, 1], "lesion_box_channel": True},
}
#: Learning-curve sizes (training cases, nested: the first N of the training folds in datalist order).
CURVE_SIZES = (112, 224, 670, 1120)
CHECKPOINTS = ("best_f1", "best_acc", "last")


def _dataset_dir(name: str, extra_cases: int, cache_dir: str | None) -> str:
    from scripts.synthetic import default_dataset

    if os.path.isdir(name):
        return name
    if name == "pool":
        return str(default_dataset(cache_dir, preset="realistic", extra_training_cases=extra_cases))
    return str(default_dataset(cache_dir, preset=name, extra_training_cases=0))


def _scores(probabilities: dict[str, list[float]], labels: dict[str, int]) -> dict[str, float]:
    from scripts.evaluation import classification_scores

    cases = sorted(probabilities)
    return classification_scores(np.array([probabilities[c] for c in cases]), np.array([labels[c] for c in cases]))


def run_one(spec: dict) -> dict:
    """Train one network with the bundle's workflow and score its checkpoints; returns the run record."""
    import torch
    from monai.bundle import ConfigWorkflow
    from scripts.baseline import split_cases
    from scripts.evaluation import predict_cases
    from scripts.training import AtomicCheckpointSaver

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    work = Path(spec["work"])
    override = {
        "bundle_root": str(work),
        "ckpt_dir": str(work / "models"),
        "dataset_dir": spec["dataset_dir"],
        "seed": spec["seed"],
        "fold": spec["fold"],
        "max_training_cases": spec["train_cases"],
        "resume_from": "none",
        **spec["override"],
    }
    workflow = ConfigWorkflow(
        workflow_type="train",
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "cpu_light.json")],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        **override,
    )
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    AtomicCheckpointSaver(
        str(work / "models"),
        {"model": network},
        save_key_metric=True,
        key_metric_name="val_accuracy",
        key_metric_filename="model_acc.pt",
    ).attach(evaluator)
    history: list[dict] = []
    from ignite.engine import Events

    evaluator.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: history.append({k: round(float(v), 4) for k, v in e.state.metrics.items() if k.startswith("val_")}),
    )
    workflow.run()
    trainer = workflow.trainer
    train_s = time.perf_counter() - start
    num_train = len(workflow.parser.get_parsed_content("train#datalist"))
    workflow.finalize()

    preprocessing = workflow.parser.get_parsed_content("validate#preprocessing")
    datasets = {split: split_cases(spec["dataset_dir"], split, spec["fold"]) for split in ("test", "val")}
    labels = {c["case"]: int(c["label"]) for cases in datasets.values() for c in cases}
    prepared = {split: [preprocessing(c) for c in cases] for split, cases in datasets.items()}
    files = {"best_f1": "model.pt", "best_acc": "model_acc.pt", "last": "model_final.pt"}
    record: dict = {"checkpoints": {}, "probabilities": {}}
    for name, file in files.items():
        network.load_state_dict(torch.load(work / "models" / file, map_location="cpu", weights_only=True))
        probs = {split: predict_cases(network, items, None) for split, items in prepared.items()}
        record["checkpoints"][name] = {split: _scores(p, labels) for split, p in probs.items()}
        record["probabilities"][name] = probs
    record.update(
        id=spec["id"],
        study=spec["study"],
        dataset=spec["dataset"],
        variant=spec["variant"],
        override=spec["override"],
        train_cases=num_train,
        fold=spec["fold"],
        seed=spec["seed"],
        epochs=trainer.state.epoch,
        val_history=history,
        labels=labels,
        train_wall_s=round(train_s, 1),
        wall_s=round(time.perf_counter() - start, 1),
        cpu_s=round(time.process_time() - cpu_start, 1),
        load_average=[round(v, 2) for v in (*load_before, *os.getloadavg())],
    )
    return record


def baseline_run(spec: dict, feature_cache: Path) -> dict:
    """The radiomics baseline fitted on the run's training cases; probabilities of test and validation cases."""
    from scripts.baseline import _features, _probabilities, fit_baseline
    from scripts.training import load_datalist

    start = time.perf_counter()
    train = load_datalist(
        spec["dataset_dir"], "training", fold=spec["fold"], subset="train", max_cases=spec["train_cases"]
    )
    test = load_datalist(spec["dataset_dir"], "test")
    val = load_datalist(spec["dataset_dir"], "training", fold=spec["fold"], subset="val")
    cache = dict(np.load(feature_cache)) if feature_cache.is_file() else {}
    missing = [c for c in train + test + val if c["case"] not in cache]
    if missing:
        cache.update(zip((c["case"] for c in missing), _features(missing, spec.get("phases") or _phases())))
        tmp = feature_cache.with_name(f".{feature_cache.name}.{os.getpid()}.npz")
        np.savez(tmp, **cache)
        os.replace(tmp, feature_cache)
    pipeline = fit_baseline(
        np.stack([cache[c["case"]] for c in train]), np.array([c["label"] for c in train]), seed=spec["seed"]
    )
    labels = {c["case"]: int(c["label"]) for c in test + val}
    probs = {
        split: dict(
            zip(
                (c["case"] for c in cases),
                _probabilities(pipeline, np.stack([cache[c["case"]] for c in cases]), 7).tolist(),
            )
        )
        for split, cases in (("test", test), ("val", val))
    }
    return {
        "id": spec["id"],
        "study": spec["study"],
        "dataset": spec["dataset"],
        "variant": "baseline",
        "train_cases": len(train),
        "fold": spec["fold"],
        "seed": spec["seed"],
        "labels": labels,
        "checkpoints": {"baseline": {split: _scores(p, labels) for split, p in probs.items()}},
        "probabilities": {"baseline": probs},
        "wall_s": round(time.perf_counter() - start, 1),
    }


def _phases() -> tuple[str, ...]:
    from scripts.constants import PHASES

    return PHASES


def _write_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _specs(args: argparse.Namespace) -> list[dict]:
    """The runs of ``args.study`` (network and baseline), one dict each."""
    specs = []
    variants = args.variants or (["f1"] if args.study != "pieces" else list(VARIANTS))

    def add(dataset: str, variant: str, n: int | None, fold: int, seed: int) -> None:
        size = f"n{n}" if n else "nall"
        specs.append(
            {
                "id": f"{args.study}-{Path(dataset).name}-{variant}-{size}-f{fold}-s{seed}",
                "study": args.study,
                "dataset": dataset,
                "variant": variant,
                "override": {
                    k: v.replace("{work_dir}", args.work_dir) if isinstance(v, str) else v
                    for k, v in {**PLAIN, **VARIANTS.get(variant, {}), **json.loads(args.override or "{}")}.items()
                }
                if variant != "baseline"
                else {},
                "train_cases": n,
                "fold": fold,
                "seed": seed,
            }
        )

    for seed in args.seeds:
        if args.study == "curve":
            for n in args.sizes or CURVE_SIZES:
                add(args.dataset, "baseline", n, 0, seed)
                for v in variants:
                    add(args.dataset, v, n, 0, seed)
        elif args.study == "pieces":
            for v in ["baseline", *variants]:
                add(args.dataset, v, args.train_cases, 0, seed)
        elif args.study == "folds":
            for fold in range(5):
                add(args.dataset, "baseline", None, fold, seed)
                for v in variants:
                    add(args.dataset, v, None, fold, seed)
    return specs


def run_study(args: argparse.Namespace) -> None:
    runs = Path(args.work_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    todo = []
    for s in _specs(args):
        done = runs / f"{s['id']}.json"
        if not done.is_file():
            todo.append(s)
        # records from before PLAIN was written into every run hold only the variant's ids; the rest was PLAIN
        elif (
            s["override"]
            and (earlier := {**PLAIN, **(json.loads(done.read_text()).get("override") or {})}) != s["override"]
        ):
            raise SystemExit(
                f"{done} was run with other config ids ({earlier}) than this study asks for ({s['override']}): "
                "use another --work_dir or remove the file."
            )
    datasets = {s["dataset"] for s in todo}
    paths = {d: _dataset_dir(d, args.extra_cases, args.cache_dir) for d in datasets}
    for s in todo:
        s["dataset_dir"] = paths[s["dataset"]]
        s["work"] = str(Path(args.work_dir) / "work" / s["id"])
    print(f"[recipe] {len(todo)} runs to do in {runs}", flush=True)
    for s in [s for s in todo if s["variant"] == "baseline"]:
        record = baseline_run(s, Path(args.work_dir) / f"features-{Path(s['dataset_dir']).name}.npz")
        _write_atomic(record, runs / f"{s['id']}.json")
        print(f"[recipe] {s['id']}: test F1 {record['checkpoints']['baseline']['test']['f1']:.3f}", flush=True)
    queue = [s for s in todo if s["variant"] != "baseline"]
    running: list[tuple[subprocess.Popen, dict, Path]] = []
    while queue or running:
        while queue and len(running) < args.jobs:
            s = queue.pop(0)
            spec_file = Path(tempfile.mkstemp(prefix="recipe-", suffix=".json")[1])
            spec_file.write_text(json.dumps(s))
            log = open(Path(args.work_dir) / "logs" / f"{s['id']}.log", "w") if _mk(args.work_dir) else None
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            proc = subprocess.Popen(
                [sys.executable, __file__, "one", str(spec_file), str(runs / f"{s['id']}.json")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            running.append((proc, s, spec_file))
        time.sleep(5)
        for item in list(running):
            proc, s, spec_file = item
            if proc.poll() is None:
                continue
            running.remove(item)
            spec_file.unlink(missing_ok=True)
            if proc.returncode:
                print(f"[recipe] {s['id']} FAILED (exit {proc.returncode}), see logs/{s['id']}.log", flush=True)
                continue
            record = json.loads((runs / f"{s['id']}.json").read_text())
            f1 = {k: round(v["test"]["f1"], 3) for k, v in record["checkpoints"].items()}
            print(f"[recipe] {s['id']}: test F1 {f1} in {record['wall_s']:.0f} s", flush=True)


def _mk(work_dir: str) -> bool:
    (Path(work_dir) / "logs").mkdir(parents=True, exist_ok=True)
    return True


# ------------------------------------------------------------------------------------------------ report
def _mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def _ensemble(records: list[dict], checkpoint: str, split: str = "test") -> dict[str, list[float]]:
    cases = sorted(records[0]["probabilities"][checkpoint][split])
    return {c: np.mean([r["probabilities"][checkpoint][split][c] for r in records], axis=0).tolist() for c in cases}


def report(args: argparse.Namespace) -> dict:
    from scripts.fusion import late_fusion

    records = [json.loads(p.read_text()) for p in sorted((Path(args.work_dir) / "runs").glob("*.json"))]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["study"], r["dataset"], r["variant"], r["train_cases"], r["fold"]), []).append(r)
    rows = []
    for (study, dataset, variant, n, fold), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        row = {"study": study, "dataset": Path(dataset).name, "variant": variant, "train_cases": n, "fold": fold}
        for ck in rs[0]["checkpoints"]:
            row[ck] = _mean_sd([r["checkpoints"][ck]["test"]["f1"] for r in rs])
            row[f"{ck}_kappa"] = _mean_sd([r["checkpoints"][ck]["test"]["kappa"] for r in rs])
        row["seeds"] = sorted(r["seed"] for r in rs)
        row["wall_s"] = _mean_sd([r["wall_s"] for r in rs])
        if variant != "baseline":
            fused = []
            for r in rs:
                base = groups.get((study, dataset, "baseline", n, fold), [])
                match = [b for b in base if b["seed"] == r["seed"]]
                if match:
                    fused.append(late_fusion(r, match[0], "best_f1"))
            if fused:
                row["fusion_late"] = _mean_sd([f["test"]["f1"] for f in fused])
                row["fusion_weight"] = _mean_sd([f["weight"] for f in fused])
        rows.append(row)
    ensembles = []
    folds: dict[tuple, list[dict]] = {}
    for r in records:
        if r["study"] == "folds":
            folds.setdefault((r["dataset"], r["variant"], r["seed"]), []).append(r)
    by_variant: dict[tuple, list[float]] = {}
    for (dataset, variant, _seed), rs in folds.items():
        if len({r["fold"] for r in rs}) < 5:
            continue
        ck = "baseline" if variant == "baseline" else "best_f1"
        probs = _ensemble(rs, ck)
        by_variant.setdefault((dataset, variant), []).append(_scores(probs, rs[0]["labels"])["f1"])
        if variant != "baseline":
            probs_last = _ensemble(rs, "last")
            by_variant.setdefault((dataset, f"{variant} (last epochs)"), []).append(
                _scores(probs_last, rs[0]["labels"])["f1"]
            )
    for (dataset, variant), values in sorted(by_variant.items()):
        ensembles.append({"dataset": Path(dataset).name, "variant": variant, "ensemble_f1": _mean_sd(values)})
    for row in rows:
        cells = [f"{k}={_fmt_cell(v)}" for k, v in row.items() if k in (*CHECKPOINTS, "baseline", "fusion_late")]
        print(f"{row['study']:7} {row['dataset']:10} {row['variant']:12} n={row['train_cases']!s:5} "
              f"fold={row['fold']} {' '.join(cells)}")  # fmt: skip
    for e in ensembles:
        print(f"ensemble {e['dataset']:10} {e['variant']:24} F1 {_fmt_cell(e['ensemble_f1'])}")
    result = {"rows": rows, "ensembles": ensembles}
    if args.json:
        _write_atomic(result, Path(args.json))
    if args.plot:
        plot_curve(rows, Path(args.plot))
    return result


def _fmt_cell(v: tuple[float, float, int]) -> str:
    mean, sd, n = v
    return f"{mean:.3f}±{sd:.3f}/{n}" if not math.isnan(sd) else f"{mean:.3f}/1"


def plot_curve(rows: list[dict], path: Path) -> None:
    """Learning curves (test macro-F1, mean ± sd over seeds) of the network and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curve = [r for r in rows if r["study"] == "curve"]
    series = [("baseline", "baseline", "radiomics baseline (random forest)")]
    series += [
        (v, "best_f1", f"network: {v}, best val F1") for v in sorted({r["variant"] for r in curve}) if v != "baseline"
    ]
    series += [
        (v, "last", f"network: {v}, last epoch") for v in sorted({r["variant"] for r in curve}) if v != "baseline"
    ]
    series += [
        (v, "fusion_late", f"late fusion: {v} (best val F1) + baseline")
        for v in sorted({r["variant"] for r in curve})
        if v != "baseline"
    ]
    for variant, key, label in series:
        pts = sorted((r["train_cases"], r[key]) for r in curve if r["variant"] == variant and key in r)
        if not pts:
            continue
        x = [p[0] for p in pts]
        mean = np.array([p[1][0] for p in pts])
        sd = np.nan_to_num(np.array([p[1][1] for p in pts]))
        ax.errorbar(x, mean, yerr=sd, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks([112, 224, 670, 1120], labels=["112", "224", "670", "1120"])
    ax.set_xlabel("training cases")
    ax.set_ylabel("test macro-F1 (70 cases), mean ± sd over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a study (skips runs already done)")
    run.add_argument("--study", choices=("curve", "pieces", "folds"), required=True)
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--variants", nargs="+", default=None, help=f"network variants ({', '.join(VARIANTS)})")
    run.add_argument("--override", default=None, help="JSON of config ids added to every network variant")
    run.add_argument("--sizes", type=int, nargs="+", default=None, help=f"curve sizes (default {CURVE_SIZES})")
    run.add_argument("--train_cases", type=int, default=224, help="pieces: training cases (default 224)")
    run.add_argument(
        "--dataset",
        default="pool",
        help="'pool' (the embedded preset plus --extra_cases training cases), a preset name or a dataset folder",
    )
    run.add_argument("--extra_cases", type=int, default=1120, help="extra training cases of the pool dataset")
    run.add_argument("--jobs", type=int, default=1, help="trainings at a time (one torch thread each)")
    for p in (run, sub.add_parser("report", help="aggregate the runs: tables, JSON, plot")):
        p.add_argument("--work_dir", default=os.path.expanduser("~/lcadb-recipe"))
        p.add_argument("--cache_dir", default=None, help="dataset cache (default $LCADB_CACHE or ~/.cache/lcadb)")
    rep = sub.choices["report"]
    rep.add_argument("--json", default=None, help="write the aggregated results here")
    rep.add_argument("--plot", default=None, help="write the learning-curve PNG here")
    one = sub.add_parser("one", help=argparse.SUPPRESS)
    one.add_argument("spec")
    one.add_argument("output")
    args = parser.parse_args(argv)
    if args.command == "one":
        _write_atomic(run_one(json.loads(Path(args.spec).read_text())), Path(args.output))
    elif args.command == "run":
        run_study(args)
    else:
        report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
