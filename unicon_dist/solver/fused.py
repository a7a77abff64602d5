"""Both passes of a batch in one, for one-to-one CLIP: fused attention kernels or a stored tile.

For a batch with one positive per row under ψ = exp, held whole by one owner and loaded as
one panel, two computations give the batch's part of −2n·C and its statistics at once:

* ``"attention"``: :func:`unicon_dist.math.attention.clip_attention_product`, two fused
  attention kernels that also return the row and column log-sum-exps;
* ``"one-pass"``: :func:`unicon_dist.math.one_pass.clip_one_pass_product`, the batch's tile
  of e^{s/τ} formed once and kept between the statistics and the product (direct regime
  only, and only where the L × L tile fits the tile budget).

The statistics of pass 1 follow from either; pass 2 uses the part of C kept here
(``PassContext.fused_parts``).  Everything else (groups of positives, a general ψ, batches
split over owners or panels, the first step s ≡ 0) stays on the tiled passes.

``PassOptions.fused`` chooses: ``"off"`` never, ``"attention"`` or ``"one-pass"`` wherever
that path is eligible, ``"auto"`` (default) the path this module's cost model expects to be
fastest.  The model, per entry of the batch's L × L similarity block, for a materialised C:

* tiled: GEMM work 2r (pass 1) + 2(r + min(m_x, m_y)) (pass 2);
* attention: 2·2·max(r, m_y) + 2·2·max(r, m_x) (two kernels, each forming the scores at the
  zero-padded common width of queries and values);
* one-pass: 2r + 2·min(m_x, m_y) (the scores and the exponential once).

Each count is divided by the share of the float32 GEMM rate the path reached on the
development CPU (RESULTS §1b).  So the stored tile is taken wherever it fits, and the kernels
only where it does not (large full-negative batches) and r is close to m.  Where nothing is
measured (CUDA) the shares are equal, so FLOPs decide, with the same outcome except that the
kernels are never chosen.

In "auto" a kernel result whose rounding would exceed the tiled path's by more than
:data:`~unicon_dist.math.attention.AMPLIFICATION_MAX` (positives that take nearly all of
their row's softmax) is recomputed on the tiled passes; the stored tile uses the tiled
path's own formulas and needs no such guard.  A matrix-free operator takes several thin
products per iteration, which a kept m_x × m_y part serves only after forming it at full
width, so "auto" keeps those on the tiled passes.
"""

from __future__ import annotations

import math

import torch

from ..math import attention, one_pass
from ..math import weights as W

__all__ = ["MODES", "FORCE", "eligible", "choose", "method", "fused_statistics", "fused_product"]

MODES = ("auto", "off", "attention", "one-pass")

#: overrides ``PassOptions.fused`` in this process when set (benchmarks and tests compare
#: the paths inside one run with it); not part of the public API
FORCE: str | None = None

# Measured on the 2-core AMD EPYC of RESULTS §1b (2026-12-07), float32: the share of the GEMM
# rate each path's GEMM work ran at -- the fused kernels 0.88-0.95 (full negatives, r = m =
# 128), the tiled passes 0.60-0.67 with their elementwise work, the stored tile about the same
# as the tiled pass 2.  A stored tile that leaves the cache (B = 4,096: 64 MiB) still beat the
# tiled passes there (C at r = 32, n = 200,000: 2.95 against 4.44 s, medians of
# `bench_fused.py --c-only`), so its memory traffic is not modelled.
_CPU = {"attention": 0.93, "tiled": 0.62, "one-pass": 0.62}
_UNMEASURED = {"attention": 1.0, "tiled": 1.0, "one-pass": 1.0}
_RATES = {"cpu": _CPU}

#: the largest stored tile without a memory budget (a batch of 8,192 in float32)
DEFAULT_ONE_PASS_BYTES = 256 << 20


def mode(options) -> str:
    m = FORCE if FORCE is not None else getattr(options, "fused", "auto")
    if m not in MODES:
        raise ValueError(f"fused must be one of {MODES}, got {m!r}")
    return m


def eligible(ctx, b, owner) -> bool:
    """Whether batch ``b`` can take both passes at once for this owner (either path)."""
    return (ctx.exp and b.pos.one_to_one and not ctx.options.constant and len(b.panels) == 1
            and ctx.layout.whole(b, owner))


# rows of the stored tile formed at a time on the CPU: 512-row blocks ran at 2.87 ns per entry
# against 3.09 ns for whole 1,024-row blocks at r = 32, m = 128, B = 1,024 (the plan's block
# there), and alike at r = 128 (`bench_fused.py --one-pass-blocks`); other devices take the
# plan's block
_CPU_ONE_PASS_ROWS = 512


def _one_pass_block(ctx, b) -> int:
    rows = ctx.plan(b.n, ctx.rank + min(ctx.shape), b.pos).block_rows
    if ctx.device.type == "cpu":
        rows = min(rows, _CPU_ONE_PASS_ROWS)
    return max(1, min(b.n, rows))


def _one_pass_fits(ctx, b, U: float) -> bool:
    budget = ctx.options.memory_budget or DEFAULT_ONE_PASS_BYTES
    itemsize = torch.finfo(ctx.dtype).bits // 8
    return ctx.direct(U) and one_pass.one_pass_bytes(b.n, _one_pass_block(ctx, b), itemsize) <= budget


def choose(device_type: str, rank: int, shape: tuple[int, int], available) -> str:
    """The cost model of the module docstring: the fastest of "tiled" and the ``available``
    fused paths for embeddings of width ``rank`` and features of widths ``shape``."""
    rates = _RATES.get(device_type, _UNMEASURED)
    mx, my = shape
    costs = {"tiled": (2 * rank + 2 * (rank + min(mx, my))) / rates["tiled"]}
    if "attention" in available:
        costs["attention"] = (4 * max(rank, my) + 4 * max(rank, mx)) / rates["attention"]
    if "one-pass" in available:
        costs["one-pass"] = (2 * rank + 2 * min(mx, my)) / rates["one-pass"]
    return min(costs, key=lambda k: (costs[k], k != "tiled"))  # ties go to the tiled passes


def method(ctx, b, U: float) -> str | None:
    """The path of an :func:`eligible` batch ``b`` whose |s/τ| is at most ``U``: "attention",
    "one-pass" or None (tiled)."""
    m = mode(ctx.options)
    available = []
    if attention.kernel_available(ctx.device, ctx.dtype):
        available.append("attention")
    if _one_pass_fits(ctx, b, U):
        available.append("one-pass")
    if m != "auto":
        return m if m in available else None
    if getattr(ctx.options, "matrix_free", False):
        return None
    best = choose(ctx.device.type, ctx.rank, ctx.shape, available)
    return None if best == "tiled" else best


def fused_statistics(ctx, b, owner) -> tuple[dict, torch.Tensor | None] | None:
    """(statistics, Φ_Xᵀ(−2n·S)Φ_Y) of batch ``b``, or None where the batch takes the tiled passes.

    The product is None for a matrix-free operator forced onto the attention kernels: its
    products then call them with values Φ_Y Ω and Φ_X Ω (:func:`fused_product`).  The
    statistics are those the tiled pass 1 returns (:func:`unicon_dist.math.weights.finish_exp`),
    so single tiles (the verifier) can still be formed from them.
    """
    if mode(ctx.options) == "off" or not eligible(ctx, b, owner):
        return None
    P = ctx.source.load(b, 0)
    U = float(P.zx.norm(dim=1).max()) * float(P.zy.norm(dim=1).max())  # |s/τ| ≤ U (Cauchy–Schwarz)
    how = method(ctx, b, U)
    if how is None:
        return None
    lf = ctx.loss_fn
    if how == "one-pass":
        block = _one_pass_block(ctx, b)
        out = one_pass.clip_one_pass_product(P.zx, P.zy, P.phi_x, P.phi_y, lf.nu, math.log(lf.epsilon), block,
                                             ctx.scratch("one-pass E", b.n, b.n), ctx.scratch("g", block, b.n))
        st = W.finish_exp(b.pos.size, True, out["lneg_row"], out["lneg_col"], -out["ld_row"], -out["ld_col"],
                          out["loss_sum"], temperature=lf.temperature, dtype=ctx.dtype, constant=False)
        st["fused"] = how
        return st, out["product"]
    per_product = bool(getattr(ctx.options, "matrix_free", False))
    # a matrix-free operator takes its products later, each through the kernels with values
    # Φ_Y Ω and Φ_X Ω (products.product); here only the log-sum-exps are needed
    A, B = (P.zy[:, :1], P.zx[:, :1]) if per_product else (P.phi_x, P.phi_y)
    out = attention.clip_attention_product(P.zx[None], P.zy[None], A[None], B[None], lf.nu)
    lse_row, lse_col, t = out["lse_row"][0], out["lse_col"][0], out["t_diag"][0]
    if mode(ctx.options) == "auto":
        amp = attention.diagonal_amplification(lse_row, lse_col, t, lf.nu)
        if amp > attention.AMPLIFICATION_MAX:
            return None
    # log N_i = log(Z_i − e^{t_ii}) for the statistics' summary and single tiles
    lneg_row = lse_row + torch.log1p(-torch.exp(t - lse_row).clamp(max=1.0))
    lneg_col = lse_col + torch.log1p(-torch.exp(t - lse_col).clamp(max=1.0))
    loss_sum = (2.0 * (math.log(lf.epsilon) - lf.nu * t) + lse_row + lse_col).sum()
    st = W.finish_exp(b.pos.size, ctx.direct(U), lneg_row, lneg_col, -lse_row, -lse_col, loss_sum,
                      temperature=lf.temperature, dtype=ctx.dtype, constant=False)
    st["fused"] = how
    return st, None if per_product else out["product"]


def fused_product(ctx, b, P, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Aᵀ(−2n·S)B of batch ``b`` (one panel ``P``) through the kernels, for operands
    A = Φ_X Ω_x, B = Φ_Y Ω_y of a matrix-free product."""
    return attention.clip_attention_product(P.zx[None], P.zy[None], A[None], B[None], ctx.loss_fn.nu)["product"]
