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
"""Run the LCA-DB job in NVFlare's proof-of-concept mode: real server, site and admin processes on this machine.

Unlike the simulator, PoC provisions a project with certificates, starts a server and one client process per site
(each with its own workspace and startup kit), submits the job through the admin API and downloads the result, as a
production deployment does. The server is named ``localhost`` so it listens on 127.0.0.1 only. Same job and
arguments as ``job.py``, plus the PoC options below::

    python federated/poc.py --data_root /tmp/lcadb_fed --sites site_a site_b --num_rounds 2 --local_epochs 1

The job result (logs, cross-site metrics, TensorBoard events, ``app_server/models/model.pt``) is copied to
``<workspace>/<name>_poc`` and the PoC processes are stopped and their workspace removed (unless ``--keep_poc``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import job
import yaml

__all__ = ["poc_project", "write_poc_project", "run_poc", "main"]

logger = logging.getLogger("lcadb.federated.poc")

#: Server name and host: NVFlare binds a server whose name is a loopback host to 127.0.0.1 only.
LOOPBACK = "localhost"
#: PoC admin user; NVFlare's PocEnv logs in as this project admin by default.
POC_ADMIN = "admin@nvidia.com"


def poc_project(
    sites: Sequence[str],
    port: int = 8002,
    name: str = "lcadb_poc",
    server_kit: dict[str, Any] | None = None,
    site_policy: dict[str, Any] | None = None,
) -> dict:
    """A PoC project: server ``localhost`` (loopback-only listeners) on ``port`` (admin port ``port + 1``), one client
    per site, one admin, and the kit builders of the production project (fl_kits.py). Provisioning it imports
    ``fl_kits`` (this folder must be on ``sys.path``).

    Args:
        sites: client names.
        port: server port on 127.0.0.1; the admin port is the next one. Defaults to 8002.
        name: project name. Defaults to "lcadb_poc".
        server_kit: ``fl_kits.ServerKitBuilder`` arguments (e.g. ``lost_site_after``). Defaults to None (its
            defaults).
        site_policy: ``fl_kits.SitePrivacyBuilder`` arguments, every site's privacy policy. Defaults to None (its
            defaults).

    Raises:
        ValueError: for repeated or missing site names.
    """
    if len(set(sites)) != len(sites) or not sites:
        raise ValueError(f"sites must be distinct and not empty, got {list(sites)}.")
    participants = [
        {
            "name": LOOPBACK,
            "type": "server",
            "org": "lcadb",
            "fed_learn_port": int(port),
            "admin_port": int(port) + 1,  # NVFlare's default 8003 would be shared by every PoC on this machine
            "default_host": LOOPBACK,
        },
        {"name": POC_ADMIN, "type": "admin", "org": "lcadb", "role": "project_admin"},
    ] + [{"name": site, "type": "client", "org": "lcadb"} for site in sites]
    builders = [
        {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder", "args": {"template_file": ["master_template.yml"]}},
        {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
        # lost and restarted sites, resume after a server crash, job store in the workspace; each site's own privacy
        {"path": "fl_kits.ServerKitBuilder", "args": dict(server_kit or {})},
        {"path": "fl_kits.SitePrivacyBuilder", "args": dict(site_policy or {})},
        {"path": "nvflare.lighter.impl.cert.CertBuilder"},
        {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
    ]
    return {
        "api_version": 3,
        "name": name,
        "description": "LCA-DB PoC",
        "participants": participants,
        "builders": builders,
    }


def write_poc_project(
    path: str | os.PathLike,
    sites: Sequence[str],
    port: int = 8002,
    server_kit: dict[str, Any] | None = None,
    site_policy: dict[str, Any] | None = None,
) -> Path:
    """Write :func:`poc_project` as ``project.yml`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    project = poc_project(sites, port, server_kit=server_kit, site_policy=site_policy)
    path.write_text(yaml.safe_dump(project, sort_keys=False))
    return path


def build_poc_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(parents=[job.build_arg_parser()], conflict_handler="resolve", description=__doc__)
    p.add_argument("--poc_workspace", default="/tmp/nvflare/lcadb_poc", help="PoC workspace (startup kits, logs)")
    p.add_argument("--port", type=int, default=8002, help="server port on 127.0.0.1 (admin port: the next one)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job")
    p.add_argument("--keep_poc", action="store_true", help="leave the PoC workspace on disk")
    p.add_argument(
        "--lost_site_after", type=float, default=60.0, help="seconds of silence after which the server drops a site"
    )
    p.add_argument(
        "--site_reports_in_full",
        action="store_true",
        help="site policy: let paths and case ids leave the sites in their error reports (default: withheld)",
    )
    return p


def run_poc(args: argparse.Namespace) -> Path | None:
    """Provision and start PoC, submit the job, wait, copy the result out, stop PoC. Returns the global checkpoint."""
    from nvflare.recipe import PocEnv

    args = job.share_cores(job.resolve_paths(args), len(args.sites))
    poc_ws = Path(args.poc_workspace).expanduser().resolve()
    data_roots = job.site_data_roots(args.sites, args.data_root, args.site_data)
    result_copy = Path(args.workspace) / f"{args.name}_poc"
    with tempfile.TemporaryDirectory(prefix="lcadb_poc_") as tmp:
        report = args.site_reports_in_full
        project = write_poc_project(
            Path(tmp) / "project.yml",
            args.sites,
            args.port,
            server_kit={"lost_site_after": args.lost_site_after},
            site_policy={"report_paths": report, "report_case_ids": report},
        )
        os.environ["NVFLARE_POC_WORKSPACE"] = str(poc_ws)  # read by PocEnv
        env = PocEnv(project_conf_path=str(project))
        status, copied = None, False
        try:
            with job.in_job_dir():
                recipe = job.build_recipe(args, data_roots, job.stage_bundle(args.bundle_root, Path(tmp) / "bundle"))
                run = recipe.execute(env)
            logger.info(f"PoC job {run.get_job_id()} submitted; waiting up to {args.timeout:.0f} s")
            result = run.get_result(timeout=args.timeout, clean_up=False)
            status = run.get_status()
            logger.info(f"PoC job status: {status}")
            if result is not None and Path(result).is_dir():
                if result_copy.exists():
                    shutil.rmtree(result_copy)
                shutil.copytree(result, result_copy)
                copied = True
                summary = job.describe_job_summary(result_copy)
                if summary:
                    logger.info(f"PoC job {run.get_job_id()}: {summary}")
            if status != job.COMPLETED or not copied:
                logger.error(
                    f"PoC job {run.get_job_id()} did not complete (status {status}); PoC workspace kept with all "
                    f"logs: {poc_ws}" + (f"; downloaded result: {result_copy}" if copied else "")
                )
                return None
        finally:
            # remove the PoC workspace only when the job completed and its result (the model) was copied out
            env.stop(clean_up=not args.keep_poc and status == job.COMPLETED and copied)
    logger.info(f"PoC results (logs, cross-site metrics, TensorBoard events): {result_copy}")
    ckpt = job.find_global_checkpoint(result_copy)
    if ckpt is None:
        logger.error("No global bundle checkpoint in the PoC job result.")
        return None
    if args.output_ckpt:
        ckpt = job.copy_global_checkpoint(ckpt, args.output_ckpt)
    logger.info(f"Global model (bundle checkpoint): {ckpt}")
    return ckpt


def main(argv: Sequence[str] | None = None) -> Path | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_poc(build_poc_arg_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
