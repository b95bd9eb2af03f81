"""GPTQ solver against independent references: float64 Hessians, brute-force clipping, closed-form special cases."""

from __future__ import annotations

import pytest
import torch

from gptq.quantizer import clip_search_scales, row_scales
from gptq.solver import (
    CholeskyError,
    GPTQConfig,
    HessianAccumulator,
    ImportanceAccumulator,
    gptq_quantize,
    inverse_cholesky,
    relative_output_error,
    rtn_quantize,
)


def _problem(n: int = 96, k: int = 256, t: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy-tailed weights and correlated inputs, as in real layers."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (1 + 3 * (torch.rand(n, k, generator=gen) > 0.98))
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    x = torch.randn(t, k, generator=gen) @ mix * (1 + torch.arange(k) / k)
    acc = HessianAccumulator(k)
    for chunk in x.split(500):
        acc.add(chunk)
    return w, acc.finalize()


# Each accumulator against its float64 formula over uneven batches: H = 2 X^T X / T (float32 products) and the
# mean squared input per feature.
ACCUMULATORS = {
    "hessian": (HessianAccumulator, lambda x: 2 * x.T @ x / x.shape[0], 1e-5),
    "importance": (ImportanceAccumulator, lambda x: (x * x).mean(0), 1e-6),
}


@pytest.mark.parametrize("name", list(ACCUMULATORS))
def test_accumulator_matches_float64_formula(name: str) -> None:
    cls, formula, rtol = ACCUMULATORS[name]
    gen = torch.Generator().manual_seed(1)
    chunks = [torch.randn(int(n), 32, generator=gen) for n in (5, 100, 37)]
    acc = cls(32)
    for c in chunks:
        acc.add(c.unsqueeze(0))
    x = torch.cat(chunks).double()
    assert torch.allclose(acc.finalize().double(), formula(x), rtol=rtol, atol=1e-6)
    assert acc.tokens == 142
    assert acc.total.dtype == torch.float32  # the running sum that several ranks all-reduce


@pytest.mark.parametrize("g", [32, 64, 128, -1])
def test_codes_scales_and_weight_agree(g: int) -> None:
    w, h = _problem()
    q = gptq_quantize(w, h, GPTQConfig(group_size=g))
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    per = w.shape[1] if g == -1 else g
    assert q.scales.shape == (w.shape[0], 1 if g == -1 else w.shape[1] // g)
    assert torch.equal(q.scales, q.scales.half().float())  # what the kernel reads is what was optimised
    assert torch.equal(q.weight, (q.codes.float() - 8) * q.scales.repeat_interleave(per, 1))


def test_diagonal_hessian_without_clipping_is_round_to_nearest() -> None:
    """With uncorrelated inputs there is nothing to compensate: GPTQ's updates vanish (closed form)."""
    w, _ = _problem()
    h = torch.diag(torch.rand(w.shape[1]) + 0.5)
    q = gptq_quantize(w, h, GPTQConfig(group_size=64, clip=False))
    r = rtn_quantize(w, 64)
    assert torch.equal(q.codes, r.codes)


@pytest.mark.parametrize("g", [64, 128, -1])
def test_gptq_beats_round_to_nearest(g: int) -> None:
    w, h = _problem()
    gptq_err = relative_output_error(w, gptq_quantize(w, h, GPTQConfig(group_size=g, clip=False)).weight, h)
    rtn_err = relative_output_error(w, rtn_quantize(w, g).weight, h)
    assert gptq_err < 0.8 * rtn_err


def test_clipping_lowers_the_hessian_weighted_error() -> None:
    w, h = _problem(seed=2)
    clipped = relative_output_error(w, gptq_quantize(w, h, GPTQConfig(group_size=64, clip=True)).weight, h)
    plain = relative_output_error(w, gptq_quantize(w, h, GPTQConfig(group_size=64, clip=False)).weight, h)
    assert clipped < plain


def test_clip_search_equals_brute_force_float64() -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(12, 16, generator=gen) * (1 + 4 * (torch.rand(12, 16, generator=gen) > 0.9))
    a = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    u = torch.linalg.cholesky(a @ a.T + 16 * torch.eye(16, dtype=torch.float64), upper=True)
    got = clip_search_scales(w, u.float())
    for r in range(12):
        best = None
        for i in range(75):
            s = row_scales(w[r : r + 1], 1 - i / 100).double()
            q = torch.clamp(torch.round(w[r].double() / s) + 8, 0, 15)
            delta = w[r].double() - (q - 8) * s
            err = (delta @ torch.linalg.inv(u)).square().sum().item()
            if best is None or err < best[0] - 1e-12:
                best = (err, s.item())
        assert got[r, 0].item() == pytest.approx(best[1], rel=1e-6)


def test_cholesky_retries_with_more_damping_then_fails_clearly() -> None:
    h = torch.diag(torch.tensor([1.0, 1.0, -0.15]))  # mean diag 0.617: +0.0617 fails, +0.617 succeeds
    _, damp, retries = inverse_cholesky(h, 0.1, 4)
    assert retries == 1 and damp == pytest.approx(1.0)
    with pytest.raises(CholeskyError, match="more\\s+calibration samples|raise --damp"):
        inverse_cholesky(-torch.eye(4), 0.1, 2)


def test_dead_inputs_are_zeroed_and_do_not_break_the_solver() -> None:
    w, h = _problem(k=128)
    h[:, 5] = 0
    h[5, :] = 0
    q = gptq_quantize(w, h, GPTQConfig(group_size=32))
    assert torch.all(q.weight[:, 5] == 0)
    assert torch.isfinite(q.weight).all()


def test_row_scales_are_the_smallest_that_cover_the_row() -> None:
    """-8 s .. 7 s covers every weight (up to the scale's fp16 rounding) and one extreme sits on the grid's end."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 64, generator=g, dtype=torch.float64)
    w[:128] -= 0.5  # rows whose extreme is negative, and rows whose extreme is positive
    w[128:] += 0.5
    s = row_scales(w.float()).double()
    assert torch.all(s.squeeze(1) == s.squeeze(1).half().double())  # fp16 values
    lo, hi = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
    tol = 2.0**-10
    assert torch.all(lo >= -8 * s * (1 + tol)) and torch.all(hi <= 7 * s * (1 + tol))
    fits = torch.isclose(lo, -8 * s, rtol=tol) | torch.isclose(hi, 7 * s, rtol=tol)
    assert fits.all()
    # Round to nearest with these scales never loses more than half a step anywhere.
    q = torch.clamp(torch.round(w / s) + 8, 0, 15)
    assert ((q - 8) * s - w).abs().max() <= 0.5 * s.max() * (1 + 8 * tol)


# ---------------------------------------------------------------- signed scales (issue 18)


def _brute_force_signed(w: torch.Tensor, factors: list[float], metric: torch.Tensor) -> torch.Tensor:
    """Per row, in float64: every signed candidate and its least-squares refit, error ``d M d^T``."""
    out = torch.empty(w.shape[0], 1)
    for r in range(w.shape[0]):
        row = w[r].double()
        a = row[row.abs().argmax()].item()
        best = None
        for p in factors:
            for s in (-a * p / 8, a * p / 7):
                s = float(torch.tensor(s).half().float()) or 1.0
                tries = [s]
                q = torch.clamp(torch.round(row / s), -8, 7)
                den = q @ metric @ q
                if den > 0:
                    fit = float(torch.tensor((row @ metric @ q / den).item()).half().float())
                    tries.append(fit if fit != 0 else s)
                for st in tries:
                    d = row - torch.clamp(torch.round(row / st), -8, 7) * st
                    err = (d @ metric @ d).item()
                    if best is None or err < best[0] * (1 - 1e-9):
                        best = (err, st)
        out[r, 0] = best[1]
    return out


@pytest.mark.parametrize("metric", ["importance", "u_inv"])
def test_signed_search_equals_brute_force_float64(metric: str) -> None:
    from gptq.quantizer import search_factors, search_scales

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(24, 16, generator=gen) * (1 + 4 * (torch.rand(24, 16, generator=gen) > 0.9))
    factors = search_factors(0.7, 16)
    if metric == "importance":
        d = torch.rand(16, generator=gen) + 0.1
        got = search_scales(w, factors, importance=d)
        m = torch.diag(d.double())
    else:
        a = torch.randn(16, 16, generator=gen, dtype=torch.float64)
        u = torch.linalg.cholesky(a @ a.T + 16 * torch.eye(16, dtype=torch.float64), upper=True)
        u_inv = torch.linalg.inv(u)
        got = search_scales(w, factors, u_inv=u_inv.float())
        m = u_inv @ u_inv.T
    want = _brute_force_signed(w, factors.tolist(), m)
    # the same scale, or one whose error ties the best within float32 rounding of the metric
    for r in range(w.shape[0]):
        row = w[r].double()

        def err(s: float, row: torch.Tensor = row) -> float:
            d = row - torch.clamp(torch.round(row / s), -8, 7) * s
            return (d @ m @ d).item()

        assert err(got[r, 0].item()) <= err(want[r, 0].item()) * (1 + 1e-5) + 1e-12


def test_signed_candidates_put_the_extreme_on_level_minus_8() -> None:
    from gptq.quantizer import signed_scale_candidates

    w = torch.tensor([[0.1, -0.3, 0.8, 0.2], [0.5, -0.9, 0.1, 0.0]])
    s = signed_scale_candidates(w, torch.ones(1))  # [2, 2, 1]: (-a/8, a/7) per row
    assert torch.equal(s[:, :, 0], torch.tensor([[-0.1, 0.1125], [0.8 / 7, -0.9 / 7]]).half().float())
    q = torch.round(w / s[0])
    assert q[0, 2] == -8 and q[1, 1] == -8  # the larger-magnitude side takes the 16th level, whatever its sign
    assert torch.all(q.abs() <= 8)


@pytest.mark.parametrize("g", [64, 128, -1])
def test_weighted_rtn_codes_scales_and_weight_agree_and_beat_rtn(g: int) -> None:
    from gptq.solver import weighted_rtn_quantize

    w, h = _problem(k=320)  # 320: g128 leaves a partial last group
    d = torch.diag(h)
    q = weighted_rtn_quantize(w, d, GPTQConfig(group_size=g))
    groups = 1 if g == -1 else -(-320 // g)
    per = 320 if g == -1 else g
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape and q.scales.shape == (96, groups)
    assert torch.equal(q.scales, q.scales.half().float())
    assert torch.equal(q.weight, ((q.codes.float() - 8) * q.scales.repeat_interleave(per, 1)[:, :320]))
    assert 0.3 < (q.scales < 0).float().mean() < 0.7  # both signs are used
    err = (((w - q.weight) ** 2) * d).sum()
    rtn = rtn_quantize(w, g)
    assert err < 0.8 * (((w - rtn.weight) ** 2) * d).sum()  # lower importance-weighted error than plain RTN


@pytest.mark.parametrize("g", [64, -1])
def test_gptq_with_signed_scales_lowers_the_hessian_weighted_error(g: int) -> None:
    w, h = _problem(seed=7)
    signed = gptq_quantize(w, h, GPTQConfig(group_size=g, signed=True))
    clipped = gptq_quantize(w, h, GPTQConfig(group_size=g, clip=True))
    assert relative_output_error(w, signed.weight, h) < relative_output_error(w, clipped.weight, h)
    assert torch.equal(signed.weight, (signed.codes.float() - 8) * signed.scales.repeat_interleave(
        w.shape[1] if g == -1 else g, 1))
