"""MobileFaceNet (Chen et al. 2018) in the widened form insightface trains as `mbf`.

Stem conv3x3/2, a grouped 3x3 conv, then inverted-residual bottlenecks (1x1 expand -> depthwise
3x3 -> 1x1 linear project) in stages at 28, 14 and 7 pixels, a 1x1 conv to 512 channels and a
global depthwise conv (GDC: a 7x7 depthwise filter instead of average pooling) -> linear -> BN1d.

The module tree, parameter names and shapes are those of insightface's arcface_torch
`backbones/mobilefacenet.py` (`layers.*`, `conv_sep.*`, `features.layers.*`), so its `mbf`
state_dicts load as they are and give the same embeddings; that includes its stem conv with 64
groups (not depthwise) when `blocks[0] == 1`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .checkpointing import run_stages


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> PReLU, or without the PReLU when `activation` is False."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, activation: bool = True):
        super().__init__()
        layers = [nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups,
                            bias=False),
                  nn.BatchNorm2d(out_ch)]
        if activation:
            layers.append(nn.PReLU(out_ch))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """1x1 expand to `hidden` -> depthwise 3x3 (stride) -> linear 1x1 projection, plus the
    input when `residual`."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, stride: int = 1,
                 residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_ch, hidden, 1),
            ConvBlock(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            ConvBlock(hidden, out_ch, 1, activation=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """`count` residual DepthWise units of `channels` channels."""

    def __init__(self, channels: int, count: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(channels, channels, hidden, residual=True)
                                      for _ in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise 7x7 conv + BN -> flatten (-> dropout) -> linear -> BN1d."""

    def __init__(self, embedding_size: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            ConvBlock(512, 512, 7, groups=512, activation=False),
            nn.Sequential(nn.Flatten(), nn.Dropout(p=dropout)),  # parameterless: keys unchanged
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet for 112x112 inputs; `scale` widens every stage (insightface's `mbf` uses 2,
    its `mbf_large` blocks (2, 8, 12, 4) and scale 4)."""

    def __init__(self, embedding_size: int = 512, blocks: Sequence[int] = (1, 4, 6, 2),
                 scale: int = 2, dropout: float = 0.0, activation_checkpointing: bool = False):
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"MobileFaceNet needs 4 block counts, got {list(blocks)}")
        self.embedding_size = embedding_size
        self.activation_checkpointing = activation_checkpointing
        c1, c2 = 64 * scale, 128 * scale
        if blocks[0] == 1:
            second = ConvBlock(c1, c1, 3, padding=1, groups=64)
        else:
            second = Residual(c1, blocks[0], hidden=128)
        self.layers = nn.ModuleList([
            ConvBlock(3, c1, 3, stride=2, padding=1), second,  # 56x56
            DepthWise(c1, c1, hidden=128, stride=2), Residual(c1, blocks[1], hidden=128),  # 28
            DepthWise(c1, c2, hidden=256, stride=2), Residual(c2, blocks[2], hidden=256),  # 14
            DepthWise(c2, c2, hidden=512, stride=2), Residual(c2, blocks[3], hidden=256),  # 7
        ])
        self.conv_sep = ConvBlock(c2, 512, 1)
        self.features = GDC(embedding_size, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self):
        """The four resolution stages as modules (views over `layers`, in this model's mode)."""
        return tuple(nn.Sequential(*self.layers[i:i + 2]).train(self.training)
                     for i in range(0, 8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_stages(self.stages(), x, self.activation_checkpointing)
        return self.features(self.conv_sep(x))
