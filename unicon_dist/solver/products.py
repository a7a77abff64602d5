"""Pass 2: products with S(γ) from pass 1's statistics, tile by tile (:mod:`.passes`).

:func:`product` recomputes each tile, turns it into a tile of −2n·S and accumulates
(Φ_X Ω_x)ᵀ S (Φ_Y Ω_y) in float64; batches whose two passes pass 1 took at once
(:mod:`.fused`) contribute the part of C their owner kept.  :func:`merge_products` sums the
owners' parts in owner order; :func:`tile_keys` and :func:`tile_product` give single tiles
(the verifier, :mod:`.verify`).
"""

from __future__ import annotations

import torch

from ..math import weights as W
from . import fused
from .layout import Batch
from .panels import Panel
from .passes import PassContext, _positive_tiles

__all__ = ["exp_weight_tile", "general_weight_tile", "product", "merge_products", "tile_keys", "tile_product"]


def exp_weight_tile(ctx: PassContext, st: dict, b: Batch, P: Panel, Q: Panel, i0, i1, j0, j1) -> torch.Tensor:
    """A tile of −2n·S for ψ = exp; rows i0:i1 from panel P, columns j0:j1 from Q."""
    out_e = out_g = None
    if st["direct"]:
        out_e, out_g = ctx.scratch("e", i1 - i0, j1 - j0), ctx.scratch("g", i1 - i0, j1 - j0)
    return W.exp_tile(P.zx[P.local(i0, i1)], Q.zy[Q.local(j0, j1)], st, b.pos, i0, i1, j0, j1, ctx.loss_fn.nu,
                      out_e, out_g)


def general_weight_tile(ctx: PassContext, st: dict, b: Batch, P: Panel, Q: Panel, i0, i1, j0, j1) -> torch.Tensor:
    """A tile of −2n·S = 2n·∂L/∂s for a general ψ."""
    s = P.zx[P.local(i0, i1)] @ Q.zy[Q.local(j0, j1)].T
    return W.general_tile(s, st, b.pos, i0, i1, j0, j1, ctx.loss_fn)


def product(ctx: PassContext, stats: list[dict], owner, tile, omega_x=None, omega_y=None) -> torch.Tensor:
    """An owner's part of (Φ_X Ω_x)ᵀ S (Φ_Y Ω_y), float64 (Ω = None: the identity).

    ``tile(b, P, Q, i0, i1, j0, j1)`` is a tile of −2n·S (:func:`exp_weight_tile` or
    :func:`general_weight_tile` at ``stats``).  Each tile G is multiplied by the narrower
    operand: by B_J into row-panel accumulators when b ≤ a, else by A_I (as Gᵀ A_I) into
    column-panel accumulators, so a product with a thin side (C·Ω, Cᵀ·Ω) costs
    O(n² min(a, b)).  Block products are formed in tile precision and summed into C in
    float64, once per outer block.
    """
    a = ctx.shape[0] if omega_x is None else omega_x.shape[1]
    w = ctx.shape[1] if omega_y is None else omega_y.shape[1]
    C = torch.zeros((a, w), dtype=torch.float64, device=ctx.device)
    by_rows = w <= a
    load = ctx.source.load
    left = lambda P: P.phi_x if omega_x is None else P.phi_x @ omega_x  # noqa: E731
    right = lambda P: P.phi_y if omega_y is None else P.phi_y @ omega_y  # noqa: E731
    for b in ctx.layout.batches:
        owned = ctx.layout.owned(b, owner)
        if not owned:
            continue
        plan = ctx.plan(b.n, ctx.rank + min(a, w), b.pos)
        br, bc = plan.block_rows, plan.block_cols
        if "constant" in stats[b.key]:
            C -= _cross_constant(ctx, stats[b.key], b, owned, left, right, plan, tile)
            continue
        if b.key in ctx.fused_parts:  # Φ_Xᵀ(−2n·S)Φ_Y of this batch, from pass 1's kernels
            K = ctx.fused_parts[b.key]
            if K is None:  # a matrix-free operator: the kernels with values Φ_Y Ω_y and Φ_X Ω_x
                P = load(b, 0)
                K = fused.fused_product(ctx, b, P, left(P), right(P))
            else:
                if omega_x is not None:
                    K = omega_x.double().T @ K
                if omega_y is not None:
                    K = K @ omega_y.double()
            C -= K
            ctx.report("product", 1, 1)
            continue
        # outer panels O carry the accumulator R_O; inner panels stream past them
        outer_block, inner_block = (br, bc) if by_rows else (bc, br)
        total = sum(-(-(b.panels[k][1] - b.panels[k][0]) // outer_block) for k in owned) * len(b.panels)
        done = 0
        for ko in owned:
            O = keep = R = I = other = None
            O = load(b, ko)
            keep = left(O) if by_rows else right(O)
            R = torch.zeros((O.p1 - O.p0, w if by_rows else a), dtype=ctx.dtype, device=ctx.device)
            for ki in range(len(b.panels)):
                I = other = None  # let the previous inner panel go before the next one loads
                I = O if ki == ko else load(b, ki)
                other = right(I) if by_rows else left(I)
                for o0 in range(O.p0, O.p1, outer_block):
                    o1 = min(o0 + outer_block, O.p1)
                    acc = R[O.local(o0, o1)]
                    for i0 in range(I.p0, I.p1, inner_block):
                        i1 = min(i0 + inner_block, I.p1)
                        if by_rows:
                            acc.addmm_(tile(b, O, I, o0, o1, i0, i1), other[I.local(i0, i1)])
                        else:
                            acc.addmm_(tile(b, I, O, i0, i1, o0, o1).T, other[I.local(i0, i1)])
                    done += 1
                    ctx.report("product", done, total)
            for o0 in range(O.p0, O.p1, outer_block):
                lo = O.local(o0, min(o0 + outer_block, O.p1))
                C -= (keep[lo].T @ R[lo]).double() if by_rows else (R[lo].T @ keep[lo]).double()
    return C / (2 * ctx.n)


def _cross_constant(ctx: PassContext, st: dict, b: Batch, owned, left, right, plan, tile) -> torch.Tensor:
    """Aᵀ(−2n·S)B in float64 when s ≡ 0 (the first step of the fixed point).

    Every negative then has the weight α_i + β_j, so off the positives −2n·S is the
    rank-two matrix α1ᵀ + 1βᵀ; the positives, a block diagonal in group order, are
    corrected tile by tile.  O(n(a + b) + Σ|P(i)|·block) instead of O(n²).
    """
    alpha, beta = st["constant"]
    sums = corrections = None
    for k in owned:
        P = ctx.source.load(b, k)
        A, B = left(P), right(P)
        part = (*W.weighted_column_sums(A, alpha[P.p0:P.p1], plan.block_rows),
                *W.weighted_column_sums(B, beta[P.p0:P.p1], plan.block_rows))
        sums = part if sums is None else tuple(s + q for s, q in zip(sums, part))
        for _, i0, i1, j0, j1, m, _ in _positive_tiles(b, P, plan):
            corr = tile(b, P, P, i0, i1, j0, j1).double() - alpha[i0:i1, None] - beta[None, j0:j1]
            corr = corr.masked_fill_(~m, 0.0).to(ctx.dtype)
            Ai, Bj = A[P.local(i0, i1)], B[P.local(j0, j1)]
            if b.pos.one_to_one:  # a diagonal tile: scale rows instead of multiplying by it
                c = ((Ai * corr.diagonal()[:, None]).T @ Bj).double()
            else:
                c = (Ai.T @ (corr @ Bj)).double()
            corrections = c if corrections is None else corrections.add_(c)
    if len(owned) < len(b.panels):
        # a share of the rows: the rank-two term couples them with every column, so
        # the column sums are taken over all panels (one extra read, first step only)
        col = None
        for k in range(len(b.panels)):
            P = ctx.source.load(b, k)
            part = W.weighted_column_sums(right(P), beta[P.p0:P.p1], plan.block_rows)
            col = part if col is None else tuple(s + q for s, q in zip(col, part))
        sums = (*sums[:2], *col)
    a_alpha, a_one, b_beta, b_one = sums
    out = torch.outer(a_alpha, b_one) + torch.outer(a_one, b_beta)
    if corrections is not None:
        out += corrections
    ctx.report("product", 1, 1)
    return out


def merge_products(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum of the owners' parts of C, in owner order (the same C whatever finishes first)."""
    C = parts[0].clone()
    for p in parts[1:]:
        C += p
    return C


def tile_keys(ctx: PassContext, stats: list[dict], owner) -> list[tuple]:
    """Every tile of a :func:`product` pass (Ω = None) over the owner's panels, as
    (batch, row panel, column panel, i0, i1, j0, j1) with positions inside the batch.

    Tiles of a constant batch (s ≡ 0, the first step) are not listed: that pass never
    forms them (it is closed form).
    """
    keys = []
    width = ctx.rank + min(ctx.shape)
    for b in ctx.layout.batches:
        if "constant" in stats[b.key]:
            continue
        plan = ctx.plan(b.n, width, b.pos)
        br, bc = plan.block_rows, plan.block_cols
        for kp in ctx.layout.owned(b, owner):
            p0, p1 = b.panels[kp]
            for kq, (q0, q1) in enumerate(b.panels):
                for i0 in range(p0, p1, br):
                    for j0 in range(q0, q1, bc):
                        keys.append((b.key, kp, kq, i0, min(i0 + br, p1), j0, min(j0 + bc, q1)))
    return keys


def tile_product(ctx: PassContext, tile, key) -> torch.Tensor:
    """One tile's part of C, Φ_X[I]ᵀ S[I, J] Φ_Y[J] (float64, formed in the tile dtype),
    for a ``key`` of :func:`tile_keys`; the parts of all keys sum to the product."""
    bk, kp, kq, i0, i1, j0, j1 = key
    b = ctx.layout.batches[bk]
    P = ctx.source.load(b, kp)
    Q = P if kq == kp else ctx.source.load(b, kq)
    G = tile(b, P, Q, i0, i1, j0, j1)
    part = P.phi_x[P.local(i0, i1)].T @ (G @ Q.phi_y[Q.local(j0, j1)])
    return -part.double() / (2 * ctx.n)
