#!/usr/bin/env bash
# Creates .venv with the pinned stack (torch first, then the project) and installs the Debian test peers.
# Idempotent and quick when nothing changed: safe to call before every command.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_VERSION=2.13.0
DEBIAN_PACKAGES=(dicom3tools dcmtk orthanc orthanc-dicomweb chromium)
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.lcadb-installed
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1) torch==$TORCH_VERSION"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "[setup] installing torch==$TORCH_VERSION, then the project with its test extras"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: a bare requirement would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==$TORCH_VERSION"
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$wanted" > "$stamp"
fi

# OHIF's prebuilt viewer for the viewer test (npm registry tarball, integrity-checked; once).
[ "${LCADB_SKIP_DEBIAN:-0}" = 1 ] || .venv/bin/python tools/fetch_ohif.py >/dev/null

# LCADB_SKIP_DEBIAN=1: training needs none of the DICOM/PACS test peers.
[ "${LCADB_SKIP_DEBIAN:-0}" = 1 ] && exit 0

missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "[setup] installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Orthanc's package starts a system service; the tests run their own instance on free loopback ports.
    (service orthanc stop || true) >/dev/null 2>&1
  else
    echo "[setup] missing Debian packages (${missing[*]}): install them as root; the DICOM and PACS tests need them" >&2
    exit 1
  fi
fi
