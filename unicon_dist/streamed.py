"""Streamed products with the similarity weight matrix S(γ), which is never formed.

C = Aᵀ S B for tall operands A (n × a) and B (n × b) is a sum over tiles of the
n × n similarity matrix s = z_x z_yᵀ (DESIGN §3):

* pass 1 streams the tiles once for per-anchor statistics: for CLIP/InfoNCE the
  log-sum-exp over negatives of every row *and* every column, combined across tiles
  with ``logaddexp`` as in the online softmax of FlashAttention (Dao et al., 2022);
  for a general ψ the sums A_ik = Σ_j εψ(s_ij − ν s_ik) + εψ((1−ν)s_ik) and
  D_ik = Σ_j εψ'(s_ij − ν s_ik) per (anchor, positive) pair;
* a short pass over the tiles that hold positives finishes the per-anchor weights;
* pass 2 recomputes each tile, turns it into a tile of −2n·S and accumulates
  R_I = Σ_J (−2nS)_{IJ} B_J, then C −= A_Iᵀ R_I / (2n) once per row block, in float64.

For ψ = exp the weight of a negative factorises, S_ij = −(e^{t_ij} a_i + e^{t_ij} ã_j)/(2n)
with t = s/τ and a_i = mean_{k∈P(i)} 1/(N_i + e^{t_ik}), so many-to-many positives cost
O(n²) plus O(Σ_i |P(i)|); everything is evaluated in log space, so |s/τ| ≈ 80 does not
overflow float32.  Memory is O((tile + n)(r + a + b)), independent of n².

Block sizes are arguments; :func:`unicon_dist.planning.plan_tiles` chooses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .losses import ContrastiveLoss, get_loss
from .planning import plan_tiles
from .positives import Positives, canonical_groups
from .validation import check_matrix, check_same_rows, resolve_device

__all__ = ["CrossProductOperator", "weighted_cross_product", "make_batches"]

_NEG_INF = -math.inf


def make_batches(n: int, negatives, seed: int = 0) -> list[np.ndarray] | None:
    """Row batches for ``negatives``: None for "full", else a seeded split into batches of B.

    The rows are permuted with ``np.random.default_rng(seed).permutation(n)`` and cut
    into consecutive batches of ``negatives`` rows (the last may be smaller).
    """
    if isinstance(negatives, str):
        if negatives != "full":
            raise ValueError(f"negatives must be 'full' or a positive batch size, got {negatives!r}")
        return None
    if isinstance(negatives, (bool, np.bool_)) or not isinstance(negatives, (int, np.integer)):
        raise ValueError(f"negatives must be 'full' or a positive batch size, got {negatives!r}")
    if negatives <= 0:
        raise ValueError(f"negatives batch size must be positive, got {negatives}")
    if negatives >= n:
        return None
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[k : k + int(negatives)] for k in range(0, n, int(negatives))]


@dataclass
class _Batch:
    """One independent block of S: rows ``index`` (None = all rows in order), in group order."""

    index: torch.Tensor | None
    pos: Positives
    zx: torch.Tensor  # embeddings in processing order (scaled by 1/τ for exponential ψ)
    zy: torch.Tensor
    stats: dict


class CrossProductOperator:
    """Matrix-free C = Φ_Xᵀ S(γ) Φ_Y with S(γ) evaluated at s = z_x z_yᵀ.

    Construction runs pass 1 (the per-anchor statistics, and the loss value); every
    product afterwards is one pass 2 over the tiles.

    Parameters
    ----------
    phi_x : array_like, shape (n, m_x)
    phi_y : array_like, shape (n, m_y)
        Feature maps of the pairs (rows may already carry the cosine row scaling).
    z_x, z_y : array_like, shape (n, r)
        Embeddings whose inner products are the similarities s_ij.
    loss, temperature, nu
        The loss (see :func:`unicon_dist.losses.get_loss`).
    negatives : "full" or int
        All n² pairs, or a seeded split of the rows into batches of this size
        (S block-diagonal, the loss keeps the global 1/(2n) normalisation).
    groups : array_like of int, shape (n,), optional
        Many-to-many positives: x_i and y_j are positives iff groups[i] == groups[j].
    seed : int
        Seed of the batch split.
    block_rows, block_cols, memory_budget
        Tile shape, or the budget the planner fits it into.
    device, dtype
        Where and in which precision the tiles are computed (default: those of z_x;
        float32 unless the inputs are float64).  C is accumulated in float64.
    progress : callable, optional
        Called as ``progress(stage, done, total)`` after each block of rows (stage
        "statistics" or "product"), e.g. :class:`unicon_dist.progress.LogProgress`.

    Attributes
    ----------
    shape : tuple (m_x, m_y)
    loss : float
        L(s) at the given embeddings (under the ``negatives`` restriction).
    n : int
    """

    def __init__(
        self,
        phi_x,
        phi_y,
        z_x,
        z_y,
        loss="clip",
        temperature: float = 0.07,
        nu: float = 1.0,
        negatives="full",
        groups=None,
        seed: int = 0,
        block_rows: int | None = None,
        block_cols: int | None = None,
        memory_budget: int | None = None,
        device=None,
        dtype=None,
        progress=None,
        _force_general: bool = False,
    ):
        self.loss_fn: ContrastiveLoss = get_loss(loss, temperature=temperature, nu=nu)
        zx = check_matrix(z_x, "z_x")
        zy = check_matrix(z_y, "z_y")
        self.device = resolve_device(device) if device is not None else zx.device
        if dtype is None:
            dtype = torch.float64 if zx.dtype == torch.float64 else torch.float32
        self.dtype = dtype
        self.phi_x = check_matrix(phi_x, "phi_x", dtype=dtype, device=self.device)
        self.phi_y = check_matrix(phi_y, "phi_y", dtype=dtype, device=self.device)
        zx = zx.to(dtype=dtype, device=self.device)
        zy = zy.to(dtype=dtype, device=self.device)
        self.n = check_same_rows(phi_x=self.phi_x, phi_y=self.phi_y, z_x=zx, z_y=zy)
        if zx.shape[1] != zy.shape[1]:
            raise ValueError(f"z_x and z_y must have the same width (embedding dim), got {zx.shape[1]} and {zy.shape[1]}")
        self.shape = (self.phi_x.shape[1], self.phi_y.shape[1])
        self._exp = self.loss_fn.exponential and not _force_general
        labels = canonical_groups(groups, self.n)
        batches = make_batches(self.n, negatives, seed)
        self._block_rows, self._block_cols, self._budget = block_rows, block_cols, memory_budget
        self._progress = progress
        self._buffers: dict[str, torch.Tensor] = {}
        self._batches = [self._make_batch(zx, zy, labels, b) for b in (batches or [None])]
        self.loss = float(sum(b.stats["loss_sum"] for b in self._batches) / (2 * self.n))

    # ------------------------------------------------------------------ setup
    def _make_batch(self, zx, zy, labels, rows) -> _Batch:
        if rows is None and labels is None:
            index, sorted_labels = None, None
        else:
            rows = np.arange(self.n) if rows is None else np.asarray(rows)
            if labels is not None:
                rows = rows[np.argsort(labels[rows], kind="stable")]
                sorted_labels = labels[rows]
            else:
                sorted_labels = None
            index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        nb = zx.shape[0] if index is None else index.numel()
        pos = Positives.build(sorted_labels, nb, self.device)
        bzx = zx if index is None else zx.index_select(0, index)
        bzy = zy if index is None else zy.index_select(0, index)
        if self._exp:
            bzx = bzx * (1.0 / self.loss_fn.temperature)
        batch = _Batch(index, pos, bzx, bzy, {})
        plan = self._plan(nb, bzx.shape[1] + max(self.shape), pos)
        batch.stats = (self._stats_exp if self._exp else self._stats_general)(batch, plan)
        return batch

    def _plan(self, n, width, pos):
        slots = 1 if (self._exp or pos.one_to_one) else pos.max_size
        return plan_tiles(
            n,
            width,
            itemsize=torch.finfo(self.dtype).bits // 8,
            slots=slots,
            memory_budget=self._budget,
            block_rows=self._block_rows,
            block_cols=self._block_cols,
        )

    def _tiles(self, n, plan):
        blocks = -(-n // plan.block_rows)
        for k, i0 in enumerate(range(0, n, plan.block_rows)):
            i1 = min(i0 + plan.block_rows, n)
            for j0 in range(0, n, plan.block_cols):
                yield i0, i1, j0, min(j0 + plan.block_cols, n)
            self._report("statistics", k + 1, blocks)

    def _buffer(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """A reusable tile-sized scratch tensor: fresh multi-megabyte allocations per tile
        cost page faults that showed up as ~20% of a pass (measured on CPU)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < rows * cols:
            buf = torch.empty(rows * cols, dtype=self.dtype, device=self.device)
            self._buffers[name] = buf
        return buf[: rows * cols].view(rows, cols)

    def _report(self, stage, done, total):
        if self._progress is not None:
            self._progress(stage, done, total)

    # --------------------------------------------------- pass 1: exponential ψ
    def _direct_exp(self, b: _Batch) -> bool:
        """Whether plain e^{t_ij} and the weights a_i stay normal floats in every tile.

        |t_ij| ≤ U := max‖z_x‖·max‖z_y‖/τ (Cauchy–Schwarz), so e^{t} ∈ [e^{−U}, e^{U}] and
        a_i = mean_k 1/(N_i + e^{t_ik}) ∈ [e^{−U}/n, e^{U}/(n − 1)].  With U ≤ 40 (float32;
        300 in float64) both, and their products that form S, are representable, so the
        passes need one exp per entry, plain row/column sums and no max subtraction.
        Beyond that (small τ, unnormalised embeddings) they fall back to per-row and
        per-column maxima as in FlashAttention's online softmax, which cost more.
        """
        U = float(b.zx.norm(dim=1).max() * b.zy.norm(dim=1).max())
        return U <= (40.0 if self.dtype != torch.float64 else 300.0)

    def _stats_exp(self, b: _Batch, plan) -> dict:
        n, pos, lf = b.zx.shape[0], b.pos, self.loss_fn
        f64 = dict(dtype=torch.float64, device=self.device)
        lneg_row = torch.full((n,), _NEG_INF, **f64)  # log Σ_{j∉P(i)} e^{t_ij}
        lneg_col = torch.full((n,), _NEG_INF, **f64)
        constant = _is_zero(b.zx) or _is_zero(b.zy)
        direct = constant or self._direct_exp(b)
        if direct:
            row_sum = torch.zeros((n,), **f64)  # Σ_{j∉P(i)} e^{t_ij}
            col_sum = torch.zeros((n,), **f64)
        if constant:  # s ≡ 0: every negative contributes e^0 = 1
            row_sum += n - pos.size.double()
            col_sum += n - pos.size.double()
        for i0, i1, j0, j1 in (() if constant else self._tiles(n, plan)):
            if direct:
                e = torch.mm(b.zx[i0:i1], b.zy[j0:j1].T, out=self._buffer("e", i1 - i0, j1 - j0)).exp_()
                if pos.tile_has_positives(i0, i1, j0, j1):
                    self._zero_positives(e, pos, i0, i1, j0, j1)
                row_sum[i0:i1] += e.sum(1)
                col_sum[j0:j1] += e.sum(0)
                continue
            t = b.zx[i0:i1] @ b.zy[j0:j1].T
            if pos.tile_has_positives(i0, i1, j0, j1):
                if pos.one_to_one:
                    t[pos.diagonal(i0, i1, j0, j1)] = _NEG_INF
                else:
                    t.masked_fill_(pos.mask(i0, i1, j0, j1), _NEG_INF)
            lneg_row[i0:i1] = torch.logaddexp(lneg_row[i0:i1], _logsumexp(t, 1).double())
            lneg_col[j0:j1] = torch.logaddexp(lneg_col[j0:j1], _logsumexp(t, 0).double())
        if direct:
            lneg_row = torch.log(row_sum)
            lneg_col = torch.log(col_sum)
        # positives: log a_i = log mean_k 1/(N_i + e^{t_ik}), and the loss terms
        la_row = torch.full((n,), _NEG_INF, **f64)
        la_col = torch.full((n,), _NEG_INF, **f64)
        loss_sum = torch.zeros((), **f64)
        inv_size = 1.0 / b.pos.size.double()
        log_eps = math.log(lf.epsilon)
        for i0, i1, j0, j1, m, t in self._positive_tiles(b, plan):
            ld_r = torch.logaddexp(lneg_row[i0:i1, None], t)
            ld_c = torch.logaddexp(lneg_col[None, j0:j1], t)
            la_row[i0:i1] = torch.logaddexp(la_row[i0:i1], torch.logsumexp((-ld_r).masked_fill(~m, _NEG_INF), 1))
            la_col[j0:j1] = torch.logaddexp(la_col[j0:j1], torch.logsumexp((-ld_c).masked_fill(~m, _NEG_INF), 0))
            base = log_eps - lf.nu * t
            terms = (base + ld_r) * inv_size[i0:i1, None] + (base + ld_c) * inv_size[None, j0:j1]
            loss_sum += terms.masked_fill(~m, 0.0).sum()
        log_size = torch.log(b.pos.size.double())
        la_row -= log_size
        la_col -= log_size
        stats = {
            "lneg_row": lneg_row,
            "lneg_col": lneg_col,
            "la_row": la_row.to(self.dtype),
            "la_col": la_col.to(self.dtype),
            "loss_sum": float(loss_sum) * lf.temperature,
            "direct": direct,
        }
        if direct:
            # −2n·S_ij = e^{t_ij}(a_i + ã_j) for negatives (see _direct_exp for the range)
            stats["alpha"] = torch.exp(la_row).to(self.dtype)
            stats["beta"] = torch.exp(la_col).to(self.dtype)
        if constant:
            stats["constant"] = (torch.exp(la_row), torch.exp(la_col))
        return stats

    @staticmethod
    def _zero_positives(e, pos, i0, i1, j0, j1):
        if pos.one_to_one:
            e[pos.diagonal(i0, i1, j0, j1)] = 0.0
        else:
            e.masked_fill_(pos.mask(i0, i1, j0, j1), 0.0)

    def _positive_tiles(self, b: _Batch, plan):
        """Tiles holding positives: (i0, i1, j0, j1, mask, t in float64)."""
        n, pos = b.zx.shape[0], b.pos
        if pos.one_to_one:
            # the diagonal, one row block at a time, as a (rows × 1) "tile" per row
            for i0 in range(0, n, plan.block_rows):
                i1 = min(i0 + plan.block_rows, n)
                t = (b.zx[i0:i1].double() * b.zy[i0:i1].double()).sum(1)
                yield from self._diag_tile(i0, i1, t)
            return
        for i0 in range(0, n, plan.block_rows):
            i1 = min(i0 + plan.block_rows, n)
            s0, s1 = pos.span(i0, i1)
            for j0 in range(s0, s1, plan.block_cols):
                j1 = min(j0 + plan.block_cols, s1)
                t = b.zx[i0:i1].double() @ b.zy[j0:j1].double().T
                yield i0, i1, j0, j1, pos.mask(i0, i1, j0, j1), t

    @staticmethod
    def _diag_tile(i0, i1, t):
        # a diagonal block is the (i1-i0)² tile with only its diagonal set; the
        # square tile keeps one code path for row and column reductions
        k = i1 - i0
        m = torch.eye(k, dtype=torch.bool, device=t.device)
        tt = torch.zeros((k, k), dtype=t.dtype, device=t.device)
        tt.diagonal().copy_(t)
        yield i0, i1, i0, i1, m, tt

    # ----------------------------------------------------- pass 1: general ψ
    def _positive_slots(self, b: _Batch, plan):
        """s_{i, start_i+q} and s_{start_j+q, j} for slots q < |P|: two (n, p) matrices."""
        n, pos = b.zx.shape[0], b.pos
        p = pos.max_size
        ar = torch.arange(p, device=self.device)
        spos_row = torch.zeros((n, p), dtype=self.dtype, device=self.device)
        spos_col = torch.zeros((n, p), dtype=self.dtype, device=self.device)
        for i0 in range(0, n, plan.block_rows):
            i1 = min(i0 + plan.block_rows, n)
            partner = (pos.start[i0:i1, None] + ar[None, :]).clamp(max=n - 1)
            spos_row[i0:i1] = torch.einsum("ir,iqr->iq", b.zx[i0:i1], b.zy[partner])
            spos_col[i0:i1] = torch.einsum("ir,iqr->iq", b.zy[i0:i1], b.zx[partner])
        valid = ar[None, :] < pos.size[:, None]
        return spos_row, spos_col, valid

    def _stats_general(self, b: _Batch, plan) -> dict:
        n, pos, lf = b.zx.shape[0], b.pos, self.loss_fn
        nu, eps = lf.nu, lf.epsilon
        spos_row, spos_col, valid = self._positive_slots(b, plan)
        p = spos_row.shape[1]
        acc = dict(dtype=torch.float64, device=self.device)
        a_row, d_row = torch.zeros((n, p), **acc), torch.zeros((n, p), **acc)
        a_col, d_col = torch.zeros((n, p), **acc), torch.zeros((n, p), **acc)
        constant = _is_zero(b.zx) or _is_zero(b.zy)
        if constant:  # s ≡ 0: each anchor has n − |P(i)| negatives, all with x = 0
            zero = torch.zeros((), **acc)
            negs = (n - pos.size.double())[:, None].expand(n, p)
            a_row += negs * lf.psi(zero)
            d_row += negs * lf.dpsi(zero)
            a_col += negs * lf.psi(zero)
            d_col += negs * lf.dpsi(zero)
        for i0, i1, j0, j1 in (() if constant else self._tiles(n, plan)):
            s = b.zx[i0:i1] @ b.zy[j0:j1].T
            neg = ~pos.mask(i0, i1, j0, j1) if pos.tile_has_positives(i0, i1, j0, j1) else None
            for q in range(int(pos.size[i0:i1].max())):
                x = s - nu * spos_row[i0:i1, q, None]
                a_row[i0:i1, q] += _masked_sum(lf.psi(x), neg, 1)
                d_row[i0:i1, q] += _masked_sum(lf.dpsi(x), neg, 1)
            for q in range(int(pos.size[j0:j1].max())):
                x = s - nu * spos_col[None, j0:j1, q]
                a_col[j0:j1, q] += _masked_sum(lf.psi(x), neg, 0)
                d_col[j0:j1, q] += _masked_sum(lf.dpsi(x), neg, 0)
        inv_size = (1.0 / pos.size.double())[:, None]
        out = {"loss_sum": 0.0}
        for side, a, d, sp in (("row", a_row, d_row, spos_row), ("col", a_col, d_col, spos_col)):
            own = (1.0 - nu) * sp.double()
            a = eps * (a + lf.psi(own))
            d = eps * d
            c = lf.dphi(a) * inv_size * valid
            if constant:  # a negative's weight at s ≡ 0 is Σ_q c_q ψ'(0) (see _cross_constant)
                out.setdefault("constant", []).append(eps * c.sum(1) * lf.dpsi(torch.zeros((), **acc)))
            out["loss_sum"] += float((lf.phi(a) * inv_size * valid).sum())
            out[f"c_{side}"] = (eps * c).to(self.dtype)  # weight of ψ' for the negatives
            out[f"pos_{side}"] = (c * (-nu * d + (1.0 - nu) * eps * lf.dpsi(own))).to(self.dtype)
            out[f"spos_{side}"] = sp
        return out

    # ------------------------------------------------------------- pass 2
    def cross(self, A, B) -> torch.Tensor:
        """Aᵀ S B in float64 for A (n × a), B (n × b).

        Each tile G of −2n·S is multiplied by the narrower operand: by B_J into
        row-block accumulators when b ≤ a, else by A_I (as Gᵀ A_I) into column-block
        accumulators, so a product with a thin side (C·Ω, Cᵀ·Ω) costs O(n² min(a, b)).
        """
        A = A.to(dtype=self.dtype, device=self.device)
        B = B.to(dtype=self.dtype, device=self.device)
        C = torch.zeros((A.shape[1], B.shape[1]), dtype=torch.float64, device=self.device)
        by_rows = B.shape[1] <= A.shape[1]
        for b in self._batches:
            Ab = A if b.index is None else A.index_select(0, b.index)
            Bb = B if b.index is None else B.index_select(0, b.index)
            plan = self._plan(Ab.shape[0], b.zx.shape[1] + min(A.shape[1], B.shape[1]), b.pos)
            tile = self._tile_exp if self._exp else self._tile_general
            n = Ab.shape[0]
            if "constant" in b.stats:
                C -= self._cross_constant(b, Ab, Bb, plan, tile)
            elif by_rows:
                blocks = -(-n // plan.block_rows)
                for k, i0 in enumerate(range(0, n, plan.block_rows)):
                    i1 = min(i0 + plan.block_rows, n)
                    R = torch.zeros((i1 - i0, Bb.shape[1]), dtype=self.dtype, device=self.device)
                    for j0 in range(0, n, plan.block_cols):
                        j1 = min(j0 + plan.block_cols, n)
                        R.addmm_(tile(b, i0, i1, j0, j1), Bb[j0:j1])
                    C -= (Ab[i0:i1].T @ R).double()  # block product in tile precision, sum in float64
                    self._report("product", k + 1, blocks)
            else:
                blocks = -(-n // plan.block_cols)
                for k, j0 in enumerate(range(0, n, plan.block_cols)):
                    j1 = min(j0 + plan.block_cols, n)
                    R = torch.zeros((j1 - j0, Ab.shape[1]), dtype=self.dtype, device=self.device)
                    for i0 in range(0, n, plan.block_rows):
                        i1 = min(i0 + plan.block_rows, n)
                        R.addmm_(tile(b, i0, i1, j0, j1).T, Ab[i0:i1])
                    C -= (R.T @ Bb[j0:j1]).double()
                    self._report("product", k + 1, blocks)
        return C / (2 * self.n)

    def _cross_constant(self, b: _Batch, A, B, plan, tile) -> torch.Tensor:
        """Aᵀ(−2n·S)B in float64 when s ≡ 0 (the first step of the fixed point).

        Every negative then has the weight α_i + β_j, so off the positives −2n·S is the
        rank-two matrix α1ᵀ + 1βᵀ; the positives, a block diagonal in group order, are
        corrected tile by tile.  O(n(a + b) + Σ|P(i)|·block) instead of O(n²).
        """
        alpha, beta = b.stats["constant"]
        a_alpha, a_one = _weighted_column_sums(A, alpha, plan.block_rows)
        b_beta, b_one = _weighted_column_sums(B, beta, plan.block_rows)
        out = torch.outer(a_alpha, b_one) + torch.outer(a_one, b_beta)
        for i0, i1, j0, j1, m, _ in self._positive_tiles(b, plan):
            corr = tile(b, i0, i1, j0, j1).double() - alpha[i0:i1, None] - beta[None, j0:j1]
            corr = corr.masked_fill_(~m, 0.0).to(self.dtype)
            if b.pos.one_to_one:  # a diagonal tile: scale rows instead of multiplying by it
                out += ((A[i0:i1] * corr.diagonal()[:, None]).T @ B[j0:j1]).double()
            else:
                out += (A[i0:i1].T @ (corr @ B[j0:j1])).double()
        self._report("product", 1, 1)
        return out

    def _tile_exp(self, b: _Batch, i0, i1, j0, j1) -> torch.Tensor:
        """A tile of −2n·S for ψ = exp."""
        st = b.stats
        if st["direct"]:
            e = torch.mm(b.zx[i0:i1], b.zy[j0:j1].T, out=self._buffer("e", i1 - i0, j1 - j0)).exp_()
            g = torch.mul(e, st["alpha"][i0:i1, None], out=self._buffer("g", i1 - i0, j1 - j0))
            g.addcmul_(e, st["beta"][None, j0:j1])
        else:
            t = b.zx[i0:i1] @ b.zy[j0:j1].T
            g = torch.exp(t + st["la_row"][i0:i1, None])
            g += t.add_(st["la_col"][None, j0:j1]).exp_()
        pos = b.pos
        if pos.tile_has_positives(i0, i1, j0, j1):
            # positives: (ν − σ_ik)/|P(i)| + (ν − σ̃_ik)/|P(k)| with σ the softmax weight of
            # the positive against the anchor's negatives, from float64 similarities
            nu = self.loss_fn.nu
            inv = 1.0 / pos.size.double()
            if pos.one_to_one:
                li, lj = pos.diagonal(i0, i1, j0, j1)
                r, c = li + i0, lj + j0
                t64 = (b.zx[r].double() * b.zy[c].double()).sum(1)
                sig_r = torch.exp(t64 - torch.logaddexp(st["lneg_row"][r], t64))
                sig_c = torch.exp(t64 - torch.logaddexp(st["lneg_col"][c], t64))
                g[li, lj] = -((nu - sig_r) + (nu - sig_c)).to(g.dtype)
            else:
                m = pos.mask(i0, i1, j0, j1)
                t64 = b.zx[i0:i1].double() @ b.zy[j0:j1].double().T
                sig_r = torch.exp(t64 - torch.logaddexp(st["lneg_row"][i0:i1, None], t64))
                sig_c = torch.exp(t64 - torch.logaddexp(st["lneg_col"][None, j0:j1], t64))
                q = (nu - sig_r) * inv[i0:i1, None] + (nu - sig_c) * inv[None, j0:j1]
                g = torch.where(m, (-q).to(g.dtype), g)
        return g

    def _tile_general(self, b: _Batch, i0, i1, j0, j1) -> torch.Tensor:
        """A tile of −2n·S = 2n·∂L/∂s for a general ψ."""
        st, pos, lf = b.stats, b.pos, self.loss_fn
        nu = lf.nu
        s = b.zx[i0:i1] @ b.zy[j0:j1].T
        g = torch.zeros_like(s)
        for q in range(int(pos.size[i0:i1].max())):
            g += st["c_row"][i0:i1, q, None] * lf.dpsi(s - nu * st["spos_row"][i0:i1, q, None])
        for q in range(int(pos.size[j0:j1].max())):
            g += st["c_col"][None, j0:j1, q] * lf.dpsi(s - nu * st["spos_col"][None, j0:j1, q])
        if pos.tile_has_positives(i0, i1, j0, j1):
            m = pos.mask(i0, i1, j0, j1)
            rows = torch.arange(i0, i1, device=self.device)[:, None]
            cols = torch.arange(j0, j1, device=self.device)[None, :]
            p = st["pos_row"].shape[1]
            slot_r = (cols - pos.start[i0:i1, None]).clamp(0, p - 1)
            slot_c = (rows - pos.start[None, j0:j1]).clamp(0, p - 1)
            val = st["pos_row"][i0:i1].gather(1, slot_r) + st["pos_col"][j0:j1].T.gather(0, slot_c)
            g = torch.where(m, val, g)
        return g

    # --------------------------------------------------------- public products
    def materialize(self) -> torch.Tensor:
        """C = Φ_Xᵀ S Φ_Y, float64 (m_x × m_y)."""
        return self.cross(self.phi_x, self.phi_y)

    def matmul(self, omega) -> torch.Tensor:
        """C Ω without forming C: Φ_Xᵀ S (Φ_Y Ω); Ω has shape (m_y, k)."""
        omega = torch.as_tensor(omega, device=self.device).to(self.dtype)
        return self.cross(self.phi_x, self.phi_y @ omega)

    def rmatmul(self, omega) -> torch.Tensor:
        """Cᵀ Ω without forming C: (Ωᵀ Φ_Xᵀ S Φ_Y)ᵀ; Ω has shape (m_x, k)."""
        omega = torch.as_tensor(omega, device=self.device).to(self.dtype)
        return self.cross(self.phi_x @ omega, self.phi_y).T


def _logsumexp(t: torch.Tensor, dim: int) -> torch.Tensor:
    """log Σ exp along ``dim``, −inf for all −inf slices.

    Written out because torch.logsumexp over dim 0 of a row-major tile is several
    times slower than the max/exp/sum sequence here (measured on CPU).
    """
    m = t.amax(dim, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return (torch.exp(t - m).sum(dim, keepdim=True).log() + m).squeeze(dim)


def _weighted_column_sums(A: torch.Tensor, w: torch.Tensor, block: int):
    """(Aᵀw, Aᵀ1) in float64, one row block at a time (no float64 copy of A)."""
    aw = torch.zeros(A.shape[1], dtype=torch.float64, device=A.device)
    a1 = torch.zeros_like(aw)
    for i0 in range(0, A.shape[0], block):
        blk = A[i0 : i0 + block].double()
        aw += blk.T @ w[i0 : i0 + block]
        a1 += blk.sum(0)  # float64: a plain float32 column sum over millions of rows loses digits
    return aw, a1


def _is_zero(t: torch.Tensor) -> bool:
    return not bool(t.any())


def _masked_sum(v: torch.Tensor, keep: torch.Tensor | None, dim: int) -> torch.Tensor:
    if keep is not None:
        v = v.masked_fill(~keep, 0.0)
    return v.sum(dim).double()


def weighted_cross_product(
    phi_x,
    phi_y,
    z_x,
    z_y,
    loss="clip",
    temperature: float = 0.07,
    nu: float = 1.0,
    negatives="full",
    groups=None,
    *,
    seed: int = 0,
    block_rows: int | None = None,
    block_cols: int | None = None,
    memory_budget: int | None = None,
    return_loss: bool = False,
    device=None,
    dtype=None,
    progress=None,
):
    """C = Φ_Xᵀ S(γ)(z_x z_yᵀ) Φ_Y, streamed in tiles; S(γ) is never formed.

    Parameters
    ----------
    phi_x : array_like, shape (n, m_x)
    phi_y : array_like, shape (n, m_y)
    z_x, z_y : array_like, shape (n, r)
        Embeddings; s = z_x z_yᵀ.
    loss, temperature, nu, negatives, groups, seed
        See :class:`CrossProductOperator`.
    block_rows, block_cols, memory_budget
        Tile shape or the budget the planner fits it into.
    return_loss : bool
        Also return L(s), which pass 1 yields at no extra cost.
    device, dtype
        Where and in which precision the tiles are computed.
    progress : callable, optional
        ``progress(stage, done, total)`` after each block of rows.

    Returns
    -------
    C : ndarray or torch.Tensor, shape (m_x, m_y), float64
        An ndarray when ``phi_x`` is not a tensor.
    loss : float
        Only with ``return_loss=True``.

    Notes
    -----
    Time O(n²(r + m_y) + n m_x m_y) for CLIP/InfoNCE with any positive structure
    (plus O(Σ|P(i)|)), O(n² p (r + m_y)) for a general ψ with at most p positives
    per anchor; memory O((tile + n)(r + m)).
    """
    op = CrossProductOperator(
        phi_x, phi_y, z_x, z_y, loss=loss, temperature=temperature, nu=nu, negatives=negatives,
        groups=groups, seed=seed, block_rows=block_rows, block_cols=block_cols,
        memory_budget=memory_budget, device=device, dtype=dtype, progress=progress,
    )
    C = op.materialize()
    if not isinstance(phi_x, torch.Tensor):
        C = C.cpu().numpy()
    return (C, op.loss) if return_loss else C
