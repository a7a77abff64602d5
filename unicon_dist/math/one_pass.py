"""A one-to-one CLIP batch in one pass: its tile of e^{s/τ} formed once and kept.

The tiled passes form every tile of t = s/τ and its exponential twice, once for the
statistics (pass 1) and once for the product (pass 2), so that memory stays O(tile).  A
batch of L pairs whose L × L tile fits in memory needs neither twice: E = e^{t} is formed
row block by row block (each block while it is in cache, for its row and column sums),
stored, and read back for pass 2 once the weights a_i = 1/(N_i + e^{t_ii}) and
ã_j = 1/(Ñ_j + e^{t_jj}) are known.  The formulas are those of :mod:`.weights` for the
direct regime (no max subtraction; :func:`~unicon_dist.math.weights.fits_direct`):
−2n·S_ij = e^{t_ij}(a_i + ã_j) off the diagonal and (σ_i − ν) + (σ̃_i − ν) on it, σ from
float64 similarities.  Per entry this saves one GEMM of width r and one exp against the
two passes; the product with Φ_Y, the rest of the work, is unchanged.
"""

from __future__ import annotations

import torch

from .weights import exp_scores

__all__ = ["one_pass_bytes", "clip_one_pass_product"]


def one_pass_bytes(L: int, block_rows: int, itemsize: int) -> int:
    """Bytes of the stored tile and the pass-2 block buffer for a batch of L pairs."""
    return itemsize * L * (L + block_rows)


def clip_one_pass_product(zx: torch.Tensor, zy: torch.Tensor, A: torch.Tensor, B: torch.Tensor, nu: float,
                          log_eps: float, block_rows: int = 512, out_e: torch.Tensor | None = None,
                          out_g: torch.Tensor | None = None) -> dict:
    """Σ Aᵀ(−2n·S)B of one batch (one positive per row, ψ = exp, direct regime) and its statistics.

    Parameters
    ----------
    zx : torch.Tensor, shape (L, r)
        Embeddings of x, pre-scaled by 1/τ, such that |t_ij| stays within
        :func:`~unicon_dist.math.weights.fits_direct`.
    zy : torch.Tensor, shape (L, r)
    A : torch.Tensor, shape (L, a)
    B : torch.Tensor, shape (L, b)
    nu : float
    log_eps : float
        log ε of the loss.
    block_rows : int
        Rows of E formed (and weighted) at a time.
    out_e, out_g : torch.Tensor, optional
        Scratch of shapes (L, L) and (min(block_rows, L), L) for E and a weighted block
        (reused across batches, they save the page faults of fresh allocations).

    Returns
    -------
    dict
        ``product`` (a × b, float64); ``lneg_row``, ``lneg_col``: log N_i, log Ñ_j (float64);
        ``ld_row``, ``ld_col``: log(N_i + e^{t_ii}), log(Ñ_i + e^{t_ii}); ``loss_sum``: the
        batch's loss sum / τ.
    """
    L = zx.shape[0]
    E = torch.empty((L, L), dtype=zx.dtype, device=zx.device) if out_e is None else out_e
    f64 = dict(dtype=torch.float64, device=zx.device)
    row, col = torch.zeros((L,), **f64), torch.zeros((L,), **f64)
    for i0 in range(0, L, block_rows):
        i1 = min(i0 + block_rows, L)
        e = exp_scores(zx[i0:i1], zy, out=E[i0:i1])
        e[:, i0:i1].diagonal().zero_()  # the positives are not negatives
        row[i0:i1] = e.sum(1).double()
        col += e.sum(0).double()
    t = (zx.double() * zy.double()).sum(1)
    lneg_row, lneg_col = torch.log(row), torch.log(col)
    ld_row, ld_col = torch.logaddexp(lneg_row, t), torch.logaddexp(lneg_col, t)
    alpha, beta = torch.exp(-ld_row).to(zx.dtype), torch.exp(-ld_col).to(zx.dtype)
    diag = (torch.exp(t - ld_row) - nu + torch.exp(t - ld_col) - nu).to(zx.dtype)
    product = torch.zeros((A.shape[1], B.shape[1]), **f64)
    buf = torch.empty((min(block_rows, L), L), dtype=zx.dtype, device=zx.device) if out_g is None else out_g
    # each block is multiplied by the narrower operand, as in the tiled pass 2
    by_rows = B.shape[1] <= A.shape[1]
    acc = None if by_rows else torch.zeros((L, A.shape[1]), dtype=zx.dtype, device=zx.device)
    for i0 in range(0, L, block_rows):
        i1 = min(i0 + block_rows, L)
        e, g = E[i0:i1], buf[: i1 - i0]
        torch.mul(e, alpha[i0:i1, None], out=g).addcmul_(e, beta[None, :])
        g[:, i0:i1].diagonal().copy_(diag[i0:i1])
        if by_rows:
            product += (A[i0:i1].T @ (g @ B)).double()
        else:
            acc.addmm_(g.T, A[i0:i1])
    if not by_rows:
        for j0 in range(0, L, block_rows):
            product += (acc[j0 : j0 + block_rows].T @ B[j0 : j0 + block_rows]).double()
    loss_sum = (2.0 * (log_eps - nu * t) + ld_row + ld_col).sum()
    return {"product": product, "lneg_row": lneg_row, "lneg_col": lneg_col, "ld_row": ld_row, "ld_col": ld_col,
            "loss_sum": loss_sum}
