"""Backbones: output shapes, parameter counts, channels_last, activation checkpointing, save/load."""
import copy
import pickle

import pytest
import torch

from partial_fc.models import MODEL_NAMES, get_model, load_backbone, save_backbone
from partial_fc.models.iresnet import IRESNET_DEPTHS

# Mechanism tests (checkpointing, channels_last, autocast) use a slim MobileFaceNet: depthwise
# convolutions are slow on CPU and the structure, not the width, is what they exercise.
SMALL = {"mbf": {"blocks": (1, 1, 1, 1), "scale": 1}}


def _iresnet_param_count(depths, embedding_size=512):
    """Count IResNet parameters from the architecture's arithmetic (independent of the module)."""
    conv3 = lambda i, o: 9 * i * o  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv3(3, 64) + bn(64) + 64  # stem conv, BN, PReLU
    in_ch = 64
    for width, depth in zip((64, 128, 256, 512), depths):
        for b in range(depth):
            c_in = in_ch if b == 0 else width
            total += bn(c_in) + conv3(c_in, width) + bn(width) + width + conv3(width, width) + bn(width)
            if b == 0:  # every first block changes resolution: 1x1 projection + BN
                total += c_in * width + bn(width)
        in_ch = width
    total += bn(512) + 512 * 49 * embedding_size + embedding_size + bn(embedding_size)
    return total


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_and_embedding_size(name):
    torch.manual_seed(0)
    size = 128 if name == "tiny" else 256
    batch = 1 if name in ("r100", "r200") else 2
    model = get_model(name, embedding_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, 112, 112))
    assert out.shape == (batch, size)
    assert torch.isfinite(out).all()
    assert model.embedding_size == size


@pytest.mark.parametrize("name,published", [("r50", 43.6e6), ("r100", 65.2e6)])
def test_iresnet_parameter_counts(name, published):
    model = get_model(name)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == _iresnet_param_count(IRESNET_DEPTHS[int(name[1:])])
    assert abs(counted - published) / published < 0.002  # insightface's table gives 3 digits


def test_tiny_is_small_and_configurable():
    for size in (128, 512):
        model = get_model("tiny", embedding_size=size)
        assert sum(p.numel() for p in model.parameters()) < 1_000_000
        assert model(torch.randn(2, 3, 112, 112)).shape == (2, size)


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown backbone"):
        get_model("resnet9000")
    with pytest.raises(ValueError, match="no IResNet of depth"):
        get_model("r42")


def test_embedding_bn_scale_is_frozen_in_iresnet():
    model = get_model("r18")
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(512))


@pytest.mark.parametrize("name", ["r18", "mbf", "tiny"])
def test_channels_last_gives_the_same_embedding(name):
    torch.manual_seed(1)
    model = get_model(name, **SMALL.get(name, {})).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = model(x)
        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out = cl_model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["r18", "mbf", "tiny"])
def test_activation_checkpointing_matches_plain_forward_and_backward(name):
    torch.manual_seed(2)
    kwargs = SMALL.get(name, {})
    plain = get_model(name, embedding_size=64, **kwargs).train()
    ckpt = get_model(name, embedding_size=64, activation_checkpointing=True, **kwargs).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 112, 112)

    out_plain = plain(x)
    out_ckpt = ckpt(x)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    weights = torch.randn_like(out_plain)
    (out_plain * weights).sum().backward()
    (out_ckpt * weights).sum().backward()
    for (n, p_plain), (_, p_ckpt) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p_plain.grad is None:
            assert p_ckpt.grad is None, n
            continue
        torch.testing.assert_close(p_ckpt.grad, p_plain.grad, rtol=1e-5, atol=1e-6, msg=n)
    # The recomputation in backward must not update BatchNorm running statistics a second time.
    for (n, b_plain), (_, b_ckpt) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(b_ckpt, b_plain, rtol=0, atol=0, msg=n)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(4)
    kwargs = {"embedding_size": 128, "widths": [8, 16, 32, 64], "dropout": 0.1}
    model = get_model("tiny", **kwargs)
    model.train()
    model(torch.randn(8, 3, 112, 112))  # move BN running statistics off their initial values
    model.eval()
    path = save_backbone(tmp_path / "ckpt" / "backbone.pt", model, "tiny", kwargs)
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"name", "kwargs", "state_dict"}
    assert payload["name"] == "tiny" and payload["kwargs"] == kwargs

    x = torch.randn(2, 3, 112, 112)
    for source in (path, tmp_path / "ckpt"):  # the file, or the checkpoint directory holding it
        loaded = load_backbone(source)
        assert not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_load_backbone_refuses_code_and_bad_files(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"name": "tiny", "kwargs": {}, "state_dict": {}, "x": Evil()}, evil)
    with pytest.raises(ValueError, match="not a PyTorch backbone file .*found a torch zip archive whose "
                       "pickle holds objects other than") as refused:  # weights_only's refusal
        load_backbone(evil)
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)
    assert "weights_only" not in str(refused.value)
    assert not marker.exists()

    wrong = tmp_path / "wrong.pt"
    torch.save({"weights": {}}, wrong)
    with pytest.raises(ValueError, match="not a backbone file"):
        load_backbone(wrong)
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "missing")
    mismatched = tmp_path / "mismatched.pt"
    save_backbone(mismatched, get_model("tiny", embedding_size=64), "tiny", {"embedding_size": 32})
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone(mismatched)


@pytest.mark.parametrize("name", ["r18", "mbf", "tiny"])
def test_backbones_run_under_bf16_autocast(name):
    torch.manual_seed(5)
    model = get_model(name, embedding_size=64, **SMALL.get(name, {})).train()
    x = torch.randn(3, 3, 112, 112)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    ref = model(x)
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # bf16 keeps ~3 significant digits: the embeddings stay close to the fp32 ones.
    cos = torch.nn.functional.cosine_similarity(out.float(), ref, dim=1)
    assert (cos > 0.98).all(), cos
