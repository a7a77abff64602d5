"""C for one-to-one CLIP through fused softmax-attention kernels.

With one positive per row (pairs i ↔ i) and ψ = exp, the tile weights of
:mod:`unicon_dist.math.weights` are softmaxes: with t = s/τ, P = softmax over the rows of t
and P̄ = softmax over its columns, −2n·S = P + P̄ − 2νI (the positive sits in both
denominators; ν only weighs its −νt term).  So for tall operands A (n × a), B (n × b)

    −2n · Aᵀ S B = Aᵀ (P B − νB) + (P̄ᵀ A − νA)ᵀ B,

and P B = softmax(z_x z_yᵀ/τ) B and P̄ᵀ A = softmax(z_y z_xᵀ/τ) A are two calls of a fused
attention kernel (queries z_x/τ, keys z_y, values B; then queries z_y, keys z_x/τ, values A).
Such kernels normalise online (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022),
so no statistics pass is needed, and they return each query's log-sum-exp, log Σ_j e^{t_ij},
which is what the loss needs: L·2n/τ = Σ_i [2(log ε − ν t_ii) + lse_row_i + lse_col_i].
Batched negatives are the kernel's head dimension.

Accuracy.  Each output row is a convex combination, so the kernel's rounding is about
u·max|b| per row, against u·Σ_j |G_ij||b_j| for the tiled path's G = P + P̄ − 2νI formed
entry by entry.  The two agree unless the positives dominate their rows (P_ii → 1, a loss
near its floor), where P B − νB cancels; :func:`diagonal_amplification` measures that ratio
from the kernel's own log-sum-exps so a caller can fall back to the tiled path.

The kernels are torch's: ``_scaled_dot_product_flash_attention_for_cpu`` (float32 and
float64) on the CPU, ``_scaled_dot_product_efficient_attention`` (float32) on CUDA, the
ATen ops behind ``scaled_dot_product_attention`` that also return the log-sum-exp.  Both
need equal widths of queries and values, so the narrower side is zero-padded (zero columns
change neither the scores nor the kept outputs).  :func:`kernel_available` checks once per
device type and dtype that the op exists and agrees with a dense softmax.
"""

from __future__ import annotations

import math

import torch

__all__ = ["kernel_available", "attention_lse", "clip_attention_product", "diagonal_amplification",
           "AMPLIFICATION_MAX"]

#: largest :func:`diagonal_amplification` at which the fused product is used: its rounding is
#: then within this factor of the tiled path's (both are float32 round-off, ~1e-7 relative)
AMPLIFICATION_MAX = 8.0

_PROBED: dict[tuple[str, torch.dtype], bool] = {}


def _raw_kernel(q, k, v):
    """(out, lse) of softmax(q kᵀ) v for 4-D (batch, heads, L, E) inputs of equal width E."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=1.0)
        return out, lse
    if q.device.type == "cuda" and q.dtype == torch.float32:
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                               scale=1.0)
        return out, lse[..., : q.shape[-2]]  # the op pads its log-sum-exp to a multiple of 32 rows
    raise RuntimeError(f"no fused attention kernel with log-sum-exp for {q.dtype} on {q.device.type}")


def kernel_available(device, dtype: torch.dtype) -> bool:
    """Whether a fused kernel with log-sum-exp runs on ``device`` in ``dtype`` and agrees with
    a dense float64 softmax on a small problem (probed once per device type and dtype)."""
    device = torch.device(device)
    key = (device.type, dtype)
    if key not in _PROBED:
        ok = False
        try:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 2, 70, 8, generator=g, dtype=torch.float64) for _ in range(3))
            out, lse = _raw_kernel(*(x.to(device=device, dtype=dtype) for x in (q, k, v)))
            s = q @ k.transpose(-1, -2)
            ref, ref_lse = torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)
            tol = 100 * torch.finfo(dtype).eps
            ok = bool(torch.allclose(out.double().cpu(), ref, atol=tol, rtol=tol)
                      and torch.allclose(lse.double().cpu(), ref_lse, atol=tol, rtol=tol))
        except (RuntimeError, AttributeError, NotImplementedError):
            ok = False
        _PROBED[key] = ok
    return _PROBED[key]


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ) v and log Σ_j e^{q_i·k_j}, per batch.

    Parameters
    ----------
    q, k : torch.Tensor, shape (h, L, r)
        Queries and keys of h independent problems (the scale is 1: fold 1/τ into q).
    v : torch.Tensor, shape (h, L, w)

    Returns
    -------
    out : torch.Tensor, shape (h, L, w)
    lse : torch.Tensor, shape (h, L), float32 or float64 as the kernel keeps it
    """
    width = max(q.shape[-1], v.shape[-1])
    out, lse = _raw_kernel(_padded(q, width)[None], _padded(k, width)[None], _padded(v, width)[None])
    return out[0, ..., : v.shape[-1]], lse[0]


def _blocked_gram(A: torch.Tensor, B: torch.Tensor, block: int) -> torch.Tensor:
    """Σ_h A_hᵀ B_h in float64, formed in the operands' precision over ``block`` rows at a time
    (as the tiled path sums its row blocks: float32 partial sums stay short)."""
    out = torch.zeros((A.shape[-1], B.shape[-1]), dtype=torch.float64, device=A.device)
    A2, B2 = A.reshape(-1, A.shape[-1]), B.reshape(-1, B.shape[-1])
    for i0 in range(0, A2.shape[0], block):
        out += (A2[i0 : i0 + block].T @ B2[i0 : i0 + block]).double()
    return out


def clip_attention_product(zx: torch.Tensor, zy: torch.Tensor, A: torch.Tensor, B: torch.Tensor, nu: float,
                           block: int = 4096) -> dict:
    """−2n · Aᵀ S B for one-to-one CLIP over h batches of L pairs, with its loss terms.

    Parameters
    ----------
    zx : torch.Tensor, shape (h, L, r)
        Embeddings of x, pre-scaled by 1/τ (so t = zx zyᵀ).
    zy : torch.Tensor, shape (h, L, r)
    A : torch.Tensor, shape (h, L, a)
    B : torch.Tensor, shape (h, L, b)
        The operands (e.g. Φ_X and Φ_Y, or Φ_Y Ω), row i of batch h paired with row i.
    nu : float
        Weight of the positive's similarity in the loss.
    block : int
        Rows per float64 partial sum of the final products.

    Returns
    -------
    dict
        ``product``: Σ_h A_hᵀ (P_h + P̄_h − 2νI) B_h, float64 (a × b); ``lse_row``,
        ``lse_col``: log Σ_j e^{t_ij} and log Σ_i e^{t_ij} (h × L, float64); ``t_diag``:
        t_ii in float64 (h × L).
    """
    o_row, lse_row = attention_lse(zx, zy, B)          # P B
    o_col, lse_col = attention_lse(zy, zx, A)          # P̄ᵀ A
    if nu != 0.0:
        o_row = o_row.sub_(B, alpha=nu)
        o_col = o_col.sub_(A, alpha=nu)
    product = _blocked_gram(A, o_row, block) + _blocked_gram(o_col, B, block)
    t_diag = (zx.double() * zy.double()).sum(-1)
    return {"product": product, "lse_row": lse_row.double(), "lse_col": lse_col.double(), "t_diag": t_diag}


def diagonal_amplification(lse_row: torch.Tensor, lse_col: torch.Tensor, t_diag: torch.Tensor, nu: float) -> float:
    """How much larger the fused product's rounding bound is than the tiled path's.

    Per row, the fused outputs carry about u·(Σ_j P_ij + ν)|b| + u·(Σ_i P̄_ij + ν)|a|
    (both sums are 1), the tiled tile about u·Σ_j |G_ij||b| with Σ_j |G_ij| averaging
    (1 − P_ii) + (1 − P̄_ii) + |2ν − P_ii − P̄_ii| over the rows; the ratio of the means is
    returned (1 for weak positives; unbounded as P_ii → 1).
    """
    p = torch.exp(t_diag - lse_row)
    pc = torch.exp(t_diag - lse_col)
    tiled = ((1.0 - p) + (1.0 - pc) + (2.0 * nu - p - pc).abs()).mean()
    fused = 2.0 + 2.0 * abs(nu)
    return float(fused / tiled) if float(tiled) > 0.0 else math.inf
