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
"""Builds and runs the app: ``python -m deploy_app -i <dicom folder> -o <output folder> -m <model>``, or, as a
MAP runs it, ``python3 <app folder>`` with HOLOSCAN_INPUT_PATH / HOLOSCAN_OUTPUT_PATH / HOLOSCAN_MODEL_PATH;
``python -m deploy_app phases -i <dicom folder>`` shows which series would serve each phase, and why (no model)."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the app once; returns the exit status (0 done, 1 failed: the error is logged, no SR is written)."""
    if __package__:
        app_module = importlib.import_module(f"{__package__}.app")
    else:  # run as a folder (``python3 /opt/holoscan/app`` in a MAP): import the folder as a package
        folder = Path(__file__).resolve().parent
        sys.path.insert(0, str(folder.parent))
        app_module = importlib.import_module(f"{folder.name}.app")
    argv = [sys.executable, *(sys.argv if argv is None else argv)]
    if len(argv) > 2 and argv[2] == "phases":  # ``python -m deploy_app phases -i STUDY``: no model, no app graph
        phases_command = importlib.import_module(f"{app_module.__package__}.phases_command")
        return phases_command.main(argv[3:])
    try:
        app_module.LCADBDeployApp(argv).run()
    except Exception as err:  # every failure ends the run with a message and a non-zero status
        logging.getLogger("deploy_app").error("LCA-DB app failed: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
