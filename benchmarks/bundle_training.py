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
"""The bundle's real trainer (``python -m monai.bundle run training``'s workflow), before and after the fast path.

"before" runs the configs as they are; "after" merges ``bundle/configs/fast_train.json`` (MONAI's fast-training
recipe) on top. Both run in one invocation, in ABBA order (before, after, after, before, ...), on the same dataset
and fold:

- ``--preset cpu_light`` (default): the main job of ``./run_training.sh`` on a machine without CUDA
  (``train.json`` + ``cpu_light.json``, the embedded default dataset, all epochs). Each run is a fresh Python
  process, timed from start to exit (imports, caching, validation and checkpoints included), like the main job.
- ``--preset paper --in_process``: the paper configuration (batch 8, reference stem, ROI 128 x 128 x 16) for the
  GPU, both executions in this process (``benchmarks/gpu_check.sh``).

For every run: ``wall_s`` (the whole job in-process; ``process_wall_s``: in a child process, imports included),
``train_samples_per_s`` (training samples over the time the trainer spent in its epochs, validation and checkpoints
excluded) and ``steady_samples_per_s`` (batch size over the median time
between two iterations from the second epoch on: the throughput once caches, workers and ``torch.compile`` are warm).

    python benchmarks/bundle_training.py                                   # main job before/after (CPU)
    python benchmarks/bundle_training.py --preset paper --in_process --drop_last --device cuda --cases_per_class 12
    python benchmarks/bundle_training.py --smoke                           # tiny network and dataset, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
sys.path.insert(0, str(REPO / "bundle"))

__all__ = ["EXECUTIONS", "train_once"]

#: Config files of each execution, on top of train.json and the preset.
EXECUTIONS = {"before": [], "after": [str(CONFIGS / "fast_train.json")]}
PRESETS = {"cpu_light": [str(CONFIGS / "cpu_light.json")], "paper": []}
#: --smoke: the light preset shrunk further so that both executions train in seconds.
SMOKE = {
    "network_def#widen_factor": 0.0625,
    "roi_size": [32, 32, 8],
    "patch_size": 16,
    "batch_size": 4,
    "num_workers": 1,
    "num_threads": 1,
}


def train_once(files: list[str], dataset_dir: str, bundle_root: str, override: dict) -> dict:
    """Train with the bundle's ``ConfigWorkflow`` (what ``monai.bundle run training`` runs) and time the trainer.

    Args:
        files: config files, merged in order.
        dataset_dir: dataset folder.
        bundle_root: folder for checkpoints and logs.
        override: config ids to override, e.g. ``{"max_epochs": 2}``.

    Returns:
        wall_s, train_samples_per_s, steady_samples_per_s, epochs, samples, final train metrics, device.
    """
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    start = time.perf_counter()
    workflow = ConfigWorkflow(
        config_file=files,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        bundle_root=bundle_root,
        dataset_dir=dataset_dir,
        **override,
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    device = workflow.parser.get_parsed_content("device")
    batch_size = workflow.parser.get_parsed_content("batch_size")
    intervals: list[float] = []
    epoch_seconds: list[float] = []
    last = {"time": None}

    def iteration_completed(engine) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if engine.state.epoch > 1 and last["time"] is not None:
            intervals.append(now - last["time"])
        last["time"] = now

    def epoch_completed(engine) -> None:
        epoch_seconds.append(engine.state.times[Events.EPOCH_COMPLETED.name])
        last["time"] = None

    trainer.add_event_handler(Events.ITERATION_COMPLETED, iteration_completed)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, epoch_completed)
    samples = len(trainer.data_loader.dataset)
    workflow.run()
    workflow.finalize()
    return {
        "wall_s": time.perf_counter() - start,
        "train_s": sum(epoch_seconds),
        "train_samples_per_s": samples * len(epoch_seconds) / sum(epoch_seconds),
        "steady_samples_per_s": batch_size / statistics.median(intervals) if intervals else None,
        "epochs": len(epoch_seconds),
        "samples_per_epoch": samples,
        "batch_size": batch_size,
        "metrics": {k: float(v) for k, v in trainer.state.metrics.items() if isinstance(v, (int, float))},
        "device": str(device),
    }


def _run_child(spec: dict) -> dict:
    """One run in a fresh Python process, timed from its start to its exit."""
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"training run {spec['files']} failed:\n{completed.stderr[-4000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="cpu_light")
    parser.add_argument("--dataset_dir", help="dataset folder; default: the embedded default dataset (main job)")
    parser.add_argument("--cases_per_class", type=int, help="generate this many cases per class instead")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each execution, alternating")
    parser.add_argument("--max_epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--device", help="override the bundle's device, e.g. cuda:0")
    parser.add_argument("--in_process", action="store_true", help="both executions in this process (GPU)")
    parser.add_argument(
        "--drop_last", action="store_true", help="drop the last partial batch (one compiled shape with torch.compile)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny network, 7 cases per class, 2 epochs: seconds")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(train_once(spec["files"], spec["dataset_dir"], spec["bundle_root"], spec["override"])))
        return

    override: dict = dict(SMOKE) if args.smoke else {}
    if args.max_epochs or args.smoke:
        override["max_epochs"] = args.max_epochs or 2
    if args.drop_last:
        override["train#dataloader#drop_last"] = True
    if args.device:
        override["device"] = f"$torch.device({args.device!r})"
    cases_per_class = 7 if args.smoke and args.cases_per_class is None else args.cases_per_class
    with tempfile.TemporaryDirectory() as tmp:
        if args.dataset_dir:
            dataset_dir = args.dataset_dir
        elif cases_per_class:
            from scripts.synthetic import generate_dataset

            workers = min(os.cpu_count() or 1, 8)
            root = generate_dataset(Path(tmp) / "lcadb", cases_per_class, seed=0, progress=False, num_workers=workers)
            dataset_dir = str(root.parent)
        else:
            from scripts.synthetic import default_dataset

            dataset_dir = str(default_dataset())
        load = os.getloadavg()
        print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs", flush=True)
        results = []
        for repeat in range(args.repeats):
            # ABBA order (before, after, after, before, ...): a load that drifts during the run favours neither
            order = list(EXECUTIONS) if repeat % 2 == 0 else list(reversed(EXECUTIONS))
            for name in order:
                extra = EXECUTIONS[name]
                files = [str(CONFIGS / "train.json"), *PRESETS[args.preset], *extra]
                spec = {
                    "files": files,
                    "dataset_dir": dataset_dir,
                    "bundle_root": str(Path(tmp) / f"{name}{repeat}"),
                    "override": override,
                }
                if args.in_process:
                    result = train_once(**spec)
                else:
                    result = _run_child(spec)
                result.update(execution=name, repeat=repeat)
                results.append(result)
                shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items() if k != "metrics"}
                print(json.dumps(shown), flush=True)
    load_after = os.getloadavg()
    summary = {}
    wall = "wall_s" if args.in_process else "process_wall_s"
    for key in (wall, "train_samples_per_s", "steady_samples_per_s"):
        values = {name: [r[key] for r in results if r["execution"] == name and r[key]] for name in EXECUTIONS}
        if all(values.values()):
            before, after = statistics.median(values["before"]), statistics.median(values["after"])
            ratio = before / after if key == wall else after / before
            summary[key] = {"before": before, "after": after, "ratio": ratio}
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    for key, value in summary.items():
        print(f"{key:<22} before {value['before']:9.2f}   after {value['after']:9.2f}   speed-up {value['ratio']:.2f}x")
    if args.json:
        report = {"preset": args.preset, "load_average": [load, load_after], "summary": summary, "runs": results}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
