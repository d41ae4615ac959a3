"""What a training step costs the host, counted by torch.profiler on CPU: operations issued per
phase (on CUDA each is a kernel launch; the foreach ones are multi-tensor kernels) and device-to-
host reads, which on CUDA each wait for the device to drain its queue."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import ProfilerActivity, profile

from partial_fc.train.divergence import first_nonfinite, scale_gradients_to_norm, squared_norm

from tests.helpers.dist_harness import run_workers
from tests.helpers.profiling import host_syncs, top_level_ops
from tests.helpers.trainer_fixtures import DIM, SIDE, make_trainer

# The phases whose work is the model's own and grows with it by nature: the forward and backward
# passes, and torch's per-parameter optimizer update on CPU (a foreach kernel on CUDA).
MODEL_PHASES = ("trainer/backbone forward", "trainer/classifier forward", "trainer/backward",
                "trainer/optimizer step")
# The trainer's own reads per step: whether the step is finite (and a rank votes to stop), and
# the state check's all-reduced flag.
TRAINER_SYNCS_PER_STEP = 2


def deep_backbone(blocks: int):
    """Linear -> (BatchNorm, Tanh, Linear) x blocks -> Linear: 4 + 4 * blocks parameter tensors
    and 3 * blocks buffers."""
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 32)]
    for _ in range(blocks):
        layers += [nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 32)]
    return nn.Sequential(*layers, nn.Linear(32, DIM))


def profiled_step(trainer, with_stack=False):
    trainer.train_step()  # the first step builds optimizer state; the steady state is what counts
    with profile(activities=[ProfilerActivity.CPU], with_stack=with_stack) as prof:
        trainer.train_step()
    return prof


def test_the_step_bookkeeping_issues_as_many_operations_for_a_small_and_a_large_model(tmp_path):
    """The gradient norm, clipping and the state check run foreach norms: a constant number of
    operations however many tensors the model has (they were five per tensor and two per
    gradient: r50 about 2,200 launches a step)."""
    counts = []
    for blocks in (1, 12):
        trainer = make_trainer(tmp_path / str(blocks), backbone=deep_backbone(blocks), clip_grad_norm=1.0)
        ops = top_level_ops(profiled_step(trainer))
        counts.append({phase: n for phase, n in ops.items() if phase not in MODEL_PHASES})
        assert ops["trainer/backward"] > 0 and counts[-1]["trainer/state check"] > 0
    assert counts[0] == counts[1]
    assert set(counts[0]) == {"trainer/data loading", "trainer/gradient norm", "trainer/state check", None}


def _sync_worker(rank, world_size, run_dir, classifier_kwargs):
    group = dist.group.WORLD if world_size > 1 else None
    trainer = make_trainer(run_dir, rank, world_size, batch_size=4, group=group,
                           classifier_kwargs=classifier_kwargs)
    return host_syncs(profiled_step(trainer, with_stack=True))


CLASSIFIER_SETUPS = {"reference": {"impl": "reference"},
                     "2-class blocks": {"impl": "chunked", "block_size": 2},
                     "one block": {"impl": "chunked", "block_size": 13}}


@pytest.fixture(scope="module")
def syncs(tmp_path_factory):
    """``{(world size, classifier setup): {owner: host syncs in one step}}`` on rank 0."""
    root = tmp_path_factory.mktemp("syncs")
    return {(world, name): run_workers(_sync_worker, world, str(root / f"{world}-{name}"), kwargs)[0]
            for world in (1, 3) for name, kwargs in CLASSIFIER_SETUPS.items()}


def test_the_trainer_reads_the_device_twice_per_step_on_any_world_size_and_class_blocks(syncs):
    """Neither the loss, nor the gradient norm, nor one flag per rank or per tensor: the loss
    is read on log steps only (read_record), and a step's own reads are the verdict and the
    state check's flag."""
    for key, owners in syncs.items():
        assert owners.get("trainer") == TRAINER_SYNCS_PER_STEP, (key, owners)
        assert None not in owners, (key, owners)


def test_a_whole_step_reads_the_device_as_often_on_three_ranks_and_any_class_blocks_as_on_one(syncs):
    totals = {key: sum(owners.values()) for key, owners in syncs.items()}
    assert len(set(totals.values())) == 1, totals


def test_squared_norm_equals_float64_arithmetic_over_mixed_dtypes_and_propagates_nan_and_inf():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 3, generator=g), torch.randn(5, generator=g).to(torch.bfloat16),
               torch.randn(2, 2, 2, generator=g).double(), torch.randn(300, generator=g) * 1e3]
    want = sum(float(t.double().pow(2).sum()) for t in tensors)
    got = squared_norm(tensors, torch.device("cpu"))
    assert got.dtype == torch.float32 and got.shape == ()
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert float(squared_norm([], torch.device("cpu"))) == 0.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        spoilt = [t.clone() for t in tensors]
        spoilt[1][3] = bad  # a bf16 tensor among float32 ones
        assert not torch.isfinite(squared_norm(spoilt, torch.device("cpu")))


def test_gradient_scaling_to_a_norm_matches_torch_clip_grad_norm():
    g = torch.Generator().manual_seed(1)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in ((4, 3), (9,), (2, 5))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 10
    reference = [p.grad.clone() for p in params]
    for max_norm in (1.0, 1e6):  # clipped, and within the bound (left exactly as it was)
        grads = [r.clone() for r in reference]
        total = squared_norm(grads, torch.device("cpu")).sqrt()
        scale_gradients_to_norm(grads, max_norm, total)
        for p, r in zip(params, reference):
            p.grad = r.clone()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        for got, p in zip(grads, params):
            torch.testing.assert_close(got, p.grad, rtol=1e-6, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(grads, reference))


def test_finite_values_whose_squares_overflow_are_no_divergence(tmp_path):
    """The state check's norm overflows to inf for finite float32 values near 1e20; the exact
    per-tensor look that follows finds them finite, and the run goes on."""
    trainer = make_trainer(tmp_path)
    with torch.no_grad():
        trainer.backbone[1].bias[0] = 1e20
    assert not torch.isfinite(squared_norm([trainer.backbone[1].bias], torch.device("cpu")))
    assert first_nonfinite(trainer._named_state()) is None
    trainer.check_state_finite()


def test_embeddings_enter_the_classifier_in_float32_under_bf16_autocast(tmp_path):
    """So they are all-gathered, and their gradients reduce-scattered, in fp32 (the classifier
    runs its GEMMs in its own gemm_dtype)."""
    trainer = make_trainer(tmp_path, precision="bf16")
    seen = []
    trainer.classifier.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    trainer.train_step()
    assert seen == [torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the backbone itself gives
        images, _ = trainer._next_batch()
        assert trainer.model(images).dtype == torch.bfloat16


@pytest.mark.cuda
def test_on_cuda_the_trainer_waits_for_the_device_twice_per_step(tmp_path):
    """CUDA's sync debug mode sees every host sync (copies to the host, nonzero and unique
    included, which the CPU count above cannot); the ones the trainer's own code makes are the
    same two."""
    import warnings

    from tests.helpers.profiling import CLASSIFIER_FILES

    trainer = make_trainer(tmp_path, device="cuda", backbone=deep_backbone(2))
    trainer.train_step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = [w.filename.replace("\\", "/") for w in caught if "synchroniz" in str(w.message)]
    own = [f for f in where if "partial_fc/" in f and not any(c in f for c in CLASSIFIER_FILES)]
    assert len(own) == TRAINER_SYNCS_PER_STEP, where
