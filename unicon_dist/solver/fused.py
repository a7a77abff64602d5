"""Both passes of a batch in one: fused attention kernels for one-to-one CLIP.

For a batch with one positive per row under ψ = exp, held whole by one owner and loaded as
one panel, :func:`unicon_dist.math.attention.clip_attention_product` gives the batch's
part of −2n·C and its row and column log-sum-exps in one call of two fused kernels; the
statistics of pass 1 follow from those log-sum-exps, and pass 2 uses the part kept here.
Everything else (groups of positives, a general ψ, batches split over owners or panels,
the first step s ≡ 0, dtypes or devices without a kernel) stays on the tiled passes.

Whether the fused kernels are used (``PassOptions.fused``):

* ``"off"``: never;
* ``"attention"``: wherever eligible;
* ``"auto"`` (default): where eligible and the cost model below says faster, and the
  kernel's rounding is within :data:`~unicon_dist.math.attention.AMPLIFICATION_MAX` of
  the tiled path's (else the batch is recomputed on the tiled path).

The cost model counts the GEMM work of each path per entry of the batch's L × L
similarity block, for a materialised C (``PassOptions.matrix_free`` False):
tiled 2r (pass 1) + 2(r + min(m_x, m_y)) (pass 2), fused 2·2·max(r, m_y) + 2·2·max(r, m_x)
(two kernels, queries and values zero-padded to one width), each divided by the share of the
float32 GEMM rate the path reached in ``benchmarks/bench_cross_product.py`` (RESULTS §1).
A matrix-free operator takes several thin products per iteration, which the kernels can
only serve at twice the tiled FLOPs, so "auto" keeps those on the tiled path.
"""

from __future__ import annotations

import math

import torch

from ..math import attention
from ..math import weights as W

__all__ = ["MODES", "FORCE", "eligible", "prefer_fused", "use_fused", "fused_statistics", "fused_product"]

MODES = ("auto", "off", "attention")

#: overrides ``PassOptions.fused`` in this process when set (benchmarks and tests compare
#: the paths inside one run with it); not part of the public API
FORCE: str | None = None

# share of the float32 GEMM rate each path reached (RESULTS §1, 2-core AMD EPYC, 2026-12-07):
# the fused kernels 0.93 at n = 20,000 and at B = 4,096; the tiled passes 0.60-0.65.  On CUDA
# nothing is measured yet, so both get the same share and FLOPs alone decide (the fused
# kernels never do fewer, so "auto" stays tiled there until bench_device measures them).
_EFFICIENCY = {"cpu": {"fused": 0.93, "tiled": 0.62}}
_UNMEASURED = {"fused": 1.0, "tiled": 1.0}


def mode(options) -> str:
    return FORCE if FORCE is not None else getattr(options, "fused", "auto")


def eligible(ctx, b, owner) -> bool:
    """Whether batch ``b`` can go through the fused kernels for this owner."""
    return (ctx.exp and b.pos.one_to_one and not ctx.options.constant and len(b.panels) == 1
            and ctx.layout.whole(b, owner) and attention.kernel_available(ctx.device, ctx.dtype))


def prefer_fused(device_type: str, rank: int, shape: tuple[int, int], matrix_free: bool) -> bool:
    """The cost model of the module docstring: whether the fused kernels should be faster."""
    if matrix_free:
        return False
    eff = _EFFICIENCY.get(device_type, _UNMEASURED)
    mx, my = shape
    tiled = (2 * rank + 2 * (rank + min(mx, my))) / eff["tiled"]
    fused = (4 * max(rank, my) + 4 * max(rank, mx)) / eff["fused"]
    return fused < tiled


def use_fused(ctx, b, owner) -> bool:
    m = mode(ctx.options)
    if m == "off" or not eligible(ctx, b, owner):
        return False
    if m == "attention":
        return True
    return prefer_fused(ctx.device.type, ctx.rank, ctx.shape, bool(getattr(ctx.options, "matrix_free", False)))


def fused_statistics(ctx, b, P) -> tuple[dict, torch.Tensor | None] | None:
    """(statistics, Φ_Xᵀ(P + P̄ − 2νI)Φ_Y) of batch ``b`` (one panel ``P``; the product is
    None for a matrix-free operator, whose products call the kernels), or None when the
    kernel's rounding would exceed the tiled path's by more than the allowed factor (mode
    "auto"; the caller then takes the tiled passes).

    The statistics are those the tiled pass 1 returns (:func:`unicon_dist.math.weights.finish_exp`),
    so single tiles (the verifier) and products with Ω can still be formed from them.
    """
    lf = ctx.loss_fn
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
    U = float(P.zx.norm(dim=1).max()) * float(P.zy.norm(dim=1).max())
    st = W.finish_exp(b.pos.size, ctx.direct(U), lneg_row, lneg_col, -lse_row, -lse_col, loss_sum,
                      temperature=lf.temperature, dtype=ctx.dtype, constant=False)
    st["fused"] = "attention"
    return st, None if per_product else out["product"]


def fused_product(ctx, b, P, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Aᵀ(P + P̄ − 2νI)B of batch ``b`` (one panel ``P``) through the kernels, for operands
    A = Φ_X Ω_x, B = Φ_Y Ω_y of a matrix-free product."""
    return attention.clip_attention_product(P.zx[None], P.zy[None], A[None], B[None], ctx.loss_fn.nu)["product"]
