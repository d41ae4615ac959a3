"""PartialFC in one process (no process group): special cases, dtypes, sampling, bad input."""
import math

import pytest
import torch

import npc_head
import partial_fc

from tests.helpers.margin_reference import make_head, make_problem, reference_loss


def _module(head, C, D, **kw):
    return partial_fc.PartialFC(head, D, C, **kw).double()


def _run(module, weight, emb, labels):
    with torch.no_grad():
        module.weight.copy_(weight)
    e = emb.clone().requires_grad_(True)
    loss = module(e, labels)
    loss.backward()
    return loss.detach(), e.grad, module.weight.grad.clone()


@pytest.mark.parametrize("kind,params", [
    ("npcface", dict(s=64.0, m0=0.4, m1=0.2, t=1.1, alpha=0.2)),
    ("arcface", dict(s=64.0, m=0.5)),
    ("cosface", dict(s=64.0, m=0.4)),
])
def test_no_process_group_matches_reference(kind, params):
    weight, emb, labels = make_problem(29, 12, 13, seed=11)
    loss, eg, wg = _run(_module(make_head(kind, params), 29, 12), weight, emb, labels)
    w, e = weight.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    ref, _ = reference_loss(kind, params, e, w, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(eg, e.grad, rtol=1e-10, atol=1e-10 * e.grad.abs().max())
    torch.testing.assert_close(wg, w.grad, rtol=1e-10, atol=1e-10 * w.grad.abs().max())


def _easy_margin_arcface(emb, weight, labels, s, m):
    """ArcFace with the 'easy margin': cos(theta + m) where c_y > 0, else c_y."""
    cos = (torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(weight).t()).clamp(-1, 1)
    rows = torch.arange(len(labels))
    cy = cos[rows, labels]
    pos = torch.where(cy > 0, torch.cos(torch.acos(cy.clamp(-1 + 1e-15, 1 - 1e-15)) + m), cy)
    logits = cos.index_put((rows, labels), pos)
    return torch.nn.functional.cross_entropy(s * logits, labels)


def _mv_arc_softmax(emb, weight, labels, s, m, t):
    """MV-Arc-Softmax (Wang et al. 2020): hard negatives c > cos(theta_y + m) become t c + t - 1."""
    cos = (torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(weight).t()).clamp(-1, 1)
    rows = torch.arange(len(labels))
    cy = cos[rows, labels]
    cy_m = torch.cos(torch.acos(cy.clamp(-1 + 1e-15, 1 - 1e-15)) + m)
    hard = cos > cy_m.detach()[:, None]
    logits = torch.where(hard, t * cos + t - 1, cos)
    pos = torch.where(cy > 0, cy_m, cy)
    logits = logits.index_put((rows, labels), pos)
    return torch.nn.functional.cross_entropy(s * logits, labels)


@pytest.mark.parametrize("special", ["easy_arcface", "mv_arc_softmax"])
def test_npcface_special_cases(special):
    weight, emb, labels = make_problem(23, 10, 15, seed=3)
    if special == "easy_arcface":
        head = npc_head.NPCFace(s=48.0, m0=0.45, m1=0.0, t=1.0, alpha=0.0)
        ref_fn = lambda e, w: _easy_margin_arcface(e, w, labels, 48.0, 0.45)
    else:
        head = npc_head.NPCFace(s=32.0, m0=0.35, m1=0.0, t=1.2, alpha=0.2)
        ref_fn = lambda e, w: _mv_arc_softmax(e, w, labels, 32.0, 0.35, 1.2)
    loss, eg, wg = _run(_module(head, 23, 10), weight, emb, labels)
    w, e = weight.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    ref = ref_fn(e, w)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(eg, e.grad, rtol=1e-10, atol=1e-10 * e.grad.abs().max())
    torch.testing.assert_close(wg, w.grad, rtol=1e-10, atol=1e-10 * w.grad.abs().max())


@pytest.mark.parametrize("target", [1.0, -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_target_cosine_of_exactly_one_gives_finite_gradients(target, dtype):
    weight = torch.eye(6, 4, dtype=dtype)[:, :4].clone()
    weight[4:] = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, -0.9, 0.2, 0.0]], dtype=dtype)
    labels = torch.tensor([0, 1, 2])
    emb = (target * weight[labels]).clone().requires_grad_(True)
    for head in (npc_head.NPCFace(), npc_head.ArcFace(), npc_head.CosFace()):
        module = partial_fc.PartialFC(head, 4, 6).to(dtype)
        with torch.no_grad():
            module.weight.copy_(weight)
        loss = module(emb, labels)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(emb.grad).all() and torch.isfinite(module.weight.grad).all()
        emb.grad = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_embeddings_are_accepted(dtype):
    weight, emb, labels = make_problem(31, 16, 12, seed=5)
    ref_module = partial_fc.PartialFC(npc_head.NPCFace(), 16, 31).double()
    ref, ref_grad, _ = _run(ref_module, weight, emb, labels)
    module = partial_fc.PartialFC(npc_head.NPCFace(), 16, 31)
    with torch.no_grad():
        module.weight.copy_(weight.float())
    e = emb.to(dtype).requires_grad_(True)
    loss = module(e, labels)
    loss.backward()
    assert loss.dtype in (torch.float32, torch.float64)
    assert e.grad.dtype == dtype and torch.isfinite(e.grad.float()).all()
    assert module.last_stats["margin"].dtype == torch.float64
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert abs(float(loss.detach()) - float(ref)) <= tol * abs(float(ref))


def test_sampling_scores_positives_and_a_fixed_number_of_rows():
    C, D = 200, 8
    weight, emb, labels = make_problem(C, D, 10, seed=9)
    module = partial_fc.PartialFC(npc_head.NPCFace(), D, C, sample_rate=0.1, seed=3).double()
    loss, eg, wg = _run(module, weight, emb, labels)
    index = module.sampled_index
    assert len(index) == int(0.1 * C)
    assert torch.equal(index, index.sort().values)
    assert set(labels.tolist()) <= set(index.tolist())
    touched = (wg.abs().sum(1) > 0).nonzero().flatten()
    assert set(touched.tolist()) <= set(index.tolist())
    unscored = torch.ones(C, dtype=torch.bool)
    unscored[index] = False
    assert (wg[unscored] == 0).all()
    # the loss is the reference restricted to the scored classes
    w, e = weight.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    ref, _ = reference_loss("npcface", dict(s=64.0, m0=0.4, m1=0.2, t=1.1, alpha=0.2),
                            e, w, labels, classes=index.tolist())
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=0)


def test_sampling_keeps_all_positives_when_they_exceed_the_budget():
    C, D = 50, 8
    weight, emb, labels = make_problem(C, D, 30, seed=2)
    module = partial_fc.PartialFC(npc_head.ArcFace(), D, C, sample_rate=0.1).double()
    _run(module, weight, emb, labels)
    assert module.sampled_index.tolist() == sorted(set(labels.tolist()))


def test_sampling_is_reproducible_and_eval_scores_everything():
    C, D = 100, 8
    weight, emb, labels = make_problem(C, D, 6, seed=1)
    draws = []
    for _ in range(2):
        module = partial_fc.PartialFC(npc_head.CosFace(), D, C, sample_rate=0.3, seed=42).double()
        with torch.no_grad():
            module.weight.copy_(weight)
        steps = []
        for _ in range(3):
            module(emb, labels)
            steps.append(module.sampled_index.tolist())
        draws.append(steps)
    assert draws[0] == draws[1]
    assert draws[0][0] != draws[0][1]
    other = partial_fc.PartialFC(npc_head.CosFace(), D, C, sample_rate=0.3, seed=43).double()
    other(emb, labels)
    assert other.sampled_index.tolist() != draws[0][0]
    module.eval()
    module(emb, labels)
    assert module.sampled_index.tolist() == list(range(C))


def test_sample_step_is_saved_in_the_state_dict():
    module = partial_fc.PartialFC(npc_head.CosFace(), 4, 10, sample_rate=0.5)
    module(torch.randn(3, 4), torch.tensor([1, 2, 3]))
    assert int(module.state_dict()["sample_step"]) == 1


def test_bad_inputs_raise():
    module = partial_fc.PartialFC(npc_head.NPCFace(), 8, 10)
    with pytest.raises(ValueError, match="label 10 outside"):
        module(torch.randn(3, 8), torch.tensor([0, 10, 2]))
    with pytest.raises(ValueError, match="label -1 outside"):
        module(torch.randn(2, 8), torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="embeddings must be"):
        module(torch.randn(3, 7), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels shape"):
        module(torch.randn(3, 8), torch.tensor([0, 1]))
    with pytest.raises(TypeError):
        module(torch.randn(2, 8), torch.tensor([0.0, 1.0]))
    for rate in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="sample_rate"):
            partial_fc.PartialFC(npc_head.NPCFace(), 8, 10, sample_rate=rate)


def test_caller_tensors_are_not_modified():
    weight, emb, labels = make_problem(17, 8, 9, seed=4)
    module = partial_fc.PartialFC(npc_head.NPCFace(), 8, 17, sample_rate=0.5).double()
    with torch.no_grad():
        module.weight.copy_(weight)
    e = emb.clone().requires_grad_(True)
    y = labels.clone()
    module(e, y).backward()
    assert torch.equal(e.detach(), emb) and torch.equal(y, labels)


def test_stats_are_reported_per_sample():
    weight, emb, labels = make_problem(17, 8, 9, seed=4)
    module = partial_fc.PartialFC(npc_head.NPCFace(), 8, 17).double()
    with torch.no_grad():
        module.weight.copy_(weight)
    module(emb, labels)
    stats = module.last_stats
    for key in ("margin", "hard_count", "target_cos"):
        assert stats[key].shape == (9,) and not stats[key].requires_grad
    _, ref = reference_loss("npcface", dict(s=64.0, m0=0.4, m1=0.2, t=1.1, alpha=0.2), emb, weight, labels)
    torch.testing.assert_close(stats["margin"], ref["margin"], rtol=1e-12, atol=1e-12)
