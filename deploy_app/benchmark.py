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

Without ``--model`` the bundle's network is exported (``monai.bundle.ckpt_export``, random weights) with the tiny
test configuration; without ``--study`` a synthetic study is generated (``scripts.synthetic_dicom``, site_a:
8 series of 256 x 256 x 40, 2 lesions). Stages are timed by calling each operator's work function in turn (the
median of ``--repeats`` runs); ``end_to_end`` is a whole ``python -m deploy_app`` run in this process (Holoscan
graph, model loading and all stages; Python start-up and imports excluded, they are ~10 s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["TINY_OVERRIDES", "export_bundle_model", "main", "time_stages"]

#: The tiny network of the tests (contracts.md), as overrides of the bundle's inference.json.
TINY_OVERRIDES = {
    "roi_size": [64, 64, 8],
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


def _timed(fn: Callable, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def time_stages(study: Path, model_path: Path) -> dict[str, float]:
    """Seconds of each stage for one study (the app's work functions, called in order)."""
    from monai.deploy.core import Fragment
    from scripts.constants import PHASES

    from deploy_app.bundle_access import load_model
    from deploy_app.domain import StudyResult
    from deploy_app.operators.inference_operator import classify_lesions, preprocess_rois
    from deploy_app.operators.lesion_roi_operator import lesion_rois
    from deploy_app.operators.phase_selector_operator import DEFAULT_RULES_FILE, PhaseSelectorOperator, load_phase_rules
    from deploy_app.operators.phase_volume_operator import assemble_phases
    from deploy_app.operators.sr_writer_operator import build_sr, write_sr
    from deploy_app.operators.study_loader_operator import StudyLoaderOperator

    fragment = Fragment()
    loader = StudyLoaderOperator(fragment, input_folder=study, name="study_loader_op")
    selector = PhaseSelectorOperator(fragment, rules_file=DEFAULT_RULES_FILE, phases=PHASES, name="phase_selector_op")
    model, t_model = _timed(load_model, model_path)
    studies, t_load = _timed(loader.load_data_to_studies, study)
    selection, t_select = _timed(selector.filter, load_phase_rules(DEFAULT_RULES_FILE, PHASES), studies)
    volume, t_resample = _timed(assemble_phases, selection[0], PHASES)
    rois, t_roi = _timed(lesion_rois, volume, study)
    batch, t_pre = _timed(preprocess_rois, model, rois)
    lesions, t_infer = _timed(classify_lesions, model, rois, batch)
    result = StudyResult(lesions, volume, model.class_names, model.name, model.version, model.weights_sha256, "")
    with tempfile.TemporaryDirectory() as out:
        _, t_sr = _timed(lambda: write_sr(build_sr(result), Path(out)))
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
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from deploy_app.bundle_access import ensure_bundle_scripts

    ensure_bundle_scripts()
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
