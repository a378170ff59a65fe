# Copyright (c) LCA-DB MONAI plugin contributors
# Licensed under the Apache License, Version 2.0 (the "License"); see the repository's LICENSE.
"""Fetch the OHIF viewer's prebuilt ``dist/`` (npm package ``@ohif/app``) for the viewer test with ``npm pack``,
checked against the package's published sha512 integrity. Idempotent: ``python tools/fetch_ohif.py [target folder]``."""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "3.13.2"
PACKAGE = f"@ohif/app@{VERSION}"
INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
DEFAULT_TARGET = Path(__file__).resolve().parents[1] / ".cache" / f"ohif-{VERSION}"


def fetch(target: Path = DEFAULT_TARGET) -> Path:
    """The ``dist`` folder of ``@ohif/app`` ``VERSION`` under ``target`` (downloaded once)."""
    dist = target / "dist"
    if (dist / "index.html").is_file():
        return dist
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            ["npm", "pack", PACKAGE, "--silent", "--pack-destination", download],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=600,
        )
        (tarball,) = Path(download).glob("*.tgz")
        data = tarball.read_bytes()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != INTEGRITY:
        raise RuntimeError(f"{PACKAGE}: integrity {digest} is not the published {INTEGRITY}.")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        members = [m for m in archive.getmembers() if m.name.startswith("package/dist/") and (m.isfile() or m.isdir())]
        archive.extractall(partial, members=members, filter="data")
    shutil.rmtree(target, ignore_errors=True)
    (partial / "package").rename(target)
    shutil.rmtree(partial, ignore_errors=True)
    return dist


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_TARGET))
