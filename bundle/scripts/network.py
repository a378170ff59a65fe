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
"""LCA-DB: the cross-attention guided, loss-based dual-branch network for focal liver lesion classification.

R. Wang et al., "Cross-attention guided loss-based deep dual-branch fusion network for liver tumor
classification", Information Fusion 2024, https://doi.org/10.1016/j.inffus.2024.102713
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv, Norm, Pool
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from monai.utils import look_up_option

from .constants import DEFAULT_PATCH_SIZE, DEFAULT_ROI_SIZE, LESION_CLASSES, PHASES

__all__ = ["LCADB", "LCADBInference", "LCADBOutput", "LossBasedAttention", "RESNET_LAYOUTS", "STEMS"]

#: ResNet depth -> (residual block, blocks per stage), as in MedicalNet / the reference code.
RESNET_LAYOUTS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    10: (ResNetBlock, (1, 1, 1, 1)),
    18: (ResNetBlock, (2, 2, 2, 2)),
    34: (ResNetBlock, (3, 4, 6, 3)),
    50: (ResNetBottleneck, (3, 4, 6, 3)),
    101: (ResNetBottleneck, (3, 4, 23, 3)),
    152: (ResNetBottleneck, (3, 8, 36, 3)),
    200: (ResNetBottleneck, (3, 24, 36, 3)),
}

#: IA-Net stem variants: "reference" is the published code's stem, as wide as the last stage's output
#: (it reuses the ResNet builder's running ``in_planes`` after building PA-Net); "resnet" is the
#: ordinary stem, as wide as stage 1.
STEMS = ("reference", "resnet")

_NUM_PHASES = len(PHASES)
_NUM_CLASSES = len(LESION_CLASSES)
_STAGE_WIDTHS = (64, 128, 256, 512)
_STAGE_STRIDES = (1, 2, 2, 2)
#: Stride of the instance head's first convolution along the slice axis (the reference's ``stride=4``).
_HEAD_DEPTH_STRIDE = 4


class LCADBOutput(NamedTuple):
    """Everything one LCA-DB forward pass computes; N is the number of patches (instances) per lesion.

    Attributes:
        logits: bag logits, the prediction, ``[B, num_classes]``.
        logits_ia: IA-Net (image branch) logits, ``[B, num_classes]``.
        logits_pa: PA-Net (patch branch) logits, ``[B, num_classes]``.
        instance_logits_ia: per-instance IA-Net logits, ``[B, N, num_classes]``.
        instance_logits_pa: per-instance PA-Net logits, ``[B, N, num_classes]``.
        attention_ia: loss-based attention over IA-Net instances, ``[B, N]``, rows sum to 1.
        attention_pa: loss-based attention over PA-Net instances, ``[B, N]``, rows sum to 1.
    """

    logits: torch.Tensor
    logits_ia: torch.Tensor
    logits_pa: torch.Tensor
    instance_logits_ia: torch.Tensor
    instance_logits_pa: torch.Tensor
    attention_ia: torch.Tensor
    attention_pa: torch.Tensor


class LossBasedAttention(nn.Module):
    """Parameter-free loss-based attention pooling of instance features (one per branch).

    The classifier scores every instance; instances with larger logit norms get more weight, those
    below the threshold ``0.1 / gamma`` of the normalised scores get none.

    Args:
        gamma: number of positions the threshold is spread over (the reference uses the number of
            stage-4 positions for IA-Net and the number of patches for PA-Net).
        threshold: numerator of the threshold, defaults to 0.1.
    """

    def __init__(self, gamma: int, threshold: float = 0.1) -> None:
        super().__init__()
        if gamma < 1:
            raise ValueError(f"gamma must be a positive integer, got {gamma}.")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}.")
        self.gamma = gamma
        self.threshold = threshold

    def forward(
        self, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            features: instance features ``[B, N, F]``.
            weight: the branch classifier's weight ``[num_classes, F]`` (the classifier's parameters rather than
                the ``nn.Linear`` itself, so that ``torch.jit.script`` can compile the call).
            bias: the branch classifier's bias ``[num_classes]``.

        Returns:
            pooled features ``[B, F]``, instance logits ``[B, N, num_classes]``, attention ``[B, N]``.
        """
        instance_logits = F.linear(features, weight, bias)
        scores = torch.linalg.vector_norm(instance_logits, dim=-1)
        attention = scores / scores.sum(dim=1, keepdim=True)
        attention = F.relu(attention - self.threshold / self.gamma)
        attention = attention / attention.sum(dim=1, keepdim=True)
        pooled = torch.bmm(attention.unsqueeze(1), features).squeeze(1)
        return pooled, instance_logits, attention


def _conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int = 0,
) -> nn.Sequential:
    """Conv3d (no bias) + BatchNorm3d + ReLU as an ordered (conv, norm, act) sequence."""
    return nn.Sequential(
        OrderedDict(
            conv=Conv[Conv.CONV, 3](in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False),
            norm=Norm[Norm.BATCH, 3](out_channels),
            act=Act[Act.RELU](inplace=True),
        )
    )


def _make_stages(block: type[nn.Module], blocks_per_stage: Sequence[int], widths: Sequence[int], in_planes: int):
    """The four residual stages of a MedicalNet-style 3D ResNet with type-B (1x1x1 conv + BN) shortcuts."""
    stages = []
    expansion = block.expansion
    for planes, num_blocks, stride in zip(widths, blocks_per_stage, _STAGE_STRIDES):
        downsample = None
        if stride != 1 or in_planes != planes * expansion:
            downsample = nn.Sequential(
                Conv[Conv.CONV, 3](in_planes, planes * expansion, kernel_size=1, stride=stride, bias=False),
                Norm[Norm.BATCH, 3](planes * expansion),
            )
        layers = [block(in_planes, planes, spatial_dims=3, stride=stride, downsample=downsample)]
        in_planes = planes * expansion
        layers += [block(in_planes, planes, spatial_dims=3) for _ in range(1, num_blocks)]
        stages.append(nn.Sequential(*layers))
    return nn.Sequential(*stages)


class ImageBranch(nn.Module):
    """IA-Net: a full-resolution 3D ResNet over the whole ROI whose stage-4 map is cut into an instance grid.

    Args:
        in_channels: number of phases.
        stem_width: output channels of the stem convolution.
        block: residual block type.
        blocks_per_stage: residual blocks in each of the four stages.
        widths: planes of the four stages.
        grid_kernel: in-plane kernel and stride of the head convolution that maps stage-4 positions to patches.
    """

    def __init__(
        self,
        in_channels: int,
        stem_width: int,
        block: type[nn.Module],
        blocks_per_stage: Sequence[int],
        widths: Sequence[int],
        grid_kernel: int,
    ) -> None:
        super().__init__()
        features = widths[-1]
        self.stem = _conv_norm_act(in_channels, stem_width, kernel_size=3, padding=1)
        self.stages = _make_stages(block, blocks_per_stage, widths, stem_width)
        head: list[nn.Module] = []
        if block.expansion != 1:
            head.append(_conv_norm_act(features * block.expansion, features, kernel_size=1))
        head.append(
            _conv_norm_act(
                features,
                features,
                kernel_size=(1, grid_kernel, grid_kernel),
                stride=(_HEAD_DEPTH_STRIDE, grid_kernel, grid_kernel),
            )
        )
        head.append(_conv_norm_act(features, features, kernel_size=1))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, H, W, D]`` to instance features ``[B, N, F]``, instances row-major over (h, w)."""
        x = x.permute(0, 1, 4, 2, 3)  # the reference convolves in (D, H, W) order
        x = self.head(self.stages(self.stem(x)))
        return x.flatten(2).transpose(1, 2)


class PatchBranch(nn.Module):
    """PA-Net: a 3D ResNet applied to every non-overlapping in-plane patch (full depth) of the ROI.

    Args:
        in_channels: number of phases.
        patch_size: in-plane patch edge in voxels.
        block: residual block type.
        blocks_per_stage: residual blocks in each of the four stages.
        widths: planes of the four stages.
    """

    def __init__(
        self,
        in_channels: int,
        patch_size: int,
        block: type[nn.Module],
        blocks_per_stage: Sequence[int],
        widths: Sequence[int],
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        features = widths[-1]
        self.stem = _conv_norm_act(in_channels, widths[0], kernel_size=3, padding=1)
        self.stem.add_module("pool", Pool[Pool.MAX, 3](kernel_size=3, stride=2, padding=1))
        self.stages = _make_stages(block, blocks_per_stage, widths, widths[0])
        self.reduce = (
            _conv_norm_act(features * block.expansion, features, kernel_size=1)
            if block.expansion != 1
            else nn.Identity()
        )
        self.pool = Pool[Pool.ADAPTIVEAVG, 3](1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, H, W, D]`` to instance features ``[B, N, F]``, patches row-major over (h, w)."""
        batch, channels, height, width, depth = x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4]
        p = self.patch_size
        grid_h, grid_w = height // p, width // p
        # 'b c (h p1) (w p2) d -> (b h w) c d p1 p2', as the reference cuts patches
        patches = x.reshape(batch, channels, grid_h, p, grid_w, p, depth).permute(0, 2, 4, 1, 6, 3, 5)
        patches = patches.reshape(batch * grid_h * grid_w, channels, depth, p, p)
        features = self.pool(self.reduce(self.stages(self.stem(patches)))).flatten(1)
        return features.reshape(batch, grid_h * grid_w, -1)


class LCADB(nn.Module):
    """LCA-DB, the cross-attention guided, loss-based dual-branch network (Wang et al., Information Fusion 2024).

    Two 3D ResNets look at one lesion ROI of ``in_channels`` MRI phases: IA-Net at full resolution,
    PA-Net on each in-plane patch. Each branch pools its instances (the patch grid) with loss-based
    attention and has its own classifier; the bag classifier reads the sum of both pooled features.
    See https://doi.org/10.1016/j.inffus.2024.102713.

    Args:
        in_channels: number of MRI phases stacked as channels, defaults to 8 (order in ``constants.PHASES``).
        num_classes: number of lesion classes, defaults to 7 (``constants.LESION_CLASSES``).
        depth: ResNet depth of both branches, one of 10, 18, 34 (BasicBlock) or 50, 101, 152, 200
            (Bottleneck, with an extra 1x1x1 reduction to the classifier width), defaults to 10.
        widen_factor: multiplier of the stage widths 64, 128, 256, 512, defaults to 1.0.
        roi_size: input spatial size (H, W, D), defaults to (128, 128, 16). H and W must be multiples of
            ``patch_size`` and D at most 32 (the instance head keeps one slice position).
        patch_size: in-plane edge of PA-Net's patches and of IA-Net's instance cells, a multiple of 8,
            defaults to 32.
        stem: IA-Net stem, "reference" (as wide as stage 4's output, the published code; needed to load its
            checkpoints) or "resnet" (as wide as stage 1), defaults to "reference".
        attention_threshold: numerator of the loss-based attention threshold, defaults to 0.1.

    Raises:
        ValueError: when an argument is out of range or ``roi_size`` does not fit the patch grid.
    """

    def __init__(
        self,
        in_channels: int = _NUM_PHASES,
        num_classes: int = _NUM_CLASSES,
        depth: int = 10,
        widen_factor: float = 1.0,
        roi_size: Sequence[int] = DEFAULT_ROI_SIZE,
        patch_size: int = DEFAULT_PATCH_SIZE,
        stem: str = "reference",
        attention_threshold: float = 0.1,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        block, blocks_per_stage = look_up_option(depth, RESNET_LAYOUTS)
        widths = tuple(int(width * widen_factor) for width in _STAGE_WIDTHS)
        if widths[0] < 1:
            raise ValueError(
                f"widen_factor must give stage 1 at least one channel (64 * widen_factor >= 1), got {widen_factor}."
            )
        roi_size = tuple(int(s) for s in roi_size)
        if len(roi_size) != 3 or min(roi_size) < 1:
            raise ValueError(f"roi_size must be three positive integers (H, W, D), got {roi_size}.")
        if patch_size < 8 or patch_size % 8:
            raise ValueError(f"patch_size must be a positive multiple of 8, got {patch_size}.")
        height, width, depth_slices = roi_size
        if height % patch_size or width % patch_size:
            raise ValueError(f"roi_size H and W must be multiples of patch_size={patch_size}, got {roi_size}.")
        stage4_depth = math.ceil(depth_slices / 8)
        if stage4_depth > _HEAD_DEPTH_STRIDE:
            raise ValueError(f"roi_size D must be at most {8 * _HEAD_DEPTH_STRIDE} slices, got {roi_size}.")
        stem = look_up_option(stem, STEMS)

        self.in_channels = in_channels
        self.num_classes = num_classes
        self.roi_size = roi_size
        self.patch_size = patch_size
        self.grid_size = (height // patch_size, width // patch_size)
        self.num_instances = self.grid_size[0] * self.grid_size[1]
        features = widths[-1]
        stem_width = features * block.expansion if stem == "reference" else widths[0]

        self.patch_branch = PatchBranch(in_channels, patch_size, block, blocks_per_stage, widths)
        self.image_branch = ImageBranch(in_channels, stem_width, block, blocks_per_stage, widths, patch_size // 8)
        # IA-Net's threshold is spread over its stage-4 positions, PA-Net's over its patches (reference).
        self.attention_ia = LossBasedAttention(stage4_depth * (height // 8) * (width // 8), attention_threshold)
        self.attention_pa = LossBasedAttention(self.num_instances, attention_threshold)
        self.classifier_ia = nn.Linear(features, num_classes)
        self.classifier_pa = nn.Linear(features, num_classes)
        self.bag_classifier = nn.Linear(features, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> LCADBOutput:
        """
        Args:
            x: one ROI per lesion, ``[B, in_channels, H, W, D]`` with (H, W, D) = ``roi_size``.

        Returns:
            ``LCADBOutput`` with ``logits``, ``logits_ia``, ``logits_pa`` ``[B, num_classes]``,
            ``instance_logits_ia``, ``instance_logits_pa`` ``[B, N, num_classes]`` and ``attention_ia``,
            ``attention_pa`` ``[B, N]``, N = (H / patch_size) * (W / patch_size).

        Raises:
            ValueError: when ``x`` is not ``[B, in_channels, *roi_size]``.
        """
        return self.forward_all(x)

    def forward_all(self, x: torch.Tensor) -> LCADBOutput:
        """:meth:`forward`, callable by subclasses: TorchScript compiles no ``super()`` call."""
        if not torch.jit.is_tracing():
            self._check_input(x)
        pooled_ia, instance_logits_ia, attention_ia = self.attention_ia(
            self.image_branch(x), self.classifier_ia.weight, self.classifier_ia.bias
        )
        pooled_pa, instance_logits_pa, attention_pa = self.attention_pa(
            self.patch_branch(x), self.classifier_pa.weight, self.classifier_pa.bias
        )
        return LCADBOutput(
            logits=self.bag_classifier(pooled_ia + pooled_pa),
            logits_ia=self.classifier_ia(pooled_ia),
            logits_pa=self.classifier_pa(pooled_pa),
            instance_logits_ia=instance_logits_ia,
            instance_logits_pa=instance_logits_pa,
            attention_ia=attention_ia,
            attention_pa=attention_pa,
        )

    def _check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``[B, in_channels, *roi_size]`` (written so TorchScript compiles it)."""
        expected = [self.in_channels, self.roi_size[0], self.roi_size[1], self.roi_size[2]]
        if x.dim() != 5 or list(x.shape[1:]) != expected:
            raise ValueError(
                f"LCADB expects input of shape [B, {self.in_channels}, {self.roi_size[0]}, {self.roi_size[1]}, "
                f"{self.roi_size[2]}] (batch, phases, H, W, D), got {list(x.shape)}."
            )


class LCADBInference(LCADB):
    """LCA-DB for deployment: class probabilities, and optionally both attention maps on the patch grid.

    Same constructor and ``state_dict`` as :class:`LCADB` (a training checkpoint loads as is), plus
    ``return_attention``. It returns plain tensors, so ``torch.jit.script``, ``torch.jit.trace``, ONNX export and
    ``python -m monai.bundle verify_net_in_out`` work on it.

    Args:
        return_attention: also return the IA-Net and PA-Net attention maps, defaults to False.
        kwargs: :class:`LCADB` arguments.
    """

    def __init__(self, return_attention: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.return_attention = return_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """
        Args:
            x: ``[B, in_channels, H, W, D]``.

        Returns:
            probabilities ``[B, num_classes]``; with ``return_attention`` the tuple (probabilities,
            attention_ia, attention_pa), each attention map ``[B, H / patch_size, W / patch_size]``.
        """
        output = self.forward_all(x)
        probabilities = torch.softmax(output.logits, dim=1)
        if not self.return_attention:
            return probabilities
        grid = [x.shape[0], self.grid_size[0], self.grid_size[1]]
        return probabilities, output.attention_ia.reshape(grid), output.attention_pa.reshape(grid)
