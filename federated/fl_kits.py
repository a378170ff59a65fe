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
"""The startup-kit side of the LCA-DB federation: what the server and each site enforce whatever a job says.

Provisioning builders (listed in ``federated/project.yml`` and in ``poc.py``'s PoC project):

- :class:`ServerKitBuilder` puts the server's job store and snapshot storage in the server kit's workspace (NVFlare's
  template puts both under ``/tmp/nvflare``: lost on reboot, shared by every NVFlare on the host), copies this module
  into the server kit's ``local/custom/`` and lists the components below in its ``local/resources.json.default``.
- :class:`SitePrivacyBuilder` writes each site's ``local/privacy.json`` (NVFlare's site privacy policy with scopes),
  copies ``fl_privacy.py`` into the site kit as ``local/custom/lcadb_site_privacy.py`` and turns off the streaming of
  the site's error log to the server (it holds paths and case ids).

Server parent-process components (they run in ``server_train``, outside any job, where ``local/custom/`` is on
``sys.path``):

- :class:`LostSiteHandler`: a site whose client has been silent for ``lost_after`` seconds (every process of the site
  gone) is logged out through NVFlare's own dead-client path, so its jobs go on without it (NVFlare would wait for its
  600 s ``heart_beat_timeout``) and a finished job does not fail for want of the lost site's outcome.
- :class:`RejoinedSiteHandler`: a site whose client restarted during a job lost that job; the job goes on without it.
- :class:`JobResumer`: after a server crash, each job that was running and has a snapshot (``fl_server.ResilientFedAvg``
  writes one after every round) goes on as a clone of itself (NVFlare's ``clone_job``) from its next round.
- :class:`DeploymentRefusalLogger`: names in the server log each site that refused to deploy a job (e.g. its
  privacy policy has no scope the job asks for).

Only NVFlare and the standard library are imported here.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, RunProcessKey, SystemComponents
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import ALL_SITES, JobMetaKey, RunStatus
from nvflare.lighter.constants import CtxKey
from nvflare.lighter.spec import Builder
from nvflare.private.fed.server.job_cmds import CLONED_META_KEYS

__all__ = [
    "SITE_POLICY_MODULE",
    "DeploymentRefusalLogger",
    "JobResumer",
    "LostSiteHandler",
    "RejoinedSiteHandler",
    "ServerKitBuilder",
    "SitePrivacyBuilder",
    "install_in_server_kit",
    "site_privacy_policy",
    "write_site_policy",
]

#: Name of the site kit's copy of fl_privacy.py (``local/custom/``): a name no job ships, so no job can shadow it.
SITE_POLICY_MODULE = "lcadb_site_privacy"
#: Scopes a site can offer, each a model filter of fl_privacy.py.
SCOPE_FILTERS = {"percentile": "ChangedPercentilePrivacy", "svt": "CountingSVTPrivacy"}
_MODULE = Path(__file__).stem


def _event_job_id(fl_ctx: FLContext) -> str | None:
    """The job of a job lifecycle event (``JobRunner._fire_job_lifecycle_event`` passes it as event data)."""
    data = fl_ctx.get_prop(FLContextKey.EVENT_DATA)
    if isinstance(data, dict) and data.get("job_id"):
        return data["job_id"]
    return fl_ctx.get_prop(FLContextKey.CURRENT_JOB_ID)


def _engine_parts(fl_ctx: FLContext):
    """The server parent's engine, its FederatedServer and its job runner (None where this is not a server parent)."""
    engine = fl_ctx.get_engine()
    server = getattr(engine, "server", None)
    return engine, server, getattr(engine, "job_runner", None)


class RejoinedSiteHandler(FLComponent):
    """A site that registers again during a job it was started on has lost that job (its NVFlare client restarted):
    stop waiting for its job outcome and report its job as dead to the server job.

    The restarted client registers with a new token; its job process is gone. NVFlare resolves the wait for a site's
    terminal job outcome when a participant dies (``FederatedServer.notify_dead_client``) but not when it registers
    again, and then fails the finished job ("terminal outcome unavailable from <site>: missing job on client",
    ``FederatedServer._sync_client_jobs``, ``_resolve_missing_client_outcome``). This does that step and sends
    NVFlare's own dead-job report (``notify_dead_job``), so the job's controller stops waiting for the site too. The
    site does not take part again in that job: NVFlare deploys a job's apps only when it dispatches the job
    (``JobRunner._deploy_job``) and fixes its participants then (``RunProcessKey.PARTICIPANTS``).
    """

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != EventType.CLIENT_REGISTER_PROCESSED:
            return
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else None
        engine, _, job_runner = _engine_parts(fl_ctx)
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


class LostSiteHandler(FLComponent):
    """Logs out a site whose NVFlare client has been silent for ``lost_after`` seconds, through NVFlare's own
    dead-client path (``FederatedServer.logout_client``), instead of after the server's ``heart_beat_timeout``
    (600 s in NVFlare's template).

    A live client sends a heartbeat every 10 s (``heart_beat_interval``, client_train.py), whatever its jobs do. When
    every process of a site is gone, NVFlare's path tells each running job that the site is dead (the job's controller
    stops waiting for it after the job's ``dead_client_grace_period``), and stops waiting for the site's outcome of
    those jobs. Before that, this handler stops waiting for the lost site's outcome of jobs that already ended: NVFlare
    would otherwise fail such a finished job ("terminal outcome unavailable from <site>: client dead",
    ``FederatedServer.notify_dead_client``) although its controller completed it without the site.

    Args:
        lost_after: seconds without any message from a site's client before it counts as lost. Defaults to 60.
        check_interval: seconds between checks. Defaults to 2.

    Raises:
        ValueError: when ``lost_after`` is not more than 2 heartbeat intervals (20 s) or ``check_interval`` <= 0.
    """

    def __init__(self, lost_after: float = 60.0, check_interval: float = 2.0) -> None:
        super().__init__()
        if lost_after <= 20 or check_interval <= 0:
            raise ValueError(f"lost_after must be > 20 s and check_interval > 0, got {lost_after}, {check_interval}.")
        self.lost_after = float(lost_after)
        self.check_interval = float(check_interval)
        self._stop = threading.Event()

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.SYSTEM_START:
            engine, server, job_runner = _engine_parts(fl_ctx)
            if server is not None and job_runner is not None:
                threading.Thread(target=self._watch, args=(engine, server, job_runner), daemon=True).start()
        elif event_type == EventType.SYSTEM_END:
            self._stop.set()

    def _watch(self, engine, server, job_runner) -> None:
        while not self._stop.wait(self.check_interval):
            now = time.time()
            for token, client in list(server.client_manager.get_clients().items()):
                silent = now - client.last_connect_time
                if silent >= self.lost_after:
                    with engine.new_context() as fl_ctx:
                        self._logout(fl_ctx, server, job_runner, engine, token, client.name, silent)

    def _logout(self, fl_ctx: FLContext, server, job_runner, engine, token: str, site: str, silent: float) -> None:
        running = [
            job_id
            for job_id, info in list(engine.run_processes.items())
            if token in (info.get(RunProcessKey.PARTICIPANTS) or {})
        ]
        ended = sorted(job_runner.get_client_outcome_jobs(site) - set(running))
        self.log_warning(
            fl_ctx,
            f"Site {site} lost: no message from its NVFlare client for {silent:.0f} s (lost_after={self.lost_after:.0f}"
            f" s). Logged out; running job(s) {running or 'none'} go on without it"
            + (f"; its outcome of ended job(s) {ended} is no longer awaited" if ended else ""),
        )
        for job_id in ended:
            job_runner.resolve_client_outcome(job_id, site)
        server.logout_client(token)


class JobResumer(FLComponent):
    """After the server restarts, resumes every job that was running when it stopped and has a snapshot.

    NVFlare 2.9 leaves such a job RUNNING for good: ``JobRunner.restore_running_job`` and
    ``update_abnormal_finished_jobs`` are never called and ``ServerEngine.persist_components`` is a no-op since HA was
    removed (NVFlare PR #4503). On ``SYSTEM_START`` this component finds the jobs the job store still holds as RUNNING
    or DISPATCHED and sets them FINISHED:ABNORMAL (what NVFlare's unused ``update_abnormal_finished_jobs`` would do).
    A job with a snapshot in the server's snapshot storage (``fl_server.ResilientFedAvg`` writes one after every
    round) then goes on as NVFlare's ``clone_job`` admin command would clone it (same job definition, a new job id,
    ``cloned_from`` the old one) once its sites registered again (at most ``wait_for_sites`` s): NVFlare's scheduler
    deploys the clone and its controller resumes at the round after the snapshot. A new id, because NVFlare's job store
    never schedules a job id twice (it tags each scheduled job: ``SimpleJobDefManager.get_jobs_to_schedule``) and the
    sites may still hold the old job (the server asks them to abort it at their next heartbeat:
    ``FederatedServer._sync_client_jobs``). Without a snapshot the log says how to start a new job from the last
    global model. Snapshots are deleted when their job ends (``JOB_COMPLETED``) and stale ones at start.

    Args:
        wait_for_sites: at most this many seconds to wait for a job's sites to register again. Defaults to 60.

    Raises:
        ValueError: for a negative time.
    """

    def __init__(self, wait_for_sites: float = 60.0) -> None:
        super().__init__()
        if wait_for_sites < 0:
            raise ValueError(f"wait_for_sites must be >= 0, got {wait_for_sites}.")
        self.wait_for_sites = float(wait_for_sites)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        engine, _, job_runner = _engine_parts(fl_ctx)
        persistor = getattr(engine, "snapshot_persistor", None)
        if job_runner is None or persistor is None:
            return
        if event_type == EventType.SYSTEM_START:
            threading.Thread(target=self._resume_all, args=(engine, persistor), daemon=True).start()
        elif event_type == EventType.JOB_COMPLETED:
            job_id = _event_job_id(fl_ctx)
            job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
            job = job_manager.get_job(job_id, fl_ctx) if job_id else None
            for snapshot_of in (job_id, job.meta.get(JobMetaKey.CLONED_FROM.value) if job else None):
                if snapshot_of and _has_snapshot(persistor, snapshot_of):
                    persistor.delete_run(snapshot_of)

    def _resume_all(self, engine, persistor) -> None:
        with engine.new_context() as fl_ctx:
            job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
            orphans = job_manager.get_jobs_by_status([RunStatus.RUNNING, RunStatus.DISPATCHED], fl_ctx)
            keep = {job.job_id for job in orphans} | {job.meta.get(JobMetaKey.CLONED_FROM.value) for job in orphans}
            for stale in _snapshot_job_ids(persistor) - keep:
                persistor.delete_run(stale)
            for job in orphans:
                job_manager.set_status(job.job_id, RunStatus.FINISHED_ABNORMAL, fl_ctx)
                origin = job.meta.get(JobMetaKey.CLONED_FROM.value)
                if not _has_snapshot(persistor, job.job_id) and origin and _has_snapshot(persistor, origin):
                    # a clone that stopped before its first round ended: it goes on from its origin's snapshot
                    snapshot = persistor.retrieve_run(origin)
                    snapshot.job_id = job.job_id
                    persistor.save(snapshot)
                if _has_snapshot(persistor, job.job_id):
                    self._resume(engine, job_manager, job)
                else:
                    self._give_up(fl_ctx, job.job_id, engine)

    def _resume(self, engine, job_manager, job) -> None:
        sites = sorted({s for targets in job.get_deployment().values() for s in targets} - {"server", ALL_SITES})
        with engine.new_context() as fl_ctx:
            self.log_warning(
                fl_ctx,
                f"Job {job.job_id} was running when the server stopped (now {RunStatus.FINISHED_ABNORMAL.value}). It "
                f"has a snapshot and goes on as a clone once its sites {sites or 'all'} are back (at most "
                f"{self.wait_for_sites:.0f} s)",
            )
        deadline = time.monotonic() + self.wait_for_sites
        while time.monotonic() < deadline and not set(sites) <= {c.name for c in engine.get_clients()}:
            time.sleep(1.0)
        with engine.new_context() as fl_ctx:
            meta = {str(k): job.meta[k] for k in job.meta.keys() & CLONED_META_KEYS}
            keys = (JobMetaKey.SUBMITTER_NAME, JobMetaKey.SUBMITTER_ORG, JobMetaKey.SUBMITTER_ROLE, JobMetaKey.SCOPE)
            meta.update({key.value: job.meta[key.value] for key in keys if key.value in job.meta})
            meta[JobMetaKey.CLONED_FROM.value] = job.job_id
            clone = job_manager.clone(from_jid=job.job_id, meta=meta, fl_ctx=fl_ctx)[JobMetaKey.JOB_ID.value]
            back = sorted({c.name for c in engine.get_clients()} & set(sites))
            self.log_warning(
                fl_ctx,
                f"Job {job.job_id} resumes as job {clone} (cloned from it) from its snapshot; sites back: {back}, "
                f"missing: {sorted(set(sites) - set(back)) or 'none'}",
            )

    def _give_up(self, fl_ctx: FLContext, job_id: str, engine) -> None:
        workspace = engine.get_workspace().get_root_dir() if hasattr(engine, "get_workspace") else "<server workspace>"
        model = os.path.join(workspace, job_id, "app_server", "models", "model.pt")
        self.log_error(
            fl_ctx,
            f"Job {job_id} was running when the server stopped (now {RunStatus.FINISHED_ABNORMAL.value}) and has no "
            "snapshot to resume from (it stopped before its first round ended, or is not an LCA-DB job). Its last "
            f"global model, if any, is {model}; start a new job from it with: python federated/job.py --startup_kit "
            f"<admin kit> ... --initial_ckpt_on_server {model} --num_rounds <rounds left>",
        )


class DeploymentRefusalLogger(FLComponent):
    """Names in the server log each site that refused a job at deployment, with its reason (NVFlare records it only
    in the job's ``job_deploy_detail`` metadata), e.g. a site whose privacy policy has no scope the job asks for
    (``AppDeployer.deploy``: "privacy scope '<scope>' is not allowed")."""

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type not in (EventType.JOB_DEPLOYED, EventType.JOB_ABORTED):
            return
        details = fl_ctx.get_prop(FLContextKey.JOB_DEPLOY_DETAIL) or []
        job_id = _event_job_id(fl_ctx)
        for detail in details:
            site, _, outcome = str(detail).partition(": ")
            if outcome and outcome != "OK" and site != "server" and not site.startswith(("num_ok_sites", "failed")):
                hint = " (its local/privacy.json has no such scope)" if "privacy scope" in outcome else ""
                self.log_error(fl_ctx, f"Site {site} refused job {job_id}: {outcome}{hint}")


def _has_snapshot(persistor, job_id: str) -> bool:
    try:
        return persistor.retrieve_run(job_id) is not None
    except Exception:  # noqa: BLE001 - the storage raises StorageException for a job without a snapshot
        return False


def _snapshot_job_ids(persistor) -> set[str]:
    try:
        return {os.path.basename(uri) for uri in persistor.storage.list_objects(persistor.uri_root)}
    except Exception:  # noqa: BLE001 - empty or missing storage
        return set()


def _atomic_json(path: Path, content: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(content, indent=4) + "\n")
    os.replace(tmp, path)


def _copy_module(source: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, dest)
    return dest


def _resource_files(kit_dir: str | os.PathLike) -> list[Path]:
    local = Path(kit_dir) / "local"
    default = local / "resources.json.default"
    if not default.is_file():
        raise FileNotFoundError(f"{kit_dir} is not an NVFlare startup kit: no {default}")
    return [p for p in (default, local / "resources.json") if p.is_file()]


def install_in_server_kit(
    server_dir: str | os.PathLike,
    lost_site_after: float = 60.0,
    resume_wait: float = 60.0,
    storage_root: str | os.PathLike | None = None,
) -> Path:
    """Copy this module into ``<server_dir>/local/custom/``, list its components in the server's resources
    (``resources.json.default`` and ``resources.json`` where there is one) and, with ``storage_root``, put the job
    store and the snapshot storage there. Idempotent.

    Args:
        server_dir: the server's startup kit folder (the one holding ``startup/`` and ``local/``).
        lost_site_after: :class:`LostSiteHandler` ``lost_after``. Defaults to 60.
        resume_wait: :class:`JobResumer` ``wait_for_sites``. Defaults to 60.
        storage_root: absolute folder for ``jobs-storage/`` and ``snapshot-storage/`` (NVFlare's storage needs
            absolute paths: ``FilesystemStorage``). Defaults to None (left as configured).

    Returns:
        The copied module.

    Raises:
        FileNotFoundError: when ``server_dir`` is not a server kit.
        ValueError: for a relative ``storage_root``.
    """
    if storage_root is not None and not os.path.isabs(storage_root):
        raise ValueError(f"storage_root must be an absolute path, got {storage_root!r}.")
    files = _resource_files(server_dir)
    module = _copy_module(Path(__file__), Path(server_dir) / "local" / "custom" / Path(__file__).name)
    components = [
        {"id": "lcadb_rejoined_site_handler", "path": f"{_MODULE}.RejoinedSiteHandler", "args": {}},
        {
            "id": "lcadb_lost_site_handler",
            "path": f"{_MODULE}.LostSiteHandler",
            "args": {"lost_after": lost_site_after},
        },
        {
            "id": "lcadb_job_resumer",
            "path": f"{_MODULE}.JobResumer",
            "args": {"wait_for_sites": resume_wait},
        },
        {"id": "lcadb_deployment_refusal_logger", "path": f"{_MODULE}.DeploymentRefusalLogger", "args": {}},
    ]
    for path in files:
        config = json.loads(path.read_text())
        ours = {c["id"] for c in components}
        config["components"] = [c for c in config.get("components", []) if c.get("id") not in ours] + components
        if storage_root is not None:
            config["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] = os.path.join(
                storage_root, "snapshot-storage"
            )
            job_manager = next(c for c in config["components"] if c.get("id") == "job_manager")
            job_manager.setdefault("args", {})["uri_root"] = os.path.join(storage_root, "jobs-storage")
        _atomic_json(path, config)
    return module


class ServerKitBuilder(Builder):
    """NVFlare provisioning builder for the server kit: job store and snapshots in the kit's workspace, and the
    components of this module. List it after ``StaticFileBuilder`` in ``project.yml`` (``builders:``), with this
    folder on the provisioning path (``nvflare provision -p federated/project.yml -c federated``).

    Args:
        lost_site_after: seconds of silence after which a site is lost (:class:`LostSiteHandler`). Defaults to 60.
        resume_wait: seconds a job waits for its sites before it resumes after a server restart. Defaults to 60.
        server_workspace: absolute path where the server kit will run (its ``jobs-storage/`` and
            ``snapshot-storage/`` go there). Defaults to None: where provisioning writes the kit
            (``<workspace>/<project>/prod_NN/<server>``, WorkspaceBuilder's layout: nvflare/lighter/impl/workspace.py).
    """

    def __init__(
        self,
        lost_site_after: float = 60.0,
        resume_wait: float = 60.0,
        server_workspace: str | None = None,
    ) -> None:
        LostSiteHandler(lost_site_after)  # validates the arguments at provisioning, not at the server's start
        JobResumer(resume_wait)
        if server_workspace is not None and not os.path.isabs(server_workspace):
            raise ValueError(f"server_workspace must be an absolute path, got {server_workspace!r}.")
        self.lost_site_after = lost_site_after
        self.resume_wait = resume_wait
        self.server_workspace = server_workspace

    def build(self, project, ctx) -> None:
        server = project.get_server()
        workspace = self.server_workspace
        if workspace is None:
            prod = f"prod_{str(ctx[CtxKey.LAST_PROD_STAGE] + 1).zfill(2)}"
            workspace = os.path.join(os.path.abspath(ctx.get_workspace()), prod, server.name)
        install_in_server_kit(ctx.get_ws_dir(server), self.lost_site_after, self.resume_wait, workspace)


def site_privacy_policy(
    default_scope: str = "percentile",
    scopes: list[str] | tuple[str, ...] = ("percentile", "svt"),
    percentile: float = 10.0,
    gamma: float = 0.01,
    svt: dict[str, float] | None = None,
    report_paths: bool = False,
    report_case_ids: bool = False,
    case_id_pattern: str | None = None,
) -> dict[str, Any]:
    """A site's ``privacy.json``: one NVFlare scope per allowed model filter, each releasing results through
    ``ModelReleaseGuard``, the scope's model filter and ``SiteReportRedactor`` (fl_privacy.py).

    A job names its scope in its ``meta.json`` (``job.py --scope``); a job without one gets ``default_scope``; a job
    that names a scope the site does not list is refused at deployment (NVFlare's ``AppDeployer.deploy``:
    ``PrivacyService.is_scope_allowed``).

    Args:
        default_scope: the scope of a job that names none. Defaults to "percentile".
        scopes: the scopes this site accepts, of ``percentile`` and ``svt``. Defaults to both.
        percentile: ``ChangedPercentilePrivacy`` percent of changed elements zeroed. Defaults to 10.
        gamma: ``ChangedPercentilePrivacy`` per-step clipping bound. Defaults to 0.01.
        svt: ``CountingSVTPrivacy`` arguments (``fraction``, ``epsilon``, ``noise_var``, ``gamma``, ``tau``).
            Defaults to None (NVFlare's defaults).
        report_paths: let file system paths leave the site in its reports. Defaults to False.
        report_case_ids: let case ids leave the site in its reports. Defaults to False.
        case_id_pattern: regular expression of the site's case ids. Defaults to None.

    Returns:
        The policy as a JSON-ready dict.

    Raises:
        ValueError: for an unknown scope or a default scope that is not allowed.
    """
    unknown = sorted(set(scopes) - set(SCOPE_FILTERS))
    if unknown or not scopes or default_scope not in scopes:
        raise ValueError(
            f"scopes must be a non-empty subset of {sorted(SCOPE_FILTERS)} holding default_scope, got {list(scopes)} "
            f"and {default_scope!r}."
        )
    model_args = {"percentile": {"percentile": percentile, "gamma": gamma}, "svt": dict(svt or {})}
    redactor = {"report_paths": report_paths, "report_case_ids": report_case_ids, "case_id_pattern": case_id_pattern}
    return {
        "scopes": [
            {
                "name": name,
                "task_result_filters": [
                    {"path": f"{SITE_POLICY_MODULE}.ModelReleaseGuard", "args": {}},
                    {"path": f"{SITE_POLICY_MODULE}.{SCOPE_FILTERS[name]}", "args": model_args[name]},
                    {"path": f"{SITE_POLICY_MODULE}.SiteReportRedactor", "args": redactor},
                ],
            }
            for name in scopes
        ],
        "default_scope": default_scope,
    }


def write_site_policy(site_dir: str | os.PathLike, policy: dict[str, Any], log_streaming: bool = False) -> Path:
    """Install a site policy in a site's startup kit: ``local/privacy.json``, ``fl_privacy.py`` as
    ``local/custom/lcadb_site_privacy.py``, and ``allow_log_streaming`` in its resources (NVFlare streams a site's
    ``error_log.txt`` to the server unless it is false: nvflare/app_common/logging/constants.py
    ``is_log_streaming_allowed``).

    Args:
        site_dir: the site's startup kit folder.
        policy: the ``privacy.json`` content (:func:`site_privacy_policy`).
        log_streaming: allow the site's logs to be streamed to the server. Defaults to False.

    Returns:
        The ``privacy.json`` written.

    Raises:
        FileNotFoundError: when ``site_dir`` is not a startup kit.
    """
    files = _resource_files(site_dir)
    _copy_module(
        Path(__file__).with_name("fl_privacy.py"), Path(site_dir) / "local" / "custom" / f"{SITE_POLICY_MODULE}.py"
    )
    privacy = Path(site_dir) / "local" / "privacy.json"
    _atomic_json(privacy, policy)
    for path in files:
        config = json.loads(path.read_text())
        config["allow_log_streaming"] = bool(log_streaming)
        _atomic_json(path, config)
    return privacy


class SitePrivacyBuilder(Builder):
    """NVFlare provisioning builder for every site kit: its privacy policy (:func:`site_privacy_policy`), the same for
    all sites unless a participant sets its own in ``project.yml`` with a ``lcadb_privacy`` property (a dict of the
    same arguments, merged over these). List it after ``StaticFileBuilder``.

    Args:
        policy: arguments of :func:`site_privacy_policy`.
    """

    def __init__(self, **policy: Any) -> None:
        site_privacy_policy(**policy)  # validates the arguments at provisioning
        self.policy = policy

    def build(self, project, ctx) -> None:
        for site in project.get_clients():
            arguments = {**self.policy, **(site.get_prop("lcadb_privacy") or {})}
            policy = site_privacy_policy(**arguments)
            streaming = bool(arguments.get("report_paths")) and bool(arguments.get("report_case_ids"))
            write_site_policy(ctx.get_ws_dir(site), policy, log_streaming=streaming)
