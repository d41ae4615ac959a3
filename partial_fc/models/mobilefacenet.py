"""MobileFaceNet (Chen et al. 2018) in the widened form insightface trains as `mbf`.

Stem conv3x3/2, depthwise stage, then inverted-residual bottlenecks (1x1 expand -> depthwise 3x3 ->
1x1 linear project) in stages at 28, 14 and 7 pixels, a 1x1 conv to 512 channels and a global
depthwise conv (GDC: a 7x7 depthwise filter instead of average pooling) -> linear -> BN1d.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .checkpointing import run_stages


class ConvBNPReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 activation: bool = True, padding: Optional[int] = None):
        padding = kernel // 2 if padding is None else padding
        layers = [
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if activation:
            layers.append(nn.PReLU(out_ch))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """1x1 expand to `hidden` -> depthwise 3x3 (stride) -> linear 1x1 projection (+ identity
    when the shape is kept)."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            ConvBNPReLU(in_ch, hidden, 1),
            ConvBNPReLU(hidden, hidden, 3, stride=stride, groups=hidden),
            ConvBNPReLU(hidden, out_ch, 1, activation=False),
        )
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet for 112x112 inputs; `scale` widens every stage (insightface's `mbf` uses 2)."""

    def __init__(self, embedding_size: int = 512, blocks: Sequence[int] = (1, 4, 6, 2),
                 scale: int = 2, dropout: float = 0.0, activation_checkpointing: bool = False):
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"MobileFaceNet needs 4 block counts, got {list(blocks)}")
        self.embedding_size = embedding_size
        self.activation_checkpointing = activation_checkpointing
        c1, c2 = 64 * scale, 128 * scale

        stem = [ConvBNPReLU(3, c1, 3, stride=2)]  # 56x56
        if blocks[0] == 1:
            stem.append(ConvBNPReLU(c1, c1, 3, groups=c1))
        else:
            stem += [Bottleneck(c1, c1, hidden=128) for _ in range(blocks[0])]
        self.stem = nn.Sequential(*stem)
        self.stage1 = nn.Sequential(  # 28x28
            Bottleneck(c1, c1, hidden=128, stride=2),
            *[Bottleneck(c1, c1, hidden=128) for _ in range(blocks[1])])
        self.stage2 = nn.Sequential(  # 14x14
            Bottleneck(c1, c2, hidden=256, stride=2),
            *[Bottleneck(c2, c2, hidden=256) for _ in range(blocks[2])])
        self.stage3 = nn.Sequential(  # 7x7
            Bottleneck(c2, c2, hidden=512, stride=2),
            *[Bottleneck(c2, c2, hidden=256) for _ in range(blocks[3])])
        self.conv_sep = ConvBNPReLU(c2, 512, 1)
        # Global depthwise conv: one 7x7 filter per channel over the whole map, no padding.
        self.gdc = ConvBNPReLU(512, 512, 7, groups=512, activation=False, padding=0)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self):
        return (self.stem, self.stage1, self.stage2, self.stage3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_stages(self.stages(), x, self.activation_checkpointing)
        x = torch.flatten(self.gdc(self.conv_sep(x)), 1)
        return self.features(self.fc(self.dropout(x)))
