"""evaluate_bins: flip-fused embeddings and the k-fold protocol, checked by a numpy re-computation."""

import numpy as np
import pytest
import torch

from partial_fc.eval import evaluate_bins, load_bin, load_verification_set, metrics
from partial_fc.eval.verification import evaluate_pairs
from partial_fc.eval import verification
from partial_fc.models import get_model

from tests.helpers.eval_synthetic_faces import make_pairs, write_bin


def _reference_embeddings(model, images_hwc):
    """Numpy preprocessing and mirroring, float64 fusion and normalisation."""
    model.eval()
    x = (images_hwc.astype(np.float64) - 127.5) / 128.0
    mirrored = x[:, :, ::-1]
    with torch.no_grad():
        emb = [model(torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2))).float())
               .double().numpy() for v in (x, mirrored)]
    out = emb[0] + emb[1]
    view_norms = np.concatenate([np.linalg.norm(e, axis=1) for e in emb])
    return out / np.linalg.norm(out, axis=1, keepdims=True), view_norms


@pytest.fixture
def small_bin(tmp_path):
    images, issame = make_pairs(23, seed=7)
    return write_bin(tmp_path / "synth.bin", images, issame)


def test_evaluate_bins_matches_reference_and_restores_mode(small_bin):
    torch.manual_seed(0)
    model = get_model("tiny", embedding_size=64).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate_bins(model, [small_bin], batch_size=5, keep_scores=True)["synth"]
    assert model.training  # mode restored
    for k, v in model.state_dict().items():  # eval mode really was used: BN statistics untouched
        assert torch.equal(v, before[k]), k

    images, issame = load_bin(small_bin, progress=False)
    emb, norms = _reference_embeddings(model, images)
    acc, std = metrics.lfw_accuracy(emb[0::2], emb[1::2], issame)
    assert result["acc"] == pytest.approx(acc, abs=1e-12)
    assert result["std"] == pytest.approx(std, abs=1e-12)
    assert result["xnorm"] == pytest.approx(norms.mean(), rel=1e-5)
    assert result["num_pairs"] == 23
    np.testing.assert_allclose(result["scores"], np.sum(emb[0::2] * emb[1::2], axis=1), atol=1e-5)
    expected_tars = metrics.tar_at_far(np.sum(emb[0::2] * emb[1::2], axis=1), issame)
    assert set(result["tar_at_far"]) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"}
    negatives = int((~issame).sum())
    for far, tar in expected_tars.items():  # a FAR below 1/negatives cannot be measured: None
        expected = tar if negatives * far >= 1 else None
        assert result["tar_at_far"][metrics.far_key(far)] == pytest.approx(expected)
    assert result["tar_at_far"]["0.1"] is not None and result["tar_at_far"]["0.01"] is None


def test_nonfinite_embeddings_fail_the_set_with_a_count_instead_of_a_traceback():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 8))
    emb[[3, 7, 8]] = np.nan
    emb[11, 2] = np.inf
    issame = np.arange(20) % 2 == 0
    result = evaluate_pairs(emb, issame)
    assert result == {"failed": "4 of 40 embeddings are non-finite (NaN/inf): the model has diverged",
                      "num_nonfinite": 4, "num_pairs": 20}


def test_evaluate_bins_without_flip_uses_the_image_only(small_bin):
    torch.manual_seed(1)
    model = get_model("tiny", embedding_size=32).eval()
    vset = load_verification_set(small_bin, progress=False)
    result = evaluate_bins(model, [vset], flip=False, keep_scores=True)["synth"]
    x = (vset.images.float() - 127.5) / 128
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model(x).double(), dim=1).numpy()
    np.testing.assert_allclose(result["scores"], np.sum(emb[0::2] * emb[1::2], axis=1), atol=1e-5)


def test_sets_from_paths_are_decoded_once(small_bin, tmp_path):
    verification.clear_cache()
    model = get_model("tiny", embedding_size=32)
    first = evaluate_bins(model, [small_bin])
    evaluate_bins(model, [str(small_bin)])
    info = verification._cached_set.cache_info()
    assert info.misses == 1 and info.hits == 1
    # A rewritten file is read again.
    images, issame = make_pairs(11, seed=8)
    write_bin(small_bin, images, issame)
    second = evaluate_bins(model, [small_bin])
    assert second["synth"]["num_pairs"] == 11 != first["synth"]["num_pairs"]
    verification.clear_cache()


def test_fixture_pairs_bin_evaluates(fixtures_dir):
    torch.manual_seed(2)
    model = get_model("tiny", embedding_size=128)
    result = evaluate_bins(model, [fixtures_dir / "verification" / "pairs.bin"], folds=10)
    assert set(result) == {"pairs"}
    r = result["pairs"]
    assert r["num_pairs"] == 20 and 0.0 <= r["acc"] <= 1.0 and r["std"] >= 0.0
    assert np.isfinite(r["xnorm"]) and r["xnorm"] > 0


def test_duplicate_set_names_are_refused(small_bin):
    vset = load_verification_set(small_bin, progress=False)
    with pytest.raises(ValueError, match="two verification sets"):
        evaluate_bins(get_model("tiny"), [vset, vset])
