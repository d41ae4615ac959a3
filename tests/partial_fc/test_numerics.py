"""Low-precision GEMMs and tiles (partial_fc/classifier/numerics.py, tiles.py): fp32 results
from bf16 / fp16 inputs on both paths, the capability probed once, and an fp16 gradient tile
that cannot overflow however many classes share a row's softmax."""
import pytest
import torch

import npc_head
from partial_fc.classifier.chunked import chunked_margin_loss
from partial_fc.classifier.numerics import matmul, mm_has_out_dtype
from partial_fc.classifier.reference import reference_margin_loss

from tests.helpers.margin_reference import make_problem


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_gemm_gives_the_fp32_product_of_the_rounded_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=g), torch.randn(256, 96, generator=g)
    got = matmul(a.to(dtype), b.to(dtype), torch.float32)
    exact = a.to(dtype).double() @ b.to(dtype).double()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))
    rounded = exact.to(dtype).double()  # what a product returned in the inputs' dtype holds
    assert float((rounded - exact).abs().max()) > 100 * float((got.double() - exact).abs().max())


def test_the_reference_path_takes_fp32_cosines_from_bf16_gemms():
    """Its cosine matrix, like the chunked path's tiles (the same ``matmul``), is the fp32
    product of the bf16-rounded unit vectors: the target cosines match that to fp32
    precision, far closer than bf16's rounding of the product."""
    weight, emb, labels = make_problem(53, 16, 12, seed=5)
    _, diagnostics = reference_margin_loss(npc_head.ArcFace(), emb.float(), weight.float(), labels,
                                           gemm_dtype=torch.bfloat16)
    e = torch.nn.functional.normalize(emb.float()).to(torch.bfloat16).double()
    w = torch.nn.functional.normalize(weight.float()).to(torch.bfloat16).double()
    want = (e * w[labels]).sum(dim=1).clamp(-1, 1)
    error = (diagnostics["target_cos"].double() - want).abs().max()
    assert float(error) < 1e-6 < float((want.to(torch.bfloat16).double() - want).abs().max())


def test_the_fp32_output_capability_is_probed_once_per_process():
    mm_has_out_dtype.cache_clear()
    weight, emb, labels = make_problem(53, 16, 12, seed=5)
    for _ in range(3):
        reference_margin_loss(npc_head.ArcFace(), emb.float(), weight.float(), labels,
                              gemm_dtype=torch.bfloat16)
    info = mm_has_out_dtype.cache_info()
    assert info.misses == 1 and info.hits >= 2


@pytest.mark.parametrize("sweep", ["classes", "rows"])
def test_an_fp16_gradient_tile_stays_finite_with_more_classes_than_fp16_can_count(sweep):
    """80,000 classes of nearly equal logit (s = 1): each row's sum-exp passes fp16's largest
    value (65,504), so a tile holding d loss / d logit times that sum (the target column's
    coefficient exp(z_y - max) - sum) would overflow. With 1 / sum-exp folded into the tile
    every entry is a probability times a slope: finite, and the gradients those of float64."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(80_000, 8, generator=g, dtype=torch.float64)
    emb = torch.randn(6, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 5, 17, 40_000, 79_999, 3])
    head = npc_head.CosFace(s=1.0, m=0.35)
    results = []
    for fn, kw in ((reference_margin_loss, {}),
                   (chunked_margin_loss, dict(gemm_dtype=torch.float16, sweep=sweep))):
        w = (weight if fn is reference_margin_loss else weight.float()).clone().requires_grad_(True)
        e = (emb if fn is reference_margin_loss else emb.float()).clone().requires_grad_(True)
        loss, _ = fn(head, e, w, labels, **kw)
        loss.mean().backward()
        results.append((loss.detach().double(), e.grad.double(), w.grad.double()))
    assert float(results[0][0].min()) > 11.0  # log(80,000): sum-exp ~ 80,000 > 65,504
    for got, want in zip(results[1], results[0]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
