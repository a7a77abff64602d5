"""Dense linear algebra of the step: the sign convention, the truncated SVD, and the
randomized truncated SVD (Halko, Martinsson & Tropp, SIAM Review 2011).

Range finder with oversampling and q steps of subspace iteration (their Alg. 4.4:
each product is re-orthonormalised by QR, since plain power iteration A(AᵀA)^q Ω
loses the smaller singular directions to round-off), then the SVD of the small
matrix B = QᵀA (Alg. 5.1).  Everything is float64.  The matrix is touched only
through A·Ω and Aᵀ·Ω, so an explicit tensor and a matrix-free operator (the streamed
C = Φ_Xᵀ S Φ_Y) run the same code.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .operators import MatrixOperator, is_operator

__all__ = ["column_signs", "fix_signs", "truncated_svd", "randomized_svd"]


def column_signs(U: torch.Tensor) -> torch.Tensor:
    """±1 per column of U making its entry of largest magnitude positive.

    LAPACK and cuSOLVER return singular and eigen vectors with different signs; fixing
    them makes factors, feature bases and so models the same on every device.
    """
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1.0
    return signs


def fix_signs(U: torch.Tensor, Vh: torch.Tensor):
    """The library's sign convention for a factorisation U diag(s) Vh: each left vector's
    entry of largest magnitude is positive (columns of U and rows of Vh flipped together)."""
    signs = column_signs(U)
    return U * signs, Vh * signs[:, None]


def truncated_svd(C: torch.Tensor, rank: int):
    """Top-``rank`` singular triplets of C in float64, with deterministic signs.

    Returns
    -------
    U : (m_x, r), s : (r,), Vh : (r, m_y)
    """
    C = C.to(torch.float64)
    U, s, Vh = torch.linalg.svd(C, full_matrices=False)
    U, Vh = fix_signs(U[:, :rank], Vh[:rank])
    return U, s[:rank], Vh


def randomized_svd(A, rank: int, oversampling: int = 10, n_power_iter: int = 2, seed: int = 0,
                   return_info: bool = False, n_test: int = 10):
    """Top-``rank`` singular triplets of A by a randomized range finder.

    Parameters
    ----------
    A : tensor, ndarray, or operator
        An (m × n) matrix, or an object with ``shape``, ``matmul(Ω)`` (A Ω, Ω of
        shape (n, k)) and ``rmatmul(Ω)`` (Aᵀ Ω, Ω of shape (m, k)).
    rank : int
        Number of triplets r.
    oversampling : int
        Extra columns p of the sketch (k = r + p, capped at min(m, n)).
    n_power_iter : int
        Subspace iterations q; each costs one A·Ω and one Aᵀ·Ω.
    seed : int
        Seed of the Gaussian test matrix.
    return_info : bool
        Also return a dict with the a-posteriori error estimate and the sketch's k
        triplets (below).
    n_test : int
        Gaussian test vectors of the error estimate; they ride along in the first
        product with A (``n_test`` extra columns), so the estimate costs no extra pass.

    Returns
    -------
    U : (m, r), s : (r,), Vh : (r, n)
        float64 tensors on the CPU whatever A's device (the k-column algebra of the
        range finder runs there; only the products with A run on its device), signs
        fixed so the largest-magnitude entry of each left singular vector is positive.
    info : dict, only with ``return_info``
        ``residual``: (Σ_i ‖(I − QQᵀ)Aω_i‖² / Σ_i ‖Aω_i‖²)^{1/2}, an estimate of the
        share ‖A − QQᵀA‖_F/‖A‖_F of A outside the sketched range (E‖Mω‖² = ‖M‖_F²);
        it includes the true tail σ_{k+1}, σ_{k+2}, … that no rank-k range can hold.
        ``residual_bound``: 10·√(2/π)·max_i ‖(I − QQᵀ)Aω_i‖, a bound on the range
        error ‖(I − QQᵀ)A‖₂ that holds with probability ≥ 1 − 10^(−n_test) (Halko et
        al. §4.3, eq. 4.3), loose by up to √(rank of the tail).  ``k``; ``s_k`` all k
        singular values of QᵀA, whose (r+1)-th gives the gap σ_r/σ_{r+1} when k > r;
        ``U_k``, ``Vh_k`` the sketch's k triplets (A ≈ U_k diag(s_k) Vh_k).

    Notes
    -----
    Cost: (q + 1) products with A and (q + 1) with Aᵀ, plus O((m + n)k²).
    """
    op = A if is_operator(A) else MatrixOperator(A)
    m, n = op.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n) = {min(m, n)}], got {rank}")
    if oversampling < 0 or n_power_iter < 0:
        raise ValueError("oversampling and n_power_iter must be >= 0")
    k = min(rank + oversampling, m, n)
    gen = torch.Generator().manual_seed(int(seed))
    omega = torch.randn((n, k), generator=gen, dtype=torch.float64)
    t = int(n_test) if return_info else 0
    if t:  # drawn after Ω from the same stream: Ω, and so the result, do not change
        omega = torch.cat([omega, torch.randn((n, t), generator=gen, dtype=torch.float64)], dim=1)
    Y = _f64(op.matmul(omega))
    Y, tests = Y[:, :k], Y[:, k:]
    Q = torch.linalg.qr(Y).Q
    for _ in range(n_power_iter):
        Z = torch.linalg.qr(_f64(op.rmatmul(Q))).Q
        Q = torch.linalg.qr(_f64(op.matmul(Z))).Q
    B = _f64(op.rmatmul(Q)).T  # k × n = Qᵀ A
    Ub, s, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q.to(Ub.device) @ Ub
    Ur, Vhr = fix_signs(U[:, :rank], Vh[:rank])
    if not return_info:
        return Ur, s[:rank], Vhr
    info = {"k": k, "s_k": s, "U_k": U, "Vh_k": Vh, "residual": None, "residual_bound": None}
    if t:
        left = torch.linalg.norm(tests - Q @ (Q.T @ tests), dim=0)
        whole = float(torch.linalg.norm(tests))
        # E‖Mω‖² = ‖M‖_F² for Gaussian ω: the ratio estimates ‖(I − QQᵀ)A‖_F / ‖A‖_F
        info["residual"] = float(torch.linalg.norm(left)) / whole if whole > 0 else 0.0
        info["residual_bound"] = float(10.0 * math.sqrt(2.0 / math.pi) * left.max())
    return Ur, s[:rank], Vhr, info


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t).to(device="cpu", dtype=torch.float64)
