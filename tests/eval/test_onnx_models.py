"""Foreign ONNX face models: fixed or dynamic batch, BGR and other mean/std, wrong input sizes.

Each ONNX file is generated here from a tiny PyTorch backbone (wrapped to take the foreign input
convention), and its embeddings must equal those of the PyTorch backbone on our input."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from partial_fc.eval import load_bin
from partial_fc.eval.embedding import InputConvention, embed_images
from partial_fc.eval.onnx_model import OnnxBackbone, export_onnx, load_eval_model
from partial_fc.models import get_model, save_backbone
from partial_fc.tools import eval as eval_tool

from tests.helpers.eval_synthetic_faces import make_pairs, write_bin


class TheirInput(nn.Module):
    """`base` (which takes ours: RGB, (x - 127.5) / 128) taking BGR (x - mean) / std instead;
    written out independently of InputConvention."""

    def __init__(self, base, mean, std, bgr):
        super().__init__()
        self.base, self.mean, self.std, self.bgr = base, mean, std, bgr

    def forward(self, x):
        pixels = x * self.std + self.mean
        if self.bgr:
            pixels = pixels[:, [2, 1, 0]]
        return self.base((pixels - 127.5) / 128.0)


def _export_fixed(model, path, batch, size=112):
    """An ONNX file whose input is fixed at batch x 3 x size x size (legacy exporter)."""
    with torch.no_grad():
        torch.onnx.export(model.eval(), (torch.randn(batch, 3, size, size),), str(path),
                          dynamo=False, input_names=["data"], output_names=["fc1"])
    return path


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    model = get_model("tiny", embedding_size=64).train()
    with torch.no_grad():
        for _ in range(3):  # move the BN running statistics off their initial values
            model(torch.randn(16, 3, 112, 112))
    return model.eval()


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """(path of a 7-pair .bin, its 14 decoded uint8 images)."""
    path = write_bin(tmp_path_factory.mktemp("faces") / "set.bin", *make_pairs(7, seed=3))
    return path, load_bin(path)[0]


def _reference(base, images):
    return embed_images(base, images, batch_size=4)[0]


@pytest.mark.parametrize("case", ["fixed_batch_1", "dynamic_batch", "bgr_std_127.5_fixed_3"])
def test_onnx_embeddings_equal_pytorch(case, base, faces, tmp_path):
    _, images = faces  # 14 images: batches of 4 (+ mirrors) do not divide by the fixed 3
    path = tmp_path / f"{case}.onnx"
    convention = InputConvention()
    if case == "fixed_batch_1":
        _export_fixed(base, path, 1)
    elif case == "dynamic_batch":
        export_onnx(base, path, exporter="torchscript")
    else:
        convention = InputConvention(mean=127.5, std=127.5, bgr=True)
        _export_fixed(TheirInput(base, 127.5, 127.5, True), path, 3)
    model = load_eval_model(path, convention=convention)
    runner = model if isinstance(model, OnnxBackbone) else model.model
    assert runner.fixed_batch == {"fixed_batch_1": 1, "dynamic_batch": None}.get(case, 3)
    emb = embed_images(model, images, batch_size=4)[0]
    np.testing.assert_allclose(emb, _reference(base, images), atol=1e-5)
    if case.startswith("bgr"):  # fed our convention instead, the same file disagrees
        plain = embed_images(OnnxBackbone(path), images, batch_size=4)[0]
        assert np.abs(plain - _reference(base, images)).max() > 1e-3


def test_onnx_inputs_of_another_size_or_layout_are_refused(tmp_path):
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(ValueError, match=r"108x108 images; our faces are aligned to 112x112"):
        OnnxBackbone(_export_fixed(small, tmp_path / "s108.onnx", 1, size=108))

    class Nhwc(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = small

        def forward(self, x):
            return self.small(x.permute(0, 3, 1, 2))

    with torch.no_grad():
        torch.onnx.export(Nhwc().eval(), (torch.randn(1, 112, 112, 3),), str(tmp_path / "nhwc.onnx"),
                          dynamo=False)
    with pytest.raises(ValueError, match=r"112 channels \(channels last: NHWC is not supported\)"):
        OnnxBackbone(tmp_path / "nhwc.onnx")


def test_pfc_eval_on_a_fixed_batch_bgr_model(base, faces, tmp_path):
    bin_path = faces[0]
    ckpt = save_backbone(tmp_path / "ckpt" / "backbone.pt", base, "tiny", {"embedding_size": 64})
    onnx = _export_fixed(TheirInput(base, 127.5, 127.5, True), tmp_path / "their.onnx", 1)
    assert eval_tool.main([str(ckpt), str(bin_path), "--folds", "2", "-o", str(tmp_path / "a")]) == 0
    assert eval_tool.main([str(onnx), str(bin_path), "--batch-size", "1", "--bgr",
                           "--input-std", "127.5", "--folds", "2", "-o", str(tmp_path / "b")]) == 0
    ours, theirs = (json.loads((tmp_path / d / "eval.json").read_text())["sets"]["set"]
                    for d in ("a", "b"))
    assert theirs["acc"] == ours["acc"]
    assert theirs["xnorm"] == pytest.approx(ours["xnorm"], rel=1e-4)
