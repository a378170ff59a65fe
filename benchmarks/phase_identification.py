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
"""Phases right per vendor style and layout of the synthetic generator, with the trivial baseline beside it.

For each study (1 lesion, all distractor series; ``separate`` also with oblique T2 and shifted C+Delay) it counts
the phases whose chosen image set is exactly the generator's instances of that phase:

- ``app``: the deploy app's identification (DICOM attributes and the shipped name rules);
- ``attributes only``: the same without name rules;
- ``names only``: the baseline, the shipped name rules as the previous selector used them (a rule must match
  exactly one whole series, and it must be the phase's instances).

    python benchmarks/phase_identification.py            # prints the Markdown table of deploy_app/README.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def names_only(series_list, rules: dict, truth) -> int:
    """Phases the name rules alone get right with whole-series, exactly-one-match semantics."""
    right = 0
    for selection in rules["selections"]:
        conditions = selection["conditions"]
        hits = [
            s
            for s in series_list
            if all(re.search(str(p), str(getattr(s, k, "") or ""), re.IGNORECASE) for k, p in conditions.items())
        ]
        if len(hits) == 1:
            uids = {i.get_native_sop_instance().SOPInstanceUID for i in hits[0].get_sop_instances()}
            right += uids == set(truth.phase_instance_uids[selection["name"]])
    return right


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=31)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT / "bundle"), str(ROOT)]
    from scripts.constants import PHASES
    from scripts.synthetic_dicom import LAYOUTS, NAMING_STYLES, generate_dicom_study

    from deploy_app.operators.study_loader_operator import read_study_folder
    from deploy_app.phase_identification import identify_phases

    rules = json.loads((ROOT / "deploy_app" / "phase_rules.json").read_text())
    print("| vendor style | layout | app | attributes only | names only (baseline) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for style in NAMING_STYLES:
            for layout in LAYOUTS:
                folder = Path(tmp) / f"{style}-{layout}"
                truth = generate_dicom_study(
                    folder, args.seed, num_lesions=1, naming_style=style, layout=layout, distractors=True,
                    matrix=(64, 64), num_slices=16, mixed_geometry=layout == "separate",
                )  # fmt: skip
                series = read_study_folder(folder).get_all_series()
                counts = []
                for name_rules in (rules, None):
                    chosen = identify_phases(series, PHASES, name_rules).chosen
                    counts.append(
                        sum(
                            sorted(str(ds.SOPInstanceUID) for ds in s.datasets) == sorted(truth.phase_instance_uids[p])
                            for p, s in chosen.items()
                        )
                    )
                baseline = names_only(series, rules, truth)
                print(f"| {style} | {layout} | {counts[0]}/8 | {counts[1]}/8 | {baseline}/8 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
