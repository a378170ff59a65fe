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
"""A site whose NVFlare client restarts during a job must not fail the job: a server-side system component.

The site's client process (``client_train``) is supervised by its startup kit: ``startup/sub_start.sh`` checks every
5 s and starts it again when it died (NVFlare's ``master_template.yml``, section ``sub_start_sh``). The restarted client
registers again with a new token; its old job process is gone. :class:`ResilientFedAvg` (fl_server.py) leaves the
site out after the round it missed and the final evaluation skips it, so the server job finishes normally. But the
server's parent process still waits for the site's *terminal job outcome*, and when the job process has ended it
takes the site's next heartbeat, which lists no job, as "terminal outcome unavailable from <site>: missing job on
client" and fails the whole job (``FINISHED:ABNORMAL``; NVFlare 2.9 ``FederatedServer._sync_client_jobs`` and
``_resolve_missing_client_outcome``). NVFlare resolves that wait silently when a participant dies while the job runs
(``FederatedServer.notify_dead_client``), but not when it re-registers, which replaces its token without that step.

:class:`RejoinedSiteHandler` does that step when a site registers again while a job it was started on is still
running on the server: it names the site in the server log, stops waiting for that site's outcome (as for a dead
site) and reports the site's job as dead to the server job (NVFlare's ``notify_dead_job``, the message NVFlare sends
for a dead site, so its controllers stop waiting for the site too). The site's other results and the job's own
``min_clients`` check are unchanged: a job that cannot go on without the site still fails.

It runs in the server's parent process, not in a job, so it lives in the server's startup kit: ``local/custom/`` is on
that process's ``sys.path`` and ``local/resources.json`` lists its components. :class:`RejoinedSiteBuilder` puts it
there at provisioning (``poc.py`` and ``federated/project.yml`` use it); :func:`install_in_server_kit` does the same
for a kit provisioned without it. Only NVFlare and the standard library are imported here.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import RunProcessKey
from nvflare.apis.fl_context import FLContext
from nvflare.lighter.spec import Builder

__all__ = ["COMPONENT_ID", "RejoinedSiteHandler", "RejoinedSiteBuilder", "install_in_server_kit"]

#: Component id of the handler in the server's ``local/resources.json``.
COMPONENT_ID = "lcadb_rejoined_site_handler"
_COMPONENT = {"id": COMPONENT_ID, "path": f"{Path(__file__).stem}.RejoinedSiteHandler", "args": {}}


class RejoinedSiteHandler(FLComponent):
    """Server parent-process component: a site that registers again during a job it was started on has lost that
    job; stop waiting for its job outcome and report its job as dead to the server job."""

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != EventType.CLIENT_REGISTER_PROCESSED:
            return
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else None
        engine = fl_ctx.get_engine()
        job_runner = getattr(engine, "job_runner", None)
        if not site or job_runner is None or not hasattr(engine, "run_processes"):
            return
        current_tokens = {client.token for client in engine.get_clients() if client.name == site}
        if not current_tokens:
            return  # the registration was refused
        for job_id, process_info in list(engine.run_processes.items()):
            participants = process_info.get(RunProcessKey.PARTICIPANTS) or {}
            lost = [t for t, client in participants.items() if client.name == site and t not in current_tokens]
            if not lost or not job_runner.is_client_outcome_pending(job_id, site):
                continue
            self.log_warning(
                fl_ctx,
                f"Site {site} registered again while job {job_id} it was started on is running: its NVFlare client "
                "restarted and lost the job. The job goes on without it; its job outcome is no longer awaited.",
            )
            job_runner.resolve_client_outcome(job_id, site)
            engine.notify_dead_job(job_id, site, "site restarted and registered again during the job")


def install_in_server_kit(server_dir: str | os.PathLike) -> Path:
    """Copy this module into ``<server_dir>/local/custom/`` and list :class:`RejoinedSiteHandler` in the server's
    ``local/resources.json.default`` (and ``resources.json`` where there is one). Idempotent.

    Args:
        server_dir: the server's startup kit folder (the one holding ``startup/`` and ``local/``).

    Returns:
        The copied module.

    Raises:
        FileNotFoundError: when ``server_dir`` has no ``local/resources.json.default`` (not a server kit).
    """
    local = Path(server_dir) / "local"
    resources = [local / "resources.json.default", local / "resources.json"]
    if not resources[0].is_file():
        raise FileNotFoundError(f"{server_dir} is not an NVFlare server startup kit: no {resources[0]}")
    (local / "custom").mkdir(exist_ok=True)
    module = local / "custom" / Path(__file__).name
    tmp = module.with_name(f".{module.name}.{uuid.uuid4().hex}.tmp")
    shutil.copyfile(__file__, tmp)
    os.replace(tmp, module)
    for path in resources:
        if not path.is_file():
            continue
        config = json.loads(path.read_text())
        components = config.setdefault("components", [])
        if not any(c.get("id") == COMPONENT_ID for c in components):
            components.append(dict(_COMPONENT))
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(config, indent=4))
            os.replace(tmp, path)
    return module


class RejoinedSiteBuilder(Builder):
    """NVFlare provisioning builder that installs :class:`RejoinedSiteHandler` in the server's startup kit. List it
    after ``StaticFileBuilder`` in ``project.yml`` (``builders:``), with this folder on the provisioning path
    (``nvflare provision -p federated/project.yml -c federated``)."""

    def build(self, project, ctx) -> None:
        install_in_server_kit(ctx.get_ws_dir(project.get_server()))
