"""Both passes at once for one-to-one CLIP: the fused attention kernels (math/attention.py),
the stored tile (math/one_pass.py) and the choice between them (solver/fused.py).

References: autograd of the dense loss (S = −∂L/∂s) and numpy products for the formulas;
the tiled passes for the solver path.  Between the fused and the tiled path in float32 the
tolerance is a rounding bound, not a fitted number: both form C from float32 GEMMs whose
partial sums run over at most 4,096 terms before they are accumulated in float64, so each
entry carries at most about u·√4096 = 64u of relative error against max|C| (u = 2^-24),
times the diagonal amplification the fused path accepts (about 1 here, checked).  In float64
the same bound is 64·2^-53 ≈ 7e-15.
"""

import math

import numpy as np
import pytest
import torch

import unicon_dist as ud
from unicon_dist.math import attention, one_pass
from unicon_dist.math.dense import contrastive_loss
from unicon_dist.solver import fused
from unicon_dist.solver.operator import CrossProductOperator

pytestmark = pytest.mark.skipif(not attention.kernel_available("cpu", torch.float32),
                                reason="torch has no fused attention kernel with log-sum-exp here")


def _bound(dtype):
    return 64 * torch.finfo(dtype).eps / 2


def _data(n, r, a, b, dtype, seed=0, coupled=0.0):
    g = torch.Generator().manual_seed(seed)
    zx = torch.nn.functional.normalize(torch.randn(n, r, generator=g, dtype=torch.float64), dim=1)
    zy = torch.nn.functional.normalize(coupled * zx + torch.randn(n, r, generator=g, dtype=torch.float64), dim=1)
    A = torch.randn(n, a, generator=g, dtype=torch.float64)
    B = torch.randn(n, b, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (zx, zy, A, B)]


def _autograd_S(zx, zy, tau, nu):
    s = (zx @ zy.T).clone().requires_grad_(True)
    loss = contrastive_loss(s, "clip", temperature=tau, nu=nu)
    (grad,) = torch.autograd.grad(loss, s)
    return -grad, float(loss.detach())


@pytest.mark.parametrize("nu", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("h", [1, 3])
def test_attention_product_matches_autograd(nu, h):
    """−2n·AᵀSB and the loss from the kernels' log-sum-exps, per batch, against autograd."""
    L, r, a, b, tau = 70, 5, 9, 3, 0.2
    zx, zy, A, B = _data(h * L, r, a, b, torch.float64, seed=h)
    out = attention.clip_attention_product((zx / tau).view(h, L, r), zy.view(h, L, r), A.view(h, L, a),
                                           B.view(h, L, b), nu)
    n = h * L
    want = torch.zeros((a, b), dtype=torch.float64)
    loss_sum = 0.0
    for k in range(h):
        sl = slice(k * L, (k + 1) * L)
        S, loss = _autograd_S(zx[sl], zy[sl], tau, nu)
        # autograd's S is of the batch's own loss (1/(2L)); −2n·S at the global n is −2L·S_batch
        want += A[sl].T @ (-2 * L * S) @ B[sl]
        loss_sum += loss * 2 * L
    assert torch.allclose(out["product"], want, rtol=0, atol=_bound(torch.float64) * float(want.abs().max()))
    got_loss = float((2.0 * (-nu * out["t_diag"]) + out["lse_row"] + out["lse_col"]).sum()) * tau
    assert got_loss == pytest.approx(loss_sum, rel=1e-13)
    assert out["lse_row"].shape == (h, L)


def test_kernel_probe_and_padding():
    """The probe accepts the CPU kernels; widths above and below r are padded correctly."""
    assert attention.kernel_available("cpu", torch.float64)
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 40, 3, generator=g, dtype=torch.float64) for _ in range(2))
    for w in (1, 3, 11):
        v = torch.randn(2, 40, w, generator=g, dtype=torch.float64)
        out, lse = attention.attention_lse(q, k, v)
        s = q @ k.transpose(-1, -2)
        assert torch.allclose(out, torch.softmax(s, -1) @ v, atol=1e-13)
        assert torch.allclose(lse.double(), torch.logsumexp(s, -1), atol=1e-13)


@pytest.mark.parametrize("how", ["attention", "one-pass"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("negatives", ["full", 500])
@pytest.mark.parametrize("nu", [1.0, 0.5])
def test_operator_fused_equals_tiled(how, dtype, negatives, nu):
    """C, C·Ω, Cᵀ·Ω, the loss and the statistics' summary agree with the tiled passes."""
    zx, zy, A, B = _data(1500, 6, 10, 7, dtype, coupled=1.0)
    ops = {f: CrossProductOperator(A, B, zx, zy, temperature=0.1, nu=nu, negatives=negatives, fused=f)
           for f in ("off", how)}
    tiled, fast = ops["off"], ops[how]
    assert all(fast._stats[k].get("fused") == how for k in range(len(fast.batches)))
    assert not any("fused" in st for st in tiled._stats)
    tol = _bound(dtype)
    C0, C1 = tiled.materialize(), fast.materialize()
    assert (C1 - C0).abs().max() <= tol * C0.abs().max()
    # a product's rounding is relative to the terms it sums, |C|·|Ω|, not to the (possibly
    # cancelling) result
    g = torch.Generator().manual_seed(1)
    om = torch.randn(7, 3, generator=g, dtype=dtype)
    P0, P1 = tiled.matmul(om), fast.matmul(om)
    assert (P1 - P0).abs().max() <= tol * (C0.abs() @ om.abs().double()).max()
    om = torch.randn(10, 2, generator=g, dtype=dtype)
    P0, P1 = tiled.rmatmul(om), fast.rmatmul(om)
    assert (P1 - P0).abs().max() <= tol * (C0.abs().T @ om.abs().double()).max()
    assert fast.loss == pytest.approx(tiled.loss, rel=tol, abs=0)
    for key in ("lse_min", "lse_max"):
        assert fast.statistics[key] == pytest.approx(tiled.statistics[key], rel=tol)
    # the statistics are complete: a single tile from them is the tiled path's tile
    key = tiled.tile_keys()[0]
    assert torch.allclose(fast.tile_product(key), tiled.tile_product(key), rtol=tol, atol=tol * float(C0.abs().max()))


def test_one_pass_wide_left_operand():
    """The stored-tile product multiplies by the narrower operand on either side."""
    zx, zy, A, B = _data(700, 5, 3, 11, torch.float64)
    for left, right in ((A, B), (B, A)):
        ref = CrossProductOperator(left, right, zx, zy, temperature=0.1, fused="off").materialize()
        got = CrossProductOperator(left, right, zx, zy, temperature=0.1, fused="one-pass")
        assert got._stats[0]["fused"] == "one-pass"
        assert torch.allclose(got.materialize(), ref, rtol=0, atol=_bound(torch.float64) * float(ref.abs().max()))


def test_auto_chooses_both_ways(monkeypatch):
    """The cost model: each path where its GEMM work at its measured rate is the least;
    RESULTS §1b has the timings."""
    both = ["attention", "one-pass"]
    for r, m in ((32, 128), (128, 128), (128, 512)):
        assert fused.choose("cpu", r, (m, m), both) == "one-pass"  # the scores and exp once: fewer FLOPs
    assert fused.choose("cpu", 128, (128, 128), ["attention"]) == "attention"
    assert fused.choose("cpu", 32, (128, 128), ["attention"]) == "tiled"
    assert fused.choose("cpu", 128, (512, 512), ["attention"]) == "tiled"
    assert fused.choose("cpu", 128, (128, 128), []) == "tiled"
    # unmeasured devices: FLOPs alone, so the stored tile where it fits and never the kernels
    assert fused.choose("cuda", 128, (128, 128), ["attention"]) == "tiled"
    assert fused.choose("cuda", 32, (512, 512), both) == "one-pass"
    zx, zy, A, B = _data(600, 16, 16, 16, torch.float32)
    assert CrossProductOperator(A, B, zx, zy, temperature=0.1)._stats[0].get("fused") == "one-pass"
    monkeypatch.setattr(fused, "DEFAULT_ONE_PASS_BYTES", 0)  # no stored tile fits
    assert CrossProductOperator(A, B, zx, zy, temperature=0.1)._stats[0].get("fused") == "attention"
    narrow = CrossProductOperator(A, B, zx[:, :4].contiguous(), zy[:, :4].contiguous(), temperature=0.1)
    assert "fused" not in narrow._stats[0]
    free = CrossProductOperator(A, B, zx, zy, temperature=0.1, matrix_free=True)
    assert "fused" not in free._stats[0]
    # a stored tile needs the direct regime (|s/τ| ≤ 40 in float32)
    monkeypatch.setattr(fused, "DEFAULT_ONE_PASS_BYTES", 1 << 30)
    cold = CrossProductOperator(A, B, zx, zy, temperature=0.02, fused="one-pass")
    assert "fused" not in cold._stats[0]
    with pytest.raises(ValueError, match="fused"):
        CrossProductOperator(A, B, zx, zy, fused="sometimes")


def test_ineligible_batches_stay_tiled():
    """Groups of positives, a general ψ, s ≡ 0 and batches split over panels are not fused."""
    zx, zy, A, B = _data(400, 4, 5, 5, torch.float64)
    groups = np.arange(400) // 2
    cases = [dict(groups=groups), dict(loss="sigmoid"), dict(panel_rows=150)]
    for how in ("attention", "one-pass"):
        for kw in cases:
            op = CrossProductOperator(A, B, zx, zy, temperature=0.1, fused=how, **kw)
            assert not any("fused" in st for st in op._stats), kw
        zero = CrossProductOperator(A, B, 0 * zx, 0 * zy, fused=how)
        assert not any("fused" in st for st in zero._stats)


def test_dominant_positives_fall_back():
    """Where P_ii → 1 the kernel's rounding would exceed the tiled path's: "auto" recomputes
    the batch on the tiled passes, and the forced kernel shows why (it is less accurate)."""
    zx, zy, A, B = _data(800, 16, 16, 16, torch.float64, coupled=50.0)
    tau = 0.02
    stats = CrossProductOperator(A, B, zx, zy, temperature=tau, fused="off")._stats[0]
    t = (zx * zy).sum(1) / tau
    p = torch.exp(t - torch.logaddexp(stats["lneg_row"], t))
    assert float(p.mean()) > 0.99  # the regime the guard is for
    amp = attention.diagonal_amplification(torch.logaddexp(stats["lneg_row"], t), torch.logaddexp(stats["lneg_col"], t),
                                           t, 1.0)
    assert amp > attention.AMPLIFICATION_MAX
    auto = CrossProductOperator(A.float(), B.float(), zx.float(), zy.float(), temperature=tau)
    assert "fused" not in auto._stats[0]
    forced = CrossProductOperator(A.float(), B.float(), zx.float(), zy.float(), temperature=tau, fused="attention")
    assert forced._stats[0]["fused"] == "attention"
    exact = CrossProductOperator(A, B, zx, zy, temperature=tau, fused="off").materialize()
    err = lambda C: float((C - exact).abs().max() / exact.abs().max())  # noqa: E731
    assert err(auto.materialize()) < err(forced.materialize())


def test_split_owners_merge_to_one_owner():
    """Owners of whole batches keep their fused parts; their products sum to one owner's."""
    zx, zy, A, B = _data(1200, 16, 16, 16, torch.float32)
    tensors = (A, B, zx, zy)
    loader = lambda rows: tuple(t[rows] if isinstance(rows, slice) else t[torch.as_tensor(rows)] for t in tensors)  # noqa: E731
    kw = dict(temperature=0.1, negatives=300, fused="attention")
    whole = CrossProductOperator.from_loader(loader, 1200, (16, 16), 16, **kw)
    keys = whole.panel_keys
    parts, stats = [], []
    for share in (keys[:2], keys[2:]):
        op = CrossProductOperator.from_loader(loader, 1200, (16, 16), 16, owned=share, compute_stats=False, **kw)
        got = op.run_round("negatives", {})["done"]
        stats.append(got)
        parts.append(op)
    merged = {**stats[0], **stats[1]}
    for op in parts:
        op.set_stats([merged[k] for k in range(len(keys))])
    C = sum(op.materialize() for op in parts)
    assert torch.allclose(C, whole.materialize(), rtol=0, atol=1e-12 * float(C.abs().max()))
    assert all(st.get("fused") == "attention" for st in merged.values())


@pytest.mark.parametrize("how", ["attention", "one-pass"])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("negatives", ["full", 400])
def test_fit_same_with_and_without_kernels(how, similarity, negatives, monkeypatch):
    """A linear fit (r = m, where "auto" picks the kernels) equals the tiled fit to float32
    round-off amplified by the iteration (a few steps: 1e-4 of max|W|)."""
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((1200, 8))
    X = latent @ rng.standard_normal((8, 8)) + 0.3 * rng.standard_normal((1200, 8))
    Y = np.tanh(latent @ rng.standard_normal((8, 8))) + 0.3 * rng.standard_normal((1200, 8))
    kw = dict(rank=8, similarity=similarity, negatives=negatives, max_iter=4, tol=0.0, loss_tol=0.0, seed=0)
    fits, calls = {}, []
    module = attention if how == "attention" else one_pass
    name = "clip_attention_product" if how == "attention" else "clip_one_pass_product"
    kernel = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or kernel(*a, **k))
    for mode in ("off", how):
        monkeypatch.setattr(fused, "FORCE", mode)
        fits[mode] = ud.UniCon(**kw).fit(X, Y)
        assert bool(calls) == (mode == how)
    W0, W1 = (torch.as_tensor(f.W_) for f in (fits["off"], fits[how]))
    assert float((W1 - W0).abs().max()) <= 1e-4 * float(W0.abs().max())
    assert fits[how].loss_ == pytest.approx(fits["off"].loss_, rel=1e-5)
    assert math.isfinite(fits[how].loss_)


def test_matrix_free_products_through_the_kernels(monkeypatch):
    """A matrix-free operator forced onto the kernels keeps no C: each C·Ω and Cᵀ·Ω calls
    them with values Φ_Y Ω (Φ_X Ω); the products equal the tiled ones to float32 round-off."""
    zx, zy, A, B = _data(1200, 6, 10, 7, torch.float32, coupled=1.0)
    kw = dict(temperature=0.1, negatives=400, matrix_free=True)
    tiled = CrossProductOperator(A, B, zx, zy, fused="off", **kw)
    fast = CrossProductOperator(A, B, zx, zy, fused="attention", **kw)
    assert all(v is None for v in fast._ctx.fused_parts.values()) and len(fast._ctx.fused_parts) == 3
    calls = []
    kernel = attention.clip_attention_product
    monkeypatch.setattr(attention, "clip_attention_product", lambda *a, **k: calls.append(a[2].shape) or kernel(*a, **k))
    tol = _bound(torch.float32)
    C0 = CrossProductOperator(A.double(), B.double(), zx.double(), zy.double(), fused="off", **kw).materialize()
    g = torch.Generator().manual_seed(2)
    om = torch.randn(7, 3, generator=g)
    P0, P1 = tiled.matmul(om), fast.matmul(om)
    # relative to the terms summed, |C|·|Ω| (see test_operator_fused_equals_tiled)
    assert (P1 - P0).abs().max() <= tol * (C0.abs() @ om.abs().double()).max()
    assert calls and all(shape[-1] == 10 for shape in calls)  # A = Φ_X, B = Φ_Y Ω
    om = torch.randn(10, 2, generator=g)
    P0, P1 = tiled.rmatmul(om), fast.rmatmul(om)
    assert (P1 - P0).abs().max() <= tol * (C0.abs().T @ om.abs().double()).max()
    assert fast.loss == pytest.approx(tiled.loss, rel=tol)


def test_feature_rows_gather_once_per_order(monkeypatch):
    """An in-memory fit's loader gathers its feature rows once per row order and then only
    embeds: the same tensors as embedding the gathered rows directly."""
    from unicon_dist.data.rows import FeatureRows, embed

    g = torch.Generator().manual_seed(3)
    px, py = torch.randn(50, 6, generator=g), torch.randn(50, 4, generator=g)
    F1, F2 = torch.randn(3, 6, generator=g), torch.randn(3, 4, generator=g)
    rows = FeatureRows(px, py, "cosine")
    order = np.random.default_rng(0).permutation(50)
    gathers = []
    real = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda t, *a: gathers.append(1) or real(t, *a))
    for _ in range(3):
        got = rows.at(F1, F2)(order)
    assert len(gathers) == 2  # Φ_X and Φ_Y, once
    want = embed(px[torch.as_tensor(order)], py[torch.as_tensor(order)], F1, F2, "cosine")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    rows.at(F1, F2)(order[::-1].copy())  # another order gathers again
    assert len(gathers) == 4
    sliced = rows.at(None, None)(slice(5, 9))
    assert sliced[0].shape == (4, 6) and not sliced[2].any()
