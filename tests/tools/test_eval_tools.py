"""pfc-eval / pfc-export / pfc-extract on a demo checkpoint, and the ONNX model matching PyTorch."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from partial_fc.eval import load_bin, metrics
from partial_fc.eval.extraction import output_paths
from partial_fc.eval.onnx_model import OnnxBackbone, compare_with_torch, export_and_check
from partial_fc.models import get_model, load_backbone, save_backbone
from partial_fc.tools import eval as eval_tool
from partial_fc.tools import export as export_tool
from partial_fc.tools import extract as extract_tool

from tests.helpers.eval_synthetic_faces import face_image, make_pairs, write_bin

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A demo checkpoint directory (tiny backbone, BN statistics warmed up) and two .bin sets."""
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    kwargs = {"embedding_size": 128}
    model = get_model("tiny", **kwargs).train()
    rng = np.random.default_rng(0)
    with torch.no_grad():  # a few forward passes in train mode move the BN running statistics
        for _ in range(3):
            batch = np.stack([face_image(int(i), rng) for i in rng.integers(0, 12, 16)])
            model(torch.from_numpy(batch).permute(0, 3, 1, 2).float().sub(127.5).div(128))
    ckpt = root / "checkpoints" / "step_100"
    save_backbone(ckpt / "backbone.pt", model, "tiny", kwargs)
    bins = []
    for name, n, seed in (("synth_a", 37, 1), ("synth_b", 24, 2)):
        images, issame = make_pairs(n, seed=seed)
        bins.append(write_bin(root / f"{name}.bin", images, issame))
    return {"root": root, "ckpt": ckpt, "bins": bins}


@pytest.fixture(scope="module")
def exported(demo):
    onnx_path = demo["root"] / "model.onnx"
    assert export_tool.main([str(demo["ckpt"]), str(onnx_path)]) == 0
    return onnx_path


def _check_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_eval_command_on_demo_checkpoint(demo, capsys):
    out = demo["root"] / "eval_ckpt"
    argv = [str(demo["ckpt"]), *map(str, demo["bins"]), "-o", str(out), "--batch-size", "16"]
    assert eval_tool.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert report["model"] == str(demo["ckpt"])
    assert set(report["sets"]) == {"synth_a", "synth_b"}
    model = load_backbone(demo["ckpt"])
    for path in demo["bins"]:
        name = path.stem
        r = report["sets"][name]
        assert set(r) >= {"acc", "std", "tar_at_far", "num_pairs", "xnorm"}
        assert list(r["tar_at_far"]) == ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]
        # The accuracy is the k-fold protocol on flip-fused embeddings, recomputed here.
        images, issame = load_bin(path, progress=False)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().sub(127.5).div(128)
        with torch.no_grad():
            emb = (model(x) + model(torch.flip(x, dims=[3]))).double().numpy()
        acc, std = metrics.lfw_accuracy(emb[0::2], emb[1::2], issame)
        assert r["acc"] == pytest.approx(acc, abs=1e-12) and r["std"] == pytest.approx(std, abs=1e-12)
        assert f"{100 * acc:.2f}%" in printed and name in printed
    _check_png(out / "roc.png")


def test_onnx_export_matches_pytorch(demo, exported):
    model = load_backbone(demo["ckpt"])
    diff = compare_with_torch(model, exported, batch_sizes=(1, 4, 7))  # dynamic batch
    assert diff <= 1e-4
    runner = OnnxBackbone(exported)
    assert runner.embedding_size == 128
    assert runner.input_shape[0] not in (1, 2) and runner.input_shape[1:] == [3, 112, 112]
    x = torch.rand(5, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), rtol=0, atol=1e-4)


def test_onnx_model_gives_the_same_accuracy(demo, exported, capsys):
    out_ckpt, out_onnx = demo["root"] / "cmp_ckpt", demo["root"] / "cmp_onnx"
    bins = [str(p) for p in demo["bins"]]
    assert eval_tool.main([str(demo["ckpt"]), *bins, "-o", str(out_ckpt)]) == 0
    assert eval_tool.main([str(exported), *bins, "-o", str(out_onnx)]) == 0
    ckpt = json.loads((out_ckpt / "eval.json").read_text())["sets"]
    onnx = json.loads((out_onnx / "eval.json").read_text())["sets"]
    for name in ckpt:
        assert onnx[name]["acc"] == ckpt[name]["acc"]
        assert onnx[name]["std"] == pytest.approx(ckpt[name]["std"], abs=1e-12)
        assert onnx[name]["xnorm"] == pytest.approx(ckpt[name]["xnorm"], rel=1e-4)
    _check_png(out_onnx / "roc.png")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_export_refuses_a_mismatch_beyond_tolerance(demo, tmp_path):
    model = load_backbone(demo["ckpt"])
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export_and_check(model, tmp_path / "m.onnx", tolerance=-1.0, exporter="torchscript")
    result = export_and_check(model, tmp_path / "ts.onnx", exporter="torchscript")
    assert result["max_abs_diff"] <= 1e-4


def _write_folder(root, rng):
    keys = []
    for identity in range(3):
        sub = root / f"id{identity}"
        sub.mkdir(parents=True)
        for k in range(2):
            ext = ".png" if k else ".jpg"
            Image.fromarray(face_image(identity, rng)).save(sub / f"img{k}{ext}")
            keys.append(f"id{identity}/img{k}{ext}")
    (root / "notes.txt").write_text("not an image")
    return sorted(keys)


def test_extract_image_folder(demo, tmp_path, capsys):
    rng = np.random.default_rng(3)
    folder = tmp_path / "faces"
    keys = _write_folder(folder, rng)
    output = tmp_path / "out" / "feats.npy"
    assert extract_tool.main([str(demo["ckpt"]), str(folder), str(output), "--batch-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["count"] == 6 and summary["dim"] == 128
    paths = output_paths(output)
    feats = np.load(paths["features"], allow_pickle=False)
    got_keys = np.load(paths["keys"], allow_pickle=False)
    assert got_keys.tolist() == keys
    assert not paths["labels"].exists()
    # Reference: the same crops through the backbone with numpy preprocessing and mirroring.
    model = load_backbone(demo["ckpt"])
    images = np.stack([np.asarray(Image.open(folder / k).convert("RGB")) for k in keys])
    x = (images.astype(np.float64) - 127.5) / 128
    with torch.no_grad():
        emb = sum(model(torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2))).float())
                  .double().numpy() for v in (x, x[:, :, ::-1]))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(feats, emb, rtol=0, atol=1e-5)
    assert feats.dtype == np.float32


def test_extract_refuses_unaligned_sizes_unless_asked(demo, tmp_path, capsys):
    folder = tmp_path / "big"
    folder.mkdir()
    Image.fromarray(np.zeros((120, 130, 3), np.uint8)).save(folder / "a.png")
    out = tmp_path / "f.npy"
    assert extract_tool.main([str(demo["ckpt"]), str(folder), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pfc-extract: error: ") and "a.png is 120x130 (HxW), the model takes 112x112" in err
    assert extract_tool.main([str(demo["ckpt"]), str(folder), str(out), "--resize",
                              "--no-normalize", "--no-flip"]) == 0
    assert np.load(out).shape == (1, 128)


def test_extract_rec_fixture(demo, fixtures_dir, tmp_path):
    pytest.importorskip("partial_fc.data.recordio", reason="RecordIO reader not merged yet")
    rec = fixtures_dir / "recordio" / "insightface" / "train.rec"
    expected = json.loads((fixtures_dir / "recordio" / "insightface" / "expected.json").read_text())
    out = tmp_path / "rec_feats.npy"
    assert extract_tool.main([str(demo["ckpt"]), str(rec), str(out)]) == 0
    paths = output_paths(out)
    keys = np.load(paths["keys"]).tolist()
    labels = np.load(paths["labels"]).tolist()
    assert keys == list(range(1, expected["num_images"] + 1))
    assert labels == [expected["records"][str(k)]["identity"] for k in keys]
    assert np.load(paths["features"]).shape == (expected["num_images"], 128)


def test_module_entry_points_and_help(capsys):
    import runpy
    import subprocess

    # One real process for the entry point; the other two in process to keep the test quick.
    proc = subprocess.run([sys.executable, "-m", "partial_fc.tools.eval", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pfc-eval" in proc.stdout
    for tool, module in (("export", export_tool), ("extract", extract_tool)):
        argv = sys.argv
        sys.argv = [module.__file__, "--help"]
        try:
            with pytest.raises(SystemExit) as done:
                runpy.run_path(module.__file__, run_name="__main__")
        finally:
            sys.argv = argv
        assert done.value.code == 0
        assert f"pfc-{tool}" in capsys.readouterr().out


def test_eval_names_unresolvable_fars_and_fails_a_diverged_model(demo, tmp_path, capsys):
    """37 pairs hold 18 negative pairs: TAR@FAR below 1/18 cannot be measured, and says so."""
    out = tmp_path / "ok"
    assert eval_tool.main([str(demo["ckpt"]), str(demo["bins"][0]), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    tars = json.loads((out / "eval.json").read_text())["sets"]["synth_a"]["tar_at_far"]
    _, issame = load_bin(demo["bins"][0], progress=False)
    negatives = int((~issame).sum())
    for key, value in tars.items():
        if negatives * float(key) >= 1:
            assert isinstance(value, float)
        else:
            assert value == f"n/a (needs >= {round(1 / float(key)):,} negative pairs)" and value in printed
    assert isinstance(tars["0.1"], float) and tars["0.01"].startswith("n/a")

    model = load_backbone(demo["ckpt"])
    with torch.no_grad():  # a diverged model: NaN BatchNorm statistics
        next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(float("nan"))
    save_backbone(tmp_path / "nan" / "backbone.pt", model, "tiny", {"embedding_size": 128})
    out = tmp_path / "nan_eval"
    assert eval_tool.main([str(tmp_path / "nan"), *map(str, demo["bins"]), "-o", str(out)]) == 1
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())["sets"]
    assert report["synth_a"]["num_nonfinite"] == 74 and report["synth_b"]["num_nonfinite"] == 48
    assert "synth_a: 74 of 74 embeddings are non-finite" in printed and "FAILED" in printed


def test_extraction_of_an_im2rec_set_whose_first_image_has_an_array_label_takes_every_image(tmp_path):
    from partial_fc.data import IRHeader, RecordIOWriter, pack
    from partial_fc.eval.extraction import RecordFaces

    from tests.helpers.data_files import jpeg_bytes

    image = jpeg_bytes(np.zeros((112, 112, 3), np.uint8))
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key in range(5):  # im2rec --pack-label: [class, extra]; key 0 is an image, not a header
            w.write(key, pack(IRHeader(2, [float(key % 2 + 1), 0.5], key, 0), image))
    faces = RecordFaces(tmp_path / "train.rec")
    assert faces.keys == [0, 1, 2, 3, 4] and [faces[i][1] for i in range(5)] == [1.0, 2.0, 1.0, 2.0, 1.0]
