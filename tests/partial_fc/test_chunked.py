"""The chunked classifier path against the materialised reference and the float64 references."""
import pytest
import torch

import npc_head
import partial_fc
from npc_head.base import MarginHead
from partial_fc.classifier.chunked import chunked_margin_loss
from partial_fc.classifier.plan import AUTO_CHUNKED_LOGIT_BYTES, default_block_size, plan_step
from partial_fc.classifier.reference import reference_margin_loss

from tests.helpers.dist_harness import run_workers
from tests.helpers.margin_reference import make_head, make_problem, reference_loss

NPC_DEFAULT = dict(s=64.0, m0=0.4, m1=0.2, t=1.1, alpha=0.2)
NPC_OTHER = dict(s=32.0, m0=0.3, m1=0.5, t=1.3, alpha=0.15, hard_margin=0.2)
ARC = dict(s=64.0, m=0.5)
COS = dict(s=30.0, m=0.35)
HEADS = [("npcface", NPC_DEFAULT), ("npcface", NPC_OTHER), ("arcface", ARC), ("cosface", COS)]


class HardSquareHead(MarginHead):
    """A head with a non-linear negative mapping and no closed-form slope (CurricularFace-like:
    hard negatives c -> c (0.3 + c)), so the chunked path uses the protocol's autograd slope."""

    def prepare(self, target_cos, norms):
        return {"tau": target_cos.detach() - 0.1}

    def negative_logits(self, cos, prep):
        return torch.where(cos > prep["tau"][:, None], cos * (0.3 + cos), cos)

    def positive_logit(self, target_cos, prep, stats):
        return target_cos - 0.2


def _losses(fn, head, weight, emb, target_index, **kw):
    w = weight.clone().requires_grad_(True)
    e = emb.clone().requires_grad_(True)
    loss, diagnostics = fn(head, e, w, target_index, **kw)
    loss.mean().backward()
    return loss.detach(), e.grad, w.grad, diagnostics


def _assert_same(got, want, rtol):
    loss, eg, wg, diag = got
    ref_loss, ref_eg, ref_wg, ref_diag = want
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=rtol * ref_loss.abs().max())
    torch.testing.assert_close(eg, ref_eg, rtol=rtol, atol=rtol * ref_eg.abs().max())
    torch.testing.assert_close(wg, ref_wg, rtol=rtol, atol=rtol * ref_wg.abs().max())
    assert diag.keys() == ref_diag.keys()
    for key in ref_diag:
        assert not diag[key].requires_grad
        torch.testing.assert_close(diag[key], ref_diag[key], rtol=rtol, atol=rtol)


@pytest.mark.parametrize("block_size", [1, 7, 37, 100])
@pytest.mark.parametrize("kind,params", HEADS)
def test_float64_matches_reference_path_and_formula(kind, params, block_size):
    weight, emb, labels = make_problem(37, 16, 13, seed=21)
    want = _losses(reference_margin_loss, make_head(kind, params), weight, emb, labels)
    got = _losses(chunked_margin_loss, make_head(kind, params), weight, emb, labels,
                  block_size=block_size)
    _assert_same(got, want, 1e-10)
    # ... and the paper-formula reference, independently of the package.
    w, e = weight.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    ref, ref_stats = reference_loss(kind, params, e, w, labels)
    ref.backward()
    torch.testing.assert_close(got[0].mean(), ref.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(got[1], e.grad, rtol=1e-10, atol=1e-10 * e.grad.abs().max())
    torch.testing.assert_close(got[2], w.grad, rtol=1e-10, atol=1e-10 * w.grad.abs().max())
    for key, value in ref_stats.items():
        torch.testing.assert_close(got[3][key], value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,params", HEADS)
def test_float32_matches_reference_path(kind, params):
    weight, emb, labels = make_problem(301, 32, 48, seed=8)
    weight, emb = weight.float(), emb.float()
    want = _losses(reference_margin_loss, make_head(kind, params), weight, emb, labels)
    got = _losses(chunked_margin_loss, make_head(kind, params), weight, emb, labels,
                  block_size=64)
    _assert_same(got, want, 1e-5)


@pytest.mark.parametrize("block_size", [3, 50])
def test_head_without_closed_form_slope_uses_autograd(block_size):
    weight, emb, labels = make_problem(23, 8, 10, seed=2)
    want = _losses(reference_margin_loss, HardSquareHead(s=20.0), weight, emb, labels)
    got = _losses(chunked_margin_loss, HardSquareHead(s=20.0), weight, emb, labels,
                  block_size=block_size)
    _assert_same(got, want, 1e-10)


def test_targets_owned_elsewhere_and_zero_weight_rows():
    """target_index -1 (another rank owns the class) and an all-zero class row (F.normalize's
    eps branch) behave as on the reference path."""
    weight, emb, labels = make_problem(19, 8, 12, seed=4)
    weight[5] = 0.0
    target_index = torch.where(labels % 3 == 0, -1, labels)
    for kind, params in HEADS:
        want = _losses(reference_margin_loss, make_head(kind, params), weight, emb, target_index)
        got = _losses(chunked_margin_loss, make_head(kind, params), weight, emb, target_index,
                      block_size=4)
        _assert_same(got, want, 1e-10)


def test_row_index_scores_the_selected_rows_without_a_copy():
    weight, emb, labels = make_problem(40, 8, 9, seed=6)
    index = torch.unique(torch.cat([labels, torch.tensor([0, 3, 17, 33, 39])]))
    target_index = torch.searchsorted(index, labels)
    head = make_head("npcface", NPC_DEFAULT)
    want = _losses(reference_margin_loss, head, weight[index], emb, target_index)
    got = _losses(chunked_margin_loss, head, weight, emb, target_index, block_size=4,
                  row_index=index)
    full_grad = torch.zeros_like(weight)
    full_grad[index] = want[2]
    _assert_same(got, (want[0], want[1], full_grad, want[3]), 1e-10)


@pytest.mark.parametrize("target", [1.0, -1.0])
def test_target_cosine_of_exactly_one_gives_finite_gradients(target):
    weight = torch.eye(6, 4)
    weight[4:] = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, -0.9, 0.2, 0.0]])
    labels = torch.tensor([0, 1, 2])
    for head in (npc_head.NPCFace(), npc_head.ArcFace(), npc_head.CosFace()):
        module = partial_fc.PartialFC(head, 4, 6, impl="chunked", block_size=4, fused=False)
        with torch.no_grad():
            module.weight.copy_(weight)
        emb = (target * weight[labels]).clone().requires_grad_(True)
        loss = module(emb, labels)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(emb.grad).all() and torch.isfinite(module.weight.grad).all()


def _module_pair(head_kind, params, C, D, **kw):
    modules = []
    for impl in ("reference", "chunked"):
        m = partial_fc.PartialFC(make_head(head_kind, params), D, C, impl=impl, fused=False,
                                 **kw).double()
        modules.append(m)
    return modules


def _step(module, weight, emb, labels):
    with torch.no_grad():
        module.weight.copy_(weight)
    module.weight.grad = None
    e = emb.clone().requires_grad_(True)
    loss = module(e, labels)
    loss.backward()
    return loss.detach(), e.grad, module.weight.grad.clone(), module.last_stats


@pytest.mark.parametrize("kind,params", [HEADS[0], HEADS[2]])
def test_partial_fc_sampling_is_identical_on_both_paths(kind, params):
    C, D = 120, 8
    weight, emb, labels = make_problem(C, D, 16, seed=13)
    ref_module, chunk_module = _module_pair(kind, params, C, D, sample_rate=0.3, seed=5,
                                            block_size=9)
    for _ in range(2):  # two steps: two different draws
        want = _step(ref_module, weight, emb, labels)
        got = _step(chunk_module, weight, emb, labels)
        assert torch.equal(ref_module.sampled_index, chunk_module.sampled_index)
        assert chunk_module.last_impl == "chunked" and ref_module.last_impl == "reference"
        _assert_same(got, want, 1e-10)
        unscored = torch.ones(C, dtype=torch.bool)
        unscored[chunk_module.sampled_index] = False
        assert (got[2][unscored] == 0).all()


def test_weight_without_gradient_and_eval_mode():
    C, D = 30, 8
    weight, emb, labels = make_problem(C, D, 10, seed=1)
    ref_module, chunk_module = _module_pair("npcface", NPC_DEFAULT, C, D, block_size=8)
    for m in (ref_module, chunk_module):
        m.weight.requires_grad_(False)
        with torch.no_grad():
            m.weight.copy_(weight)
    grads = []
    for m in (ref_module, chunk_module):
        e = emb.clone().requires_grad_(True)
        m(e, labels).backward()
        grads.append(e.grad)
        assert m.weight.grad is None
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10 * grads[0].abs().max())
    for m in (ref_module, chunk_module):
        m.eval()
    with torch.no_grad():
        losses = [m(emb, labels) for m in (ref_module, chunk_module)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=0)


@pytest.mark.parametrize("sweep", ["classes", "rows"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_embeddings_run_low_precision_gemms(dtype, sweep):
    weight, emb, labels = make_problem(53, 16, 12, seed=5)
    w = weight.clone().requires_grad_(True)
    ref = reference_loss("npcface", NPC_DEFAULT, emb, w, labels)[0]
    ref.backward()
    ref = ref.detach()
    module = partial_fc.PartialFC(npc_head.NPCFace(), 16, 53, impl="chunked", block_size=10,
                                  sweep=sweep, fused=False)
    with torch.no_grad():
        module.weight.copy_(weight.float())
    e = emb.to(dtype).requires_grad_(True)
    loss = module(e, labels)
    loss.backward()
    assert e.grad.dtype == dtype and torch.isfinite(e.grad.float()).all()
    torch.testing.assert_close(module.weight.grad.double(), w.grad, rtol=0,
                               atol=5e-2 * w.grad.abs().max())
    assert module.last_stats["margin"].dtype == torch.float64
    assert abs(float(loss.detach()) - float(ref)) <= 5e-2 * float(ref)
    # Under CPU autocast, fp32 embeddings get bf16 GEMMs as well (and fp32 statistics).
    module.weight.grad = None
    e32 = emb.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(e32, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and e32.grad.dtype == torch.float32
    assert abs(float(loss.detach()) - float(ref)) <= 5e-2 * float(ref)
    full = module(emb.float(), labels).detach()  # no autocast: fp32 GEMMs, much closer
    assert abs(float(full) - float(ref)) < 1e-5 * float(ref) < abs(float(loss.detach()) - float(ref))


def test_configuration_is_validated_and_auto_is_a_size_rule():
    head = npc_head.NPCFace()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            partial_fc.PartialFC(head, 8, 10, impl="chunked", block_size=bad)
    with pytest.raises(ValueError, match="impl"):
        partial_fc.PartialFC(head, 8, 10, impl="fused")
    with pytest.raises(ValueError, match="gemm_dtype"):
        partial_fc.PartialFC(head, 8, 10, gemm_dtype="int8")
    with pytest.raises(ValueError, match="block_size"):
        chunked_margin_loss(head, torch.randn(3, 8), torch.randn(10, 8),
                            torch.tensor([0, 1, 2]), block_size=0)
    with pytest.raises(ValueError, match="reduction"):
        chunked_margin_loss(head, torch.randn(3, 8), torch.randn(10, 8),
                            torch.tensor([0, 1, 2]), reduction="sum")
    module = partial_fc.PartialFC(head, 8, 10)
    assert module.impl == "auto"
    rows = 1024
    below = AUTO_CHUNKED_LOGIT_BYTES // (4 * rows)
    assert plan_step("auto", "auto", rows, below, "cpu", True).impl == "reference"
    assert plan_step("auto", "auto", rows, below + 1, "cpu", True).impl == "chunked"
    assert (module.resolve_impl(rows, below), module.resolve_impl(rows, below + 1)) == (
        "reference", "chunked")
    module(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]))
    assert module.last_impl == "reference" and module.last_plan.sweep is None
    assert plan_step("chunked", "auto", 1, 1, "cpu", False).impl == "chunked"
    assert default_block_size(1024, torch.device("cpu")) >= 256


# --- over gloo ranks --------------------------------------------------------------------------

DIST_CASES = [
    # (kind, params, num_classes, dim, sample_rate, seed, block_size)
    ("npcface", NPC_DEFAULT, 37, 16, 1.0, 0, 5),
    ("npcface", NPC_OTHER, 41, 8, 0.4, 4, 3),
    ("arcface", ARC, 41, 8, 0.5, 5, 64),
    ("cosface", COS, 37, 16, 1.0, 3, 4),
]
BATCHES = {1: [11], 2: [7, 4], 3: [5, 3, 7]}


def run_cases_on_rank(rank, world_size, cases=DIST_CASES, batches=BATCHES, fused=False,
                      **module_kw):
    """On one gloo rank: each case's PartialFC (float64, chunked, this rank's shard of the case's
    weight) on this rank's slice of the global batch, one training step; ``fused``: as
    PartialFC takes it (False: the tile functions eagerly). Returns per case the loss, the
    gradients, the shard start, the scored classes, the diagnostics and the step's plan, for
    :func:`assert_ranks_match_reference`."""
    sizes = batches[world_size]
    lo = sum(sizes[:rank])
    results = []
    for kind, params, C, D, rate, seed, block in cases:
        weight, emb, labels = make_problem(C, D, sum(sizes), seed)
        start, count = partial_fc.shard_range(C, world_size, rank)
        module = partial_fc.PartialFC(make_head(kind, params), D, C, sample_rate=rate, seed=seed,
                                      impl="chunked", block_size=block, fused=fused,
                                      **module_kw).double()
        with torch.no_grad():
            module.weight.copy_(weight[start : start + count])
        e = emb[lo : lo + sizes[rank]].clone().requires_grad_(True)
        loss = module(e, labels[lo : lo + sizes[rank]])
        loss.backward()
        results.append(dict(loss=loss.detach(), emb_grad=e.grad, weight_grad=module.weight.grad,
                            start=start, sampled=module.sampled_index + start,
                            stats=module.last_stats, plan=module.last_plan))
    return results


def _chunked_worker(rank, world_size):
    return run_cases_on_rank(rank, world_size)


def assert_ranks_match_reference(results, world_size, cases=DIST_CASES, batches=BATCHES):
    """Each rank's loss, embedding gradient and weight-gradient rows of every case in ``cases``
    equal the float64 reference over the classes the ranks scored; yields, per case, the rate,
    class count, scored classes, the reference's statistics and the ranks' results."""
    sizes = batches[world_size]
    for ci, (kind, params, C, D, rate, seed, _) in enumerate(cases):
        weight, emb, labels = make_problem(C, D, sum(sizes), seed)
        sampled = torch.cat([r[ci]["sampled"] for r in results]).tolist()
        w, e = weight.clone().requires_grad_(True), emb.clone().requires_grad_(True)
        ref, ref_stats = reference_loss(kind, params, e, w, labels, classes=sampled)
        ref.backward()
        per_rank = [r[ci] for r in results]
        assert all(res["plan"] == per_rank[0]["plan"] for res in per_rank), "plans differ"
        for rank, res in enumerate(per_rank):
            lo = sum(sizes[:rank])
            torch.testing.assert_close(res["loss"], ref.detach(), rtol=1e-10, atol=0)
            torch.testing.assert_close(res["emb_grad"], e.grad[lo : lo + sizes[rank]],
                                       rtol=1e-10, atol=1e-10 * e.grad.abs().max())
            rows = slice(res["start"], res["start"] + res["weight_grad"].shape[0])
            torch.testing.assert_close(res["weight_grad"], w.grad[rows],
                                       rtol=1e-10, atol=1e-10 * w.grad.abs().max())
        yield rate, C, sampled, ref_stats, per_rank


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_chunked_over_ranks_matches_float64_reference(world_size):
    results = run_workers(_chunked_worker, world_size)
    for rate, C, sampled, ref_stats, per_rank in assert_ranks_match_reference(results, world_size):
        if rate < 1.0:
            assert len(sampled) < C
        for res in per_rank:
            for key, value in ref_stats.items():
                torch.testing.assert_close(res["stats"][key], value, rtol=1e-12, atol=1e-12)
