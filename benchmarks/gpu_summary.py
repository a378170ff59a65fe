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
"""Summary of one ``benchmarks/gpu_check.sh`` run: the measured numbers against the performance goals.

Reads ``trainer.json`` (``bundle_training.py``), ``infer.json`` (``benchmark.py``) and ``pipeline.json``
(``data_pipeline.py``) from the result folder and writes ``summary.json`` and ``summary.md`` (a table for the
README) beside them. A missing or failed step is reported as missing, not as a failed goal.

    python benchmarks/gpu_summary.py gpu_results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["GOALS", "summarise"]

#: (name, unit, comparison, target) of each goal of the performance issue.
GOALS = {
    "trainer_samples_per_s_batch8": ("samples/s", ">=", 250.0),
    "inference_lesions_per_s_batch32": ("lesions/s", ">=", 500.0),
    "inference_ms_batch1": ("ms", "<=", 4.0),
}


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def summarise(folder: Path) -> dict:
    """The goal table of one result folder.

    Args:
        folder: the folder ``gpu_check.sh`` wrote its JSON files to.

    Returns:
        ``{"device", "rows": [{"goal", "unit", "target", "default", "ours", "speedup", "met"}], "pipeline"}``;
        ``default``/``ours``/``met`` are None where the step did not produce its file.
    """
    trainer, infer, pipeline = (_load(folder, n) for n in ("trainer.json", "infer.json", "pipeline.json"))
    measured: dict[str, tuple[float | None, float | None]] = dict.fromkeys(GOALS, (None, None))
    if trainer and "steady_samples_per_s" in trainer.get("summary", {}):
        steady = trainer["summary"]["steady_samples_per_s"]
        measured["trainer_samples_per_s_batch8"] = (steady["before"], steady["after"])
    for result in (infer or {}).get("results", []):
        if result.get("task") == "infer" and result["batch"] == 32:
            lesions_per_s = (result["default_lesions_per_s"], result["ours_lesions_per_s"])
            measured["inference_lesions_per_s_batch32"] = lesions_per_s
        if result.get("task") == "infer" and result["batch"] == 1:
            measured["inference_ms_batch1"] = (result["default_ms_per_batch"], result["ours_ms_per_batch"])
    rows = []
    for goal, (unit, comparison, target) in GOALS.items():
        default, ours = measured[goal]
        met = None if ours is None else (ours >= target if comparison == ">=" else ours <= target)
        speedup = None
        if default and ours:
            speedup = ours / default if comparison == ">=" else default / ours
        rows.append(
            {
                "goal": goal,
                "unit": unit,
                "target": f"{comparison} {target:g}",
                "default": default,
                "ours": ours,
                "speedup": speedup,
                "met": met,
            }
        )
    device = (infer or {}).get("device") or (trainer or {}).get("runs", [{}])[0].get("device")
    return {"device": device, "rows": rows, "pipeline": (pipeline or {}).get("results")}


def _markdown(summary: dict) -> str:
    def number(value: float | None) -> str:
        return "missing" if value is None else f"{value:.1f}"

    lines = [
        f"Device: {summary['device']}",
        "",
        "| goal | target | default execution | fast path | speed-up | met |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        speedup = "" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        met = "not measured" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(
            f"| {row['goal']} ({row['unit']}) | {row['target']} | {number(row['default'])} | {number(row['ours'])} "
            f"| {speedup} | {met} |"
        )
    for result in summary["pipeline"] or []:
        lines.append(
            f"\ndata path `{result['path']}` on {result['device']}: {result['samples_per_s']:.0f} samples/s, "
            f"{result['cpu_ms_per_sample']:.2f} CPU ms/sample"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    summary = summarise(args.folder)
    (args.folder / "summary.json").write_text(json.dumps(summary, indent=2))
    text = _markdown(summary)
    (args.folder / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
