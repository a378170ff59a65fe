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
"""Server side of the LCA-DB NVFlare job: the FedAvg controller, the bundle-checkpoint persistor and the recipe.

NVFlare copies this module into the server app's ``custom/`` folder when the job is exported (the controller and the
persistor are classes outside the ``nvflare`` package), so it must only import NVFlare, torch and the standard library.
Written for NVFlare 2.9 (the recipe API changed in 2.7).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_snapshot import RunSnapshot
from nvflare.apis.job_def import JobMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import ModelLearnable
from nvflare.app_common.app_constant import AlgorithmConstants, DefaultCheckpointFileName
from nvflare.app_common.utils.fedprox_utils import normalize_fedprox_mu
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

__all__ = [
    "SITE_ERROR_KEY",
    "SNAPSHOT_COMPONENT",
    "SUMMARY_FILE",
    "BundleCheckpointPersistor",
    "LiveSitesCrossSiteModelEval",
    "ResilientFedAvg",
    "LCADBFedAvgRecipe",
    "failed_sites_of_job",
    "fedopt_sgd_step",
    "weights_digest",
]

#: Meta key of a training result that carries a site's error report instead of weights (set by client.py).
SITE_ERROR_KEY = "lcadb_site_error"
#: Component id of :class:`ResilientFedAvg`'s state in the server's snapshot storage (one ``RunSnapshot`` per job).
SNAPSHOT_COMPONENT = "lcadb_resilient_fedavg"
#: File in the server app folder (downloaded with the job result) naming the rounds done and the sites left out.
SUMMARY_FILE = "lcadb_job_summary.json"
#: State-dict suffixes of BatchNorm running statistics: averaged by FedOpt, not treated as gradients.
_STATISTICS_SUFFIXES = ("running_mean", "running_var")
#: Sites that failed during training, per job id: the training controller and the evaluation controller that
#: follows it run in the same server job process.
_FAILED_SITES: dict[str, dict[str, str]] = {}


def failed_sites_of_job(job_id: str) -> dict[str, str]:
    """``{site: reason}`` of the sites :class:`ResilientFedAvg` left out during the job ``job_id``."""
    return dict(_FAILED_SITES.get(job_id, {}))


def weights_digest(weights: dict[str, Any]) -> str:
    """A short fingerprint of a model's floating-point weights (sha256 over the sorted keys and float32 values).

    The same for the server's global model (numpy arrays) and for the bundle checkpoint it writes (tensors), so a log
    line can say which model a job resumed from and anyone can check it against a saved ``model.pt``.
    """
    digest = hashlib.sha256()
    for key in sorted(weights):
        array = _to_numpy(weights[key])
        if np.issubdtype(array.dtype, np.floating):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def fedopt_sgd_step(update: dict[str, Any], velocity: dict[str, Any], lr: float, momentum: float) -> dict[str, Any]:
    """The server step of FedOpt with SGD: what ``torch.optim.SGD(lr, momentum)`` does to the global weights when the
    averaged site update is taken as the negative gradient (as NVFlare's ``FedOpt.optimizer_update``).

    Args:
        update: averaged weight difference per key (arrays or tensors).
        velocity: momentum buffers per key, updated in place (empty before the first round).
        lr: server learning rate.
        momentum: server momentum.

    Returns:
        The difference to add to the global weights; BatchNorm running statistics pass unchanged.
    """
    steps = {}
    for key, diff in update.items():
        if key.endswith(_STATISTICS_SUFFIXES):
            steps[key] = diff
            continue
        buffer = velocity.get(key)
        velocity[key] = diff if buffer is None else momentum * buffer + diff
        steps[key] = lr * velocity[key]
    return steps


class BundleCheckpointPersistor(PTFileModelPersistor):
    """``PTFileModelPersistor`` that starts from a bundle checkpoint and writes the global model as one.

    NVFlare saves ``{"model": state_dict, "meta_props": ..., "train_conf": ...}`` in ``FL_global_model.pt``. Beside it,
    after every round, this persistor writes ``<bundle_ckpt_dir>/<bundle_ckpt_name>`` (default ``models/model.pt``
    in the server app folder): the plain network ``state_dict`` with the dtypes of the initial model, exactly what
    the bundle's own training saves, so ``python -m monai.bundle ckpt_export --ckpt_file ...`` and the deploy app load
    it unchanged. Next to it, ``<bundle_ckpt_name stem>_config.json`` holds the bundle overrides the job trained with
    (``network_config``), a config file the bundle merges with ``--config_file``, so evaluating or exporting the model
    needs no remembered overrides. Both are written to a temporary name and renamed, so they are never half-written.

    Every argument is an explicit constructor parameter stored under its own name: NVFlare's job serializer writes
    exactly those into ``config_fed_server.json`` (arguments hidden in ``**kwargs`` are silently dropped).

    Args:
        model: the network, a ``torch.nn.Module`` or ``{"path": "scripts.network.LCADB", "args": {...}}``.
        source_ckpt_file_full_name: checkpoint to start from: a plain ``state_dict`` (bundle ``model.pt``), a dict
            with a ``"model"`` entry (NVFlare ``FL_global_model.pt``, bundle ``checkpoint.pt``). Absolute, or relative
            to the server app's ``custom/`` folder (where ``job.py`` ships it). None starts from the network's own
            initialisation. Defaults to None.
        bundle_ckpt_dir: folder, relative to the server app folder, of the bundle checkpoint. Defaults to "models".
        bundle_ckpt_name: file name of the bundle checkpoint. Defaults to "model.pt".
        network_config: bundle overrides (``{"id": value}``) the network was built with, written beside the bundle
            checkpoint. Defaults to None (nothing written).
        global_model_file_name: NVFlare's global model file. Defaults to "FL_global_model.pt".
        best_global_model_file_name: NVFlare's best global model file. Defaults to "best_FL_global_model.pt".
        load_weights_only: load checkpoints with ``torch.load(weights_only=True)``. Defaults to True.

    Raises:
        ValueError: for a bundle checkpoint path outside the app folder.
    """

    def __init__(
        self,
        model: torch.nn.Module | dict[str, Any] | None = None,
        source_ckpt_file_full_name: str | None = None,
        bundle_ckpt_dir: str = "models",
        bundle_ckpt_name: str = "model.pt",
        network_config: dict[str, Any] | None = None,
        global_model_file_name: str = DefaultCheckpointFileName.GLOBAL_MODEL,
        best_global_model_file_name: str = DefaultCheckpointFileName.BEST_GLOBAL_MODEL,
        load_weights_only: bool = True,
    ) -> None:
        if os.path.isabs(bundle_ckpt_dir) or ".." in bundle_ckpt_dir.split(os.sep):
            raise ValueError(f"bundle_ckpt_dir must be a relative folder inside the app, got {bundle_ckpt_dir!r}.")
        if not bundle_ckpt_name or os.sep in bundle_ckpt_name:
            raise ValueError(f"bundle_ckpt_name must be a plain file name, got {bundle_ckpt_name!r}.")
        super().__init__(
            model=model,
            global_model_file_name=global_model_file_name,
            best_global_model_file_name=best_global_model_file_name,
            source_ckpt_file_full_name=source_ckpt_file_full_name,
            load_weights_only=load_weights_only,
        )
        self.bundle_ckpt_dir = bundle_ckpt_dir
        self.bundle_ckpt_name = bundle_ckpt_name
        self.network_config = dict(network_config) if network_config else None

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        learnable = super().load_model(fl_ctx)
        if learnable is None or not self.source_ckpt_file_full_name or not isinstance(self.model, torch.nn.Module):
            return learnable
        # a checkpoint of another network configuration must stop the job here, not at every site in round 0
        loaded = self.persistence_manager.var_dict
        expected = self.model.state_dict()
        missing = [k for k in expected if k not in loaded and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in loaded if k not in expected]
        wrong = [
            f"{k}: {tuple(torch.as_tensor(loaded[k]).shape)} vs {tuple(expected[k].shape)}"
            for k in expected
            if k in loaded and tuple(torch.as_tensor(loaded[k]).shape) != tuple(expected[k].shape)
        ]
        if missing or unexpected or wrong:
            self.system_panic(
                reason=(
                    f"Initial checkpoint {self.source_ckpt_file_full_name} does not fit the job's network "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]}, shape checkpoint vs network {wrong[:3]}); "
                    "pass the bundle configs/overrides it was trained with (its *_config.json)."
                ),
                fl_ctx=fl_ctx,
            )
            return None
        self.log_info(fl_ctx, f"Global model starts from {self.source_ckpt_file_full_name} ({len(loaded)} tensors)")
        return learnable

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext) -> None:
        super().save_model(ml, fl_ctx)
        path = os.path.join(self.log_dir, self.bundle_ckpt_dir, self.bundle_ckpt_name)
        self.write_bundle_checkpoint(path)
        self.log_info(fl_ctx, f"Global model saved as a bundle checkpoint: {path}")

    def bundle_config_path(self, ckpt_path: str) -> str:
        """The network-settings file written beside the bundle checkpoint ``ckpt_path``."""
        return os.path.splitext(ckpt_path)[0] + "_config.json"

    def write_bundle_checkpoint(self, path: str) -> None:
        """Write the current global weights as a plain ``state_dict`` (tensors, initial dtypes) to ``path``,
        and the network settings (``network_config``) beside it."""
        weights = self.persistence_manager.to_persistence_dict()["model"]
        reference = self.model.state_dict() if isinstance(self.model, torch.nn.Module) else {}
        state_dict = OrderedDict()
        for key, value in weights.items():
            tensor = torch.as_tensor(value).detach().cpu()
            if key in reference:
                tensor = tensor.to(reference[key].dtype)
            state_dict[key] = tensor
        _atomic_write(path, lambda tmp: torch.save(state_dict, tmp))
        if self.network_config is not None:
            text = json.dumps(self.network_config, indent=2, sort_keys=True) + "\n"
            _atomic_write(self.bundle_config_path(path), lambda tmp: Path(tmp).write_text(text))


def _to_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)


def _atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it to ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


class ResilientFedAvg(FedAvg):
    """FedAvg that trains on every connected site each round and keeps going while ``min_clients`` sites succeed.

    NVFlare's own ``FedAvg`` samples ``num_clients`` sites at random per round and stops the job when one of them
    fails and fewer than ``num_clients`` results can still arrive. Hospitals want the opposite: every available site
    trains every round, and a lost or misconfigured site does not stop the others. This controller therefore

    - sends each round's task to all connected sites that have not failed before;
    - ends a round once every site has answered, or ``wait_time_after_min_received`` seconds after the first
      ``min_clients`` answers, or after ``round_timeout`` seconds (so a hung site cannot block the job), or when
      NVFlare deems every site still awaited disconnected (its job reported dead, e.g. a restarted client, see
      fl_kits.py), and drops every site that did not answer, naming it and the limit or the disconnection;
    - logs a site's error report (``meta[SITE_ERROR_KEY]``, sent by client.py, e.g. missing data, naming the site
      and the path) or its NVFlare error code, drops that site from later rounds, and aggregates the others;
    - stops the job with a clear error when fewer than ``min_clients`` sites delivered a model in a round;
    - after every round, writes its state (round, global model, FedOpt/SCAFFOLD state, sites left out) as a
      ``RunSnapshot`` to the server's snapshot storage (``snapshot_persistor`` in the server kit's resources), so a
      server restarted after a crash resumes the job at the next round (``fl_kits.JobResumer``); and writes
      :data:`SUMMARY_FILE` (rounds done, sites per round, sites left out and why) into the server app folder.

    NVFlare 2.9 itself no longer snapshots a job: ``ServerEngine.persist_components`` is a no-op since HA was removed
    (NVFlare PR #4503, nvflare/private/fed/server/server_engine.py) and nothing calls
    ``JobRunner.restore_running_job``; so this controller writes its own snapshot through the same storage API.

    Args:
        min_clients: fewest successful site results a round needs. Defaults to 1.
        wait_time_after_min_received: seconds to wait for the remaining sites once ``min_clients`` answered.
            Defaults to 600.
        round_timeout: seconds a round may last in all (0: no limit). Defaults to 0.
        server_lr: FedOpt server learning rate (1 with momentum 0 is FedAvg). Defaults to 1.0.
        server_momentum: FedOpt server SGD momentum in [0, 1). Defaults to 0.0.
        scaffold: SCAFFOLD: send global control variates with each task and update them from the sites' control
            differences (``client.py --scaffold``, NVFlare's ``PTScaffoldHelper`` at the site). Defaults to False.
        args: positional arguments of ``FedAvg``.
        kwargs: keyword arguments of ``FedAvg`` (``num_rounds``, ``persistor_id``, ``fedprox_mu``, ...).
    """

    def __init__(
        self,
        *args: Any,
        min_clients: int = 1,
        wait_time_after_min_received: int = 600,
        round_timeout: int = 0,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        scaffold: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if server_lr <= 0 or not 0 <= server_momentum < 1:
            raise ValueError(
                f"server_lr must be > 0 and server_momentum in [0, 1), got {server_lr}, {server_momentum}."
            )
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self._velocity: dict[str, Any] = {}
        self.scaffold = scaffold
        self._global_controls: dict[str, Any] = {}
        self._control_sum: dict[str, Any] = {}
        self._control_count = 0
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}.")
        if wait_time_after_min_received < 0 or round_timeout < 0:
            raise ValueError(
                f"wait_time_after_min_received and round_timeout must be >= 0, got {wait_time_after_min_received} "
                f"and {round_timeout}."
            )
        self.min_clients = min_clients
        self.wait_time_after_min_received = wait_time_after_min_received
        self.round_timeout = round_timeout
        self.failed_sites: dict[str, str] = {}
        self._failed_round: dict[str, int] = {}
        self._round_targets: list[str] = []
        self._round_answered: set[str] = set()
        self._round_delivered: list[str] = []
        self._rounds: list[dict[str, Any]] = []
        self._resumed: list[dict[str, Any]] = []
        self._resume_state: dict[str, Any] | None = None

    def run(self) -> None:
        """FedAvg's rounds, resumed after the last snapshotted round when the job has a snapshot (the server kit's
        ``JobResumer`` requeued it after a crash and deletes the snapshot when the job ends: fl_kits.py)."""
        self._resume_state = self._read_snapshot()
        if self._resume_state:
            self.start_round = self._resume_state["round"] + 1
            self.num_rounds = max(0, self._resume_state["num_rounds"] - self.start_round)
        super().run()
        if not self.abort_signal.triggered:
            self._write_summary(finished=True)

    def load_model(self) -> FLModel:
        """The initial model from the persistor, or on resume the snapshot's global model (persisted at once, so the
        job's checkpoint files hold it even when no round is left)."""
        model = super().load_model()
        state = self._resume_state
        if not state or model is None:
            return model
        model.params = dict(state["params"])
        self._velocity = dict(state.get("velocity") or {})
        self._global_controls = dict(state.get("global_controls") or {})
        self._rounds = list(state.get("rounds") or [])
        resumed = {"at_round": self.start_round, "snapshot_round": state["round"], "snapshot_of": state["job_id"]}
        self._resumed = [*state.get("resumed", []), resumed]
        for site, info in (state.get("left_out") or {}).items():
            self.failed_sites[site] = info["reason"]
            self._failed_round[site] = info["round"]
            _FAILED_SITES.setdefault(self.fl_ctx.get_job_id(), {})[site] = info["reason"]
        self.warning(
            f"Job {self.fl_ctx.get_job_id()} resumes at round {self.start_round} of {state['num_rounds']} from the "
            f"snapshot of job {state['job_id']} after round {state['round']} (global model digest "
            f"{weights_digest(model.params)}; sites left out before: {sorted(self.failed_sites) or 'none'})"
        )
        super().save_model(model)
        return model

    def save_model(self, model: FLModel) -> None:
        """Persist the global model (NVFlare's persistor), then snapshot the job and update the summary."""
        super().save_model(model)
        self._rounds.append({"round": self.current_round, "sites": sorted(self._round_delivered)})
        self._write_snapshot(model)
        self._write_summary(finished=False)

    def _snapshot_persistor(self):
        """The server kit's snapshot persistor (``snapshot_persistor`` in its resources), or None (simulator)."""
        return getattr(self.engine, "snapshot_persistor", None)

    def _read_snapshot(self) -> dict[str, Any] | None:
        """This job's snapshot or, for a job cloned from another (``fl_kits.JobResumer`` after a server crash, or
        ``nvflare job clone``), that job's snapshot; None for a fresh start."""
        persistor = self._snapshot_persistor()
        if persistor is None:
            return None
        meta = self.fl_ctx.get_prop(FLContextKey.JOB_META) or {}
        for job_id in (self.fl_ctx.get_job_id(), meta.get(JobMetaKey.CLONED_FROM.value)):
            try:
                snapshot = persistor.retrieve_run(job_id) if job_id else None
            except Exception:  # noqa: BLE001 - StorageException when that job has none
                continue
            state = snapshot.get_component_snapshot(SNAPSHOT_COMPONENT) if snapshot is not None else None
            if state:
                return {**state, "job_id": job_id}
        return None

    def _write_snapshot(self, model: FLModel) -> None:
        persistor = self._snapshot_persistor()
        if persistor is None:
            return
        snapshot = RunSnapshot(self.fl_ctx.get_job_id())
        snapshot.set_component_snapshot(
            SNAPSHOT_COMPONENT,
            {
                "round": self.current_round,
                "num_rounds": self.start_round + self.num_rounds,
                "params": {k: _to_numpy(v) for k, v in model.params.items()},
                "velocity": {k: _to_numpy(v) for k, v in self._velocity.items()},
                "global_controls": {k: _to_numpy(v) for k, v in self._global_controls.items()},
                "left_out": self._left_out(),
                "rounds": self._rounds,
                "resumed": self._resumed,
            },
        )
        persistor.save(snapshot)
        self.info(f"Round {self.current_round}: job snapshot saved (the job resumes from here after a server restart)")

    def _left_out(self) -> dict[str, dict[str, Any]]:
        return {site: {"round": self._failed_round[site], "reason": r} for site, r in self.failed_sites.items()}

    def _write_summary(self, finished: bool) -> None:
        app_root = self.fl_ctx.get_prop(FLContextKey.APP_ROOT)
        if not app_root:
            return
        summary = {
            "job_id": self.fl_ctx.get_job_id(),
            "num_rounds": self.start_round + self.num_rounds,
            "rounds_finished": finished,
            "rounds": self._rounds,
            "left_out": self._left_out(),
            "resumed": self._resumed,
        }
        text = json.dumps(summary, indent=2) + "\n"
        _atomic_write(os.path.join(app_root, SUMMARY_FILE), lambda tmp: Path(tmp).write_text(text))

    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        connected = [client.name for client in self.engine.get_clients()]
        clients = sorted(name for name in connected if name not in self.failed_sites)
        if len(clients) < self.min_clients:
            raise RuntimeError(
                f"Only {len(clients)} usable site(s) {clients} (connected: {sorted(connected)}, failed: "
                f"{self.failed_sites}), fewer than min_clients={self.min_clients}."
            )
        self.info(f"Round {self.current_round}: training on sites {clients}")
        self._round_targets, self._round_answered, self._round_delivered = list(clients), set(), []
        self._control_sum, self._control_count = {}, 0
        return clients

    def send_model(
        self,
        task_name: str = "train",
        data: FLModel | None = None,
        targets=None,
        min_responses=None,
        timeout: int = 0,
        callback=None,
    ) -> None:
        if self.scaffold and data is not None and self._global_controls:
            data.meta = {**(data.meta or {}), AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL: self._global_controls}
        self.broadcast_model(
            task_name=task_name,
            data=data,
            targets=targets,
            min_responses=min(self.min_clients, len(targets)) if targets else self.min_clients,
            timeout=timeout or self.round_timeout,
            wait_time_after_min_received=self.wait_time_after_min_received,
            blocking=False,
            callback=callback,
        )

    def _accept_train_result(self, client_name: str, result, fl_ctx: FLContext, is_unknown_task: bool = False) -> bool:
        accepted = super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task=is_unknown_task)
        if not is_unknown_task:
            self._round_answered.add(client_name)
        if not accepted and not is_unknown_task:
            self._mark_failed(
                client_name,
                f"NVFlare return code {result.get_return_code()} (its training process failed, was killed or lost; "
                "see the site's log)",
            )
        return accepted

    def _aggregate_one_result(self, result: FLModel) -> bool:
        meta = result.meta or {}
        error = meta.get(SITE_ERROR_KEY)
        if error:
            self._mark_failed(meta.get("client_name", "unknown site"), str(error))
            return False
        site = meta.get("client_name", "unknown site")
        if self.scaffold:
            controls = meta.get(AlgorithmConstants.SCAFFOLD_CTRL_DIFF)
            if not controls:
                self._mark_failed(site, "SCAFFOLD job, but no control variates sent")
                return False
            accepted = super()._aggregate_one_result(result)
            if accepted:
                for key, value in controls.items():
                    self._control_sum[key] = value + self._control_sum[key] if key in self._control_sum else value
                self._control_count += 1
        else:
            accepted = super()._aggregate_one_result(result)
        if accepted:
            self._round_delivered.append(site)
        return accepted

    def _get_aggregated_result(self) -> FLModel:
        disconnect_time = getattr(self.communicator, "get_client_disconnect_time", lambda site: None)
        for site in self._round_targets:
            if site in self._round_answered:
                continue
            if disconnect_time(site):
                # NVFlare ends a task early once every site it still waits for is deemed disconnected: a dead-job
                # report (a lost site, a restarted client: fl_kits.py) plus its dead-client grace period
                self._mark_failed(site, "no result; NVFlare deemed it disconnected (its job was reported dead)")
                continue
            limit = (
                f"round_timeout={self.round_timeout} s"
                if self.round_timeout
                else f"wait_time_after_min_received={self.wait_time_after_min_received} s after min_clients"
            )
            self._mark_failed(site, f"no result within the round ({limit}): hung, disconnected or restarted")
        if self._received_count < self.min_clients:
            raise RuntimeError(
                f"Round {self.current_round}: only {self._received_count} site(s) delivered a model, fewer than "
                f"min_clients={self.min_clients}. Failed sites: {self.failed_sites or 'none'}."
            )
        return super()._get_aggregated_result()

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        """FedAvg, or with ``server_lr != 1`` / ``server_momentum > 0`` FedOpt with server SGD (Reddi et al., ICLR
        2021; NVFlare's ``FedOpt`` default optimiser): the averaged update ``d`` is the negative gradient,
        ``v = momentum * v + d``, ``w = w + server_lr * v``. BatchNorm statistics are averaged, never accelerated."""
        if self.scaffold and self._control_count:
            # SCAFFOLD (Karimireddy et al., ICML 2020), every live site participating: c += mean_i(delta c_i)
            for key, total in self._control_sum.items():
                mean = total / self._control_count
                self._global_controls[key] = self._global_controls[key] + mean if key in self._global_controls else mean
            self.info(
                f"Round {self.current_round}: SCAFFOLD global controls updated from {self._control_count} site(s)"
            )
        if (self.server_lr != 1.0 or self.server_momentum > 0.0) and aggr_result.params_type == ParamsType.DIFF:
            aggr_result.params = fedopt_sgd_step(
                aggr_result.params, self._velocity, self.server_lr, self.server_momentum
            )
            self.info(
                f"Round {self.current_round}: FedOpt server update (SGD lr {self.server_lr}, momentum "
                f"{self.server_momentum}) of {len(self._velocity)} parameters"
            )
        return super().update_model(model, aggr_result)

    def _mark_failed(self, site: str, reason: str) -> None:
        if site not in self.failed_sites:
            self.failed_sites[site] = reason
            self._failed_round[site] = self.current_round
            _FAILED_SITES.setdefault(self.fl_ctx.get_job_id(), {})[site] = reason
            self.error(
                f"Site {site} failed in round {self.current_round} and is left out of later rounds: {reason}. "
                f"The job goes on while at least min_clients={self.min_clients} sites deliver."
            )


class LiveSitesCrossSiteModelEval(CrossSiteModelEval):
    """NVFlare's ``CrossSiteModelEval`` that evaluates only on sites that are connected and did not fail in training.

    A site that crashed, hung or restarted during training (see :class:`ResilientFedAvg`) would otherwise get the
    evaluation task and hold the job until ``validation_timeout``. Same arguments as ``CrossSiteModelEval``.
    """

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        failed = failed_sites_of_job(fl_ctx.get_job_id())
        if failed:
            self._participating_clients = [c for c in self._participating_clients if c not in failed]
            self.log_warning(
                fl_ctx,
                f"Evaluating on {self._participating_clients} only; left out (failed during training): {failed}",
            )
        if not self._participating_clients:
            self.system_panic("no live site left for the final evaluation", fl_ctx)


class LCADBFedAvgRecipe(FedAvgRecipe):
    """NVFlare's PyTorch ``FedAvgRecipe`` with the :class:`ResilientFedAvg` controller and optional FedProx.

    Args:
        fedprox_mu: FedProx proximal coefficient sent to the sites with every training task (NVFlare's
            ``fedprox_mu`` metadata, as ``FedProxRecipe`` does); 0 disables FedProx. Defaults to 0.
        wait_time_after_min_received: see :class:`ResilientFedAvg`. Defaults to 600.
        round_timeout: see :class:`ResilientFedAvg`. Defaults to 0 (no limit).
        server_lr: FedOpt server learning rate, see :class:`ResilientFedAvg`. Defaults to 1.0.
        server_momentum: FedOpt server momentum, see :class:`ResilientFedAvg`. Defaults to 0.0.
        scaffold: SCAFFOLD, see :class:`ResilientFedAvg`. Defaults to False.
        kwargs: the ``FedAvgRecipe`` arguments (``name``, ``min_clients``, ``num_rounds``, ``train_script``, ...).
    """

    def __init__(
        self,
        *,
        fedprox_mu: float = 0.0,
        wait_time_after_min_received: int = 600,
        round_timeout: int = 0,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        scaffold: bool = False,
        **kwargs: Any,
    ) -> None:
        # FedAvgRecipe builds the controller inside its __init__, so these must be set first.
        self.fedprox_mu = normalize_fedprox_mu(fedprox_mu)
        self.wait_time_after_min_received = wait_time_after_min_received
        self.round_timeout = round_timeout
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.scaffold = scaffold
        super().__init__(**kwargs)

    def add_site_evaluation(self, full: bool, validation_timeout: int = 600, submit_model_timeout: int = 600) -> None:
        """Evaluate the final global model (and with ``full`` every site's local model) on every live site's
        validation fold, with :class:`LiveSitesCrossSiteModelEval` (as NVFlare's ``add_final_global_evaluation`` /
        ``add_cross_site_evaluation`` set it up, but skipping sites that failed during training)."""
        from nvflare.app_common.widgets.validation_json_generator import ValidationJsonGenerator
        from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator

        persistor_id = self._job.comp_ids.get("persistor_id", "")
        if not persistor_id:
            raise ValueError("site evaluation needs the job's model persistor; none was registered")
        locator_id = self._job.to_server(PTFileModelLocator(pt_persistor_id=persistor_id), id="model_locator")
        self._job.to_server(ValidationJsonGenerator())
        self._job.to_server(
            LiveSitesCrossSiteModelEval(
                model_locator_id=locator_id,
                submit_model_task_name="submit_model" if full else "",
                submit_model_timeout=submit_model_timeout,
                validation_timeout=validation_timeout,
            )
        )

    def _create_controller(self, persistor_id: str, model_params, model_aggregator) -> ResilientFedAvg:
        return ResilientFedAvg(
            num_clients=self.min_clients,
            num_rounds=self.num_rounds,
            persistor_id=persistor_id,
            model=model_params,
            save_filename=self.save_filename,
            aggregator=model_aggregator,
            stop_cond=self.stop_cond,
            patience=self.patience,
            task_name="train",
            exclude_vars=self.exclude_vars,
            aggregation_weights=self.aggregation_weights,
            memory_gc_rounds=self.server_memory_gc_rounds,
            enable_tensor_disk_offload=self.enable_tensor_disk_offload,
            fedprox_mu=self.fedprox_mu,
            min_clients=self.min_clients,
            wait_time_after_min_received=self.wait_time_after_min_received,
            round_timeout=self.round_timeout,
            server_lr=self.server_lr,
            server_momentum=self.server_momentum,
            scaffold=self.scaffold,
        )
