"""A small, fast face backbone for CPU demos and tests (112x112 in, well under 1M parameters).

Four strided stages of plain 3x3 convolutions (BN + PReLU), with one residual 3x3 pair at 14 and
7 pixels, then a global depthwise 7x7 conv (GDC), dropout, a linear layer and BN1d. Plain dense
convolutions are used throughout because they run far faster on CPU than depthwise ones per FLOP.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .checkpointing import run_stages


def _conv_bn_prelu(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.PReLU(out_ch),
    )


class ResidualPair(nn.Module):
    """conv3x3-BN-PReLU-conv3x3-BN added to the input."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_prelu(ch, ch, 1),
            nn.Conv2d(ch, ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class TinyFaceNet(nn.Module):
    """Small CPU backbone: 112 -> 56 -> 28 -> 14 -> 7 with `widths` channels per stage."""

    def __init__(self, embedding_size: int = 128, widths: Sequence[int] = (16, 32, 64, 128),
                 dropout: float = 0.0, activation_checkpointing: bool = False):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"TinyFaceNet needs 4 stage widths, got {list(widths)}")
        self.embedding_size = embedding_size
        self.activation_checkpointing = activation_checkpointing
        w1, w2, w3, w4 = widths
        self.stage1 = _conv_bn_prelu(3, w1, 2)
        self.stage2 = _conv_bn_prelu(w1, w2, 2)
        self.stage3 = nn.Sequential(_conv_bn_prelu(w2, w3, 2), ResidualPair(w3))
        self.stage4 = nn.Sequential(_conv_bn_prelu(w3, w4, 2), ResidualPair(w4))
        self.gdc = nn.Sequential(
            nn.Conv2d(w4, w4, 7, groups=w4, bias=False),
            nn.BatchNorm2d(w4),
        )
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(w4, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self):
        return (self.stage1, self.stage2, self.stage3, self.stage4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_stages(self.stages(), x, self.activation_checkpointing)
        x = torch.flatten(self.gdc(x), 1)
        return self.features(self.fc(self.dropout(x)))
