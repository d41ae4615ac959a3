"""Row-sparse classifier optimizers: exactly torch's SGD / AdamW when every row is sampled, and a
per-row float64 reference of the Partial FC update (sampled rows only) otherwise."""
import copy
import math

import pytest
import torch

import npc_head
import partial_fc
from partial_fc.optim import RowSparseAdamW, RowSparseSGD, build_classifier_optimizer

from tests.helpers.margin_reference import make_problem

C, D, B = 60, 8, 12


def _module(rate, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    module = partial_fc.PartialFC(npc_head.NPCFace(), D, C, sample_rate=rate, seed=seed)
    return module.to(dtype)


def _batches(steps, dtype=torch.float64):
    out = []
    for step in range(steps):
        _, emb, labels = make_problem(C, D, B, seed=100 + step)
        out.append((emb.to(dtype), labels))
    return out


def _train(module, optimizer, batches, scheduler=None, record=False):
    """Run the steps; optionally record (weight before, grad, sampled rows) of each."""
    history = []
    for emb, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        module(emb, labels).backward()
        if record:
            history.append((module.weight.detach().clone(), module.weight.grad.clone(),
                            module.sampled_index.clone()))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return history


SGD_SETTINGS = [
    dict(momentum=0.9, weight_decay=5e-4),
    dict(momentum=0.9, weight_decay=1e-3, nesterov=True),
    dict(momentum=0.8, dampening=0.3, weight_decay=0.0),
    dict(momentum=0.0, weight_decay=1e-2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("settings", SGD_SETTINGS)
def test_sgd_with_every_row_sampled_is_torch_sgd(settings, dtype):
    ours = _module(1.0, dtype=dtype)
    theirs = copy.deepcopy(ours)
    batches = _batches(4, dtype)
    _train(ours, RowSparseSGD(ours, lr=0.3, **settings), batches)
    _train(theirs, torch.optim.SGD(theirs.parameters(), lr=0.3, **settings), batches)
    assert torch.equal(ours.weight, theirs.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamw_with_every_row_sampled_is_torch_adamw(dtype):
    ours = _module(1.0, dtype=dtype)
    theirs = copy.deepcopy(ours)
    batches = _batches(4, dtype)
    kw = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05)
    _train(ours, RowSparseAdamW(ours, **kw), batches)
    _train(theirs, torch.optim.AdamW(theirs.parameters(), **kw), batches)
    assert torch.equal(ours.weight, theirs.weight)


def test_lr_scheduler_drives_the_row_sparse_optimizer_like_torch():
    ours = _module(1.0)
    theirs = copy.deepcopy(ours)
    batches = _batches(4)
    opt = build_classifier_optimizer(ours, "sgd", lr=0.5, momentum=0.9, weight_decay=5e-4)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.1)
    _train(ours, opt, batches, sched)
    _train(theirs, ref, batches, ref_sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.01)
    assert torch.equal(ours.weight, theirs.weight)


def _reference_sgd(history, lr, momentum, dampening, weight_decay, nesterov):
    """Per-row float64 SGD applied to the sampled rows of each recorded step only."""
    weight = history[0][0].clone()
    buffers = {}
    for _, grad, rows in history:
        for r in rows.tolist():
            d = grad[r] + weight_decay * weight[r]
            if momentum:
                if r not in buffers:
                    buffers[r] = d.clone()
                else:
                    buffers[r] = momentum * buffers[r] + (1 - dampening) * d
                d = d + momentum * buffers[r] if nesterov else buffers[r]
            weight[r] = weight[r] - lr * d
    return weight, buffers


@pytest.mark.parametrize("settings", SGD_SETTINGS[:3])
def test_sampled_sgd_updates_only_sampled_rows(settings):
    settings = dict(dict(dampening=0.0, nesterov=False), **settings)
    module = _module(0.2, seed=3)
    opt = RowSparseSGD(module, lr=0.2, **settings)
    history = _train(module, opt, _batches(5), record=True)
    # The record holds the weight *before* each step; the reference replays from the first.
    expected, buffers = _reference_sgd(history, 0.2, **settings)
    torch.testing.assert_close(module.weight.detach(), expected, rtol=1e-12, atol=1e-14)
    sampled = set().union(*(set(rows.tolist()) for _, _, rows in history))
    never = sorted(set(range(C)) - sampled)
    assert never, "the test needs rows that were never sampled"
    assert torch.equal(module.weight.detach()[never], history[0][0][never])  # no decay either
    state = opt.state[module.weight]
    assert state["momentum_buffer"].shape == (C, D) and state["step"].shape == (C,)
    for r in range(C):
        expected_count = sum(int(r in rows.tolist()) for _, _, rows in history)
        assert int(state["step"][r]) == expected_count
        if r in buffers:
            torch.testing.assert_close(state["momentum_buffer"][r], buffers[r], rtol=1e-12, atol=1e-14)
        else:
            assert (state["momentum_buffer"][r] == 0).all()


def test_unsampled_rows_keep_value_and_momentum_between_steps():
    module = _module(0.25, seed=5)
    opt = RowSparseSGD(module, lr=0.1, momentum=0.9, weight_decay=5e-4)
    batches = _batches(2)
    _train(module, opt, batches[:1])
    weight = module.weight.detach().clone()
    buffer = opt.state[module.weight]["momentum_buffer"].clone()
    history = _train(module, opt, batches[1:], record=True)
    rows = history[0][2]
    other = torch.ones(C, dtype=torch.bool)
    other[rows] = False
    assert torch.equal(module.weight.detach()[other], weight[other])
    assert torch.equal(opt.state[module.weight]["momentum_buffer"][other], buffer[other])
    assert not torch.equal(module.weight.detach()[rows], weight[rows])


def _reference_adamw(history, lr, betas, eps, weight_decay):
    weight = history[0][0].clone()
    m, v, t = torch.zeros_like(weight), torch.zeros_like(weight), [0] * weight.shape[0]
    beta1, beta2 = betas
    for _, grad, rows in history:
        for r in rows.tolist():
            t[r] += 1
            weight[r] = weight[r] * (1 - lr * weight_decay)
            m[r] = beta1 * m[r] + (1 - beta1) * grad[r]
            v[r] = beta2 * v[r] + (1 - beta2) * grad[r] ** 2
            m_hat = m[r] / (1 - beta1 ** t[r])
            denom = torch.sqrt(v[r]) / math.sqrt(1 - beta2 ** t[r]) + eps
            weight[r] = weight[r] - lr * m_hat / denom
    return weight, m, v, t


def test_sampled_adamw_has_per_row_moments_and_bias_correction():
    module = _module(0.3, seed=7)
    kw = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt = build_classifier_optimizer(module, "adamw", **kw)
    assert isinstance(opt, RowSparseAdamW)
    history = _train(module, opt, _batches(5), record=True)
    weight, m, v, t = _reference_adamw(history, **kw)
    state = opt.state[module.weight]
    torch.testing.assert_close(module.weight.detach(), weight, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["exp_avg"], m, rtol=1e-12, atol=1e-16)
    torch.testing.assert_close(state["exp_avg_sq"], v, rtol=1e-12, atol=1e-18)
    assert state["step"].tolist() == t
    assert len(set(t)) > 1, "rows should have different update counts"


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_state_dict_round_trip_and_per_row_shapes(name):
    module = _module(0.3, seed=11)
    batches = _batches(4)
    opt = build_classifier_optimizer(module, name, lr=0.05)
    _train(module, opt, batches[:2])
    saved_module = copy.deepcopy(module.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    for value in saved["state"][0].values():
        assert value.shape[0] == C
    _train(module, opt, batches[2:])

    resumed = _module(0.3, seed=11)
    resumed.load_state_dict(saved_module)
    opt2 = build_classifier_optimizer(resumed, name, lr=0.05)
    opt2.load_state_dict(saved)
    assert opt2.state[resumed.weight]["step"].dtype == torch.int64
    _train(resumed, opt2, batches[2:])
    assert torch.equal(resumed.weight, module.weight)

    other = partial_fc.PartialFC(npc_head.NPCFace(), D, C + 3).double()
    opt3 = build_classifier_optimizer(other, name, lr=0.05)
    with pytest.raises(ValueError, match="re-shard"):
        opt3.load_state_dict(saved)


def test_bad_arguments_raise():
    module = _module(1.0)
    with pytest.raises(ValueError, match="unknown classifier optimizer"):
        build_classifier_optimizer(module, "lamb")
    with pytest.raises(ValueError, match="Nesterov"):
        RowSparseSGD(module, lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="lr"):
        RowSparseSGD(module, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        RowSparseAdamW(module, betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="weight"):
        RowSparseSGD(torch.nn.ReLU(), lr=0.1)


def test_gradient_accumulation_updates_the_union_of_sampled_rows():
    module = _module(0.15, seed=9)
    opt = RowSparseSGD(module, lr=0.1, momentum=0.9, weight_decay=1e-3)
    batches = _batches(3)
    # A skipped step (zero_grad without step) forgets its rows.
    module(*batches[0]).backward()
    opt.zero_grad()
    assert module.rows_to_update() is None
    before = module.weight.detach().clone()
    rows = []
    for emb, labels in batches[1:]:
        (module(emb, labels) * 0.5).backward()
        rows.append(module.sampled_index.clone())
    union = torch.unique(torch.cat(rows))
    assert torch.equal(module.rows_to_update(), union)
    assert len(union) > max(len(r) for r in rows)
    grad = module.weight.grad.clone()
    opt.step()
    assert module.rows_to_update() is None
    expected, _ = _reference_sgd([(before, grad, union)], 0.1, 0.9, 0.0, 1e-3, False)
    torch.testing.assert_close(module.weight.detach(), expected, rtol=1e-12, atol=1e-14)
    other = torch.ones(C, dtype=torch.bool)
    other[union] = False
    assert torch.equal(module.weight.detach()[other], before[other])
    # Evaluation forwards and forwards without gradient record nothing.
    module.eval()
    module(*batches[0])
    module.train()
    with torch.no_grad():
        module(*batches[0])
    assert module.rows_to_update() is None and module._pending_rows == []


def _dense_steps(optimizer_cls, dtype, settings, grad_layout=lambda g: g, steps=3):
    """A [60 x 8] weight (no sampling: every row updated) after ``steps`` updates from fixed
    gradients, each set by hand in the layout ``grad_layout`` gives it."""
    module = torch.nn.Linear(D, C, bias=False).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(C, D, generator=torch.Generator().manual_seed(3)))
    if optimizer_cls is RowSparseSGD:
        optimizer = RowSparseSGD(module, lr=0.3, **settings)
    else:  # the single-tensor path, the one the docstrings promise bit for bit
        optimizer = torch.optim.SGD(module.parameters(), lr=0.3, foreach=False, **settings)
    gen = torch.Generator().manual_seed(4)
    for _ in range(steps):
        module.weight.grad = grad_layout(torch.randn(C, D, generator=gen).to(dtype))
        optimizer.step()
    return module.weight.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("settings", SGD_SETTINGS)
def test_sgd_dense_update_of_low_precision_rows_is_torch_sgd(settings, dtype):
    """bf16/fp16 classifier rows: every element updated as torch.optim.SGD does (the CPU fused
    SGD kernel of torch 2.13 skipped elements of such tensors past its first vector)."""
    ours = _dense_steps(RowSparseSGD, dtype, settings)
    theirs = _dense_steps(torch.optim.SGD, dtype, settings)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("settings", SGD_SETTINGS)
def test_sgd_dense_update_with_a_gradient_in_another_layout_is_torch_sgd(settings):
    """A gradient set by hand with other strides than the weight (column-major here) updates
    each element from its own gradient (the fused kernel walks raw memory)."""
    column_major = lambda g: g.t().contiguous().t()  # noqa: E731
    ours = _dense_steps(RowSparseSGD, torch.float32, settings, column_major)
    theirs = _dense_steps(torch.optim.SGD, torch.float32, settings, column_major)
    assert torch.equal(ours, theirs)
