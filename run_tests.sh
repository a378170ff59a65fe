#!/usr/bin/env bash
# Sets up .venv and the Debian test peers (tools/setup_env.sh), then runs the whole test suite.
# Extra arguments go to pytest, e.g. ./run_tests.sh -m "not slow" or ./run_tests.sh tests/test_network.py
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash tools/setup_env.sh
# holoscan (imported by monai.deploy) warns below a 32 MB stack and can crash with less.
ulimit -s 32768 2>/dev/null || true
exec .venv/bin/python -m pytest "$@"
