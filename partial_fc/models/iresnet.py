"""IResNet backbones (the ResNet variant of ArcFace / insightface) for 112x112 face crops.

Each residual unit is BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus an identity
(or 1x1 conv + BN projection when the shape changes). Four stages of 64/128/256/512 channels each
halve the resolution (112 -> 7), and the head is BN -> dropout -> FC(512*7*7 -> D) -> BN1d whose
scale is frozen at 1. Parameter names follow insightface's so its published weights load as is.
Mixed precision is left to the caller's autocast; nothing here fixes a dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .checkpointing import run_stages

IRESNET_DEPTHS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-BN residual unit of IResNet; the stride sits on the second convolution."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=1e-5)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet for 112x112 inputs, giving a `embedding_size`-d (unnormalised) embedding."""

    feature_map_size = 7  # 112 / 2**4

    def __init__(self, stage_depths: Sequence[int], embedding_size: int = 512,
                 dropout: float = 0.0, activation_checkpointing: bool = False,
                 zero_init_residual: bool = False):
        super().__init__()
        if len(stage_depths) != 4:
            raise ValueError(f"IResNet needs 4 stage depths, got {list(stage_depths)}")
        self.embedding_size = embedding_size
        self.activation_checkpointing = activation_checkpointing
        widths = (64, 128, 256, 512)

        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        in_ch = widths[0]
        for i, (width, depth) in enumerate(zip(widths, stage_depths), start=1):
            blocks = [IBasicBlock(in_ch, width, stride=2)]
            blocks += [IBasicBlock(width, width) for _ in range(depth - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_ch = width
        self.bn2 = nn.BatchNorm2d(in_ch, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch * self.feature_map_size ** 2, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The embedding BN only centres and rescales by the batch statistics: its scale stays 1.
        self.features.weight.requires_grad_(False)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)

    def stages(self):
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = run_stages(self.stages(), x, self.activation_checkpointing)
        x = torch.flatten(self.bn2(x), 1)  # flatten copies a channels_last map into NCHW order
        return self.features(self.fc(self.dropout(x)))


def iresnet(depth: int, **kwargs) -> IResNet:
    """IResNet-`depth` (18, 34, 50, 100 or 200)."""
    if depth not in IRESNET_DEPTHS:
        raise ValueError(f"no IResNet of depth {depth}; choose from {sorted(IRESNET_DEPTHS)}")
    return IResNet(IRESNET_DEPTHS[depth], **kwargs)
