"""insightface's arcface_torch backbones re-stated as functions of a bare state_dict (eval mode).

An independent reference for "insightface's code loads our file": each function reads the
parameters by insightface's own key names (recognition/arcface_torch/backbones/iresnet.py,
mobilefacenet.py, vit.py) and runs their forward with torch.nn.functional only, so it shares no
code with partial_fc.models. A missing key raises KeyError, a wrong shape fails in the op.
"""
import re

import torch
import torch.nn.functional as F


def _bn(x, sd, p, eps=1e-5):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                        sd[p + ".bias"], False, 0.0, eps)


def _count(sd, prefix):
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max(int(m.group(1)) for k in sd for m in [pat.match(k)] if m)


def iresnet_forward(sd, x):
    """IResNet: conv1/bn1/prelu, layer1..4 of IBasicBlock (stride 2 on each first block),
    bn2, flatten, fc, features (BN1d)."""
    x = F.prelu(_bn(F.conv2d(x, sd["conv1.weight"], padding=1), sd, "bn1"), sd["prelu.weight"])
    for layer in range(1, 5):
        for b in range(_count(sd, f"layer{layer}.")):
            p = f"layer{layer}.{b}."
            stride = 2 if b == 0 else 1
            out = F.conv2d(_bn(x, sd, p + "bn1"), sd[p + "conv1.weight"], padding=1)
            out = F.prelu(_bn(out, sd, p + "bn2"), sd[p + "prelu.weight"])
            out = _bn(F.conv2d(out, sd[p + "conv2.weight"], stride=stride, padding=1), sd, p + "bn3")
            if p + "downsample.0.weight" in sd:
                x = _bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride), sd,
                        p + "downsample.1")
            x = out + x
    x = torch.flatten(_bn(x, sd, "bn2"), 1)
    return _bn(F.linear(x, sd["fc.weight"], sd["fc.bias"]), sd, "features")


def _conv_block(sd, p, x, stride=1, padding=None):
    """ConvBlock / LinearBlock: `p.layers.0` conv, `.1` BN, `.2` PReLU when present."""
    w = sd[p + ".layers.0.weight"]
    groups = x.shape[1] // w.shape[1]
    padding = w.shape[-1] // 2 if padding is None else padding
    x = _bn(F.conv2d(x, w, stride=stride, padding=padding, groups=groups), sd, p + ".layers.1")
    if p + ".layers.2.weight" in sd:
        x = F.prelu(x, sd[p + ".layers.2.weight"])
    return x


def _depthwise(sd, p, x, stride, residual):
    out = _conv_block(sd, p + ".layers.0", x)
    out = _conv_block(sd, p + ".layers.1", out, stride=stride)
    out = _conv_block(sd, p + ".layers.2", out)
    return x + out if residual else out


def mobilefacenet_forward(sd, x):
    """MobileFaceNet: layers.0 conv/2, layers.1 (grouped conv or Residual), then DepthWise/2 and
    Residual pairs, conv_sep, GDC (7x7 depthwise LinearBlock, flatten, Linear, BN1d)."""
    x = _conv_block(sd, "layers.0", x, stride=2)
    for i in range(1, 8):
        p = f"layers.{i}"
        if sd.get(p + ".layers.0.weight", torch.empty(0)).ndim == 4:  # a plain ConvBlock
            x = _conv_block(sd, p, x)
        elif i % 2 == 0:  # DepthWise, stride 2
            x = _depthwise(sd, p, x, 2, residual=False)
        else:  # Residual
            for b in range(_count(sd, p + ".layers.")):
                x = _depthwise(sd, f"{p}.layers.{b}", x, 1, residual=True)
    x = _conv_block(sd, "conv_sep", x)
    x = torch.flatten(_conv_block(sd, "features.layers.0", x, padding=0), 1)
    return _bn(F.linear(x, sd["features.layers.2.weight"]), sd, "features.layers.3")


def vit_forward(sd, x, num_heads=8):
    """VisionTransformer (eval): patch_embed 9x9/9, + pos_embed, pre-LN blocks (attention with
    explicit softmax, MLP with ReLU6), norm, flatten, feature head (eps 2e-5)."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=9)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    n, t, d = x.shape

    def ln(h, p):
        return F.layer_norm(h, (d,), sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    for b in range(_count(sd, "blocks.")):
        p = f"blocks.{b}."
        h = ln(x, p + "norm1")
        qkv = F.linear(h, sd[p + "attn.qkv.weight"]).reshape(n, t, 3, num_heads, d // num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (d // num_heads) ** -0.5).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(n, t, d)
        x = x + F.linear(h, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.relu6(F.linear(ln(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    x = ln(x, "norm").reshape(n, t * d)
    x = _bn(F.linear(x, sd["feature.0.weight"]), sd, "feature.1", eps=2e-5)
    return _bn(F.linear(x, sd["feature.2.weight"]), sd, "feature.3", eps=2e-5)


FORWARDS = {"r18": iresnet_forward, "mbf": mobilefacenet_forward, "vit_t": vit_forward}
