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

import json
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import ModelLearnable
from nvflare.app_common.app_constant import DefaultCheckpointFileName
from nvflare.app_common.utils.fedprox_utils import normalize_fedprox_mu
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

__all__ = ["SITE_ERROR_KEY", "BundleCheckpointPersistor", "ResilientFedAvg", "LCADBFedAvgRecipe"]

#: Meta key of a training result that carries a site's error report instead of weights (set by client.py).
SITE_ERROR_KEY = "lcadb_site_error"


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
      ``min_clients`` answers (so a hung site cannot block the job);
    - logs a site's error report (``meta[SITE_ERROR_KEY]``, sent by client.py, e.g. missing data, naming the site
      and the path) or its NVFlare error code, drops that site from later rounds, and aggregates the others;
    - stops the job with a clear error when fewer than ``min_clients`` sites delivered a model in a round.

    Args:
        min_clients: fewest successful site results a round needs. Defaults to 1.
        wait_time_after_min_received: seconds to wait for the remaining sites once ``min_clients`` answered.
            Defaults to 3600.
        args: positional arguments of ``FedAvg``.
        kwargs: keyword arguments of ``FedAvg`` (``num_rounds``, ``persistor_id``, ``fedprox_mu``, ...).
    """

    def __init__(self, *args: Any, min_clients: int = 1, wait_time_after_min_received: int = 3600, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}.")
        if wait_time_after_min_received < 0:
            raise ValueError(f"wait_time_after_min_received must be >= 0, got {wait_time_after_min_received}.")
        self.min_clients = min_clients
        self.wait_time_after_min_received = wait_time_after_min_received
        self.failed_sites: dict[str, str] = {}

    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        connected = [client.name for client in self.engine.get_clients()]
        clients = sorted(name for name in connected if name not in self.failed_sites)
        if len(clients) < self.min_clients:
            raise RuntimeError(
                f"Only {len(clients)} usable site(s) {clients} (connected: {sorted(connected)}, failed: "
                f"{self.failed_sites}), fewer than min_clients={self.min_clients}."
            )
        self.info(f"Round {self.current_round}: training on sites {clients}")
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
        self.broadcast_model(
            task_name=task_name,
            data=data,
            targets=targets,
            min_responses=min(self.min_clients, len(targets)) if targets else self.min_clients,
            timeout=timeout,
            wait_time_after_min_received=self.wait_time_after_min_received,
            blocking=False,
            callback=callback,
        )

    def _accept_train_result(self, client_name: str, result, fl_ctx: FLContext, is_unknown_task: bool = False) -> bool:
        accepted = super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task=is_unknown_task)
        if not accepted and not is_unknown_task:
            self._mark_failed(client_name, f"NVFlare return code {result.get_return_code()}")
        return accepted

    def _aggregate_one_result(self, result: FLModel) -> bool:
        meta = result.meta or {}
        error = meta.get(SITE_ERROR_KEY)
        if error:
            self._mark_failed(meta.get("client_name", "unknown site"), str(error))
            return False
        return super()._aggregate_one_result(result)

    def _get_aggregated_result(self) -> FLModel:
        if self._received_count < self.min_clients:
            raise RuntimeError(
                f"Round {self.current_round}: only {self._received_count} site(s) delivered a model, fewer than "
                f"min_clients={self.min_clients}. Failed sites: {self.failed_sites or 'none'}."
            )
        return super()._get_aggregated_result()

    def _mark_failed(self, site: str, reason: str) -> None:
        if site not in self.failed_sites:
            self.failed_sites[site] = reason
            self.error(
                f"Site {site} failed in round {self.current_round} and is left out of later rounds: {reason}. "
                f"The job goes on while at least min_clients={self.min_clients} sites deliver."
            )


class LCADBFedAvgRecipe(FedAvgRecipe):
    """NVFlare's PyTorch ``FedAvgRecipe`` with the :class:`ResilientFedAvg` controller and optional FedProx.

    Args:
        fedprox_mu: FedProx proximal coefficient sent to the sites with every training task (NVFlare's
            ``fedprox_mu`` metadata, as ``FedProxRecipe`` does); 0 disables FedProx. Defaults to 0.
        wait_time_after_min_received: see :class:`ResilientFedAvg`. Defaults to 3600.
        kwargs: the ``FedAvgRecipe`` arguments (``name``, ``min_clients``, ``num_rounds``, ``train_script``, ...).
    """

    def __init__(self, *, fedprox_mu: float = 0.0, wait_time_after_min_received: int = 3600, **kwargs: Any) -> None:
        # FedAvgRecipe builds the controller inside its __init__, so these must be set first.
        self.fedprox_mu = normalize_fedprox_mu(fedprox_mu)
        self.wait_time_after_min_received = wait_time_after_min_received
        super().__init__(**kwargs)

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
        )
