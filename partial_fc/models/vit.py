"""Vision Transformers for 112x112 face crops, as insightface's model zoo trains them on WebFace42M.

A 9x9/9 patch embedding gives a 12x12 grid of 144 tokens (no class token) with learned position
embeddings, then `depth` pre-norm blocks (LayerNorm -> 8-head self-attention without qkv bias,
LayerNorm -> MLP 4x with ReLU6, each with stochastic depth), a final LayerNorm and the feature
head Linear(144*D -> D) -> BN1d -> Linear(D -> embedding) -> BN1d (eps 2e-5). In training, a
`mask_ratio` share of tokens is dropped before the blocks and replaced by a learned mask token
after them. Module names, shapes and the forward are those of insightface's arcface_torch
`backbones/vit.py`, so its `vit_*` state_dicts load as they are.

timm's VisionTransformer would build the same blocks, but timm requires torchvision, whose wheels
on the index this project installs from are built for a different torch than ours (CPU 2.13) and
fail to import against it; attention itself runs in PyTorch's
`F.scaled_dot_product_attention`.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import run_stages

IMAGE_SIZE = 112
PATCH_SIZE = 9
NUM_HEADS = 8
MLP_RATIO = 4
# name -> (embed_dim, depth), from insightface's backbones/__init__.py.
VIT_SIZES: Dict[str, tuple] = {
    "vit_t": (256, 12),
    "vit_s": (512, 12),
    "vit_b": (512, 24),
    "vit_l": (768, 24),
}


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): zero whole samples' branch with probability `rate`
    and rescale the kept ones by 1 / (1 - rate)."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * MLP_RATIO)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"ViT backbones take {IMAGE_SIZE}x{IMAGE_SIZE} images, "
                             f"got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # N x 144 x D


def kept_tokens(tokens: int, mask_ratio: float) -> int:
    """Tokens left after masking ``mask_ratio`` of ``tokens`` (insightface: ``int(L * (1 - r))``),
    at least one and, for any ``mask_ratio > 0``, at most ``tokens - 1``: every training step then
    attends to some token and uses the mask token (DDP needs every trainable parameter to take
    part in every step)."""
    return min(tokens - 1, max(1, int(tokens * (1 - mask_ratio))))


class VisionTransformer(nn.Module):
    """ViT for 112x112 inputs giving an `embedding_size`-d (unnormalised) embedding.

    `drop_path_rate` rises linearly from 0 over the blocks to this value; `mask_ratio` is the
    share of tokens dropped in training (insightface's vit_t/s/b/l: 0.1 and 0.1; its WebFace42M
    runs `vit_*_dp005_mask0*`: 0.05 and 0 or 0.05). `dropout` acts before the feature head.
    """

    num_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2

    def __init__(self, embed_dim: int, depth: int, embedding_size: int = 512,
                 drop_path_rate: float = 0.1, mask_ratio: float = 0.1, dropout: float = 0.0,
                 activation_checkpointing: bool = False):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
        self.embedding_size = embedding_size
        self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        self.activation_checkpointing = activation_checkpointing
        self.patch_embed = PatchEmbed(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, NUM_HEADS, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        # Kept at mask_ratio=0 too (insightface's state_dicts hold it), but frozen: a parameter
        # that never receives a gradient fails DistributedDataParallel at its second step.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim), requires_grad=mask_ratio > 0)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def stages(self):
        return tuple(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        n, tokens, dim = x.shape
        masking = self.training and self.mask_ratio > 0
        if masking:  # keep a random (1 - mask_ratio) share of tokens per sample
            keep = kept_tokens(tokens, self.mask_ratio)
            order = torch.rand(n, tokens, device=x.device).argsort(dim=1)
            restore = order.argsort(dim=1)
            x = x.gather(1, order[:, :keep, None].expand(-1, -1, dim))
        x = run_stages(self.stages(), x, self.activation_checkpointing)
        x = self.norm(x)
        if masking:
            x = torch.cat([x, self.mask_token.to(x.dtype).expand(n, tokens - x.shape[1], -1)], 1)
            x = x.gather(1, restore[:, :, None].expand(-1, -1, dim))
        return self.feature(self.dropout(x.reshape(n, tokens * dim)))


def vit(name: str, **kwargs) -> VisionTransformer:
    """ViT `name` (one of VIT_SIZES) with insightface's width and depth."""
    if name not in VIT_SIZES:
        raise ValueError(f"no ViT named {name!r}; choose from {', '.join(VIT_SIZES)}")
    embed_dim, depth = VIT_SIZES[name]
    return VisionTransformer(embed_dim, depth, **kwargs)
