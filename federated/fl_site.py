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
"""What one hospital site does in a federated round, with no NVFlare in the loop.

The site runs the bundle's own training workflow (``monai.bundle.ConfigWorkflow`` on ``configs/train.json``: its
``train#trainer``, loss, optimiser, augmentation and ``validate#evaluator``) on its local datalist. There is no second
training loop here: this module only loads the global weights into the workflow's network before a round, runs the
trainer for ``local_epochs`` more epochs, and returns the weight difference. ``client.py`` wraps it with the NVFlare
Client API; ``compare.py`` uses :func:`run_site` for the "each site alone" baseline.

FedBN keeps every BatchNorm parameter and running statistic local (never sent, never overwritten). FedProx adds
``mu / 2 * ||w - w_global||^2`` to the bundle's loss through an ignite handler (:class:`FedProxHandler`); the bundle is
not edited.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

__all__ = [
    "RoundResult",
    "FedProxHandler",
    "SiteTrainer",
    "batchnorm_keys",
    "check_site_data",
    "describe_error",
    "exchanged_keys",
    "parse_overrides",
    "run_site",
    "save_state_dict",
]

logger = logging.getLogger(__name__)

#: Buffers that count batches rather than hold weights: never exchanged (averaging a counter means nothing).
_COUNTER_SUFFIXES = ("num_batches_tracked",)


def check_site_data(site_name: str, data_root: str | os.PathLike | None) -> Path:
    """Check that a site's dataset is there before anything is built, and name the site and the path if not.

    Args:
        site_name: the site, as NVFlare names it.
        data_root: the site's dataset root (``<root>/datalist.json`` and ``<root>/images/...``).

    Returns:
        The datalist path.

    Raises:
        FileNotFoundError: when the folder or its ``datalist.json`` is missing.
        ValueError: when no root is configured, or the datalist is not JSON or has no ``training`` cases.
    """
    if data_root is None or str(data_root).strip() == "":
        raise ValueError(
            f"Site '{site_name}': no dataset configured. Pass --data_root in the job's per-site config "
            "or set LCADB_DATA_ROOT in the site's environment."
        )
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"Site '{site_name}': dataset folder does not exist: {root}")
    datalist = root / "datalist.json"
    if not datalist.is_file():
        raise FileNotFoundError(f"Site '{site_name}': dataset folder {root} has no datalist: {datalist} is missing")
    try:
        content = json.loads(datalist.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Site '{site_name}': cannot read the datalist {datalist}: {e}") from e
    training = content.get("training") if isinstance(content, dict) else None
    if not training:
        raise ValueError(f"Site '{site_name}': the datalist {datalist} has no 'training' cases.")
    return datalist


def describe_error(site_name: str, error: BaseException) -> str:
    """One line for the coordinator: the site, and the innermost error of the chain with its type.

    MONAI wraps a component's error ("Failed to instantiate component 'scripts.training.load_datalist' ...");
    the reason that names the case (a bad label, a missing file) is the innermost cause, so that one is reported,
    together with the outermost message when it differs.
    """
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    root, prefix = chain[-1], f"Site '{site_name}'"
    message = str(root).strip()
    reason = message if message.startswith(prefix) else f"{prefix}: {type(root).__name__}: {message}"
    outer = str(chain[0]).strip().splitlines()[0] if str(chain[0]).strip() else type(chain[0]).__name__
    if len(chain) > 1 and outer not in reason:
        reason = f"{reason} (while: {outer})"
    return reason


def batchnorm_keys(network: torch.nn.Module) -> set[str]:
    """The ``state_dict`` keys of every BatchNorm layer: weight, bias, running mean/var and the batch counter."""
    keys = set()
    for name, module in network.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in module.state_dict())
    return keys


def exchanged_keys(network: torch.nn.Module, fedbn: bool = False) -> list[str]:
    """The ``state_dict`` keys a site receives from and sends to the server.

    Args:
        network: the site's network.
        fedbn: keep BatchNorm parameters and statistics local (FedBN, Li et al., ICLR 2021).

    Returns:
        Keys in ``state_dict`` order; batch counters are never exchanged.
    """
    local_only = batchnorm_keys(network) if fedbn else set()
    return [k for k in network.state_dict() if k not in local_only and not k.endswith(_COUNTER_SUFFIXES)]


def parse_overrides(pairs: Sequence[str] | None) -> dict[str, Any]:
    """Parse ``id=value`` bundle overrides (value as JSON when it parses, else the raw string).

    Example: ``["network_def#widen_factor=0.125", "roi_size=[64, 64, 8]"]``.

    Raises:
        ValueError: when a pair has no ``=`` or an empty id.
    """
    overrides: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bundle override must look like 'id=value', got {pair!r}.")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Save a plain ``state_dict`` (a bundle checkpoint) atomically: temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        torch.save(OrderedDict((k, v.detach().cpu()) for k, v in state_dict.items()), tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class FedProxHandler:
    """Adds the FedProx proximal term to the bundle trainer's loss, before ``backward``.

    Attached to ``IterationEvents.LOSS_COMPLETED`` of a MONAI ``SupervisedTrainer``, it adds
    ``mu / 2 * sum ||w - w_global||^2`` (NVFlare's ``PTFedProxLoss``) to ``engine.state.output["loss"]``, so the
    bundle's own loss (``LCADBLoss``) and optimiser stay untouched. ``mu = 0`` (the default) adds nothing.
    """

    def __init__(self) -> None:
        self.mu = 0.0
        self.reference: torch.nn.Module | None = None
        self._loss = None

    def attach(self, engine: SupervisedTrainer) -> None:
        if not isinstance(engine, SupervisedTrainer):
            raise TypeError(f"FedProxHandler needs a monai SupervisedTrainer, got {type(engine).__name__}.")
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def set_reference(self, network: torch.nn.Module, mu: float | None) -> None:
        """Snapshot the global model ``network`` holds now as the proximal anchor, with coefficient ``mu``."""
        mu = float(mu or 0.0)
        if mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}.")
        self.mu = mu
        if mu == 0.0:
            self.reference, self._loss = None, None
            return
        from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

        self.reference = copy.deepcopy(network).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self._loss = PTFedProxLoss(mu=mu)

    def __call__(self, engine: SupervisedTrainer) -> None:
        if self.reference is None or self._loss is None:
            return
        engine.state.output[CommonKeys.LOSS] = engine.state.output[CommonKeys.LOSS] + self._loss(
            engine.network, self.reference
        )


@dataclass
class RoundResult:
    """What a site sends back after a training round.

    Attributes:
        weight_diff: ``local - global`` for every exchanged key (tensors on CPU).
        metrics: the bundle evaluator's metrics of the received global model on the site's validation fold
            (``global_*``, computed before local training) and of the locally trained model (``local_*``), plus
            ``train_loss`` (mean bundle loss over the round).
        num_steps: training iterations run this round (NVFlare's FedAvg weights sites by it).
        local_state_dict: the full local model after training (CPU), for the site's own checkpoint.
    """

    weight_diff: dict[str, torch.Tensor]
    metrics: dict[str, float]
    num_steps: int
    local_state_dict: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    scaffold_control_diff: dict[str, Any] | None = field(repr=False, default=None)


class SiteTrainer:
    """The bundle's training workflow for one site, kept alive across federated rounds.

    Args:
        site_name: the site's name (used in messages and file names).
        data_root: the site's dataset root, passed to the bundle as ``dataset_dir``.
        bundle_root: bundle folder holding ``configs/`` and ``scripts/``.
        local_epochs: epochs of local training per round (the bundle's ``max_epochs`` grows by this each round).
        work_dir: where the bundle writes its checkpoints and logs (``ckpt_dir``, ``output_dir``); defaults to
            ``<cwd>/lcadb_<site_name>``.
        config_files: bundle configs, relative to ``bundle_root``, merged in order. Defaults to
            ``("configs/train.json",)``.
        overrides: more bundle overrides, e.g. ``{"network_def#widen_factor": 0.125}``.
        fedbn: keep BatchNorm parameters and statistics local.

    Raises:
        FileNotFoundError / ValueError: from :func:`check_site_data`, or a missing bundle config.
        TypeError: when the bundle's ``train#trainer`` is not a ``SupervisedTrainer``.
    """

    def __init__(
        self,
        site_name: str,
        data_root: str | os.PathLike,
        bundle_root: str | os.PathLike,
        local_epochs: int = 1,
        work_dir: str | os.PathLike | None = None,
        config_files: Sequence[str] = ("configs/train.json",),
        overrides: Mapping[str, Any] | None = None,
        fedbn: bool = False,
        scaffold: bool = False,
    ) -> None:
        if local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {local_epochs}.")
        self.site_name = site_name
        self.data_root = Path(data_root)
        check_site_data(site_name, self.data_root)
        self.bundle_root = Path(bundle_root).resolve()
        configs = [self.bundle_root / c for c in config_files]
        for c in configs:
            if not c.is_file():
                raise FileNotFoundError(f"Site '{site_name}': bundle config not found: {c}")
        self.local_epochs = int(local_epochs)
        self.work_dir = Path(work_dir) if work_dir is not None else Path.cwd() / f"lcadb_{site_name}"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.fedbn = fedbn
        self.scaffold = scaffold

        # the bundle's configs name `scripts.*` classes; ConfigWorkflow only adds the root to sys.path in run()
        if str(self.bundle_root) not in sys.path:
            sys.path.insert(0, str(self.bundle_root))
        bundle_overrides = {
            "bundle_root": str(self.bundle_root),
            "dataset_dir": str(self.data_root),
            "output_dir": str(self.work_dir / "eval"),
            "ckpt_dir": str(self.work_dir / "models"),
            "log_dir": str(self.work_dir / "logs"),
            "max_epochs": self.local_epochs,
            # every round starts from the server's weights: never auto-resume an older local checkpoint.pt
            "resume_from": "none",
        }
        bundle_overrides.update(overrides or {})
        logger.info(f"Site '{site_name}': bundle {self.bundle_root}, data {self.data_root}, outputs {self.work_dir}")
        self.workflow = ConfigWorkflow(
            config_file=[str(c) for c in configs],
            meta_file=str(self.bundle_root / "configs" / "metadata.json"),
            logging_file=False,  # keep the FL system's logging; never fileConfig a provisioned file
            workflow_type="train",
            **bundle_overrides,
        )
        self.workflow.initialize()
        self.trainer = self.workflow.trainer
        if not isinstance(self.trainer, SupervisedTrainer):
            raise TypeError(f"the bundle's train#trainer must be a SupervisedTrainer, got {type(self.trainer)}.")
        self.evaluator = self.workflow.evaluator
        if self.evaluator is not None and not isinstance(self.evaluator, SupervisedEvaluator):
            raise TypeError(
                f"the bundle's validate#evaluator must be a SupervisedEvaluator, got {type(self.evaluator)}"
            )
        self.network: torch.nn.Module = self.trainer.network
        self.keys = exchanged_keys(self.network, fedbn=fedbn)
        self.fedprox = FedProxHandler()
        self.fedprox.attach(self.trainer)
        self._scaffold_helper = None
        self._scaffold_controls: tuple[dict, dict] | None = None
        if scaffold:
            from nvflare.app_opt.pt.scaffold import PTScaffoldHelper

            self._scaffold_helper = PTScaffoldHelper()
            self._scaffold_helper.init(self.network)
            self.trainer.add_event_handler(IterationEvents.MODEL_COMPLETED, self._scaffold_correct)
        self._losses: list[float] = []
        self.last_global: dict[str, torch.Tensor] | None = None
        self.last_num_steps = 1
        self.trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._record_loss)

    def _record_loss(self, engine: SupervisedTrainer) -> None:
        self._losses.append(float(engine.state.output[CommonKeys.LOSS].detach()))

    def load_global(self, weights: Mapping[str, Any]) -> None:
        """Copy the exchanged keys of ``weights`` into the network; local-only keys (FedBN) stay as they are.

        Raises:
            KeyError: when the server's model lacks a key this site exchanges.
            ValueError: when a shape differs (the server and the site configure different networks).
        """
        state = self.network.state_dict()
        missing = [k for k in self.keys if k not in weights]
        if missing:
            raise KeyError(
                f"Site '{self.site_name}': the global model lacks {len(missing)} key(s) of the bundle network, "
                f"e.g. {missing[:3]}; server and site must build the same network."
            )
        with torch.no_grad():
            for k in self.keys:
                value = torch.as_tensor(weights[k])
                if tuple(value.shape) != tuple(state[k].shape):
                    raise ValueError(
                        f"Site '{self.site_name}': global weight '{k}' has shape {tuple(value.shape)}, the bundle "
                        f"network has {tuple(state[k].shape)}; server and site must build the same network."
                    )
                state[k].copy_(value.to(state[k].dtype))

    def evaluate(self, weights: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Run the bundle's ``validate#evaluator`` (the site's validation fold) on ``weights`` (or the current model).

        The current local weights are restored afterwards, so evaluating a foreign model leaves training intact.
        """
        if self.evaluator is None:
            return {}
        saved = None
        if weights is not None:
            saved = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
            self.load_global(weights)
        try:
            self.evaluator.run()
            return {k: float(v) for k, v in self.evaluator.state.metrics.items() if _is_number(v)}
        finally:
            if saved is not None:
                self.network.load_state_dict(saved)

    def _current_lr(self) -> float:
        return float(self.trainer.optimizer.param_groups[0]["lr"])

    def _scaffold_correct(self, engine: SupervisedTrainer) -> None:
        """SCAFFOLD: after each optimiser step, move the weights by ``-lr * (c_global - c_local)``
        (NVFlare's ``PTScaffoldHelper.model_update``)."""
        if self._scaffold_controls is not None:
            self._scaffold_helper.model_update(self.network, self._current_lr(), *self._scaffold_controls)

    def train_round(
        self,
        global_weights: Mapping[str, Any] | None = None,
        fedprox_mu: float | None = None,
        scaffold_global_controls: Mapping[str, Any] | None = None,
    ) -> RoundResult:
        """Load the global weights, evaluate them, train ``local_epochs`` epochs with the bundle trainer, diff.

        Args:
            global_weights: the server's model (``state_dict``-like); None trains from the current weights.
            fedprox_mu: FedProx coefficient for this round; None or 0 trains plain FedAvg.
            scaffold_global_controls: SCAFFOLD's global control variates from the server (with ``scaffold=True``);
                None keeps the last ones (zeros at first).
        """
        if global_weights is not None:
            self.load_global(global_weights)
        start = {k: v.detach().clone() for k, v in self.network.state_dict().items() if k in set(self.keys)}
        self.last_global = {k: v.cpu() for k, v in start.items()}
        metrics = {f"global_{k}": v for k, v in self.evaluate().items()}
        self.fedprox.set_reference(self.network, fedprox_mu)
        state = self.trainer.state
        state.max_epochs = state.epoch + self.local_epochs
        first_iteration = state.iteration
        self._losses = []
        model_global = None
        if self._scaffold_helper is not None:
            if scaffold_global_controls:
                self._scaffold_helper.load_global_controls(scaffold_global_controls)
            self._scaffold_controls = self._scaffold_helper.get_params()
            model_global = copy.deepcopy(self.network)
        logger.info(
            f"Site '{self.site_name}': local epochs {state.epoch + 1}..{state.max_epochs}"
            + (f", FedProx mu={fedprox_mu}" if fedprox_mu else "")
            + (", FedBN (BatchNorm kept local)" if self.fedbn else "")
            + (", SCAFFOLD control variates" if self.scaffold else "")
        )
        self.trainer.run()
        control_diff = None
        if self._scaffold_helper is not None:
            self._scaffold_helper.terms_update(self.network, self._current_lr(), *self._scaffold_controls, model_global)
            control_diff = self._scaffold_helper.get_delta_controls()
            self._scaffold_controls = None
        self.fedprox.set_reference(self.network, 0.0)
        num_steps = self.trainer.state.iteration - first_iteration
        self.last_num_steps = num_steps
        if self._losses:
            metrics["train_loss"] = sum(self._losses) / len(self._losses)
        if self.evaluator is not None:
            metrics.update({f"local_{k}": float(v) for k, v in self.evaluator.state.metrics.items() if _is_number(v)})
        local = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        diff = {k: local[k] - start[k].cpu() for k in self.keys}
        return RoundResult(
            weight_diff=diff,
            metrics=metrics,
            num_steps=num_steps,
            local_state_dict=local,
            scaffold_control_diff=control_diff,
        )

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}

    def local_model_as_update(self) -> dict[str, torch.Tensor]:
        """The local model as its difference to the last global model this site trained from (exchanged keys).

        With a privacy filter, a site's local model leaves the site only in this form, so the filter sees it as it
        sees a training update; every site that trained in that round holds the same base (:meth:`from_update`).

        Raises:
            RuntimeError: before the first training round (no global model to differ from).
        """
        if self.last_global is None:
            raise RuntimeError(f"Site '{self.site_name}': no training round yet, so no global model to differ from.")
        local = self.network.state_dict()
        return {k: local[k].detach().cpu() - self.last_global[k] for k in self.keys}

    def from_update(self, update: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Another site's model sent by :meth:`local_model_as_update`: this site's last global model plus ``update``.

        Raises:
            RuntimeError: before the first training round.
        """
        if self.last_global is None:
            raise RuntimeError(
                f"Site '{self.site_name}': no training round yet, cannot rebuild a model from an update."
            )
        return {k: self.last_global[k] + torch.as_tensor(update[k]).to(self.last_global[k].dtype) for k in update}


def _is_number(value: Any) -> bool:
    try:
        return torch.as_tensor(value).numel() == 1 and bool(torch.isfinite(torch.as_tensor(value, dtype=torch.float64)))
    except (TypeError, ValueError, RuntimeError):
        return False


def run_site(
    site_name: str,
    data_root: str | os.PathLike,
    bundle_root: str | os.PathLike,
    local_epochs: int,
    global_weights: Mapping[str, Any] | None = None,
    *,
    work_dir: str | os.PathLike | None = None,
    config_files: Sequence[str] = ("configs/train.json",),
    overrides: Mapping[str, Any] | None = None,
    fedbn: bool = False,
    fedprox_mu: float | None = None,
) -> RoundResult:
    """One site, one round, no NVFlare: build the bundle workflow on the site's data, train, return the update.

    With ``global_weights=None`` this is plain local training with the bundle (the "site alone" baseline).
    See :class:`SiteTrainer` for the arguments.
    """
    trainer = SiteTrainer(
        site_name,
        data_root,
        bundle_root,
        local_epochs,
        work_dir=work_dir,
        config_files=config_files,
        overrides=overrides,
        fedbn=fedbn,
    )
    return trainer.train_round(global_weights, fedprox_mu=fedprox_mu)
