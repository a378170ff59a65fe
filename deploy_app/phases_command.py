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
"""``python -m deploy_app phases -i STUDY``: which image set of a study would serve each phase, and why.

No model is needed. It prints the files skipped as not needed, then for every series (or volume of a series) the
phase chosen with its evidence and the runner-up, then one line per phase, the damaged or undecodable files of
series that serve no phase; then every problem (a damaged or undecodable file in a phase's series is one), and
exits with status 1 when there is any.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from .errors import StudyInputError

__all__ = ["main"]


def _default_settings() -> dict:
    """The ``lcadb`` block of the app configuration (``HOLOSCAN_CONFIG_PATH`` or the app's ``app.yaml``)."""
    app_dir = Path(__file__).resolve().parent
    config = Path(os.environ.get("HOLOSCAN_CONFIG_PATH") or app_dir / "app.yaml")
    try:
        return (yaml.safe_load(config.read_text()) or {}).get("lcadb") or {}
    except (OSError, yaml.YAMLError):
        return {}


def main(argv: list[str]) -> int:
    """Run the command on ``argv`` (the arguments after ``phases``); returns the exit status."""
    from .bundle_access import ensure_bundle_scripts
    from .operators.phase_selector_operator import DEFAULT_RULES_FILE, load_phase_rules, load_series_phases
    from .operators.study_loader_operator import SKIPPED_FILES, read_study_folder
    from .phase_identification import FILE_PROBLEMS, identify_phases

    app_dir = Path(__file__).resolve().parent
    settings = _default_settings()
    parser = argparse.ArgumentParser(prog="python -m deploy_app phases", description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--input", required=True, type=Path, help="study folder (DICOM files)")
    parser.add_argument(
        "--rules",
        type=Path,
        default=app_dir / settings.get("phase_rules", DEFAULT_RULES_FILE),
        help="name rules file (SDK series-selector JSON); default: the app configuration's lcadb.phase_rules",
    )
    parser.add_argument("--no-rules", action="store_true", help="decide from DICOM attributes only, ignore names")
    parser.add_argument(
        "--series-map",
        default=settings.get("phase_series"),
        help="JSON file mapping SeriesInstanceUID to phase (site override); default: lcadb.phase_series",
    )
    args = parser.parse_args(argv)
    ensure_bundle_scripts()
    from scripts.constants import PHASES

    try:
        rules = None if args.no_rules else load_phase_rules(args.rules, PHASES)
        series_map = args.series_map
        if isinstance(series_map, str) and not Path(series_map).is_absolute() and not Path(series_map).exists():
            series_map = app_dir / series_map
        series_phases = load_series_phases(series_map, PHASES)
        study = read_study_folder(args.input)
    except StudyInputError as err:
        print(f"PROBLEM: {err}")
        return 1
    identification = identify_phases(study.get_all_series(), PHASES, rules, series_phases)
    print(f"study {study.StudyInstanceUID} ({args.input})")
    for line in getattr(study, SKIPPED_FILES, []):
        print(f"SKIPPED: {line}")
    for line in identification.report():
        print(line)
    used = {id(s.series) for s in identification.chosen.values()}
    for series in study.get_all_series():
        if id(series) not in used:
            for message in getattr(series, FILE_PROBLEMS, []):
                print(f"WARNING (series {getattr(series, 'SeriesNumber', '?')} serves no phase): {message}")
    for problem in identification.problems:
        print(f"PROBLEM: {problem}")
    print(f"{len(identification.problems)} problem(s)." if identification.problems else "All 8 phases identified.")
    return 1 if identification.problems else 0
