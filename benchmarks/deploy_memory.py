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
"""Peak memory (max RSS) of a whole deploy-app run with the paper-size network, by number of lesions.

    python benchmarks/deploy_memory.py --lesions 1 5 20 --batch-sizes 4 20 --json memory.json

The paper-size network (random weights) is exported as ``ckpt_export`` does and then with the bundle's CPU export
(``python -m scripts.export_cpu``), the model the app runs on a CPU; a synthetic study (site_a, 256 x 256 pixels,
its default slice count) is generated; its lesions come from a ``lesion_boxes.json`` of N boxes of 24 x 24 x 8
voxels tiled over the C+A grid. Each ``python -m deploy_app`` run is a fresh process: its peak RSS (``wait4``
rusage, the same figure as ``/usr/bin/time -v``'s "Maximum resident set size") and wall time are reported, per
``lcadb.inference_batch_size``. Slow on purpose: ~6 s per lesion on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _boxes(truth, count: int) -> dict:
    """``count`` boxes of 24 x 24 x 8 voxels on the C+A grid, tiled row by row, then slab by slab."""
    series = truth.series["C+A"]
    lesions = []
    for n in range(count):
        i, j, k = n % 6, (n // 6) % 6, n // 36
        x0, y0, z0 = 40 + 30 * i, 40 + 30 * j, 4 + 10 * k
        lesions.append(
            {"id": f"L{n + 1}", "series_instance_uid": series, "box_voxels": [x0, y0, z0, x0 + 24, y0 + 24, z0 + 8]}
        )
    return {"lesions": lesions}


def _run(study: Path, model: Path, config: Path, out: Path, threads: int) -> dict[str, float]:
    env = {**os.environ, "HOLOSCAN_CONFIG_PATH": str(config), "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    argv = [
        "bash",
        "-c",
        f'ulimit -s 32768; exec "{sys.executable}" -m deploy_app -i "{study}" -o "{out}" -m "{model}"',
    ]
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the app failed on {study}:\n{stderr[-3000:]}")
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lesions", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lcadb-deploy-memory"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    sys.path[:0] = [str(REPO), str(REPO / "bundle")]
    from scripts.synthetic_dicom import generate_dicom_study

    from deploy_app.benchmark import FULL_SIZE_OVERRIDES, export_bundle_model, export_cpu_bundle_model

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "model" / "model_cpu.ts"
    if not model.is_file():
        model = export_cpu_bundle_model(export_bundle_model(args.work / "model", FULL_SIZE_OVERRIDES))
    base = args.work / "study"
    truth = generate_dicom_study(base, seed=5, num_lesions=1, site="site_a", overwrite=True)
    results = []
    for count in args.lesions:
        study = args.work / f"study-{count}"
        shutil.rmtree(study, ignore_errors=True)
        study.mkdir()
        for series in base.iterdir():
            if series.is_dir() and series.name != "series_100":  # no SEG: the box file gives the lesions
                (study / series.name).symlink_to(series)
        (study / "lesion_boxes.json").write_text(json.dumps(_boxes(truth, count)))
        for batch_size in args.batch_sizes:
            config = yaml.safe_load((REPO / "deploy_app" / "app.yaml").read_text())
            config["lcadb"]["inference_batch_size"] = batch_size
            config_path = args.work / f"app-{batch_size}.yaml"
            config_path.write_text(yaml.safe_dump(config))
            out = args.work / f"out-{count}-{batch_size}"
            shutil.rmtree(out, ignore_errors=True)
            row = {"lesions": count, "batch_size": batch_size, **_run(study, model, config_path, out, args.threads)}
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
