"""FaceRecordDataset, ImageFolderDataset, decode_image and train_transform."""
from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from partial_fc.data import (
    BadSampleError,
    FaceRecordDataset,
    ImageFolderDataset,
    IRHeader,
    LabelError,
    RecordIOWriter,
    decode_image,
    pack,
    train_transform,
)
from partial_fc.data.image import decode_image_pil
from partial_fc.data.transforms import eval_transform, flip_image, normalize_batch, normalize_image

from tests.helpers.data_files import jpeg_bytes, make_identity_folder


def _write_insightface(root, images, labels, ranges=None, num_classes=None):
    """A small InsightFace-layout set written with our writer (labels as given)."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(images)
    classes = num_classes if num_classes is not None else max(labels) + 1
    if ranges is None:
        ranges = []
        for c in range(classes):
            keys = [i + 1 for i, l in enumerate(labels) if l == c]
            ranges.append((keys[0], keys[-1] + 1) if keys else (1, 1))
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        w.write(0, pack(IRHeader(0, [n + 1, n + 1 + classes], 0, 0), b""))
        for i, (img, lab) in enumerate(zip(images, labels)):
            w.write(i + 1, pack(IRHeader(0, float(lab), i + 1, 0), img))
        for c, (a, b) in enumerate(ranges):
            w.write(n + 1 + c, pack(IRHeader(0, [a, b], 0, 0), b""))
    h, w = decode_image(images[0]).shape[:2]
    (root / "property").write_text(f"{classes},{h},{w}")
    return root


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [jpeg_bytes(rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)) for _ in range(n)]


def test_insightface_fixture_items(recordio_fixtures):
    ds = FaceRecordDataset(recordio_fixtures / "insightface")
    assert ds.layout == "insightface" and len(ds) == 24 and ds.num_classes == 6
    assert ds.identity_ranges.tolist() == [[1 + 4 * c, 5 + 4 * c] for c in range(6)]
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == [i // 4 for i in range(24)]  # keys 1..24 in order, 4 per identity
    image, _ = ds[0]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    x, y = FaceRecordDataset(recordio_fixtures / "insightface", transform=train_transform())[5]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape[0] == 3 and y == 1


def test_decode_image_matches_pillow(recordio_fixtures):
    ds = FaceRecordDataset(recordio_fixtures / "insightface")
    for i in (0, 4, 9):
        _, payload = ds.read_record(i)
        np.testing.assert_array_equal(decode_image(payload), decode_image_pil(payload))
    # non-JPEG and grayscale input
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out.shape == (8, 8, 3) and (out[..., 0] == gray).all()
    assert decode_image(jpeg_bytes(np.zeros((8, 8, 3), np.uint8))).shape == (8, 8, 3)


def test_train_transform_values():
    img = np.random.default_rng(0).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    ref = (img.astype(np.float64) - 127.5) / 128.0
    never = train_transform(flip_prob=0.0)(img)
    always = train_transform(flip_prob=1.0)(img)
    np.testing.assert_array_equal(never.numpy(), ref.transpose(2, 0, 1).astype(np.float32))
    np.testing.assert_array_equal(always.numpy(), ref[:, ::-1].transpose(2, 0, 1).astype(np.float32))
    np.testing.assert_array_equal(eval_transform()(img).numpy(), never.numpy())
    before = img.copy()
    flips = [bool((train_transform(rng=random.Random(s))(img) == always).all()) for s in range(200)]
    assert 60 < sum(flips) < 140  # about half
    np.testing.assert_array_equal(img, before)  # input untouched


def test_batch_normalisation_equals_the_per_sample_transform():
    """flip_image in the worker + normalize_batch on the device == normalize_image, bit for bit,
    against a float64 reference; grayscale, read-only and tensor inputs; the input untouched."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 9, 7, 3), dtype=np.uint8)
    flips = [True, False, True, True, False]
    ref = (images.astype(np.float64) - 127.5) / 128.0
    ref = np.stack([r[:, ::-1] if f else r for r, f in zip(ref, flips)]).transpose(0, 3, 1, 2)
    ref = ref.astype(np.float32)
    before = images.copy()
    batch = torch.stack([flip_image(img, f) for img, f in zip(images, flips)])
    assert batch.dtype == torch.uint8 and batch.shape == (5, 9, 7, 3)
    out = normalize_batch(batch)
    assert out.is_contiguous() and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), ref)
    last = normalize_batch(batch, memory_format=torch.channels_last)
    assert last.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(last.numpy(), ref)
    per_sample = torch.stack([normalize_image(img, flip=f) for img, f in zip(images, flips)])
    assert all(normalize_image(img, flip=f).is_contiguous() for img, f in zip(images, flips))
    np.testing.assert_array_equal(per_sample.numpy(), ref)
    np.testing.assert_array_equal(images, before)

    read_only = images[0].copy()
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy warns on read-only arrays
        np.testing.assert_array_equal(normalize_image(read_only, flip=True).numpy(), ref[0])
        np.testing.assert_array_equal(flip_image(read_only, True).numpy(), images[0][:, ::-1])
        np.testing.assert_array_equal(flip_image(read_only, False).numpy(), images[0])
    np.testing.assert_array_equal(normalize_image(torch.from_numpy(images[0]), flip=True).numpy(), ref[0])
    gray = images[0, :, :, 0]
    assert flip_image(gray, True).shape == (9, 7, 3)
    np.testing.assert_array_equal(normalize_image(gray).numpy()[2], (gray.astype(np.float32) - 127.5) / 128)
    with pytest.raises(ValueError, match="uint8 NxHxWx3"):
        normalize_batch(batch.float())
    with pytest.raises(ValueError, match="HxWx3"):
        normalize_image(np.zeros((4, 4, 4), np.uint8))


def test_bad_image_raise_and_skip(tmp_path):
    imgs = _images(6)
    imgs[2] = imgs[2][:40]  # truncated JPEG
    labels = [0, 0, 1, 1, 2, 2]
    root = _write_insightface(tmp_path / "ds", imgs, labels)
    ds = FaceRecordDataset(root)
    with pytest.raises(BadSampleError, match=r"train\.rec: key 3: offset \d+: cannot decode"):
        ds[2]
    skip = FaceRecordDataset(root, on_bad_image="skip", return_key=True)
    assert skip[2] is None  # left out; no other sample stands in for it (none is served twice)
    assert [None if item is None else item[2] for item in (skip[i] for i in range(6))] == [1, 2, None, 4, 5, 6]
    assert skip.skipped == 2 and skip.skipped_indices == [2, 2]


def test_an_image_of_another_size_is_a_bad_sample_named_by_key_or_path(tmp_path):
    imgs = _images(4)
    size = decode_image(imgs[0]).shape[:2]
    other = np.zeros((size[0] + 8, size[1], 3), np.uint8)
    imgs[1] = jpeg_bytes(other)
    root = _write_insightface(tmp_path / "ds", imgs, [0, 0, 1, 1])
    assert FaceRecordDataset(root)[1][0].shape[:2] == other.shape[:2]  # no size asked: no check
    strict = FaceRecordDataset(root, image_size=size)
    with pytest.raises(BadSampleError, match=rf"train\.rec: key 2: offset \d+: image is {size[0] + 8}x"
                                             rf"{size[1]}, expected {size[0]}x{size[1]}"):
        strict[1]
    skip = FaceRecordDataset(root, image_size=size, on_bad_image="skip", return_key=True)
    assert skip[1] is None and skip[2][1:] == (1, 3) and skip.skipped == 1
    folder = make_identity_folder(tmp_path / "faces", num_ids=2, per_id=(2,), size=(40, 32))
    odd = folder / "person_b" / "img_01.jpg"
    odd.write_bytes(jpeg_bytes(np.zeros((30, 40, 3), np.uint8)))
    with pytest.raises(BadSampleError, match=rf"{odd}: image is 30x40, expected 32x40"):
        ImageFolderDataset(folder, image_size=(32, 40))[3]
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderDataset(folder, image_size=(32,))


def test_label_checks(tmp_path):
    imgs = _images(4)
    # a label outside num_classes
    root = _write_insightface(tmp_path / "a", imgs, [0, 0, 1, 5], ranges=[(1, 3), (3, 5)], num_classes=2)
    with pytest.raises(LabelError, match=r"key 4: offset \d+: label 5 outside \[0, 2\)"):
        FaceRecordDataset(root, on_bad_image="skip")[3]
    # a label that disagrees with the identity ranges of the header: the label is used unless raise
    root = _write_insightface(tmp_path / "b", imgs, [0, 1, 1, 1], ranges=[(1, 3), (3, 5)], num_classes=2)
    assert FaceRecordDataset(root)[1][1] == 1
    with pytest.raises(LabelError, match=r"key 2: offset \d+: label 1, but key 2 lies in identity 0's "
                                         r"range \[1, 3\)"):
        FaceRecordDataset(root, check_labels="raise")[1]
    # an identity without images
    root = _write_insightface(tmp_path / "c", imgs, [0, 0, 2, 2], num_classes=3)
    with pytest.raises(LabelError, match=r"identity 1 has no images"):
        FaceRecordDataset(root)


def test_im2rec_without_property_scans_labels(tmp_path):
    imgs = _images(3)
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for k, lab in zip((0, 1, 2), (2.0, 0.0, 4.0)):
            w.write(k, pack(IRHeader(0, lab, k, 0), imgs[k]))
    ds = FaceRecordDataset(tmp_path)
    assert ds.layout == "im2rec" and ds.num_classes == 5 and [ds[i][1] for i in range(3)] == [2, 0, 4]
    assert FaceRecordDataset(tmp_path, num_classes=7).num_classes == 7


def test_image_folder_dataset(tmp_path):
    root = make_identity_folder(tmp_path / "faces", num_ids=3, per_id=(2, 3, 1))
    ds = ImageFolderDataset(root, return_key=True)
    assert ds.num_classes == 3 and len(ds) == 6
    assert [ds[i][1] for i in range(6)] == [0, 0, 1, 1, 1, 2]
    image, label, path = ds[3]
    np.testing.assert_array_equal(image, decode_image_pil(open(path, "rb").read()))
    (root / "person_d").mkdir()
    with pytest.raises(LabelError, match="identity 3 .*has no images"):
        ImageFolderDataset(root)


@pytest.mark.cuda
def test_decode_image_cuda_matches_cpu(recordio_fixtures):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("torchvision")
    from partial_fc.data import decode_image_cuda

    ds = FaceRecordDataset(recordio_fixtures / "insightface")
    payloads = [ds.read_record(i)[1] for i in range(4)]
    for payload, gpu in zip(payloads, decode_image_cuda(payloads)):
        cpu = torch.from_numpy(decode_image(payload)).permute(2, 0, 1)
        assert gpu.shape == cpu.shape and gpu.device.type == "cuda"
        assert (gpu.cpu().int() - cpu.int()).abs().float().mean() < 2.0  # IDCT rounding differs


@pytest.mark.cuda
def test_normalize_batch_on_cuda_equals_cpu():
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, size=(4, 112, 112, 3), dtype=np.uint8))
    cpu = normalize_batch(images)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        gpu = normalize_batch(images.cuda(), memory_format=memory_format)
        assert gpu.device.type == "cuda" and gpu.is_contiguous(memory_format=memory_format)
        assert torch.equal(gpu.cpu(), cpu)
