"""The closed-form step W* = [C]_r / ρ and its factorisations (DESIGN §2).

Maximising tr(Wᵀ C) − (ρ/2)‖W‖²_F over rank(W) ≤ r is solved by the rank-r truncated
SVD of C (Eckart–Young–Mirsky): W* = U_r Σ_r V_rᵀ / ρ.  All work here is in float64.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["truncated_svd", "closed_form_step", "damped_target", "tangent_projection", "FACTORIZATIONS"]

FACTORIZATIONS = ("orthonormal", "sqrt")


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor):
    """Deterministic signs: the entry of largest magnitude in each left vector is positive."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1.0
    return U * signs, Vh * signs[:, None]


def truncated_svd(C: torch.Tensor, rank: int):
    """Top-``rank`` singular triplets of C in float64, with deterministic signs.

    Returns
    -------
    U : (m_x, r), s : (r,), Vh : (r, m_y)
    """
    C = C.to(torch.float64)
    U, s, Vh = torch.linalg.svd(C, full_matrices=False)
    U, Vh = _fix_signs(U[:, :rank], Vh[:rank])
    return U, s[:rank], Vh


class _Shifted:
    """C + ridge·I (ones on the leading diagonal) as an operator, for the matrix-free SVD."""

    def __init__(self, op, ridge: float):
        self.op, self.ridge, self.shape = op, ridge, tuple(op.shape)

    def _eye(self, omega, rows):
        out = torch.zeros((rows, omega.shape[1]), dtype=torch.float64)
        k = min(self.shape)
        out[:k] = self.ridge * omega[:k].to(torch.float64).cpu()
        return out

    def matmul(self, omega):
        return self.op.matmul(omega).to(torch.float64).cpu() + self._eye(omega, self.shape[0])

    def rmatmul(self, omega):
        return self.op.rmatmul(omega).to(torch.float64).cpu() + self._eye(omega, self.shape[1])


class _Mixed:
    """η·C + β·W_prev as an operator over a matrix-free C (W_prev explicit, m_x × m_y)."""

    def __init__(self, op, W_prev: torch.Tensor, eta: float, beta: float):
        self.op, self.W, self.eta, self.beta, self.shape = op, W_prev.to(torch.float64).cpu(), eta, beta, tuple(op.shape)

    def matmul(self, omega):
        omega64 = omega.to(torch.float64).cpu()
        return self.eta * self.op.matmul(omega).to(torch.float64).cpu() + self.beta * (self.W @ omega64)

    def rmatmul(self, omega):
        omega64 = omega.to(torch.float64).cpu()
        return self.eta * self.op.rmatmul(omega).to(torch.float64).cpu() + self.beta * (self.W.T @ omega64)


def damped_target(C, W_prev: torch.Tensor, eta: float, scale: float):
    """M = η·C + (1 − η)·scale·W_prev: the matrix whose rank-r SVD is the damped step.

    With ``scale = ρ`` and the "sqrt" factorization, [M]_r/ρ is the projected gradient
    step of length η/ρ on L + (ρ/2)‖W‖² (the plain step is length 1/ρ, η = 1), which
    converges when η/ρ is small against the curvature of L.  For the "orthonormal"
    factorization W_prev has unit singular values and only M's singular subspaces
    matter, so ``scale`` (the mean of C's top-r singular values) puts W_prev on C's
    scale.  That step is the generalized power method (Journée, Nesterov, Richtárik &
    Sepulchre, JMLR 2010) on −L + (α/2)‖W‖², α = (1 − η)·scale/η: the added term is
    constant where W's singular values are all 1, and for α above the curvature of L
    it makes the objective convex, where each power step cannot decrease it.  A fixed
    point of the plain map (W_prev = the factors of C) is one of the damped map.

    ``C`` is a tensor or an operator with ``shape``, ``matmul`` and ``rmatmul``.
    """
    if not 0 < eta <= 1:
        raise ValueError(f"damping must be in (0, 1], got {eta!r}")
    beta = (1.0 - eta) * float(scale)
    if hasattr(C, "matmul") and hasattr(C, "rmatmul") and not isinstance(C, torch.Tensor):
        return _Mixed(C, W_prev, eta, beta)
    C = torch.as_tensor(C).to(torch.float64)
    return eta * C + beta * W_prev.to(device=C.device, dtype=torch.float64)


def closed_form_step(C, rank: int, rho: float = 1.0, ridge: float = 0.0, factorization: str = "orthonormal",
                     svd: str = "exact", oversampling: int = 10, n_power_iter: int = 2, seed: int = 0,
                     return_singular_values: bool = False):
    """Factors (F1, F2) of the maximiser of tr(Wᵀ C) − (ρ/2)‖W‖² over rank(W) ≤ r.

    Parameters
    ----------
    C : array_like, torch.Tensor, or operator, shape (m_x, m_y)
        The weighted cross product Φ_Xᵀ S Φ_Y, explicit or as an operator with
        ``shape``, ``matmul`` and ``rmatmul`` (then ``svd`` must be "randomized").
    rank : int
        r ≤ min(m_x, m_y).
    rho : float
        Weight of the Frobenius regulariser, > 0.
    ridge : float
        Tikhonov term added to the leading diagonal of C before the SVD; it pulls the
        map toward the identity when both inputs share one space.
    factorization : {"orthonormal", "sqrt"}
        "sqrt": F1 = (Σ_r/ρ)^{1/2} U_rᵀ and F2 = (Σ_r/ρ)^{1/2} V_rᵀ, so F1ᵀF2 = W*.
        "orthonormal": F1 = U_rᵀ, F2 = V_rᵀ (the paper's choice on real data; the
        singular values then only select the subspace).
    svd : {"exact", "randomized"}
        LAPACK SVD of the explicit C, or :func:`unicon_dist.randomized.randomized_svd`
        with ``oversampling``, ``n_power_iter`` and ``seed``.

    return_singular_values : bool
        Also return the top-r singular values of C (+ ridge).

    Returns
    -------
    F1 : (r, m_x), F2 : (r, m_y)
        ndarrays for ndarray input, float64 tensors otherwise.
    s : (r,), only with ``return_singular_values``
    """
    from .randomized import randomized_svd

    is_operator = hasattr(C, "matmul") and hasattr(C, "rmatmul") and not isinstance(C, torch.Tensor)
    was_numpy = not is_operator and not isinstance(C, torch.Tensor)
    if is_operator:
        shape = tuple(C.shape)
    else:
        C = torch.as_tensor(np.asarray(C) if was_numpy else C).to(torch.float64)
        if C.ndim != 2:
            raise ValueError(f"C must be 2-D, got shape {tuple(C.shape)}")
        shape = tuple(C.shape)
    m = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1 or rank > m:
        raise ValueError(f"rank must be an integer in [1, min(m_x, m_y) = {m}], got {rank!r}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    if factorization not in FACTORIZATIONS:
        raise ValueError(f"factorization must be one of {FACTORIZATIONS}, got {factorization!r}")
    if svd not in ("exact", "randomized"):
        raise ValueError(f"svd must be 'exact' or 'randomized', got {svd!r}")
    if is_operator and svd != "randomized":
        raise ValueError("a matrix-free C needs svd='randomized'")
    if ridge:
        if is_operator:
            C = _Shifted(C, ridge)
        else:
            C = C.clone()
            C.diagonal().add_(ridge)
    if svd == "exact":
        U, s, Vh = truncated_svd(C, int(rank))
    else:
        U, s, Vh = randomized_svd(C, int(rank), oversampling, n_power_iter, seed)
    if factorization == "sqrt":
        root = torch.sqrt(s / rho)[:, None]
        F1, F2 = root * U.T, root * Vh
    else:
        F1, F2 = U.T.contiguous(), Vh.contiguous()
    if was_numpy:
        F1, F2, s = F1.cpu().numpy(), F2.cpu().numpy(), s.cpu().numpy()
    return (F1, F2, s) if return_singular_values else (F1, F2)


def tangent_projection(W, Z, rank: int):
    """Project Z onto the tangent space of the rank-r manifold at W.

    P_T(Z) = U Uᵀ Z + Z V Vᵀ − U Uᵀ Z V Vᵀ with U, V the top-r singular vectors of W.
    At a stationary point of L + R the tangent part of its gradient ρW − C vanishes.
    """
    W = torch.as_tensor(np.asarray(W) if not isinstance(W, torch.Tensor) else W).double()
    Z = torch.as_tensor(np.asarray(Z) if not isinstance(Z, torch.Tensor) else Z).double()
    U, _, Vh = truncated_svd(W, rank)
    PU = U @ (U.T @ Z)
    return PU + (Z @ Vh.T) @ Vh - (PU @ Vh.T) @ Vh
