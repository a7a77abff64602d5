"""S(γ) tile by tile: the per-anchor statistics of pass 1 and the tiles of −2n·S of pass 2.

Plain functions over tensors (no panels, no I/O); :mod:`unicon_dist.solver.passes`
streams the tiles through them.  Notation (DESIGN §2): s = z_x z_yᵀ over the n pairs of a
batch, P(i) the positives of anchor i, N(i) its negatives, ν the weight of the positive
inside ψ, ε the loss's ε.

For ψ = exp (CLIP/InfoNCE), with t = s/τ:

* N_i = Σ_{j∈N(i)} e^{t_ij} (and Ñ_j over columns), kept as log N_i when e^{t} could
  leave the floating range, and merged over tiles with ``logaddexp`` as in the online
  softmax of FlashAttention (Dao et al., 2022);
* a_i = mean_{k∈P(i)} 1/(N_i + e^{t_ik}) (and ã_j), so that a negative's weight
  factorises: −2n·S_ij = e^{t_ij}(a_i + ã_j);
* a positive's weight is (ν − σ_ik)/|P(i)| + (ν − σ̃_ik)/|P(k)|, σ_ik = e^{t_ik}/(N_i + e^{t_ik});
* the loss sums τ Σ_{k∈P(i)} [log ε − ν t_ik + log(N_i + e^{t_ik})]/|P(i)| over rows and columns.

For a general ψ, per (anchor, positive-slot q) pair:
A_iq = ε Σ_{j∈N(i)} ψ(s_ij − ν s_iq) + ε ψ((1 − ν) s_iq) and D_iq = ε Σ_{j∈N(i)} ψ'(s_ij − ν s_iq);
with c_iq = φ'(A_iq)/|P(i)|, −2n·S_ij = ε Σ_q c_iq ψ'(s_ij − ν s_iq) (+ the column terms) for a
negative and c_iq(−ν D_iq + (1 − ν) ε ψ'((1 − ν) s_iq)) for the positive in slot q.
"""

from __future__ import annotations

import math

import torch

from .positives import Positives

__all__ = [
    "NEG_INF", "exp_floor", "flush_below", "fits_direct", "logsumexp", "logaddexp_all", "masked_sum",
    "exp_scores", "weighted_column_sums", "zero_positives", "accumulate_exp_negatives", "exp_positives_diagonal",
    "accumulate_exp_positives", "finish_exp", "exp_tile", "accumulate_general_constant",
    "accumulate_general_negatives", "finish_general", "general_tile",
]

NEG_INF = -math.inf


# ----------------------------------------------------------------- numerical guards
def exp_floor(dtype: torch.dtype) -> float:
    """Where exp arguments are clamped before an exp that may underflow: log(tiny) + 1.

    torch's CPU exp is 10–40× slower on inputs whose result underflows (subnormal, zero,
    or exp(−inf)) than on ordinary ones, and at τ = 0.01 most of a log-space tile
    underflows: a float32 solve took 25× as long as its float64 twin (RESULTS §9).
    Clamping the argument at log(tiny) + 1 keeps every result a normal float.  A term that
    should have been below e·tiny (1.2e-38 · e in float32, 2.2e-308 · e in float64)
    becomes e·tiny instead: an absolute change far below the rounding of the terms it is
    summed with, which are relative to a maximum of 1 (:func:`logsumexp`); :func:`exp_tile`
    then drops such entries altogether (:func:`flush_below`).
    """
    return math.log(torch.finfo(dtype).tiny) + 1.0


def flush_below(dtype: torch.dtype) -> float:
    """√tiny of ``dtype``: tile entries below it are dropped (see :func:`exp_tile`)."""
    return math.sqrt(torch.finfo(dtype).tiny)


def fits_direct(U: float, dtype: torch.dtype) -> bool:
    """Whether plain e^{t_ij} and the weights a_i stay normal floats in every tile.

    |t_ij| ≤ U := max‖z_x‖·max‖z_y‖/τ (Cauchy–Schwarz), so e^{t} ∈ [e^{−U}, e^{U}] and
    a_i = mean_k 1/(N_i + e^{t_ik}) ∈ [e^{−U}/n, e^{U}/(n − 1)].  With U ≤ 40 (float32;
    300 in float64) both, and their products that form S, are representable, so the
    passes need one exp per entry, plain row/column sums and no max subtraction.
    Beyond that (small τ, unnormalised embeddings) they fall back to per-row and
    per-column maxima as in FlashAttention's online softmax, which cost more.
    """
    return U <= (40.0 if dtype != torch.float64 else 300.0)


LOG2_E = 1.0 / math.log(2.0)


def exp_scores(zx: torch.Tensor, zy: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """e^{zx zyᵀ} of a direct-regime tile, formed as 2^{(log₂e · zx) zyᵀ}.

    torch's CPU ``exp2_`` was 3.5× faster than ``exp_`` on a 512 × 1,024 float32 tile
    (``benchmarks/bench_fused.py --exp-rates``, RESULTS.md §1c); on CUDA the two were
    not compared (no GPU was lent when this was written).
    Scaling the r columns of ``zx`` instead of the tile's entries costs O(rows·r).  The
    extra rounding of log₂e·zx is at most half an ulp per element (ε/2 relative), the
    order of the GEMM's own rounding of t, so e^{t} changes by ≲ |t|·ε/2 relative: 2.4e-6
    at the direct regime's bound |t| ≤ 40 in float32 (:func:`fits_direct`), as for ``exp``
    of the GEMM's t.  ``zx`` is rescaled on every call, O(rows·r) against the GEMM's
    O(rows·cols·r).
    """
    return torch.mm(zx * LOG2_E, zy.T, out=out).exp2_()


# ------------------------------------------------------------------ reductions
def logsumexp(t: torch.Tensor, dim: int) -> torch.Tensor:
    """log Σ exp(t) along ``dim``; −inf for slices that are all −inf.

    Written out because torch.logsumexp over dim 0 of a row-major tile is several
    times slower than the max/exp/sum sequence here (measured on CPU); t − max is clamped
    at :func:`exp_floor` (see there), and slices that are all −inf are set back to −inf.
    """
    m = t.amax(dim, keepdim=True)
    empty = m == NEG_INF
    m = torch.where(empty, torch.zeros_like(m), m)
    out = (torch.sub(t, m).clamp_(min=exp_floor(t.dtype)).exp_().sum(dim, keepdim=True).log_() + m)
    return out.masked_fill_(empty, NEG_INF).squeeze(dim)


def logaddexp_all(parts: list[torch.Tensor]) -> torch.Tensor:
    """log Σ_k exp(parts[k]), combined pairwise in list order (so a fixed order gives fixed bits)."""
    out = parts[0]
    for p in parts[1:]:
        out = torch.logaddexp(out, p)
    return out


def masked_sum(v: torch.Tensor, keep: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Σ_dim v·[keep] in float64 (``keep`` None: every entry)."""
    if keep is not None:
        v = v.masked_fill(~keep, 0.0)
    return v.sum(dim).double()


def weighted_column_sums(A: torch.Tensor, w: torch.Tensor, block: int):
    """(Aᵀw, Aᵀ1) in float64, one row block of A at a time (no float64 copy of A)."""
    aw = torch.zeros(A.shape[1], dtype=torch.float64, device=A.device)
    a1 = torch.zeros_like(aw)
    for i0 in range(0, A.shape[0], block):
        blk = A[i0 : i0 + block].double()
        aw += blk.T @ w[i0 : i0 + block]
        a1 += blk.sum(0)  # float64: a plain float32 column sum over millions of rows loses digits
    return aw, a1


def zero_positives(e: torch.Tensor, pos: Positives, i0, i1, j0, j1) -> None:
    """Set the positive pairs of tile (i0:i1, j0:j1) of ``e`` to 0, in place."""
    if pos.one_to_one:
        e[pos.diagonal(i0, i1, j0, j1)] = 0.0
    else:
        e.masked_fill_(pos.mask(i0, i1, j0, j1), 0.0)


# ----------------------------------------------------------------- pass 1, ψ = exp
def accumulate_exp_negatives(row, col, zx, zy, pos: Positives, i0, i1, j0, j1, direct: bool, out=None) -> None:
    """Add tile (i0:i1, j0:j1)'s negatives to N_i (``row``) and Ñ_j (``col``), in place.

    ``zx`` (pre-scaled by 1/τ) and ``zy`` hold the tile's rows and columns; ``row`` and
    ``col`` are float64 over the batch.  ``direct``: plain sums Σ e^{t_ij}; otherwise
    log-space, merged with ``logaddexp``.  ``out``: scratch for the (i1−i0, j1−j0) tile.
    """
    if direct:
        e = exp_scores(zx, zy, out=out)
        if pos.tile_has_positives(i0, i1, j0, j1):
            zero_positives(e, pos, i0, i1, j0, j1)
        row[i0:i1] += e.sum(1)
        col[j0:j1] += e.sum(0)
        return
    t = zx @ zy.T
    if pos.tile_has_positives(i0, i1, j0, j1):
        if pos.one_to_one:
            t[pos.diagonal(i0, i1, j0, j1)] = NEG_INF
        else:
            t.masked_fill_(pos.mask(i0, i1, j0, j1), NEG_INF)
    row[i0:i1] = torch.logaddexp(row[i0:i1], logsumexp(t, 1).double())
    col[j0:j1] = torch.logaddexp(col[j0:j1], logsumexp(t, 0).double())


def exp_positives_diagonal(zx, zy, lneg_row, lneg_col, log_eps: float, nu: float):
    """One positive per anchor (pairs i ↔ i): (log a_i, log ã_i, the block's loss sum / τ).

    ``zx``, ``zy``: the block's rows (zx pre-scaled by 1/τ); ``lneg_row``, ``lneg_col``:
    their log N_i, log Ñ_i.  The similarities are taken in float64.
    """
    t = (zx.double() * zy.double()).sum(1)
    ld_r = torch.logaddexp(lneg_row, t)
    ld_c = torch.logaddexp(lneg_col, t)
    return -ld_r, -ld_c, (2.0 * (log_eps - nu * t) + ld_r + ld_c).sum()


def accumulate_exp_positives(la_row, la_col, t, m, lneg_row, lneg_col, inv_size, i0, i1, j0, j1,
                             log_eps: float, nu: float) -> torch.Tensor:
    """Merge a tile's positives into log Σ_{k∈P(i)} 1/(N_i + e^{t_ik}) (``la_row``, and
    ``la_col`` over columns) in place; return the tile's loss sum / τ.

    ``t``: the tile's float64 t_ij; ``m``: its positive mask; ``inv_size``: 1/|P(i)|.
    """
    ld_r = torch.logaddexp(lneg_row[i0:i1, None], t)
    ld_c = torch.logaddexp(lneg_col[None, j0:j1], t)
    la_row[i0:i1] = torch.logaddexp(la_row[i0:i1], torch.logsumexp((-ld_r).masked_fill(~m, NEG_INF), 1))
    la_col[j0:j1] = torch.logaddexp(la_col[j0:j1], torch.logsumexp((-ld_c).masked_fill(~m, NEG_INF), 0))
    base = log_eps - nu * t
    terms = (base + ld_r) * inv_size[i0:i1, None] + (base + ld_c) * inv_size[None, j0:j1]
    return terms.masked_fill(~m, 0.0).sum()


def finish_exp(size, direct, lneg_row, lneg_col, la_row, la_col, loss_sum, *, temperature: float,
               dtype: torch.dtype, constant: bool) -> dict:
    """A batch's statistics for ψ = exp from the merged sums.

    ``la_row``/``la_col`` are log Σ_{k∈P(i)} 1/(N_i + e^{t_ik}); dividing by |P(i)| (``size``)
    gives log a_i.  Returns ``lneg_row``/``lneg_col`` (log N), ``la_row``/``la_col`` (log a,
    in ``dtype``), ``loss_sum`` (τ times the sum), ``direct``; with ``direct`` also
    ``alpha``/``beta`` = a, ã in ``dtype``; with ``constant`` (s ≡ 0) ``constant`` = (a, ã)
    in float64, the rank-two weights of the first step.
    """
    log_size = torch.log(size.double())
    la_row = la_row - log_size  # log a_i = log mean_k 1/(N_i + e^{t_ik})
    la_col = la_col - log_size
    stats = {
        "lneg_row": lneg_row,
        "lneg_col": lneg_col,
        "la_row": la_row.to(dtype),
        "la_col": la_col.to(dtype),
        "loss_sum": float(loss_sum) * temperature,
        "direct": bool(direct),
    }
    if direct:
        # −2n·S_ij = e^{t_ij}(a_i + ã_j) for negatives (see fits_direct for the range)
        stats["alpha"] = torch.exp(la_row).to(dtype)
        stats["beta"] = torch.exp(la_col).to(dtype)
    if constant:
        stats["constant"] = (torch.exp(la_row), torch.exp(la_col))
    return stats


# ----------------------------------------------------------------- pass 2, ψ = exp
def exp_tile(zx, zy, st: dict, pos: Positives, i0, i1, j0, j1, nu: float, out_e=None, out_g=None) -> torch.Tensor:
    """A tile of −2n·S for ψ = exp: rows i0:i1 (``zx``, pre-scaled by 1/τ), columns j0:j1 (``zy``).

    Negatives: e^{t_ij}(a_i + ã_j), from ``alpha``/``beta`` (``direct`` statistics) or
    exp(t_ij + log a_i) + exp(t_ij + log ã_j); positives: (ν − σ_ik)/|P(i)| + (ν − σ̃_ik)/|P(k)|
    with σ from float64 similarities.  ``out_e``, ``out_g``: scratch tiles for the direct path.
    """
    if st["direct"]:
        e = exp_scores(zx, zy, out=out_e)
        g = torch.mul(e, st["alpha"][i0:i1, None], out=out_g)
        g.addcmul_(e, st["beta"][None, j0:j1])
    else:
        t = zx @ zy.T
        floor = exp_floor(t.dtype)
        g = torch.add(t, st["la_row"][i0:i1, None]).clamp_(min=floor).exp_()
        g += t.add_(st["la_col"][None, j0:j1]).clamp_(min=floor).exp_()
        # entries below √tiny (1.1e-19 in float32) are set to 0: the GEMMs that take this
        # tile would form subnormal products with them, which run ~70× slower on CPU
        # (RESULTS §9).  C changes by less than n·B·√tiny·max|φ_x||φ_y| in absolute
        # terms: far below its float32 rounding unless all of S is that small (every
        # pair separated by more than ~45τ in similarity: a loss at its floor).
        torch.nn.functional.threshold_(g, flush_below(g.dtype), 0.0)
    if pos.tile_has_positives(i0, i1, j0, j1):
        # positives: (ν − σ_ik)/|P(i)| + (ν − σ̃_ik)/|P(k)| with σ the softmax weight of
        # the positive against the anchor's negatives, from float64 similarities
        inv = 1.0 / pos.size.double()
        if pos.one_to_one:
            li, lj = pos.diagonal(i0, i1, j0, j1)
            r, c = li + i0, lj + j0
            t64 = (zx[li].double() * zy[lj].double()).sum(1)
            sig_r = torch.exp(t64 - torch.logaddexp(st["lneg_row"][r], t64))
            sig_c = torch.exp(t64 - torch.logaddexp(st["lneg_col"][c], t64))
            g[li, lj] = -((nu - sig_r) + (nu - sig_c)).to(g.dtype)
        else:
            m = pos.mask(i0, i1, j0, j1)
            t64 = zx.double() @ zy.double().T
            sig_r = torch.exp(t64 - torch.logaddexp(st["lneg_row"][i0:i1, None], t64))
            sig_c = torch.exp(t64 - torch.logaddexp(st["lneg_col"][None, j0:j1], t64))
            q = (nu - sig_r) * inv[i0:i1, None] + (nu - sig_c) * inv[None, j0:j1]
            g = torch.where(m, (-q).to(g.dtype), g)
    return g


# ----------------------------------------------------------------- general ψ
def accumulate_general_constant(a_row, d_row, a_col, d_col, negs, p0, p1, loss_fn) -> None:
    """s ≡ 0: each anchor of positions p0:p1 has ``negs`` (n − |P(i)|, one column per slot)
    negatives, all at x = 0; add their ψ(0) and ψ'(0) sums in place."""
    zero = torch.zeros((), dtype=torch.float64, device=a_row.device)
    a_row[p0:p1] += negs * loss_fn.psi(zero)
    d_row[p0:p1] += negs * loss_fn.dpsi(zero)
    a_col[p0:p1] += negs * loss_fn.psi(zero)
    d_col[p0:p1] += negs * loss_fn.dpsi(zero)


def accumulate_general_negatives(a_row, d_row, a_col, d_col, s, neg, size, spos_row, spos_col, i0, i1, j0, j1,
                                 loss_fn) -> None:
    """Add tile (i0:i1, j0:j1) of s to the A and D sums of its rows and columns, in place.

    ``neg``: the tile's negative mask (None: all negatives); ``size``: |P(i)| over the batch;
    ``spos_row[i, q]`` = s_{i, start_i + q} (``spos_col`` the same over columns).
    """
    nu = loss_fn.nu
    for q in range(int(size[i0:i1].max())):
        x = s - nu * spos_row[i0:i1, q, None]
        a_row[i0:i1, q] += masked_sum(loss_fn.psi(x), neg, 1)
        d_row[i0:i1, q] += masked_sum(loss_fn.dpsi(x), neg, 1)
    for q in range(int(size[j0:j1].max())):
        x = s - nu * spos_col[None, j0:j1, q]
        a_col[j0:j1, q] += masked_sum(loss_fn.psi(x), neg, 0)
        d_col[j0:j1, q] += masked_sum(loss_fn.dpsi(x), neg, 0)


def finish_general(pos: Positives, spos_row, spos_col, a_row, d_row, a_col, d_col, *, loss_fn,
                   dtype: torch.dtype, constant: bool) -> dict:
    """A batch's statistics for a general ψ from the merged negative sums (formulas: module docstring).

    Returns ``c_row``/``c_col`` (ε c, the weight of ψ' for negatives), ``pos_row``/``pos_col``
    (the positives' weights), ``spos_row``/``spos_col`` and ``loss_sum``; with ``constant``
    (s ≡ 0) ``constant`` = [row, column] weight of every negative, Σ_q ε c_q ψ'(0).
    """
    nu, eps = loss_fn.nu, loss_fn.epsilon
    device = a_row.device
    acc = dict(dtype=torch.float64, device=device)
    valid = torch.arange(spos_row.shape[1], device=device)[None, :] < pos.size[:, None]
    inv_size = (1.0 / pos.size.double())[:, None]
    out = {"loss_sum": 0.0}
    for side, a, d, sp in (("row", a_row, d_row, spos_row), ("col", a_col, d_col, spos_col)):
        own = (1.0 - nu) * sp.double()
        a = eps * (a + loss_fn.psi(own))
        d = eps * d
        c = loss_fn.dphi(a) * inv_size * valid
        if constant:  # a negative's weight at s ≡ 0 is Σ_q c_q ψ'(0)
            out.setdefault("constant", []).append(eps * c.sum(1) * loss_fn.dpsi(torch.zeros((), **acc)))
        out["loss_sum"] += float((loss_fn.phi(a) * inv_size * valid).sum())
        out[f"c_{side}"] = (eps * c).to(dtype)  # weight of ψ' for the negatives
        out[f"pos_{side}"] = (c * (-nu * d + (1.0 - nu) * eps * loss_fn.dpsi(own))).to(dtype)
        out[f"spos_{side}"] = sp
    return out


def general_tile(s, st: dict, pos: Positives, i0, i1, j0, j1, loss_fn) -> torch.Tensor:
    """A tile of −2n·S = 2n·∂L/∂s for a general ψ, from the tile s of similarities."""
    nu = loss_fn.nu
    g = torch.zeros_like(s)
    for q in range(int(pos.size[i0:i1].max())):
        g += st["c_row"][i0:i1, q, None] * loss_fn.dpsi(s - nu * st["spos_row"][i0:i1, q, None])
    for q in range(int(pos.size[j0:j1].max())):
        g += st["c_col"][None, j0:j1, q] * loss_fn.dpsi(s - nu * st["spos_col"][None, j0:j1, q])
    if pos.tile_has_positives(i0, i1, j0, j1):
        m = pos.mask(i0, i1, j0, j1)
        rows = torch.arange(i0, i1, device=s.device)[:, None]
        cols = torch.arange(j0, j1, device=s.device)[None, :]
        p = st["pos_row"].shape[1]
        slot_r = (cols - pos.start[i0:i1, None]).clamp(0, p - 1)
        slot_c = (rows - pos.start[None, j0:j1]).clamp(0, p - 1)
        val = st["pos_row"][i0:i1].gather(1, slot_r) + st["pos_col"][j0:j1].T.gather(0, slot_c)
        g = torch.where(m, val, g)
    return g
