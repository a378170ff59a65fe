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
"""Seconds per study of the deploy app, end to end and split by stage, on the CPU (or the GPU when present).

    python -m deploy_app.benchmark --threads 2                    # synthetic study, tiny network
    python -m deploy_app.benchmark --threads 2 --full-size        # also one forward of the paper-size network
    python -m deploy_app.benchmark --study <dicom folder> --model <model.ts>
    python -m deploy_app.benchmark --threads 2 --cpu-export --full-size --repeats 5   # ckpt_export vs CPU export

Without ``--model`` the bundle's network is exported (``monai.bundle.ckpt_export``, random weights) with the tiny
test configuration; without ``--study`` a synthetic study is generated (``scripts.synthetic_dicom``, site_a:
8 series of 256 x 256 x 40, 2 lesions). Stages are timed by calling each operator's work function in turn (the
median of ``--repeats`` runs); ``end_to_end`` is a whole ``python -m deploy_app`` run in this process (Holoscan
graph, model loading and all stages; Python start-up and imports excluded, they are ~10 s on 2 cores).

``--cpu-export`` times the network per lesion (batch 1, the input made by the model's ``image_preprocessing``) with
the ``ckpt_export`` model and with the bundle's CPU export (``python -m scripts.export_cpu``) of the same random
weights: the first call of each in a fresh process (what a MAP run pays: it classifies one study per process),
then, in this process, one warm-up call each and ``--repeats`` calls alternating between the two (a busy machine
slows both alike); medians and their ratio, and the largest differences of the outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "TINY_OVERRIDES",
    "compare_cpu_export",
    "export_bundle_model",
    "export_cpu_bundle_model",
    "first_call",
    "main",
    "time_stages",
]

#: The tiny network of the tests (contracts.md), as overrides of the bundle's inference.json.
TINY_OVERRIDES = {
    "roi_size": [64, 64, 8],
    "patch_size": 32,
    "network_def#depth": 10,
    "network_def#widen_factor": 0.125,
    "save_attention": True,
}
FULL_SIZE_OVERRIDES = {"save_attention": True}


def export_bundle_model(out_dir: Path, overrides: dict, bundle_root: Path | None = None, seed: int = 0) -> Path:
    """Export the bundle's ``network_def`` with random weights as ``ckpt_export`` does, with ``overrides`` merged
    into the embedded ``inference.json`` (ckpt_export embeds config files as they are on disk).

    Returns:
        the path of ``model.ts``.
    """
    import torch
    from monai.bundle import ConfigParser, ckpt_export

    bundle_root = Path(bundle_root or Path(__file__).resolve().parents[1] / "bundle")
    if str(bundle_root) not in sys.path:
        sys.path.insert(0, str(bundle_root))
    out_dir.mkdir(parents=True, exist_ok=True)
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    for key, value in overrides.items():
        parser[key] = value
    config = out_dir / "inference.json"
    ConfigParser.export_config_file(parser.get(), str(config))
    torch.manual_seed(seed)
    torch.save(parser.get_parsed_content("network_def").state_dict(), out_dir / "model.pt")
    roi = parser.get_parsed_content("roi_size")
    ckpt_export(
        net_id="network_def",
        filepath=str(out_dir / "model.ts"),
        ckpt_file=str(out_dir / "model.pt"),
        meta_file=str(bundle_root / "configs" / "metadata.json"),
        config_file=str(config),
        use_trace=True,
        input_shape=[1, 8, *roi],
    )
    return out_dir / "model.ts"


def export_cpu_bundle_model(plain_model: Path, bundle_root: Path | None = None) -> Path:
    """The bundle's CPU export (``scripts.export_cpu``) of the weights and config that :func:`export_bundle_model`
    left next to ``plain_model`` (``model.pt``, ``inference.json``).

    Returns:
        the path of ``model_cpu.ts``, beside ``plain_model``.
    """
    from scripts.export_cpu import export_cpu_model

    bundle_root = Path(bundle_root or Path(__file__).resolve().parents[1] / "bundle")
    folder = Path(plain_model).parent
    return export_cpu_model(
        folder / "inference.json",
        folder / "model.pt",
        bundle_root / "configs" / "metadata.json",
        folder / "model_cpu.ts",
    )


def _lesion_input(model, seed: int = 0):
    """One lesion's network input ``[1, 8, H, W, D]``: a random ROI through the model's ``image_preprocessing``."""
    import numpy as np

    roi = np.random.default_rng(seed).normal(100.0, 30.0, size=(8, 72, 66, 11)).astype(np.float32)
    return model.preprocess(roi)[None]


def first_call(model_path: Path) -> dict[str, float]:
    """Seconds to load ``model_path`` on the CPU and of its first and second call on one lesion, in this process
    (meaningful in a fresh one: ``python -m deploy_app.benchmark --first-call <model>``)."""
    import torch

    from deploy_app.bundle_access import load_model

    model, load_s = _timed(load_model, model_path, "cpu")
    x = _lesion_input(model)
    with torch.inference_mode():
        _, first_s = _timed(model.network, x)
        _, second_s = _timed(model.network, x)
    return {"load_s": load_s, "first_call_s": first_s, "second_call_s": second_s}


def _first_call_in_fresh_process(model_path: Path, threads: int) -> dict[str, float]:
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    argv = [sys.executable, "-m", "deploy_app.benchmark", "--first-call", str(model_path), "--threads", str(threads)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=repo, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the first-call run of {model_path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_cpu_export(
    plain_model: Path, cpu_model: Path, repeats: int = 3, threads: int = 2, fresh_process: bool = True
) -> dict[str, float | bool | dict]:
    """Seconds per lesion of the ``ckpt_export`` model and of the CPU export (see the module docstring).

    Args:
        plain_model: the ``ckpt_export`` TorchScript.
        cpu_model: the CPU export of the same weights.
        repeats: alternating timed calls of each after one warm-up call.
        threads: torch CPU threads of the first-call processes (this process keeps its own setting).
        fresh_process: time the first calls in fresh processes (about 10 s of start-up each).

    Returns:
        wall-clock medians and their ratio (``speedup``), the median ratio within each pair of runs, the process
        CPU time per lesion (less disturbed by other jobs than the wall clock), the first-call timings, and the
        largest output differences.
    """
    import torch

    from deploy_app.bundle_access import load_model

    result: dict[str, float | bool | dict] = {}
    if fresh_process:
        result["first_call_plain"] = _first_call_in_fresh_process(plain_model, threads)
        result["first_call_cpu"] = _first_call_in_fresh_process(cpu_model, threads)
    plain, cpu = load_model(plain_model, "cpu"), load_model(cpu_model, "cpu")
    if plain.weights_sha256 != cpu.weights_sha256:
        raise ValueError(f"{plain_model} and {cpu_model} do not hold the same weights.")
    x = _lesion_input(plain)
    seconds: dict[str, list[float]] = {"plain": [], "cpu": []}
    cpu_seconds: dict[str, list[float]] = {"plain": [], "cpu": []}
    with torch.inference_mode():
        outputs = {"plain": plain.network(x), "cpu": cpu.network(x)}  # the warm-up calls
        for _ in range(repeats):
            for name, model in (("plain", plain), ("cpu", cpu)):
                start = time.process_time()
                seconds[name].append(_timed(model.network, x)[1])
                cpu_seconds[name].append(time.process_time() - start)
    (p_plain, *att_plain), (p_cpu, *att_cpu) = outputs["plain"], outputs["cpu"]
    result.update(
        plain_s_per_lesion=statistics.median(seconds["plain"]),
        cpu_s_per_lesion=statistics.median(seconds["cpu"]),
        plain_runs_s=seconds["plain"],
        cpu_runs_s=seconds["cpu"],
        # on a busy machine: the ratio within each (plain, cpu) pair of runs, and the process CPU time per lesion
        pairwise_speedup_median=statistics.median(a / b for a, b in zip(seconds["plain"], seconds["cpu"])),
        plain_process_cpu_s_per_lesion=statistics.median(cpu_seconds["plain"]),
        cpu_process_cpu_s_per_lesion=statistics.median(cpu_seconds["cpu"]),
        max_abs_probability_difference=float((p_plain - p_cpu).abs().max()),
        max_abs_attention_difference=max(float((a - b).abs().max()) for a, b in zip(att_plain, att_cpu)),
        same_class=bool(torch.equal(p_plain.argmax(1), p_cpu.argmax(1))),
    )
    result["speedup"] = result["plain_s_per_lesion"] / result["cpu_s_per_lesion"]
    return result


def _timed(fn: Callable, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def time_stages(study: Path, model_path: Path) -> dict[str, float]:
    """Seconds of each stage for one study (the app's work functions, called in order)."""
    from scripts.constants import PHASES

    from deploy_app.bundle_access import load_model
    from deploy_app.domain import StudyResult
    from deploy_app.operators.inference_operator import classify_lesions, preprocess_rois
    from deploy_app.operators.lesion_roi_operator import lesion_rois
    from deploy_app.operators.phase_selector_operator import DEFAULT_RULES_FILE, load_phase_rules, select_phases
    from deploy_app.operators.phase_volume_operator import assemble_phases
    from deploy_app.operators.sr_writer_operator import build_outputs, write_outputs
    from deploy_app.operators.study_loader_operator import read_study_folder

    rules = load_phase_rules(DEFAULT_RULES_FILE, PHASES)
    model, t_model = _timed(load_model, model_path)
    dicom_study, t_load = _timed(read_study_folder, study)
    (selection, _), t_select = _timed(select_phases, dicom_study, PHASES, rules, None)
    volume, t_resample = _timed(assemble_phases, selection, PHASES)
    rois, t_roi = _timed(lesion_rois, volume, study)
    batch, t_pre = _timed(preprocess_rois, model, rois)
    lesions, t_infer = _timed(classify_lesions, model, rois, batch)
    result = StudyResult(lesions, volume, model.class_names, model.name, model.version, model.weights_sha256, "")
    with tempfile.TemporaryDirectory() as out:
        _, t_sr = _timed(lambda: write_outputs(build_outputs(result), Path(out)))
    return {
        "model_loading": t_model,
        "loading": t_load,
        "selection": t_select,
        "resampling": t_resample,
        "roi": t_roi,
        "preprocessing": t_pre,
        "inference": t_infer,
        "sr_writing": t_sr,
        "lesions": len(rois),
    }


def _full_size_forward(threads: int) -> float:
    """Seconds of one forward of the paper-size network (random weights) on one lesion, CPU fp32."""
    import torch
    from scripts.network import LCADBInference

    network = LCADBInference(depth=10, widen_factor=1.0, roi_size=(128, 128, 16)).eval()
    x = torch.rand(1, 8, 128, 128, 16)
    with torch.inference_mode():
        start = time.perf_counter()
        network(x)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, help="DICOM study folder (default: a generated synthetic study)")
    parser.add_argument("--model", type=Path, help="exported model.ts (default: the bundle's tiny network)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per stage, the median is reported (default 3)")
    parser.add_argument("--full-size", action="store_true", help="also time one forward of the full-size network")
    parser.add_argument("--output", type=Path, help="write the numbers as JSON here too")
    parser.add_argument(
        "--cpu-export",
        action="store_true",
        help="instead of the stages: per-lesion inference of the ckpt_export model vs the CPU export (scripts."
        "export_cpu) of the same random weights; tiny network, or the paper-size one with --full-size",
    )
    parser.add_argument("--first-call", type=Path, metavar="MODEL", help=argparse.SUPPRESS)  # --cpu-export's helper
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from deploy_app.bundle_access import ensure_bundle_scripts

    ensure_bundle_scripts()
    if args.first_call:
        print(json.dumps(first_call(args.first_call)))
        return 0
    if args.cpu_export:
        if args.model or args.study:
            parser.error("--cpu-export exports random weights itself: it takes no --model or --study.")
        with tempfile.TemporaryDirectory() as tmp:
            overrides = FULL_SIZE_OVERRIDES if args.full_size else TINY_OVERRIDES
            plain = export_bundle_model(Path(tmp), overrides)
            result = compare_cpu_export(plain, export_cpu_bundle_model(plain), args.repeats, args.threads)
        result["network"] = "paper size (depth 10, widen 1.0, 128 x 128 x 16)" if args.full_size else "tiny"
        result["device"] = f"cpu, {args.threads} threads, load average {os.getloadavg()[0]:.1f}"
        print(json.dumps(result, indent=1))
        if args.output:
            args.output.write_text(json.dumps(result, indent=1))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or export_bundle_model(Path(tmp) / "model", TINY_OVERRIDES)
        study = args.study
        if study is None:
            from scripts.synthetic_dicom import generate_dicom_study

            study = Path(tmp) / "study"
            generate_dicom_study(study, seed=1, num_lesions=2, naming_style="siemens", site="site_a")
        runs = [time_stages(study, model) for _ in range(args.repeats)]
        result: dict[str, float | int | str] = {
            key: round(statistics.median(run[key] for run in runs), 3) for key in runs[0] if key != "lesions"
        }
        result["stages_total"] = round(sum(v for k, v in result.items() if k != "model_loading"), 3)
        result["lesions"] = runs[0]["lesions"]
        from deploy_app.__main__ import main as app_main

        ends = []
        for n in range(args.repeats):
            start = time.perf_counter()
            status = app_main(["deploy_app", "-i", str(study), "-o", str(Path(tmp) / f"out{n}"), "-m", str(model)])
            ends.append(time.perf_counter() - start)
            if status != 0:
                raise RuntimeError("the app failed on the benchmark study")
        result["end_to_end"] = round(statistics.median(ends), 3)
    if args.full_size:
        result["full_size_forward_per_lesion"] = round(_full_size_forward(args.threads), 3)
    result["device"] = "cuda" if torch.cuda.is_available() else f"cpu, {args.threads} threads"
    print(json.dumps(result, indent=1))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
