"""IJB-B/C 1:1: alignment, media/template pooling and the whole pipeline on a generated release."""

import numpy as np
import pytest
import torch
from torch import nn

from partial_fc.data import decode_image
from partial_fc.eval import metrics
from partial_fc.eval.alignment import (ARCFACE_TEMPLATE, align_face,
                                       estimate_similarity, warp_affine)
from partial_fc.eval.ijb import (evaluate_ijb, pair_scores, read_ijb_meta,
                                 template_features)

from tests.helpers.eval_synthetic_faces import (face_image, make_ijb_release,
                                                random_similarity, reference_warp)


def test_similarity_estimate_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    for _ in range(5):
        transform = random_similarity(rng, 176)
        moved = ARCFACE_TEMPLATE @ transform[:, :2].T + transform[:, 2]
        estimated = estimate_similarity(ARCFACE_TEMPLATE, moved)
        np.testing.assert_allclose(estimated, transform, rtol=0, atol=1e-9)
    with pytest.raises(ValueError):
        estimate_similarity(np.zeros((5, 2)), ARCFACE_TEMPLATE)


def test_warp_matches_a_float64_bilinear_reference():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    for matrix in (np.array([[1.0, 0, 3], [0, 1, -2]]),  # integer shift: exact
                   np.array([[1.0, 0, 0.5], [0, 1, 0.25]]),
                   random_similarity(rng, 120, size=80)):
        got = warp_affine(image, matrix, (112, 100)).astype(np.float64)
        ref = reference_warp(image, matrix, (112, 100))
        # Compare where all four bilinear neighbours lie inside the source: at the rim of the
        # source the blending with the black outside is a matter of convention.
        inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
        ys, xs = np.mgrid[0:100, 0:112].astype(np.float64)
        sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
        sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
        inside = (sx >= 0) & (sx <= image.shape[1] - 1) & (sy >= 0) & (sy <= image.shape[0] - 1)
        assert inside.mean() > 0.5
        assert np.abs(got[inside] - ref[inside]).max() <= 1.0 + 1e-9
        assert (got[(sx < -1) | (sx > image.shape[1]) | (sy < -1) | (sy > image.shape[0])] == 0).all()
    shifted = warp_affine(image, np.array([[1.0, 0, 3], [0, 1, -2]]), (80, 96))
    np.testing.assert_array_equal(shifted[:-2, 3:], image[2:, :-3])
    assert shifted[-2:].max() == 0 and shifted[:, :3].max() == 0


def test_alignment_undoes_the_placement_of_a_face():
    rng = np.random.default_rng(2)
    canonical = face_image(3, rng)
    transform = random_similarity(rng, 176)
    loose = np.clip(np.rint(reference_warp(canonical, transform, (176, 176))), 0, 255).astype(np.uint8)
    landmarks = ARCFACE_TEMPLATE @ transform[:, :2].T + transform[:, 2]
    aligned = align_face(loose, landmarks)
    assert aligned.shape == (112, 112, 3)
    err = np.abs(aligned[4:-4, 4:-4].astype(float) - canonical[4:-4, 4:-4].astype(float))
    assert err.mean() < 3.0  # two bilinear resamplings of a noisy image
    other = face_image(4, rng)
    assert np.abs(aligned[4:-4, 4:-4].astype(float) - other[4:-4, 4:-4]).mean() > 5 * err.mean()


def _reference_template_scores(feats, templates, medias, pairs):
    """Media averages summed per template, normalised, cosine per pair: plain loops in float64."""
    tfeat = {}
    for t in set(templates.tolist()):
        total = np.zeros(feats.shape[1])
        for m in set(medias[templates == t].tolist()):
            rows = feats[(templates == t) & (medias == m)].astype(np.float64)
            total += rows.sum(axis=0) / len(rows)
        tfeat[t] = total / np.sqrt(np.sum(total ** 2))
    return np.array([float(np.dot(tfeat[a], tfeat[b])) for a, b in pairs])


def test_template_pooling_matches_reference():
    rng = np.random.default_rng(3)
    n = 300
    templates = rng.choice([7, 11, 23, 42, 99, 1000], n)
    medias = rng.integers(0, 9, n)  # media ids shared across templates too
    feats = rng.standard_normal((n, 16)).astype(np.float32) * rng.uniform(0.1, 5, (n, 1))
    pairs = np.array([[7, 11], [42, 99], [1000, 7], [23, 23], [99, 1000]])
    ids, tfeats = template_features(feats, templates, medias)
    assert ids.tolist() == [7, 11, 23, 42, 99, 1000]
    np.testing.assert_allclose(np.linalg.norm(tfeats, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(pair_scores(ids, tfeats, pairs, batch_size=2),
                               _reference_template_scores(feats, templates, medias, pairs),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="without features"):
        pair_scores(ids, tfeats, np.array([[7, 8]]))


class PixelEmbedding(nn.Module):
    """A fixed, parameter-free embedding: the 8x8-average-pooled, mean-centred image."""

    def forward(self, x):
        pooled = nn.functional.avg_pool2d(x, 8).flatten(1)
        return pooled - pooled.mean(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def ijb_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("IJBC")
    info = make_ijb_release(root, "ijbc", num_ids=5, templates_per_id=3, seed=4)
    return root, info


def test_meta_is_read_by_name(ijb_release):
    root, info = ijb_release
    meta = read_ijb_meta(root, "IJBC")
    faces = info["faces"]
    assert list(meta.image_names) == [f["name"] for f in faces]
    np.testing.assert_array_equal(meta.templates, [f["template"] for f in faces])
    np.testing.assert_allclose(meta.landmarks, np.stack([f["landmarks"] for f in faces]), atol=1e-5)
    np.testing.assert_allclose(meta.face_scores, [f["score"] for f in faces], atol=1e-6)
    assert meta.pairs.shape == (105, 2) and meta.labels.sum() == 5 * 3
    with pytest.raises(FileNotFoundError, match="ijbb_face_tid_mid"):
        read_ijb_meta(root, "IJBB")


@pytest.mark.parametrize("face_score_weighting", [True, False])
def test_ijb_pipeline_matches_reference(ijb_release, face_score_weighting):
    root, info = ijb_release
    model = PixelEmbedding()
    result = evaluate_ijb(model, root, "IJBC", batch_size=7, face_score_weighting=face_score_weighting,
                          progress=False)
    meta = read_ijb_meta(root, "IJBC")

    # Reference: align each crop, embed it and its mirror with numpy preprocessing, pool by loops.
    feats = []
    for i, name in enumerate(meta.image_names):
        crop = align_face(decode_image((root / "loose_crop" / name).read_bytes()), meta.landmarks[i])
        x = (crop.astype(np.float64) - 127.5) / 128.0
        both = np.stack([x, x[:, ::-1]]).transpose(0, 3, 1, 2)
        emb = model(torch.from_numpy(both).float()).double().numpy()
        feat = emb[0] + emb[1]
        feats.append(feat * (meta.face_scores[i] if face_score_weighting else 1.0))
    ref = _reference_template_scores(np.array(feats), meta.templates, meta.medias, meta.pairs)
    np.testing.assert_allclose(result["scores"], ref, rtol=0, atol=1e-5)
    assert result["tar_at_far"] == {metrics.far_key(f): t for f, t in
                                    metrics.tar_at_far(ref, meta.labels).items()}
    # Aligned synthetic identities are easy: every genuine pair outscores every impostor pair.
    genuine, impostor = ref[meta.labels], ref[~meta.labels]
    assert genuine.min() > impostor.max()
    assert result["tar_at_far"]["0.1"] == 1.0
    assert result["num_faces"] == len(info["faces"]) and result["num_templates"] == 15


def test_ijb_alignment_matters(ijb_release, tmp_path):
    """With the landmarks scrambled the same pipeline separates identities worse."""
    root, _ = ijb_release
    good = evaluate_ijb(PixelEmbedding(), root, "IJBC", progress=False)
    bad_root = tmp_path / "IJBC"
    (bad_root / "meta").mkdir(parents=True)
    (bad_root / "loose_crop").symlink_to(root / "loose_crop")
    for f in (root / "meta").iterdir():
        text = f.read_text()
        if f.name.endswith("5pts_score.txt"):
            rng = np.random.default_rng(5)
            lines = []
            for line in text.splitlines():
                parts = line.split()
                pts = np.array(parts[1:11], float).reshape(5, 2)[rng.permutation(5)]
                lines.append(" ".join([parts[0], *map(str, pts.reshape(-1)), parts[11]]))
            text = "\n".join(lines) + "\n"
        (bad_root / "meta" / f.name).write_text(text)
    bad = evaluate_ijb(PixelEmbedding(), bad_root, "IJBC", progress=False)
    gap = lambda r: r["scores"][r["labels"]].mean() - r["scores"][~r["labels"]].mean()  # noqa: E731
    assert gap(good) > gap(bad) + 0.05


def test_eval_command_on_ijb(ijb_release, tmp_path, capsys):
    import json

    from partial_fc.models import get_model, save_backbone
    from partial_fc.tools import eval as eval_tool

    root, _ = ijb_release
    torch.manual_seed(0)
    ckpt = save_backbone(tmp_path / "backbone.pt", get_model("tiny", embedding_size=64), "tiny",
                         {"embedding_size": 64})
    out = tmp_path / "out"
    assert eval_tool.main([str(ckpt), "--ijb-root", str(root), "--ijb-target", "IJBC",
                           "-o", str(out), "--batch-size", "16"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["sets"] == {}
    ijbc = report["ijb"]["IJBC"]
    assert ijbc["num_pairs"] == 105 and ijbc["num_templates"] == 15
    assert list(ijbc["tar_at_far"]) == ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]
    assert "IJBC" in capsys.readouterr().out
    assert (out / "roc.png").stat().st_size > 1000
