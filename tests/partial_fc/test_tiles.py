"""The chunked path's tile functions (partial_fc/classifier/tiles.py), in both sweeps (chunks
of rows against every class, blocks of classes), against the reference path.

The functions' math is checked in float64 for every head run eagerly (the same Python the
compiler receives); the compiled form is checked in fp32 for NPCFace (statistics, a hard-negative
mask; one head, to keep compile time out of the suite) together with the number of graphs a run
with varying batch sizes compiles, and a real compile failure; on CUDA three heads. Compile time
is paid once per process (inductor's on-disk cache serves later processes).
"""
import warnings

import pytest
import torch

import npc_head
import partial_fc
from partial_fc.classifier.chunked import chunked_margin_loss
from partial_fc.classifier.plan import MIN_CHUNK_ROWS, ROW_TILE_ELEMENTS, row_chunk_size
from partial_fc.classifier.reference import reference_margin_loss
from partial_fc.classifier.tiles import Tiles, compiler_unavailable_reason

from tests.helpers.dist_harness import run_workers
from tests.helpers.margin_reference import make_head, make_problem
from tests.partial_fc.test_chunked import (ARC, COS, NPC_DEFAULT, NPC_OTHER, HardSquareHead,
                                           _assert_same, _losses, assert_ranks_match_reference,
                                           run_cases_on_rank)

HEADS = {
    "npcface": lambda: make_head("npcface", NPC_DEFAULT),
    "npcface_other": lambda: make_head("npcface", NPC_OTHER),
    "arcface": lambda: make_head("arcface", ARC),
    "cosface": lambda: make_head("cosface", COS),
    "mv_arc": lambda: npc_head.MVSoftmax(s=32.0, m=0.35, t=1.2),
    "mv_am_fixed": lambda: npc_head.MVSoftmax(s=32.0, m=0.35, t=1.3, arc=False, fixed=True),
    "curricularface": lambda: _curricular(),
    "autograd_slope": lambda: HardSquareHead(s=20.0),
    "adaface": lambda: npc_head.AdaFace(s=32.0, m=0.4, h=0.333, t_alpha=0.5),
}


def _curricular():
    head = npc_head.CurricularFace(s=64.0, m=0.5)
    head.eval()  # t fixed (not updated by prepare), so both paths see the same t
    head.t.fill_(0.3)
    return head


def _fused(fn, head, weight, emb, target_index, compile=False, **kw):
    return _losses(fn, head, weight, emb, target_index,
                   tiles=Tiles(head, compile=compile), **kw)


# Each sweep with its tile sizes: blocks of 1, 7 and 100 classes; chunks of 1, 5 and all rows.
SWEEP_CASES = [dict(sweep="classes", block_size=b) for b in (1, 7, 100)] + [
    dict(sweep="rows", chunk_rows=c) for c in (1, 5, None)]


@pytest.mark.parametrize("name", sorted(HEADS))
def test_tiles_in_float64_match_the_reference_path(name):
    weight, emb, labels = make_problem(37, 16, 13, seed=21)
    weight[5] = 0.0  # F.normalize's eps branch, folded into the tile
    target_index = torch.where(labels % 4 == 0, -1, labels)  # some targets owned elsewhere
    want = _losses(reference_margin_loss, HEADS[name](), weight, emb, target_index)
    for case in SWEEP_CASES:
        got = _fused(chunked_margin_loss, HEADS[name](), weight, emb, target_index, **case)
        _assert_same(got, want, 1e-10)


@pytest.mark.parametrize("case", SWEEP_CASES[1::2], ids=lambda c: str(c))
def test_sampled_rows_match_and_only_they_get_gradient(case):
    weight, emb, labels = make_problem(40, 8, 9, seed=6)
    index = torch.unique(torch.cat([labels, torch.tensor([0, 3, 17, 33, 39])]))
    target_index = torch.searchsorted(index, labels)
    want = _losses(reference_margin_loss, HEADS["npcface"](), weight[index], emb, target_index)
    got = _fused(chunked_margin_loss, HEADS["npcface"](), weight, emb, target_index,
                 row_index=index, **case)
    full_grad = torch.zeros_like(weight)
    full_grad[index] = want[2]
    _assert_same(got, (want[0], want[1], full_grad, want[3]), 1e-10)


class CountingTiles(Tiles):
    """The real tile functions (eager), counting the backward passes they run."""

    def __init__(self, head):
        super().__init__(head, compile=False)
        self.backward_calls = 0

    def backward(self, *args):
        self.backward_calls += 1
        return super().backward(*args)


@pytest.mark.parametrize("sampled", [False, True])
def test_rows_sweep_with_a_weighted_loss_forms_the_weight_gradient_again(sampled):
    """The row sweep forms the weight gradient for a uniform upstream gradient (a mean loss);
    per-row weights make backward form it again by the class sweep: same gradients as the
    reference path under the same weighted loss."""
    weight, emb, labels = make_problem(29, 8, 12, seed=4)
    index = torch.tensor([0, 2, 3, 5, 8, 9, 11, 13, 17, 19, 23, 28]) if sampled else None
    if sampled:
        labels = index[labels % len(index)]
    target_index = torch.searchsorted(index, labels) if sampled else labels
    row_weights = torch.linspace(0.2, 2.0, emb.shape[0], dtype=emb.dtype)

    def run(fn, head, **kw):
        w, e = weight.clone().requires_grad_(True), emb.clone().requires_grad_(True)
        loss, _ = fn(head, e, w[index] if sampled and fn is reference_margin_loss else w,
                     target_index, **kw)
        (loss * row_weights).sum().backward()
        return loss.detach(), e.grad, w.grad

    want = run(reference_margin_loss, HEADS["npcface"]())
    head = HEADS["npcface"]()
    tiles = CountingTiles(head)
    got = run(chunked_margin_loss, head, tiles=tiles, sweep="rows", chunk_rows=5,
              row_index=index)
    chunks = -(-emb.shape[0] // 5)
    assert tiles.backward_calls == chunks + 1  # the chunks, then one block of the class sweep
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10 * w.abs().max())


def test_rows_sweep_forms_no_gradient_without_grad_mode():
    """Under no_grad (validation) the row sweep runs its forward passes only."""
    weight, emb, labels = make_problem(29, 8, 12, seed=4)
    head = HEADS["npcface"]()
    tiles = CountingTiles(head)
    w = weight.clone().requires_grad_(True)
    with torch.no_grad():
        loss, _ = chunked_margin_loss(head, emb, w, labels, tiles=tiles, sweep="rows",
                                      chunk_rows=4)
    assert tiles.backward_calls == 0
    want, _ = reference_margin_loss(HEADS["npcface"](), emb, weight, labels)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)


def test_row_chunk_size_follows_the_tile_budget():
    cpu = torch.device("cpu")
    budget, least = ROW_TILE_ELEMENTS["cpu"], MIN_CHUNK_ROWS["cpu"]
    assert row_chunk_size(1024, 1000, cpu) == 1024  # the whole batch fits: one chunk
    chunk = row_chunk_size(1024, 100_000, cpu)  # balanced chunks within the budget
    assert chunk * 100_000 <= budget and -(-1024 // chunk) == -(-1024 * 100_000 // budget)
    assert row_chunk_size(1024, budget // (least - 1), cpu) == 0  # too few rows: class sweep
    assert row_chunk_size(1024, budget // 3, cpu, minimum=False) == 3  # forced: in budget
    assert row_chunk_size(1024, 2 * budget, cpu, minimum=False) == 1
    assert row_chunk_size(least // 2, budget // (least // 2), cpu) == least // 2  # small batch
    # CUDA: only a chunk of the whole batch (the weight gradient is then written once).
    cuda = torch.device("cuda")
    assert row_chunk_size(1024, ROW_TILE_ELEMENTS["cuda"] // 1024, cuda) == 1024
    assert row_chunk_size(1024, ROW_TILE_ELEMENTS["cuda"] // 1023, cuda) == 0


@pytest.mark.parametrize("bad", [dict(sweep="diagonal"), dict(sweep="rows", chunk_rows=0),
                                 dict(sweep="rows", chunk_rows=2.5)])
def test_bad_sweep_arguments_are_refused(bad):
    weight, emb, labels = make_problem(10, 4, 3, seed=1)
    with pytest.raises(ValueError, match="sweep|chunk_rows"):
        chunked_margin_loss(HEADS["arcface"](), emb, weight, labels, **bad)
    with pytest.raises(ValueError, match="sweep must be one of"):
        partial_fc.PartialFC(HEADS["arcface"](), 4, 10, sweep="diagonal")


def test_tiles_of_another_head_are_refused():
    weight, emb, labels = make_problem(10, 4, 3, seed=1)
    with pytest.raises(ValueError, match="another head"):
        chunked_margin_loss(HEADS["arcface"](), emb, weight, labels,
                            tiles=Tiles(HEADS["arcface"](), compile=False))


# --- compiled ---------------------------------------------------------------------------------

needs_compiler = pytest.mark.skipif(
    compiler_unavailable_reason(torch.device("cpu")) is not None,
    reason=f"torch.compile on CPU: {compiler_unavailable_reason(torch.device('cpu'))}",
)


def _unique_graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@needs_compiler
@pytest.mark.parametrize("sweep", ["rows", "classes"])
def test_compiled_float32_run_matches_reference_and_compiles_a_bounded_number_of_graphs(sweep):
    """20 training steps with a different global batch each step (and Partial FC sampling, so
    the scored rows and the last block's width change too): every step matches the reference
    path to 1e-5 in fp32, and the run compiles at most 4 graphs (the row sweep: forward pass,
    backward pass and weight-gradient projection; the class sweep: the two passes; plus room
    for a re-specialisation), not one per step."""
    C, D, block, name = 97, 16, 24, "npcface"
    torch.manual_seed(0)
    fused = partial_fc.PartialFC(HEADS[name](), D, C, sample_rate=0.7, impl="chunked",
                                 block_size=block, fused=True, sweep=sweep)
    ref = partial_fc.PartialFC(HEADS[name](), D, C, sample_rate=0.7, impl="reference")
    for m in (fused, ref):
        m.head.train(False)
    ref.load_state_dict(fused.state_dict())
    before = _unique_graphs()
    for step in range(20):
        batch = 5 + (7 * step) % 13
        g = torch.Generator().manual_seed(step)
        emb = torch.randn(batch, D, generator=g)
        labels = torch.randint(0, C, (batch,), generator=g)
        results = []
        for m in (fused, ref):
            e = emb.clone().requires_grad_(True)
            loss = m(e, labels)
            loss.backward()
            results.append((loss.detach(), e.grad, m.weight.grad.clone()))
            m.weight.grad = None
        assert fused.last_plan.compiled and fused.last_plan.sweep == sweep
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())
    compiled = _unique_graphs() - before
    assert 1 <= compiled <= 4, f"{compiled} graphs compiled in 20 steps"


def test_no_compiler_warns_once_and_runs_the_same_functions_eagerly(monkeypatch, tmp_path):
    """With no C++ compiler on PATH, PartialFC(fused=True) says so once and runs the tile
    functions eagerly, with the results of fused=False."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-c++")
    assert "no C++ compiler" in compiler_unavailable_reason(torch.device("cpu"))
    weight, emb, labels = make_problem(30, 8, 6, seed=3)
    modules = [partial_fc.PartialFC(HEADS["npcface"](), 8, 30, impl="chunked", block_size=8,
                                    fused=f).double() for f in (True, False)]
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in modules:
            with torch.no_grad():
                m.weight.copy_(weight)
            losses.append([m(emb, labels).detach() for _ in range(2)])
    assert [str(w.message) for w in caught if "fused" in str(w.message)] == [
        "PartialFC(fused=True): no C++ compiler (no-such-c++ or clang++) on PATH for inductor; "
        "the tile functions run eagerly"
    ]
    assert modules[0].last_plan == modules[1].last_plan and not modules[0].last_plan.compiled
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


# Run in a fresh process: inductor remembers a failed compiler search for the process's life.
FAILING_COMPILER_RUN = """
import json, warnings, torch, npc_head
from partial_fc.classifier.chunked import chunked_margin_loss
from partial_fc.classifier.tiles import Tiles
from tests.helpers.margin_reference import make_problem
weight, emb, labels = make_problem(37, 16, 13, seed=21)
weight, emb = weight.float(), emb.float()
head = npc_head.NPCFace(s=17.0)

def run(tiles):
    w, e = weight.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    loss, _ = chunked_margin_loss(head, e, w, labels, tiles=tiles, sweep="classes", block_size=8)
    loss.mean().backward()
    return [loss.detach(), e.grad, w.grad]

tiles = Tiles(head)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = [run(tiles) for _ in range(2)]
want = run(Tiles(head, compile=False))
print(json.dumps(dict(
    messages=[str(w.message) for w in caught if "tile kernels" in str(w.message)],
    broken=tiles.broken, active=tiles.active,
    first=max(float(((g - w).abs().max() / w.abs().max())) for g, w in zip(got[0], want)),
    second_equal=all(bool(torch.equal(g, w)) for g, w in zip(got[1], want)))))
"""


@needs_compiler
def test_a_failing_compiler_warns_once_and_the_same_functions_run_eagerly(tmp_path):
    """A C++ compiler that exists but fails (inductor's own error, raised at a call): one
    warning, the rest of that call and every later one run eagerly, with the eager results."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    cxx = tmp_path / "broken-c++"
    cxx.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    cxx.chmod(0o755)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, CXX=str(cxx), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               TORCHINDUCTOR_FX_GRAPH_CACHE="0", PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", FAILING_COMPILER_RUN], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["messages"]) == 1 and "failed to compile" in result["messages"][0], result
    assert result["broken"] and not result["active"]
    assert result["first"] < 1e-5  # what compiled before the failure ran compiled
    assert result["second_equal"]  # then eagerly: the eager results exactly


class OutOfMemoryHead(npc_head.NPCFace):
    """Its negative logits raise what an exhausted device raises."""

    def negative_logits(self, cos, prep):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@needs_compiler
def test_an_out_of_memory_error_in_the_compiled_tiles_is_raised_not_taken_for_a_compile_failure():
    weight, emb, labels = make_problem(37, 16, 13, seed=21)
    head = OutOfMemoryHead(s=17.0)
    tiles = Tiles(head)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
            chunked_margin_loss(head, emb.float(), weight.float(), labels, tiles=tiles,
                                sweep="classes")
    assert tiles.active and not [w for w in caught if "tile kernels" in str(w.message)]


# --- over gloo ranks (the tile functions, eagerly) ------------------------------------------

BATCHES = {1: [11], 2: [7, 4], 3: [5, 3, 7]}
# The last case leaves the third of three ranks without classes (2 classes over 3 ranks).
DIST_CASES = [("npcface", NPC_OTHER, 41, 8, 0.4, 4, 3), ("arcface", ARC, 37, 16, 1.0, 0, 64),
              ("npcface", NPC_DEFAULT, 2, 8, 1.0, 5, 1)]


def _tiles_worker(rank, world_size, sweep, compiling_rank=None):
    return run_cases_on_rank(rank, world_size, DIST_CASES, BATCHES, fused=rank == compiling_rank,
                             sweep=sweep)


@pytest.mark.parametrize("sweep", ["rows", "classes"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_both_sweeps_over_ranks_match_float64_reference(world_size, sweep):
    results = run_workers(_tiles_worker, world_size, sweep)
    for *_, per_rank in assert_ranks_match_reference(results, world_size, DIST_CASES, BATCHES):
        assert per_rank[0]["plan"].sweep == sweep


def test_ranks_agree_to_run_eagerly_when_one_rank_cannot_compile():
    """Rank 0 could compile its tiles, rank 1 cannot (fused=False stands for a node without a
    compiler): the step's first all-gather tells every rank, so both run the same functions
    eagerly and take the class sweep ("auto" takes rows only for compiled tiles): no hang, the
    reference results, one plan."""
    results = run_workers(_tiles_worker, 2, "auto", 0)
    for *_, per_rank in assert_ranks_match_reference(results, 2, DIST_CASES, BATCHES):
        assert not per_rank[0]["plan"].compiled and per_rank[0]["plan"].sweep == "classes"


# --- CUDA -------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sweep", ["rows", "classes"])
@pytest.mark.parametrize("name", ["npcface", "arcface", "curricularface"])
def test_cuda_compiled_tiles_match_reference(name, sweep):
    """On the device: Triton tiles, fp32 GEMMs to 1e-5 and bf16 GEMMs (fp32 accumulation and
    statistics) to bf16's resolution against the fp32 reference path, in both sweeps (rows:
    chunks of 40 of the 96 rows)."""
    if compiler_unavailable_reason(torch.device("cuda")) is not None:
        pytest.skip(compiler_unavailable_reason(torch.device("cuda")))
    weight, emb, labels = make_problem(3001, 64, 96, seed=8)
    weight, emb, labels = weight.float().cuda(), emb.float().cuda(), labels.cuda()
    want = _losses(reference_margin_loss, HEADS[name]().cuda(), weight, emb, labels)
    head = HEADS[name]().cuda()
    kw = dict(sweep=sweep, block_size=1024, chunk_rows=40 if sweep == "rows" else None)
    got = _fused(chunked_margin_loss, head, weight, emb, labels, compile=True, **kw)
    _assert_same(got, want, 1e-5)
    got16 = _fused(chunked_margin_loss, head, weight, emb, labels, compile=True,
                   gemm_dtype=torch.bfloat16, **kw)
    torch.testing.assert_close(got16[0], want[0], rtol=2e-2, atol=2e-2 * want[0].abs().max())
    torch.testing.assert_close(got16[1], want[1], rtol=5e-2, atol=5e-2 * want[1].abs().max())


# --- configuration ----------------------------------------------------------------------------

def test_head_fused_and_sweep_keys_are_validated_and_reach_the_classifier():
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from partial_fc.train.builders import build_classifier
    from partial_fc.train.config import ConfigError, validate_config

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        default = compose(config_name="config", overrides=["trainer.device=cpu"])
        off = compose(config_name="config", overrides=["trainer.device=cpu", "head.fused=false"])
        bad = compose(config_name="config", overrides=["head.fused=maybe"])
    for cfg, want in ((default, True), (off, False)):
        validate_config(cfg)
        assert build_classifier(cfg, num_classes=10).fused is want
    with pytest.raises(ConfigError, match=r"head\.fused must be true or false, got 'maybe'"):
        validate_config(bad)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        rows = compose(config_name="config", overrides=["trainer.device=cpu", "head.sweep=rows"])
        bad_sweep = compose(config_name="config", overrides=["head.sweep=diagonal"])
    assert build_classifier(default, num_classes=10).sweep == "auto"
    validate_config(rows)
    assert build_classifier(rows, num_classes=10).sweep == "rows"
    with pytest.raises(ConfigError, match=r"head\.sweep must be one of \('auto', 'rows', "
                                          r"'classes'\), got 'diagonal'"):
        validate_config(bad_sweep)


def _backward_twice(fn, head, weight, emb, target_index, **kw):
    """Gradients after ``loss.backward(retain_graph=True)`` and a second backward of a
    differently scaled loss, then ``torch.autograd.grad`` of the weight alone, all through the
    one forward."""
    w = weight.clone().requires_grad_(True)
    e = emb.clone().requires_grad_(True)
    loss, _ = fn(head, e, w, target_index, **kw)
    loss.mean().backward(retain_graph=True)
    (3.0 * loss.mean()).backward(retain_graph=True)
    (again,) = torch.autograd.grad(loss.sum(), w)
    return e.grad, w.grad, again


@pytest.mark.parametrize("case", [dict(sweep="classes", block_size=7),
                                  dict(sweep="rows", chunk_rows=5)], ids=str)
def test_a_retained_graph_gives_every_backward_the_reference_gradients(case):
    """retain_graph=True: each backward through the same forward gives the reference path's
    gradients (the row sweep's precomputed gradients serve the first; later ones are formed
    again), not an AttributeError of a context cleared by the first."""
    weight, emb, labels = make_problem(37, 16, 13, seed=21)
    want = _backward_twice(reference_margin_loss, HEADS["npcface"](), weight, emb, labels)
    head = HEADS["npcface"]()
    got = _backward_twice(chunked_margin_loss, head, weight, emb, labels,
                          tiles=Tiles(head, compile=False), **case)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10 * w.abs().max())


def test_a_second_backward_without_a_retained_graph_is_torch_s_error():
    weight, emb, labels = make_problem(37, 16, 13, seed=21)
    head = HEADS["npcface"]()
    loss, _ = chunked_margin_loss(head, emb, weight.clone().requires_grad_(True), labels,
                                  tiles=Tiles(head, compile=False), sweep="rows")
    loss.mean().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.mean().backward()


@pytest.mark.parametrize("case", [dict(sweep="auto"), dict(sweep="rows"),
                                  dict(sweep="rows", chunk_rows=4)], ids=str)
def test_an_empty_global_batch_gives_what_the_reference_path_gives(case):
    """No rows at all (the class sweep and the reference path return an empty loss and zero
    gradients; the row sweep had no chunk to take its results from)."""
    weight, emb, labels = make_problem(37, 16, 13, seed=21)
    want = _losses(reference_margin_loss, HEADS["npcface"](), weight, emb[:0], labels[:0])
    got = _fused(chunked_margin_loss, HEADS["npcface"](), weight, emb[:0], labels[:0], **case)
    for g, w in zip(got[:3], want[:3]):
        assert torch.equal(g, w)
    assert got[3].keys() == want[3].keys()


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("sweep", ["rows", "classes"])
def test_fp16_weight_rows_of_small_norm_get_their_finite_gradient(sweep, sampled):
    """fp16 class rows of norm 0.01, 512 rows on three labels: the gradient (about 150) is
    fp16-finite, but the row sweep's sum over rows per unit upstream gradient (512 times that)
    is not: it must stay in the working dtype until backward scales it."""
    weight, emb, labels = make_problem(20, 16, 512, seed=2)
    labels = labels % 3
    weight = (weight * (0.01 / weight.norm(dim=1, keepdim=True))).half()
    index = torch.tensor([0, 1, 2, 5, 8, 13, 19]) if sampled else None
    rows = weight.double()[index] if sampled else weight.double()
    want = _losses(reference_margin_loss, HEADS["npcface"](), rows, emb, labels)[2]
    if sampled:
        want = torch.zeros_like(weight, dtype=torch.float64).index_copy_(0, index, want)
    head = HEADS["npcface"]()
    got = _losses(chunked_margin_loss, head, weight, emb.float(), labels, row_index=index,
                  tiles=Tiles(head, compile=False), sweep=sweep)[2]
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3 * want.abs().max())


def test_a_head_with_statistics_but_no_sums_is_refused_by_name():
    class NoSums(npc_head.MarginHead):
        num_stats = 1

        def positive_logit(self, target_cos, prep, stats):
            return target_cos

    weight, emb, labels = make_problem(37, 16, 13, seed=21)
    for fn, case in ((reference_margin_loss, {}), (chunked_margin_loss, {}),
                     (chunked_margin_loss, dict(sweep="rows"))):
        with pytest.raises(NotImplementedError, match="NoSums has num_stats=1"):
            fn(NoSums(s=20.0), emb, weight, labels, **case)
