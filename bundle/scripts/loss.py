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
"""The LCA-DB training loss: focal loss on the bag, loss-based instance terms, cross-attention and similarity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from .network import LCADBOutput

__all__ = ["LCADBLoss", "multiclass_focal_loss", "attention_weighted_cross_entropy", "rampup_weight"]


def multiclass_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 1.0):
    """Focal loss (Lin et al. 2017), ``alpha * (1 - p_t) ** gamma * CE``, averaged over the batch.

    Args:
        logits: ``[B, C]``.
        target: class indices ``[B]``.
        gamma: focusing parameter.
        alpha: scale.
    """
    cross_entropy = F.cross_entropy(logits, target, reduction="none")
    p_target = torch.exp(-cross_entropy)
    return (alpha * (1 - p_target) ** gamma * cross_entropy).mean()


def attention_weighted_cross_entropy(instance_logits: torch.Tensor, attention: torch.Tensor, target: torch.Tensor):
    """Sum over all instances of ``attention * CE(instance, bag label)``.

    Args:
        instance_logits: ``[B, N, C]``.
        attention: ``[B, N]``.
        target: bag labels ``[B]``; every instance carries its bag's label.
    """
    batch, num_instances, num_classes = instance_logits.shape
    cross_entropy = F.cross_entropy(
        instance_logits.reshape(batch * num_instances, num_classes),
        target.repeat_interleave(num_instances),
        reduction="none",
    )
    return (attention.reshape(-1) * cross_entropy).sum()


def rampup_weight(epoch: int, maximum: float = 0.2, length: int = 24) -> float:
    """Gaussian ramp-up ``maximum * exp(-5 (1 - epoch / length)^2)``: 0 at epoch 0, ``maximum`` from ``length`` on."""
    if epoch <= 0:
        return 0.0
    if epoch >= length:
        return maximum
    return maximum * math.exp(-5.0 * (1.0 - epoch / length) ** 2)


class LCADBLoss(_Loss):
    """The LCA-DB loss, as the authors' code computes it, with every weight configurable.

    With ``u = rampup_weight(epoch)``, B the batch size and ``WCE(f, a)`` the attention-weighted
    instance cross-entropy::

        total = focal(logits)
              + instance_weight * u * (WCE(f_PA, a_PA) + WCE(f_IA, a_IA)) / B
              + cross_weight * u * (WCE(f_IA, a_PA) + WCE(f_PA, a_IA)) [/ B with normalize_cross_by_batch]
              + similarity_weight * (1 - cos(a_IA, a_PA))

    The reference does not divide the cross-attention terms by B; ``normalize_cross_by_batch=True``
    does, which makes their weight independent of the batch size.

    Args:
        focal_gamma: focusing parameter of the focal loss, defaults to 2.
        focal_alpha: scale of the focal loss, defaults to 1.
        instance_weight: weight of the two same-branch instance terms, defaults to 1.
        cross_weight: weight of the two cross-attention terms, defaults to 0.25.
        similarity_weight: weight of the attention-similarity term, defaults to 0.25.
        rampup_max: ramp-up weight reached at ``rampup_length``, defaults to 0.2.
        rampup_length: epochs of the ramp-up, defaults to 24.
        normalize_cross_by_batch: divide the cross-attention terms by the batch size, defaults to False.

    Raises:
        ValueError: when a weight is negative or ``rampup_length`` is not positive.

    Example:
        >>> import torch
        >>> from scripts.network import LCADB
        >>> net = LCADB(widen_factor=0.125, roi_size=(64, 64, 8))
        >>> terms = LCADBLoss()(net(torch.randn(2, 8, 64, 64, 8)), torch.tensor([0, 6]), epoch=30)
        >>> sorted(terms)
        ['cross_ia', 'cross_pa', 'focal', 'instance_ia', 'instance_pa', 'similarity', 'total', 'u_w']
    """

    def __init__(
        self,
        focal_gamma: float = 2.0,
        focal_alpha: float = 1.0,
        instance_weight: float = 1.0,
        cross_weight: float = 0.25,
        similarity_weight: float = 0.25,
        rampup_max: float = 0.2,
        rampup_length: int = 24,
        normalize_cross_by_batch: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("focal_gamma", focal_gamma),
            ("focal_alpha", focal_alpha),
            ("instance_weight", instance_weight),
            ("cross_weight", cross_weight),
            ("similarity_weight", similarity_weight),
            ("rampup_max", rampup_max),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if rampup_length < 1:
            raise ValueError(f"rampup_length must be >= 1, got {rampup_length}.")
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        self.instance_weight = instance_weight
        self.cross_weight = cross_weight
        self.similarity_weight = similarity_weight
        self.rampup_max = rampup_max
        self.rampup_length = rampup_length
        self.normalize_cross_by_batch = normalize_cross_by_batch
        #: epoch (from 0) used when ``forward`` is called without one; training handlers set it.
        self.epoch = 0

    def forward(self, output: LCADBOutput, target: torch.Tensor, epoch: int | None = None) -> dict[str, torch.Tensor]:
        """
        Args:
            output: the network's :class:`~.network.LCADBOutput`.
            target: class indices ``[B]`` or ``[B, 1]``.
            epoch: training epoch counted from 0, defaults to ``self.epoch``.

        Returns:
            ``total`` (to minimise) and the unweighted terms ``focal``, ``instance_ia``, ``instance_pa``,
            ``cross_ia`` (IA instance logits weighted by PA attention), ``cross_pa``, ``similarity``, and
            the ramp-up weight ``u_w``, all scalar tensors.

        Raises:
            ValueError: when ``target`` does not hold one label per sample.
        """
        batch = output.logits.shape[0]
        if target.numel() != batch:
            raise ValueError(
                f"target must hold one class index per sample ([{batch}] or [{batch}, 1]), got {list(target.shape)}."
            )
        target = target.reshape(-1).long()
        u_w = rampup_weight(self.epoch if epoch is None else epoch, self.rampup_max, self.rampup_length)
        terms = {
            "focal": multiclass_focal_loss(output.logits, target, self.focal_gamma, self.focal_alpha),
            "instance_ia": attention_weighted_cross_entropy(output.instance_logits_ia, output.attention_ia, target),
            "instance_pa": attention_weighted_cross_entropy(output.instance_logits_pa, output.attention_pa, target),
            "cross_ia": attention_weighted_cross_entropy(output.instance_logits_ia, output.attention_pa, target),
            "cross_pa": attention_weighted_cross_entropy(output.instance_logits_pa, output.attention_ia, target),
            "similarity": F.cosine_embedding_loss(
                output.attention_ia, output.attention_pa, torch.ones_like(target, dtype=output.attention_ia.dtype)
            ),
        }
        cross_scale = 1.0 / batch if self.normalize_cross_by_batch else 1.0
        terms["total"] = (
            terms["focal"]
            + self.instance_weight * u_w * (terms["instance_pa"] + terms["instance_ia"]) / batch
            + self.cross_weight * u_w * cross_scale * (terms["cross_ia"] + terms["cross_pa"])
            + self.similarity_weight * terms["similarity"]
        )
        terms["u_w"] = torch.tensor(u_w, dtype=terms["total"].dtype, device=terms["total"].device)
        return terms
