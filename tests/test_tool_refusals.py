"""Console scripts refuse bad input with one `pfc-X: error: ...` line and exit status 2, say what a
file is when it is not a backbone, print no object reprs, keep pipes free of progress bars and
leave no partial outputs behind."""
from __future__ import annotations

import configparser
import importlib
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from partial_fc.data.image import ImageDecodeError, decode_image
from partial_fc.eval import metrics
from partial_fc.eval.bin_format import load_bin
from partial_fc.models import INSIGHTFACE_ARCHITECTURES, get_model, load_backbone, save_backbone
from partial_fc.progress import progress_bar

REPO = Path(__file__).resolve().parents[1]


def _console_scripts():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [line.strip() for line in cfg["options.entry_points"]["console_scripts"].splitlines()]
    return [tuple(part.strip() for part in line.split("=")) for line in lines if line]


def _run(target: str, argv, capsys):
    module, func = target.split(":")
    rc = getattr(importlib.import_module(module), func)(argv)
    return rc, capsys.readouterr()


def _one_line_refusal(prog, rc, captured):
    assert rc == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.fixture
def tiny_checkpoint(tmp_path):
    return save_backbone(tmp_path / "ckpt" / "backbone.pt", get_model("tiny", embedding_size=16),
                         "tiny", {"embedding_size": 16}).parent


# Every console script, given an input that does not exist.
_MISSING_INPUT_ARGS = {
    "pfc-eval": ["{missing}", "{missing}.bin"],
    "pfc-export": ["{missing}", "{tmp}/out.onnx"],
    "pfc-extract": ["{missing}", "{missing}_faces", "{tmp}/feats.npy"],
    "pfc-pack": ["{missing}", "{tmp}/packed"],
    "pfc-inspect": ["{missing}"],
    "pfc-synthetic": ["{tmp}/syn", "--identities", "0"],
    "pfc-summary": ["{missing}"],
    "pfc-make-bin": ["{missing}", "{missing}.txt", "-o", "{tmp}/x.bin"],
    "pfc-align": ["{missing}", "{tmp}/aligned", "--landmarks", "{missing}.txt"],
}


def test_every_console_script_is_covered():
    assert {name for name, _ in _console_scripts()} == set(_MISSING_INPUT_ARGS)


@pytest.mark.parametrize("prog,target", _console_scripts())
def test_console_script_refuses_missing_input_in_one_line(prog, target, tmp_path, capsys):
    if prog == "pfc-summary":  # a run directory without summary.json: its own rc 1 message
        pytest.skip("pfc-summary reports an unfinished run with rc 1 by design")
    argv = [a.format(missing=tmp_path / "nonexistent", tmp=tmp_path) for a in _MISSING_INPUT_ARGS[prog]]
    _one_line_refusal(prog, *_run(target, argv, capsys))


def test_eval_of_a_missing_bin_is_one_line(tiny_checkpoint, tmp_path, capsys):
    line = _one_line_refusal("pfc-eval", *_run("partial_fc.tools.eval:main",
                                               [str(tiny_checkpoint), str(tmp_path / "nonexist.bin"),
                                                "--device", "cpu"], capsys))
    assert "nonexist.bin" in line


def test_insightface_export_of_tiny_is_refused(tiny_checkpoint, tmp_path, capsys):
    line = _one_line_refusal("pfc-export", *_run("partial_fc.tools.export:main",
                                                 [str(tiny_checkpoint), str(tmp_path / "x.pth"),
                                                  "--format", "insightface"], capsys))
    assert "'tiny'" in line and "no insightface equivalent" in line
    assert all(arch in line for arch in ("r18", "r200", "mbf", "vit_t"))
    assert not (tmp_path / "x.pth").exists()
    assert "tiny" not in INSIGHTFACE_ARCHITECTURES
    with pytest.raises(ValueError, match="'tiny' has no insightface equivalent"):
        save_backbone(tmp_path / "y.pth", get_model("tiny", embedding_size=16), "tiny",
                      format="insightface")


@pytest.mark.parametrize("name,content,found", [
    ("README.md", b"# a readme\n\nnot weights\n", "found text"),
    ("model.onnx", b"\x08\x07\x12\x07pytorch\x1a\x032.0", "found an ONNX model"),
    ("weights.zip", None, "found a zip archive without data.pkl"),
])
def test_non_torch_file_says_what_it_is(tmp_path, name, content, found):
    path = tmp_path / name
    if content is None:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "hello")
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_backbone(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a PyTorch backbone file (expected ours: a dict with "
                              "name/kwargs/state_dict, or an insightface state_dict)")
    assert found in message
    assert "weights_only" not in message


def test_decode_errors_carry_no_object_reprs(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"GIF89a but not really an image at all")
    assert "0x" not in str(info.value) and "BytesIO" not in str(info.value)
    good = tmp_path / "g.jpg"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good)
    path = tmp_path / "pairs.bin"
    with open(path, "wb") as f:
        pickle.dump(([good.read_bytes(), b"not an image"], [True]), f, protocol=4)
    with pytest.raises(ValueError, match=rf"{path}: image 1 cannot be decoded") as info:
        load_bin(path, progress=False)
    assert "0x" not in str(info.value) and "object at" not in str(info.value)


def test_progress_bar_is_off_in_a_pipe():
    assert progress_bar(range(3)).disable  # pytest's stderr is not a terminal
    assert progress_bar(range(3), enabled=False).disable


def test_eval_table_prints_na_with_a_footnote():
    from partial_fc.tools.eval import _json_set, format_table, unresolved_far
    tars = {metrics.far_key(f): (0.9 if f >= 1e-3 else None) for f in metrics.DEFAULT_FARS}
    result = {"num_pairs": 6000, "acc": 0.99, "std": 0.01, "tar_at_far": tars}
    table = format_table({"lfw": result}, {}, metrics.DEFAULT_FARS)
    lines = table.splitlines()
    assert max(len(line) for line in lines) < 120
    assert "needs" not in lines[2]  # the data row holds plain n/a cells
    assert lines[2].count("n/a") == sum(f < 1e-3 for f in metrics.DEFAULT_FARS)
    assert any("1,000,000 negative pairs" in line for line in lines[3:])
    # eval.json keeps the full text
    assert _json_set(result, set())["tar_at_far"][metrics.far_key(1e-6)] == unresolved_far(1e-6)
    assert "1,000,000" in unresolved_far(1e-6)


def test_failed_pack_leaves_no_new_folder_and_keeps_an_old_one(tmp_path, capsys):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text("a.jpg\t0\nmissing.jpg\t0\n")
    out = tmp_path / "new" / "packed"
    _one_line_refusal("pfc-pack", *_run("partial_fc.tools.pack:main",
                                        [str(lst), str(out), "--workers", "1", "--no-progress"], capsys))
    assert not (tmp_path / "new").exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    _one_line_refusal("pfc-pack", *_run("partial_fc.tools.pack:main",
                                        [str(lst), str(old), "--workers", "1", "--no-progress"], capsys))
    assert (old / "keep.txt").read_text() == "mine"


def test_train_config_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "data.num_classes=-3",
         f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [errors[0]] and "data.num_classes" in errors[0], proc.stderr[-2000:]


def test_onnx_export_prints_no_known_exporter_noise(tiny_checkpoint, tmp_path, capsys, caplog, recwarn):
    import warnings

    from partial_fc.eval.onnx_model import _known_exporter_noise_silenced
    pytest.importorskip("onnxruntime")
    rc, captured = _run("partial_fc.tools.export:main",
                        [str(tiny_checkpoint), str(tmp_path / "m.onnx")], capsys)
    assert rc == 0, captured.err
    assert "torchvision is not installed" not in captured.err + caplog.text
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]
    with _known_exporter_noise_silenced(), pytest.warns(UserWarning, match="a real one"):
        warnings.warn("a real one", UserWarning)


def test_align_summary_says_what_was_left_out_and_suggests_keep_largest(tmp_path):
    from partial_fc.tools.align import left_out_note
    report = {"photos": 10, "aligned": 7, "no_face": ["a/1.jpg"], "several_faces": ["b/1.jpg", "c/2.jpg"],
              "unreadable": []}
    note = left_out_note(report, tmp_path / "align_report.json")
    assert note.startswith("left out 3 of 10 photo(s) (2 with several faces, 1 with no face found)")
    assert "align_report.json" in note and "--keep-largest" in note
    assert "--keep-largest" not in left_out_note({**report, "several_faces": [], "photos": 8},
                                                 tmp_path / "r.json")
    assert left_out_note({**report, "no_face": [], "several_faces": []}, tmp_path / "r.json") == ""


def test_make_bin_missing_images_points_at_the_align_report(tmp_path):
    from partial_fc.eval.pairs import PairsError, make_bin
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.jpg")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg gone.jpg 1\n")
    with pytest.raises(PairsError) as info:
        make_bin(tmp_path, pairs, tmp_path / "x.bin", progress=False)
    assert "align_report.json" not in str(info.value)
    (tmp_path / "align_report.json").write_text("{}")
    with pytest.raises(PairsError, match=r"1 image\(s\) of the pairs list are missing \(.*align_report\.json "
                       r"lists the photos pfc-align left out.*--keep-largest\)"):
        make_bin(tmp_path, pairs, tmp_path / "x.bin", progress=False)


def test_size_refusal_mentions_pfc_align_for_raw_photos(tmp_path):
    from partial_fc.data import FaceRecordDataset
    from partial_fc.data.packing import pack_images
    Image.new("RGB", (92, 112), (1, 2, 3)).save(tmp_path / "a.jpg")
    pack_images([(tmp_path / "a.jpg", 0)], tmp_path / "rec", progress=False)
    with pytest.raises(ValueError, match=r"rec/property: images are 112x92 \(HxW\) but 112x112 are needed; "
                       r"repack with pfc-pack --resize 112x112, or for raw photos align them first "
                       r"with pfc-align"):
        FaceRecordDataset(tmp_path / "rec", image_size=(112, 112))


# ----------------------------------------------------------------------------- launch/train.py
# Each kind of bad input (config, data set, checkpoint, output folder) leaves launch/train.py
# through one `train.py: error: ...` line and exit status 2; the line names the file, the key,
# the line or record, and what was expected against what was found.
SMALL_RUN = ["data.synthetic.num_identities=8", "data.synthetic.images_per_identity=4",
             "data.synthetic.num_heldout_identities=2", "data.synthetic.num_pairs=20", "data.batch_size=4",
             "data.num_workers=0", "trainer.max_steps=2", "trainer.progress_bar=false"]
REC_RUN = ["data=rec", "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=2",
           "trainer.progress_bar=false"]


def _train(overrides, env_dir: Path, limit_file_bytes=None) -> subprocess.CompletedProcess:
    import os
    import resource

    def limit():  # a file size limit (EFBIG on a longer write), settable without privileges
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = dict(os.environ, PFC_DATA_CACHE=str(env_dir / "cache"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *overrides], capture_output=True,
                          text=True, timeout=240, cwd=env_dir, env=env,
                          preexec_fn=limit if limit_file_bytes else None)


def _one_train_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("train.py: error: "), proc.stderr[-3000:]
    return errors[0][len("train.py: error: "):]


def _pack(root: Path, size=(112, 112)) -> Path:
    from partial_fc.data.packing import pack_images

    items = []
    for k in range(8):
        path = root.parent / f"{root.name}-src" / f"{k}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size[1], size[0]), (30 * k, 60, 90)).save(path)
        items.append((path, k // 2))
    pack_images(items, root, progress=False)
    return root


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    """A finished 2-step run of the small synthetic set, packs of 112x112 and 112x96 crops, and
    files that are not what their key wants."""
    base = tmp_path_factory.mktemp("train_inputs")
    done = base / "done"
    proc = _train([*SMALL_RUN, f"hydra.run.dir={done}"], base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _pack(base / "rec112")
    _pack(base / "rec96", size=(112, 96))
    (base / "notes.txt").write_text("not weights, not pairs\n")
    (base / "empty").mkdir()
    (base / "a_file").write_text("")
    return base


def _idx_with_offset(base: Path, value: str) -> Path:
    bad = base / "idx_bad"
    if not bad.exists():
        shutil.copytree(base / "rec112", bad)
    lines = (bad / "train.idx").read_text().splitlines()
    lines[1] = f"1\t{value}"
    (bad / "train.idx").write_text("\n".join(lines) + "\n")
    return bad


def _damaged_run(base: Path) -> Path:
    run = base / "damaged"
    if not run.exists():
        shutil.copytree(base / "done", run)
        trainer = run / "checkpoints" / "step_00000002" / "trainer.pt"
        trainer.write_bytes(trainer.read_bytes()[:100])
    return run


def _tensorboard_blocked(base: Path) -> Path:
    run = base / "tb_blocked"
    run.mkdir(exist_ok=True)
    (run / "tensorboard").write_text("")
    return run


TRAIN_REFUSALS = {
    "data.num_classes that the labels contradict": (
        lambda b: [*SMALL_RUN, "data.num_classes=9", f"hydra.run.dir={b}/r1"],
        r"data\.num_classes=9 but the dataset has 8 classes \(the labels of .*train\.rec: max label 7 \+ 1\)"),
    "112x96 crops under on_bad_image=skip": (
        lambda b: [*REC_RUN, f"data.root={b}/rec96", "data.on_bad_image=skip", f"hydra.run.dir={b}/r2"],
        r"rec96/property: images are 112x96 \(HxW\) but 112x112 are needed; repack with pfc-pack --resize 112x112"),
    "a data.root that does not exist": (
        lambda b: [*REC_RUN, f"data.root={b}/nowhere", f"hydra.run.dir={b}/r3"],
        r"data\.root: .*/nowhere does not exist"),
    "a data.root without RecordIO": (
        lambda b: [*REC_RUN, f"data.root={b}/empty", f"hydra.run.dir={b}/r4"],
        r"no RecordIO file .*/empty/train\.rec"),
    "an .idx offset of 2^64-1 (apache/mxnet#8103)": (
        lambda b: [*REC_RUN, f"data.root={_idx_with_offset(b, '18446744073709551615')}", f"hydra.run.dir={b}/r5"],
        r"idx_bad/train\.idx: line 2: key 1: offset 18446744073709551615 lies past the end of train\.rec "
        r"\(\d+ bytes\)"),
    "a data.val_bins file that is not a .bin": (
        lambda b: [*SMALL_RUN, f"data.val_bins=[{b}/notes.txt]", f"hydra.run.dir={b}/r6"],
        r"data\.val_bins: .*notes\.txt: not a readable verification \.bin"),
    "a model.pretrained file that is not a backbone": (
        lambda b: [*SMALL_RUN, f"model.pretrained={b}/notes.txt", f"hydra.run.dir={b}/r7"],
        r"model\.pretrained: .*notes\.txt: not a PyTorch backbone file .*found text"),
    "a run folder of a run with another class count": (
        lambda b: [*SMALL_RUN, "data.synthetic.num_identities=6", f"hydra.run.dir={b}/done"],
        r"done/checkpoints/step_00000002/MANIFEST\.json: the checkpoint was written with num_classes=8 "
        r"\(this run: 6\); this run folder holds another run"),
    "a run folder of a run of another head": (
        lambda b: [*SMALL_RUN, "head=arcface", f"hydra.run.dir={b}/done"],
        r"MANIFEST\.json: the checkpoint was written with head=npcface \(this run: arcface\)"),
    "a run folder of a run on another number of images": (
        lambda b: [*SMALL_RUN, "data.synthetic.images_per_identity=5", f"hydra.run.dir={b}/done"],
        r"done/checkpoints/step_00000002/trainer\.pt: the sampler state does not fit this run \(sampler state "
        r"has dataset_len=32 but this sampler has dataset_len=40\)"),
    "a truncated checkpoint file": (
        lambda b: [*SMALL_RUN, f"hydra.run.dir={_damaged_run(b)}"],
        r"damaged/checkpoints/step_00000002/trainer\.pt: not a readable checkpoint file \(100 bytes\)"),
    "a batch larger than a rank's share of the data set": (
        lambda b: [*SMALL_RUN, "data.batch_size=64", f"hydra.run.dir={b}/r8"],
        r"data\.batch_size=64 is larger than a rank's share of the data set \(32 images over 1 rank\(s\): 32 per "
        r"epoch\)"),
    "a run folder that is a file": (
        lambda b: [*SMALL_RUN, f"hydra.run.dir={b}/a_file/run"],
        r"cannot write the run folder .*a_file/run: .*a_file is a file, not a folder"),
    "a TensorBoard folder that is a file": (
        lambda b: [*SMALL_RUN, f"hydra.run.dir={_tensorboard_blocked(b)}"],
        r"cannot write the TensorBoard log .*tb_blocked/tensorboard: .*tensorboard is a file, not a folder"),
}


@pytest.mark.parametrize("kind", list(TRAIN_REFUSALS))
def test_train_refuses_each_kind_of_bad_input_in_one_line(kind, train_inputs):
    overrides, message = TRAIN_REFUSALS[kind]
    line = _one_train_error(_train(overrides(train_inputs), train_inputs))
    assert re.search(message, line), line


def test_train_that_cannot_write_its_first_checkpoint_says_which_file_and_why(train_inputs):
    run = train_inputs / "fsize"
    proc = _train([*SMALL_RUN, f"hydra.run.dir={run}"], train_inputs, limit_file_bytes=1 << 20)
    line = _one_train_error(proc)
    assert re.fullmatch(rf"checkpoint of step 2 not written: rank 0: cannot write the trainer state "
                        rf"{run}/checkpoints/step_00000002\.tmp/trainer\.pt: File too large; no complete checkpoint "
                        r"exists yet", line), line
    assert list((run / "checkpoints").iterdir()) == []  # the half-written folder is gone


# ----------------------------------------------------------------------------- other tools


def test_inspect_names_the_idx_line_of_an_offset_of_2_64_minus_1(tmp_path, capsys):
    root = _idx_with_offset(_pack(tmp_path / "rec112").parent, "18446744073709551615")
    rc, captured = _run("partial_fc.tools.inspect:main", [str(root), "--no-progress"], capsys)
    assert rc == 2  # the set does not open: the report says why
    assert re.search(r"FATAL +.*idx_bad/train\.idx: line 2: key 1: offset 18446744073709551615 lies past the end "
                     r"of train\.rec \(\d+ bytes\) \(2\^64-1: a -1 written as unsigned\)", captured.out), captured.out


@pytest.mark.parametrize("content,message", [
    ('{"steps": 3', r"summary\.json: not a readable run summary \(JSON: Expecting"),
    ("[1, 2]", r"summary\.json: not a run summary of launch/train\.py \(a JSON list, expected an object\)"),
    ('{"steps": 3}', r"summary\.json: not a run summary of launch/train\.py \(it has no 'samples_per_sec' entry\)"),
])
def test_summary_of_a_damaged_file_names_it(tmp_path, capsys, content, message):
    (tmp_path / "summary.json").write_text(content)
    line = _one_line_refusal("pfc-summary", *_run("partial_fc.tools.summary:main", [str(tmp_path)], capsys))
    assert re.search(message, line), line


def test_pack_refuses_a_list_line_of_three_fields_and_a_photo_listed_twice(tmp_path, capsys):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8), (3, 2, 1)).save(tmp_path / "b.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text("a.jpg\t0\n0\t1\tb.jpg\n")  # an im2rec .lst line: index, label, path
    line = _one_line_refusal("pfc-pack", *_run("partial_fc.tools.pack:main",
                                               [str(lst), str(tmp_path / "out"), "--workers", "1", "--no-progress"],
                                               capsys))
    assert line.endswith(f"{lst}:2: expected 'path<TAB>label', got 3 tab-separated field(s) in '0\\t1\\tb.jpg' "
                         "(this looks like an im2rec .lst, 'index<TAB>label<TAB>path': swap to 'path<TAB>label')")
    lst.write_text("a.jpg\t0\nb.jpg\t1\n./a.jpg\t1\n")  # the same photo in two classes
    line = _one_line_refusal("pfc-pack", *_run("partial_fc.tools.pack:main",
                                               [str(lst), str(tmp_path / "out"), "--workers", "1", "--no-progress"],
                                               capsys))
    assert line.endswith(f"{lst}:3: './a.jpg' is listed again (first on line 1)")
    assert not (tmp_path / "out").exists()


def test_eval_of_a_set_smaller_than_its_folds_names_the_file(tiny_checkpoint, tmp_path, capsys):
    from partial_fc.eval.bin_format import write_bin

    image = (tmp_path / "f.jpg")
    Image.new("RGB", (112, 112), (9, 9, 9)).save(image)
    path = write_bin(tmp_path / "tiny.bin", [image.read_bytes()] * 8, [True, False, True, False])
    line = _one_line_refusal("pfc-eval", *_run("partial_fc.tools.eval:main",
                                               [str(tiny_checkpoint), str(path), "--device", "cpu"], capsys))
    assert line.endswith(f"{path}: 4 pairs cannot be scored by the 10-fold protocol (it needs 2 <= folds <= pairs)")
    text = tmp_path / "pairs.bin"
    text.write_text("not a pickle")
    line = _one_line_refusal("pfc-eval", *_run("partial_fc.tools.eval:main",
                                               [str(tiny_checkpoint), str(text), "--device", "cpu"], capsys))
    assert f"{text}: not a readable verification .bin (expected a pickle of (images, issame))" in line
