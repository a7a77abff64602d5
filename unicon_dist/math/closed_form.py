"""The closed-form step W* = [C]_r / ρ and its factorisations (DESIGN §2).

Maximising tr(Wᵀ C) − (ρ/2)‖W‖²_F over rank(W) ≤ r is solved by the rank-r truncated
SVD of C (Eckart–Young–Mirsky): W* = U_r Σ_r V_rᵀ / ρ.  All work here is in float64.
"""

from __future__ import annotations

import numpy as np
import torch

from .linalg import fix_signs, randomized_svd, truncated_svd
from .operators import Mixed, Shifted, is_operator

__all__ = ["truncated_svd", "closed_form_step", "damped_target", "tangent_projection", "spectral_gap",
           "fixed_point_residual", "map_residual", "FACTORIZATIONS"]

FACTORIZATIONS = ("orthonormal", "sqrt")


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
        return Mixed(C, W_prev, eta, beta)
    C = torch.as_tensor(C).to(torch.float64)
    return eta * C + beta * W_prev.to(device=C.device, dtype=torch.float64)


def closed_form_step(C, rank: int, rho: float = 1.0, ridge: float = 0.0, factorization: str = "orthonormal",
                     svd: str = "exact", oversampling: int = 10, n_power_iter: int = 2, seed: int = 0,
                     return_singular_values: bool = False, return_info: bool = False):
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
        LAPACK SVD of the explicit C, or :func:`unicon_dist.math.linalg.randomized_svd`
        with ``oversampling``, ``n_power_iter`` and ``seed``.

    return_singular_values : bool
        Also return the top-r singular values of C (+ ridge).
    return_info : bool
        Also return a dict (last) describing the SVD: ``singular_values`` (top r),
        ``spectral_gap`` σ_r/σ_{r+1} (inf when σ_{r+1} = 0; None when the randomized
        sketch has no (r+1)-th value, i.e. no oversampling), ``residual`` the randomized
        range finder's relative residual estimate ‖C − QQᵀC‖_F/‖C‖_F (see
        :func:`~unicon_dist.math.linalg.randomized_svd`; None for the exact SVD) and
        ``triplets`` (U, s, Vh): every triplet computed (all of them for the exact SVD,
        the sketch's k for the randomized one), for diagnostics of C beyond rank r.

    Returns
    -------
    F1 : (r, m_x), F2 : (r, m_y)
        ndarrays for ndarray input, float64 tensors otherwise.
    s : (r,), only with ``return_singular_values``
    info : dict, only with ``return_info``
    """
    matrix_free = is_operator(C)
    was_numpy = not matrix_free and not isinstance(C, torch.Tensor)
    if matrix_free:
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
    if matrix_free and svd != "randomized":
        raise ValueError("a matrix-free C needs svd='randomized'")
    if ridge:
        if matrix_free:
            C = Shifted(C, ridge)
        else:
            C = C.clone()
            C.diagonal().add_(ridge)
    r = int(rank)
    if svd == "exact":
        U, s, Vh = torch.linalg.svd(C, full_matrices=False)
        triplets, residual = (U, s, Vh), None
        U, Vh = fix_signs(U[:, :r], Vh[:r])
        s_all, s = s, s[:r]
    else:
        U, s, Vh, sketch = randomized_svd(C, r, oversampling, n_power_iter, seed, return_info=True)
        s_all, triplets = sketch["s_k"], (sketch["U_k"], sketch["s_k"], sketch["Vh_k"])
        residual = sketch["residual"]
    info = {"singular_values": s, "residual": residual, "triplets": triplets,
            "spectral_gap": spectral_gap(s_all, r)}
    if factorization == "sqrt":
        root = torch.sqrt(s / rho)[:, None]
        F1, F2 = root * U.T, root * Vh
    else:
        F1, F2 = U.T.contiguous(), Vh.contiguous()
    if was_numpy:
        F1, F2, s = F1.cpu().numpy(), F2.cpu().numpy(), s.cpu().numpy()
    out = (F1, F2, s) if return_singular_values else (F1, F2)
    return (*out, info) if return_info else out


def spectral_gap(s, rank: int):
    """σ_r/σ_{r+1} of descending singular values ``s`` (inf when σ_{r+1} = 0, None without
    an (r+1)-th value).  Near 1 the top-r subspace, and so the step, is ill-determined:
    its perturbation bound (Wedin, 1972) scales as 1/(σ_r − σ_{r+1})."""
    s = torch.as_tensor(s, dtype=torch.float64)
    if s.numel() <= rank:
        return None
    nxt = float(s[rank])
    return float(s[rank - 1]) / nxt if nxt > 0 else float("inf")


def fixed_point_residual(C, F1, F2, rho: float, factorization: str = "sqrt", similarity: str = "dot") -> float:
    """The certificate of a fixed point of W ↦ [C(W)]_r/ρ at W = F1ᵀF2 (DESIGN §2).

    With P_T the projection onto the tangent space of the rank-r manifold at W
    (:func:`tangent_projection`), a fixed point has P_T(C) = ρW: the tangent part of the
    gradient ρW − C of R − tr(WᵀC) vanishes, a stationary point of L + R for "dot".

    - "sqrt", "dot": ‖P_T(ρW − C)‖_F / ‖P_T(C)‖_F.
    - "sqrt", "cosine": ‖P_T(C)/‖P_T(C)‖_F − W/‖W‖_F‖_F.  L does not see the scale of W
      and C(cW) = C(W)/c, so only directions can be compared; this is zero iff
      P_T(C) = λW with λ > 0, and λ = ρ at the scale c² = λ/ρ that the iteration sets.
      It lies in [0, 2]; above √2 the tangent part of C points against W (the loss
      would rather soften the similarities, and no scale makes W a fixed point).
    - "orthonormal" (either similarity): W = UVᵀ has unit singular values, so its
      fixed point is W = polar([C]_r): C maps W's row space into its column space and
      back ((I − UUᵀ)CV = 0, UᵀC(I − VVᵀ) = 0) and the core K = UᵀCV is symmetric
      positive definite.  The residual is √(‖(I − UUᵀ)CV‖² + ‖UᵀC(I − VVᵀ)‖² +
      ‖skew K‖² + ‖min(eig sym K, 0)‖²) / ‖P_T(C)‖_F, scale-invariant in C.

    Orthonormal bases of W's column and row spaces come from the factors (QR of F1ᵀ,
    F2ᵀ), not from an SVD of W.  C may include the ``ridge`` of the step (C + ridge·I).
    """
    C = torch.as_tensor(np.asarray(C) if not isinstance(C, torch.Tensor) else C).double()
    F1 = torch.as_tensor(F1).to(device=C.device, dtype=torch.float64)
    F2 = torch.as_tensor(F2).to(device=C.device, dtype=torch.float64)
    Qx, Qy = torch.linalg.qr(F1.T).Q, torch.linalg.qr(F2.T).Q
    CQy, QxC = C @ Qy, Qx.T @ C
    core = Qx.T @ CQy
    # P_T(Z) = Q_xQ_xᵀZ + ZQ_yQ_yᵀ − Q_xQ_xᵀZQ_yQ_yᵀ, in pieces that never form m×m products twice
    pt_c = Qx @ QxC + (CQy - Qx @ core) @ Qy.T
    denom = float(torch.linalg.norm(pt_c))
    if not denom > 0:
        return float("nan")
    if factorization == "orthonormal":
        # in the bases of F1ᵀ = U and F2ᵀ = V themselves the core is UᵀCV (QR only re-signs them)
        U, V = F1.T, F2.T
        K = U.T @ C @ V
        sym = 0.5 * (K + K.T)
        negative = torch.clamp(torch.linalg.eigvalsh(sym), max=0.0)
        off = torch.linalg.norm(pt_c - Qx @ core @ Qy.T) ** 2
        skew = torch.linalg.norm(0.5 * (K - K.T)) ** 2
        return float(torch.sqrt(off + skew + torch.sum(negative ** 2))) / denom
    W = F1.T @ F2
    if similarity == "cosine":
        return float(torch.linalg.norm(pt_c / denom - W / torch.linalg.norm(W)))
    return float(torch.linalg.norm(pt_c - float(rho) * W)) / denom  # W lies in its own tangent space


def map_residual(C, F1, F2, rho: float, factorization: str = "sqrt", similarity: str = "dot", *,
                 triplets=None) -> float:
    """‖N(T(W)) − N(W)‖_F / ‖N(T(W))‖_F: how far W = F1ᵀF2 is from a fixed point of the plain map.

    T(W) is the undamped step at W, built from the leading r singular triplets of C
    ([C]_r/ρ for "sqrt", their polar factor U_rV_rᵀ for "orthonormal"); N divides by the
    Frobenius norm where L is blind to the scale of W ("sqrt" with cosine similarity).
    Zero at a fixed point of T.  :func:`fixed_point_residual` vanishes at every stationary
    point (P_T(C) = ρW), which the damped map converges to; this one vanishes only where
    W's subspaces are also C's *leading* ones (in SCF terms, the aufbau solution).  It needs
    the full SVD of C (exact C only); ``triplets`` = (U, s, Vh) of C, descending, when the
    caller has it already.
    """
    C = torch.as_tensor(np.asarray(C) if not isinstance(C, torch.Tensor) else C).double()
    F1 = torch.as_tensor(F1).to(device=C.device, dtype=torch.float64)
    F2 = torch.as_tensor(F2).to(device=C.device, dtype=torch.float64)
    r = F1.shape[0]
    if triplets is None:
        U, s, Vh = truncated_svd(C, r)
    else:
        U, s, Vh = (t.to(device=C.device, dtype=torch.float64) for t in triplets)
        U, s, Vh = U[:, :r], s[:r], Vh[:r]
    T = (U * (s if factorization == "sqrt" else torch.ones_like(s))) @ Vh
    W = F1.T @ F2
    if factorization == "sqrt" and similarity == "cosine":
        T, W = T / torch.linalg.norm(T), W / torch.linalg.norm(W)
    elif factorization == "sqrt":
        T = T / float(rho)
    return float(torch.linalg.norm(T - W) / torch.linalg.norm(T))


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
