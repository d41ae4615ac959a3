"""The training step equals single-process training: DDP, accumulation, skipped steps."""
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.helpers.dist_harness import run_workers
from tests.helpers.trainer_fixtures import linear_backbone, make_trainer, parameters_of, step_record


def _ddp_worker(rank, world_size, run_dir, steps):
    trainer = make_trainer(run_dir, rank, world_size, batch_size=6, group=dist.group.WORLD)
    losses = [step_record(trainer)["loss"] for _ in range(steps)]
    return losses, parameters_of(trainer)


def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    steps = 3
    results = run_workers(_ddp_worker, 2, str(tmp_path / "ddp"), steps)
    single = make_trainer(tmp_path / "single", batch_size=12)
    losses = [step_record(single)["loss"] for _ in range(steps)]
    ref = parameters_of(single)
    for rank_losses, params in results:
        assert rank_losses == pytest.approx(losses, rel=1e-5)
        for got, want in zip(params["backbone"], ref["backbone"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    rows = torch.cat([params["classifier"] for _, params in results])
    torch.testing.assert_close(rows, ref["classifier"], rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    accumulated = make_trainer(tmp_path / "a", batch_size=6, grad_accum=2)
    whole = make_trainer(tmp_path / "b", batch_size=12, grad_accum=1)
    for _ in range(2):
        ra, rb = step_record(accumulated), step_record(whole)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
    pa, pb = parameters_of(accumulated), parameters_of(whole)
    for x, y in zip(pa["backbone"] + [pa["classifier"]], pb["backbone"] + [pb["classifier"]]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert accumulated.batches.sampler.position == whole.batches.sampler.position == 24


@pytest.mark.parametrize("channels_last", [False, True])
def test_uint8_batches_normalised_by_the_trainer_train_identically(tmp_path, channels_last):
    """The GPU path (workers ship uint8 NxHxWx3, the trainer normalises on its device) gives
    bit-identical images, hence identical losses and weights, to normalising in the workers."""
    conv = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 16))  # noqa: E731
    results = []
    for in_workers in (True, False):
        torch.manual_seed(0)
        trainer = make_trainer(tmp_path / str(in_workers), batch_size=8, backbone=conv(),
                               normalize_in_workers=in_workers, channels_last=channels_last)
        images, _ = trainer.batches.next()
        assert images.dtype == (torch.float32 if in_workers else torch.uint8)
        trainer.batches.close()
        results.append(([step_record(trainer)["loss"] for _ in range(3)], parameters_of(trainer)))
    (loss_a, pa), (loss_b, pb) = results
    assert loss_a == loss_b
    for x, y in zip(pa["backbone"] + [pa["classifier"]], pb["backbone"] + [pb["classifier"]]):
        assert torch.equal(x, y)


@pytest.mark.cuda
def test_uint8_batches_through_pinned_memory_train_like_float_batches_on_cuda(tmp_path):
    """The GPU path end to end: pinned uint8 batches, a non-blocking copy, normalize_batch on the
    device; the same losses and weights as float batches normalised in the workers."""
    results = []
    for in_workers in (True, False):
        trainer = make_trainer(tmp_path / str(in_workers), batch_size=8, device="cuda",
                               normalize_in_workers=in_workers)
        results.append(([step_record(trainer)["loss"] for _ in range(3)], parameters_of(trainer)))
    (loss_a, pa), (loss_b, pb) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for x, y in zip(pa["backbone"] + [pa["classifier"]], pb["backbone"] + [pb["classifier"]]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


class NaNOnCall(nn.Module):
    """Wraps a backbone; its output on the given forward call is NaN."""

    def __init__(self, inner, bad_call):
        super().__init__()
        self.inner, self.bad_call, self.calls = inner, bad_call, 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        return out * float("nan") if self.calls == self.bad_call else out


def test_non_finite_step_is_skipped_and_weights_untouched(tmp_path):
    trainer = make_trainer(tmp_path, batch_size=8, backbone=NaNOnCall(linear_backbone(), bad_call=2))
    trainer.train_step()
    before = parameters_of(trainer)
    record = step_record(trainer)
    assert not math.isfinite(record["loss"]) and record["skipped_steps"] == 1
    after = parameters_of(trainer)
    for x, y in zip(before["backbone"] + [before["classifier"]], after["backbone"] + [after["classifier"]]):
        assert torch.equal(x, y)
    record = step_record(trainer)
    assert math.isfinite(record["loss"]) and trainer.skipped_steps == 1 and trainer.step == 3
    assert any(not torch.equal(x, y) for x, y in zip(after["backbone"], parameters_of(trainer)["backbone"]))


def test_gradient_clipping_bounds_the_update(tmp_path):
    clipped = make_trainer(tmp_path / "c", batch_size=8, clip_grad_norm=1e-3)
    free = make_trainer(tmp_path / "f", batch_size=8)
    start = parameters_of(clipped)
    rc, rf = step_record(clipped), step_record(free)
    assert rc["grad_norm"] == pytest.approx(rf["grad_norm"])  # reported before clipping
    moved_c = sum((a - b).norm() ** 2 for a, b in zip(parameters_of(clipped)["backbone"], start["backbone"]))
    moved_f = sum((a - b).norm() ** 2 for a, b in zip(parameters_of(free)["backbone"], start["backbone"]))
    assert moved_c < moved_f


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_on_cpu(tmp_path, precision):
    trainer = make_trainer(tmp_path, batch_size=8, precision=precision)
    fp32 = make_trainer(tmp_path / "fp32", batch_size=8)
    record, ref = step_record(trainer), step_record(fp32)
    assert record["loss"] == pytest.approx(ref["loss"], rel=0.05)
    if precision == "bf16":
        assert record["skipped_steps"] == 0 and "amp_scale" not in record
        return
    # fp16: GradScaler starts at 2^16; steps whose scaled gradients overflow are skipped on every
    # rank and halve the scale, until steps go through.
    records = [record] + [step_record(trainer) for _ in range(7)]
    skipped = records[-1]["skipped_steps"]
    assert skipped < len(records), "some fp16 steps must go through"
    assert records[-1]["amp_scale"] == 2.0 ** (16 - skipped)


def test_fp16_non_finite_step_backs_off_the_loss_scale(tmp_path):
    trainer = make_trainer(tmp_path, batch_size=8, precision="fp16",
                           backbone=NaNOnCall(linear_backbone(), bad_call=1))
    record = step_record(trainer)
    assert record["skipped_steps"] == 1 and record["amp_scale"] == 2.0 ** 15
