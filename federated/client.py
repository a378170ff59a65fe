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
"""NVFlare Client API script of the LCA-DB job: the NVFlare calls around :class:`fl_site.SiteTrainer`, nothing else.

NVFlare copies this file (and ``fl_site.py``) into each site's app ``custom/`` folder, next to the bundle's
``configs/`` and ``scripts/`` that the job ships, so that folder is the bundle root by default. Arguments come as one
command-line string from the job (``train_args``, per site for ``--data_root``); the site name comes from NVFlare.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import nvflare.client as flare
import torch
from fl_site import SiteTrainer, describe_error, parse_overrides, save_state_dict
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.client.tracking import SummaryWriter

__all__ = ["SITE_ERROR_KEY", "parse_args", "main"]

logger = logging.getLogger("lcadb.federated.client")

#: Same key as ``fl_server.SITE_ERROR_KEY`` (not imported: the server module is not shipped to sites).
SITE_ERROR_KEY = "lcadb_site_error"
#: Site-side environment variable with the dataset root, used when the job gives no ``--data_root``.
DATA_ROOT_ENV = "LCADB_DATA_ROOT"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description="LCA-DB site training (NVFlare Client API)")
    data_root = os.environ.get(DATA_ROOT_ENV)
    parser.add_argument("--data_root", default=data_root, help=f"site dataset (default: ${DATA_ROOT_ENV})")
    parser.add_argument("--bundle_root", default=str(here), help="bundle with configs/ and scripts/ (default: here)")
    parser.add_argument("--local_epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--torch_threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--config_file", action="append", default=None, help="bundle config(s), repeatable")
    parser.add_argument("--override", action="append", default=[], help="bundle override id=value, repeatable")
    parser.add_argument("--fedbn", action="store_true", help="keep BatchNorm parameters and statistics local")
    parser.add_argument("--scaffold", action="store_true", help="SCAFFOLD control variates (NVFlare PTScaffoldHelper)")
    parser.add_argument(
        "--submit_update",
        action="store_true",
        help="cross-site evaluation: send the local model as its difference to the last global model (privacy filter)",
    )
    parser.add_argument("--work_dir", default=None, help="site outputs (default: <app>/lcadb next to custom/)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    # 1. connect to NVFlare; the site name comes from NVFlare, not from the command line
    flare.init()
    site = flare.get_site_name()
    work_dir = Path(args.work_dir) if args.work_dir else Path(__file__).resolve().parent.parent / "lcadb"
    writer = SummaryWriter()

    # 2. build the bundle workflow on the local data; a configuration error is reported to the server every task
    trainer, error = None, None
    try:
        trainer = SiteTrainer(
            site,
            args.data_root,
            args.bundle_root,
            args.local_epochs,
            work_dir=work_dir,
            config_files=args.config_file or ("configs/train.json",),
            overrides=parse_overrides(args.override),
            fedbn=args.fedbn,
            scaffold=args.scaffold,
        )
    except Exception as e:  # e.g. the site's data is missing: messages from fl_site name the site and the path
        error = describe_error(site, e)
        logger.exception(f"LCA-DB site setup failed: {error}")

    while flare.is_running():
        # 3. receive the task and the global model
        model = flare.receive()
        if error is None:
            try:
                flare.send(_do_task(trainer, model, site, work_dir, writer, args.submit_update))
                continue
            except Exception as e:  # report any site failure to the server instead of killing the site's process
                logger.exception(f"LCA-DB site '{site}' failed on task '{flare.get_task_name()}'")
                error = describe_error(site, e)
        flare.send(flare.FLModel(metrics={}, meta={SITE_ERROR_KEY: error}))


def _do_task(
    trainer: SiteTrainer, model: flare.FLModel, site: str, work_dir: Path, writer, submit_update: bool
) -> flare.FLModel:
    # 4. cross-site evaluation: submit the local model, or evaluate a received one on the local fold
    if flare.is_submit_model():
        if submit_update:  # goes through the site's privacy filter like a training update
            return flare.FLModel(
                params=trainer.local_model_as_update(),
                params_type=flare.ParamsType.DIFF,
                meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: trainer.last_num_steps},
            )
        return flare.FLModel(params=trainer.local_state_dict(), params_type=flare.ParamsType.FULL)
    if flare.is_evaluate():
        weights = model.params
        if model.params_type == flare.ParamsType.DIFF:
            weights = trainer.from_update(weights)
        return flare.FLModel(metrics=trainer.evaluate(weights))

    # 5. train: the bundle trainer runs local_epochs more epochs from the global weights (FedProx if asked)
    meta = model.meta or {}
    result = trainer.train_round(
        model.params,
        fedprox_mu=meta.get(AlgorithmConstants.FEDPROX_MU),
        scaffold_global_controls=meta.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL),
    )
    save_state_dict(result.local_state_dict, work_dir / "models" / f"model_{site}.pt")
    for key, value in result.metrics.items():
        writer.add_scalar(key, value, model.current_round)

    # 6. send the weight difference, the metrics and the step count (FedAvg's weight) back
    return flare.FLModel(
        params=result.weight_diff,
        params_type=flare.ParamsType.DIFF,
        metrics=result.metrics,
        meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: result.num_steps}
        | ({AlgorithmConstants.SCAFFOLD_CTRL_DIFF: result.scaffold_control_diff} if trainer.scaffold else {}),
    )


if __name__ == "__main__":
    main()
