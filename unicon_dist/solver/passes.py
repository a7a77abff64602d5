"""The two passes over the tiles of s = z_x z_yᵀ, as functions returning partial results.

Every function takes a :class:`PassContext` (the layout, the panel source, the loss, the
tile plan) and an *owner*: the set of (batch, panel) keys visited as outer panels (None:
all of them).  What an owner returns is a partial result; the merge functions combine
the partials of all owners in a fixed (owner) order, so the result does not depend on
which owner finishes first.  :class:`~unicon_dist.solver.operator.CrossProductOperator`
is one owner of everything; :mod:`unicon_dist.execution.ray` runs one owner per worker.

* **Pass 1** (the per-anchor statistics of :mod:`unicon_dist.math.weights`) runs as
  rounds (:data:`ROUNDS`, :func:`compute_statistics`): every owner computes partial row
  and column sums over the outer panels it owns, the driver merges them and hands the
  merged values to the next round.  A batch one owner holds entirely is finished inside
  the first round, so a local pass reads each panel as often as a plain loop would.
* **Pass 2** is in :mod:`.products`.
* A one-to-one CLIP batch one owner holds whole can take both passes at once (fused
  attention kernels or a stored tile, :mod:`.fused`): the first round then returns its
  statistics, and the owner keeps its part of C for pass 2 (``PassContext.fused_parts``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..math import weights as W
from ..math.losses import ContrastiveLoss
from . import fused
from .layout import Batch, Layout
from .options import PassOptions
from .panels import Panel, PanelSource, Scratch
from .planning import plan_tiles

__all__ = [
    "PassContext", "ROUNDS", "run_round", "compute_statistics", "merge_sums", "merge_exp_negatives",
    "merge_exp_positives", "statistics_summary", "loss_value",
]


@dataclass(frozen=True, eq=False)
class PassContext:
    """What both passes read.

    Attributes
    ----------
    layout : Layout
    source : PanelSource
    loss_fn : ContrastiveLoss
    options : PassOptions
        With ``device`` and ``dtype`` resolved.
    rank : int
        Width of the embeddings.
    shape : (m_x, m_y)
        Feature widths.
    exp : bool
        Whether ψ = exp (the factorised weights) is used.
    scratch : Scratch
    fits_direct : callable, optional
        ``fits_direct(U) -> bool``, pass 1's choice between plain sums and log space for
        |s/τ| ≤ U (default :func:`unicon_dist.math.weights.fits_direct` at ``dtype``).
    fused_parts : dict
        Batch key -> this owner's Φ_Xᵀ(−2n·S)Φ_Y (float64) for batches pass 1 took both
        passes of at once (:mod:`.fused`), or None where a matrix-free operator calls the
        attention kernels per product; filled by the first round, read by pass 2.
    """

    layout: Layout
    source: PanelSource
    loss_fn: ContrastiveLoss
    options: PassOptions
    rank: int
    shape: tuple[int, int]
    exp: bool
    scratch: Scratch
    fits_direct: Callable[[float], bool] | None = None
    fused_parts: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.layout.n

    @property
    def dtype(self) -> torch.dtype:
        return self.options.dtype

    @property
    def device(self) -> torch.device:
        return self.options.device

    def direct(self, U: float) -> bool:
        return self.fits_direct(U) if self.fits_direct is not None else W.fits_direct(U, self.dtype)

    def plan(self, n: int, width: int, pos):
        """The tile plan of a batch of n positions with ``pos`` positives, operands ``width`` wide."""
        opt = self.options
        slots = 1 if (self.exp or pos.one_to_one) else pos.max_size
        return plan_tiles(n, width, itemsize=torch.finfo(self.dtype).bits // 8, slots=slots,
                          memory_budget=opt.memory_budget, block_rows=opt.block_rows, block_cols=opt.block_cols,
                          device_type=self.device.type)

    def report(self, stage: str, done: int, total: int) -> None:
        if self.options.progress is not None:
            self.options.progress(stage, done, total)


# ------------------------------------------------------------------- tile loops
def _tiles(ctx: PassContext, b: Batch, plan, stage: str, rows):
    """(P, Q, i0, i1, j0, j1) over the tiles of batch b in the row panels ``rows``
    (indices into b.panels) against every column panel, row panel by row panel."""
    br, bc = plan.block_rows, plan.block_cols
    total = sum(-(-(b.panels[k][1] - b.panels[k][0]) // br) for k in rows) * len(b.panels)
    done = 0
    for kp in rows:
        P = Q = None
        P = ctx.source.load(b, kp)
        for kq in range(len(b.panels)):
            Q = None  # let the previous column panel go before the next one loads
            Q = P if kq == kp else ctx.source.load(b, kq)
            for i0 in range(P.p0, P.p1, br):
                i1 = min(i0 + br, P.p1)
                for j0 in range(Q.p0, Q.p1, bc):
                    yield P, Q, i0, i1, j0, min(j0 + bc, Q.p1)
                done += 1
                ctx.report(stage, done, total)


def _positive_tiles(b: Batch, P: Panel, plan):
    """(P, i0, i1, j0, j1, mask, t) over the tiles of panel P that hold positives, t the
    float64 similarities."""
    pos = b.pos
    for i0 in range(P.p0, P.p1, plan.block_rows):
        i1 = min(i0 + plan.block_rows, P.p1)
        li = P.local(i0, i1)
        if pos.one_to_one:
            # the diagonal, as an (i1 − i0)² tile with only its diagonal set; the
            # square tile keeps one code path for row and column reductions
            t = (P.zx[li].double() * P.zy[li].double()).sum(1)
            k = i1 - i0
            tt = torch.zeros((k, k), dtype=t.dtype, device=t.device)
            tt.diagonal().copy_(t)
            yield P, i0, i1, i0, i1, torch.eye(k, dtype=torch.bool, device=t.device), tt
            continue
        s0, s1 = pos.span(i0, i1)
        for j0 in range(s0, s1, plan.block_cols):
            j1 = min(j0 + plan.block_cols, s1)
            t = P.zx[li].double() @ P.zy[P.local(j0, j1)].double().T
            yield P, i0, i1, j0, j1, pos.mask(i0, i1, j0, j1), t


def _stats_plan(ctx: PassContext, b: Batch):
    return ctx.plan(b.n, ctx.rank + max(ctx.shape), b.pos)


# --------------------------------------------------------------- pass 1: ψ = exp
def _norm_maxima(ctx: PassContext, b: Batch, panels) -> tuple[float, float]:
    mx = my = 0.0
    for k in panels:
        P = ctx.source.load(b, k)
        mx = max(mx, float(P.zx.norm(dim=1).max()))
        my = max(my, float(P.zy.norm(dim=1).max()))
    return mx, my


def _negatives_exp(ctx: PassContext, b: Batch, plan, direct: bool, panels):
    """N_i over rows i of ``panels`` and (partial) Ñ_j over every column; log N unless ``direct``."""
    n, pos = b.n, b.pos
    f64 = dict(dtype=torch.float64, device=ctx.device)
    if ctx.options.constant:  # s ≡ 0: every negative contributes e^0 = 1
        row, col = torch.zeros((n,), **f64), torch.zeros((n,), **f64)
        for k in panels:
            p0, p1 = b.panels[k]
            row[p0:p1] = n - pos.size[p0:p1].double()
            col[p0:p1] = n - pos.size[p0:p1].double()
        return row, col
    if direct:
        row, col = torch.zeros((n,), **f64), torch.zeros((n,), **f64)
    else:
        row, col = torch.full((n,), W.NEG_INF, **f64), torch.full((n,), W.NEG_INF, **f64)
    for P, Q, i0, i1, j0, j1 in _tiles(ctx, b, plan, "statistics", panels):
        out = ctx.scratch("e", i1 - i0, j1 - j0) if direct else None
        W.accumulate_exp_negatives(row, col, P.zx[P.local(i0, i1)], Q.zy[Q.local(j0, j1)], pos, i0, i1, j0, j1,
                                   direct, out)
    return row, col


def _positives_exp(ctx: PassContext, b: Batch, plan, lneg_row, lneg_col, panels):
    """log Σ_{k∈P(i)} 1/(N_i + e^{t_ik}) for rows and columns of ``panels`` (−inf elsewhere),
    and their part of the loss sum (/τ)."""
    lf, n = ctx.loss_fn, b.n
    f64 = dict(dtype=torch.float64, device=ctx.device)
    la_row = torch.full((n,), W.NEG_INF, **f64)
    la_col = torch.full((n,), W.NEG_INF, **f64)
    loss_sum = torch.zeros((), **f64)
    log_eps = math.log(lf.epsilon)
    if b.pos.one_to_one:
        # one positive per row, on the diagonal: vectors instead of diagonal tiles
        # (on a GPU the (k × k) tiles cost a third of an iteration's host time, RESULTS §10)
        for k in panels:
            P = ctx.source.load(b, k)
            for i0 in range(P.p0, P.p1, plan.block_rows):
                i1 = min(i0 + plan.block_rows, P.p1)
                li = P.local(i0, i1)
                la_row[i0:i1], la_col[i0:i1], part = W.exp_positives_diagonal(
                    P.zx[li], P.zy[li], lneg_row[i0:i1], lneg_col[i0:i1], log_eps, lf.nu)
                loss_sum += part
        return la_row, la_col, float(loss_sum)
    inv_size = 1.0 / b.pos.size.double()
    for k in panels:
        for _, i0, i1, j0, j1, m, t in _positive_tiles(b, ctx.source.load(b, k), plan):
            loss_sum += W.accumulate_exp_positives(la_row, la_col, t, m, lneg_row, lneg_col, inv_size,
                                                   i0, i1, j0, j1, log_eps, lf.nu)
    return la_row, la_col, float(loss_sum)


def _finish_exp(ctx: PassContext, b: Batch, direct, lneg_row, lneg_col, la_row, la_col, loss_sum) -> dict:
    return W.finish_exp(b.pos.size, direct, lneg_row, lneg_col, la_row, la_col, loss_sum,
                        temperature=ctx.loss_fn.temperature, dtype=ctx.dtype, constant=ctx.options.constant)


def _stats_exp(ctx: PassContext, b: Batch, plan) -> dict:
    """All statistics of a batch one owner holds entirely."""
    panels = range(len(b.panels))
    opt = ctx.options
    if opt.constant:
        direct = True
    elif opt.norm_bound is not None:
        direct = ctx.direct(opt.norm_bound[0] * opt.norm_bound[1] / ctx.loss_fn.temperature)
    else:
        mx, my = _norm_maxima(ctx, b, panels)
        direct = ctx.direct(mx * my)
    row, col = _negatives_exp(ctx, b, plan, direct, panels)
    lneg_row, lneg_col = (torch.log(row), torch.log(col)) if direct else (row, col)
    return _finish_exp(ctx, b, direct, lneg_row, lneg_col, *_positives_exp(ctx, b, plan, lneg_row, lneg_col, panels))


# -------------------------------------------------------------- pass 1: general ψ
def _positive_slots(ctx: PassContext, b: Batch, plan, panels):
    """s_{i, start_i+q} and s_{start_j+q, j} for slots q < |P| of the rows of ``panels``:
    two (n, p) matrices, zero in other rows."""
    n, pos = b.n, b.pos
    p = pos.max_size
    ar = torch.arange(p, device=ctx.device)
    spos_row = torch.zeros((n, p), dtype=ctx.dtype, device=ctx.device)
    spos_col = torch.zeros((n, p), dtype=ctx.dtype, device=ctx.device)
    for k in panels:
        P = ctx.source.load(b, k)
        for i0 in range(P.p0, P.p1, plan.block_rows):
            i1 = min(i0 + plan.block_rows, P.p1)
            li = P.local(i0, i1)
            # slots past a group's size point at any row of the panel; `valid` masks them
            partner = (pos.start[i0:i1, None] + ar[None, :]).clamp(max=P.p1 - 1) - P.p0
            spos_row[i0:i1] = torch.einsum("ir,iqr->iq", P.zx[li], P.zy[partner])
            spos_col[i0:i1] = torch.einsum("ir,iqr->iq", P.zy[li], P.zx[partner])
    return spos_row, spos_col


def _negatives_general(ctx: PassContext, b: Batch, plan, spos_row, spos_col, panels):
    """A and D sums over the negatives, for rows of ``panels`` and (partial) for every column."""
    n, pos = b.n, b.pos
    p = spos_row.shape[1]
    acc = dict(dtype=torch.float64, device=ctx.device)
    a_row, d_row = torch.zeros((n, p), **acc), torch.zeros((n, p), **acc)
    a_col, d_col = torch.zeros((n, p), **acc), torch.zeros((n, p), **acc)
    if ctx.options.constant:  # s ≡ 0: each anchor has n − |P(i)| negatives, all with x = 0
        for k in panels:
            p0, p1 = b.panels[k]
            negs = (n - pos.size[p0:p1].double())[:, None].expand(p1 - p0, p)
            W.accumulate_general_constant(a_row, d_row, a_col, d_col, negs, p0, p1, ctx.loss_fn)
        return a_row, d_row, a_col, d_col
    for P, Q, i0, i1, j0, j1 in _tiles(ctx, b, plan, "statistics", panels):
        s = P.zx[P.local(i0, i1)] @ Q.zy[Q.local(j0, j1)].T
        neg = ~pos.mask(i0, i1, j0, j1) if pos.tile_has_positives(i0, i1, j0, j1) else None
        W.accumulate_general_negatives(a_row, d_row, a_col, d_col, s, neg, pos.size, spos_row, spos_col,
                                       i0, i1, j0, j1, ctx.loss_fn)
    return a_row, d_row, a_col, d_col


def _finish_general(ctx: PassContext, b: Batch, spos_row, spos_col, a_row, d_row, a_col, d_col) -> dict:
    return W.finish_general(b.pos, spos_row, spos_col, a_row, d_row, a_col, d_col, loss_fn=ctx.loss_fn,
                            dtype=ctx.dtype, constant=ctx.options.constant)


def _stats_general(ctx: PassContext, b: Batch, plan) -> dict:
    """All statistics of a batch one owner holds entirely."""
    panels = range(len(b.panels))
    spos_row, spos_col = _positive_slots(ctx, b, plan, panels)
    return _finish_general(ctx, b, spos_row, spos_col,
                           *_negatives_general(ctx, b, plan, spos_row, spos_col, panels))


# ----------------------------------------------------------- pass 1 as rounds
def _round_norms(ctx: PassContext, owner, split) -> dict:
    """Per shared batch: max ‖z_x/τ‖ and max ‖z_y‖ over the owner's panels."""
    layout = ctx.layout
    return {k: _norm_maxima(ctx, b, layout.owned(b, owner)) for k in split
            if (b := layout.batches[k]) and layout.owned(b, owner)}


def _round_slots(ctx: PassContext, owner, split) -> dict:
    """Per shared batch: the positive-slot similarities of the owner's rows (general ψ)."""
    out = {}
    for k in split:
        b = ctx.layout.batches[k]
        if ctx.layout.owned(b, owner):
            out[k] = _positive_slots(ctx, b, _stats_plan(ctx, b), ctx.layout.owned(b, owner))
    return out


def _round_negatives(ctx: PassContext, owner, args) -> dict:
    """Whole batches: their statistics (``done``); shared ones: partial negative sums."""
    done, partial = {}, {}
    for b in ctx.layout.batches:
        owned = ctx.layout.owned(b, owner)
        if not owned:
            continue
        plan = _stats_plan(ctx, b)
        got = fused.fused_statistics(ctx, b, owner)
        if got is not None:
            done[b.key], ctx.fused_parts[b.key] = got
            ctx.report("statistics", 1, 1)
            continue
        if ctx.layout.whole(b, owner):
            done[b.key] = (_stats_exp if ctx.exp else _stats_general)(ctx, b, plan)
        elif ctx.exp:
            partial[b.key] = _negatives_exp(ctx, b, plan, args[b.key], owned)
        else:
            partial[b.key] = _negatives_general(ctx, b, plan, *args[b.key], owned)
    return {"done": done, "partial": partial}


def _round_positives(ctx: PassContext, owner, merged) -> dict:
    """Per shared batch (ψ = exp): the owner's part of the positives' sums, from the merged N."""
    out = {}
    for k, (direct, lneg_row, lneg_col) in merged.items():
        b = ctx.layout.batches[k]
        if ctx.layout.owned(b, owner):
            out[k] = _positives_exp(ctx, b, _stats_plan(ctx, b), lneg_row, lneg_col, ctx.layout.owned(b, owner))
    return out


#: the rounds of pass 1, by name: ``ROUNDS[name](ctx, owner, *args)`` is one owner's part
ROUNDS = {"norms": _round_norms, "slots": _round_slots, "negatives": _round_negatives,
          "positives": _round_positives}


def run_round(ctx: PassContext, owner, name: str, *args):
    """One owner's partial result of the pass-1 round ``name`` (see :data:`ROUNDS`)."""
    if name not in ROUNDS:
        raise ValueError(f"unknown pass-1 round {name!r}; expected one of {sorted(ROUNDS)}")
    return ROUNDS[name](ctx, owner, *args)


def merge_sums(parts: list, count: int) -> list:
    """Elementwise sums of the first ``count`` entries of each owner's partial, in owner order."""
    return [sum(q[i] for q in parts) for i in range(count)]


def merge_exp_negatives(direct: bool, parts: list) -> tuple:
    """(direct, log N_row, log N_col) from the owners' partial negative sums (ψ = exp)."""
    if direct:
        sums = merge_sums(parts, 2)
        return direct, torch.log(sums[0]), torch.log(sums[1])
    return direct, W.logaddexp_all([q[0] for q in parts]), W.logaddexp_all([q[1] for q in parts])


def merge_exp_positives(parts: list) -> tuple:
    """(la_row, la_col, loss sum) from the owners' partial positives' sums (ψ = exp)."""
    return W.logaddexp_all([q[0] for q in parts]), W.logaddexp_all([q[1] for q in parts]), sum(q[2] for q in parts)


def _first_round_args(ctx: PassContext, run, split) -> dict:
    """What the first round needs for shared batches: the exp path's choice between plain
    sums and log space (from the global norm maxima), and the general path's positive-slot
    similarities."""
    if not split:
        return {}
    if not ctx.exp:
        slots = run("slots", split)
        return {k: tuple(merge_sums([p[k] for p in slots if k in p], 2)) for k in split}
    opt = ctx.options
    if opt.constant:
        return {k: True for k in split}
    if opt.norm_bound is not None:
        bx, by = opt.norm_bound
        return {k: ctx.direct(bx * by / ctx.loss_fn.temperature) for k in split}
    norms = run("norms", split)  # of z_x/τ and z_y
    return {k: ctx.direct(max(p[k][0] for p in norms if k in p) * max(p[k][1] for p in norms if k in p))
            for k in split}


def compute_statistics(ctx: PassContext, run, split=()) -> list[dict]:
    """Pass 1: the statistics of every batch, one dict per batch.

    ``run(round, *args)`` returns one partial result per owner (e.g. ``[run_round(ctx, o,
    round, *args) for o in owners]``); ``split`` names the batches whose panels several
    owners share (none when one owner holds all).
    """
    split = list(split)
    batches = ctx.layout.batches
    args = _first_round_args(ctx, run, split)
    first = run("negatives", args)
    stats: dict[int, dict] = {}
    for part in first:
        stats.update(part["done"])
    for k in split:
        parts = [p["partial"][k] for p in first if k in p["partial"]]
        if ctx.exp:
            args[k] = merge_exp_negatives(args[k], parts)
        else:
            stats[k] = _finish_general(ctx, batches[k], *args[k], *merge_sums(parts, 4))
    if split and ctx.exp:
        pos = run("positives", {k: args[k] for k in split})
        for k in split:
            direct, lneg_row, lneg_col = args[k]
            stats[k] = _finish_exp(ctx, batches[k], direct, lneg_row, lneg_col,
                                   *merge_exp_positives([p[k] for p in pos if k in p]))
    return [stats[b.key] for b in batches]


def loss_value(stats: list[dict], n: int) -> float:
    """L(s) from pass 1's statistics of all batches of n pairs (the global 1/(2n) normalisation)."""
    return float(sum(st["loss_sum"] for st in stats) / (2 * n))


def statistics_summary(stats: list[dict]) -> dict:
    """Range of pass 1's log-sum-exp statistics, and whether the overflow guard fired.

    ``lse_min``/``lse_max``: the extremes of log Σ_{j∉P(i)} e^{s_ij/τ} over every row and
    column of every batch (finite values; None for a general ψ, whose pass 1 keeps plain
    sums).  ``log_space_batches``: batches whose statistics were kept in log space because
    e^{s/τ} could overflow the tile dtype (see :func:`unicon_dist.math.weights.fits_direct`).
    """
    lo, hi, log_space = math.inf, -math.inf, 0
    for st in stats:
        if "lneg_row" not in st:
            continue
        log_space += not st["direct"] and "fused" not in st  # the fused kernels need no log space
        for key in ("lneg_row", "lneg_col"):
            v = st[key][torch.isfinite(st[key])]
            if v.numel():
                lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    finite = lo <= hi
    return {"lse_min": lo if finite else None, "lse_max": hi if finite else None,
            "log_space_batches": log_space, "batches": len(stats)}
