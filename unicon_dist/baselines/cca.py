"""Regularised canonical correlation analysis (CCA), the classical closed-form alignment.

CCA finds directions a (for x) and b (for y) maximising the correlation of aᵀx and bᵀy
(Hotelling, 1936).  With whitened views the problem is one SVD: the singular values of
K_x^{-1/2} Σ_xy K_y^{-1/2} are the canonical correlations and its singular vectors, mapped
back through K^{-1/2}, the canonical directions.  A ridge on the covariances (canonical
ridge; Vinod, 1976) keeps the whitening defined when d ≥ n or the features are collinear.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..math.linalg import truncated_svd
from ._common import BaselineEstimator, check_bool, check_positive, check_rank, check_views

__all__ = ["RegularizedCCA"]


class RegularizedCCA(BaselineEstimator):
    """Ridge-regularised CCA with cosine retrieval on the top canonical directions.

    Each view is centred with its training mean and whitened with its regularised
    covariance

        K_x = Σ_xx + λ · (tr(Σ_xx) / d_x) · I,   Σ_xx = X_cᵀ X_c / n,

    so ``ridge = λ`` is relative to the mean eigenvalue of Σ_xx (λ = 1e-3 adds 0.1 % of
    the average variance to every direction; the result does not depend on the scale of
    the features).  K_x^{-1/2} comes from a float64 eigendecomposition.  The rank-r SVD

        K_x^{-1/2} Σ_xy K_y^{-1/2} = U diag(ρ) Vᵀ

    gives the canonical correlations ρ_1 ≥ … ≥ ρ_r and directions W_x = K_x^{-1/2} U_r,
    W_y = K_y^{-1/2} V_r (so W_xᵀ K_x W_x = I).  Equivalently ρ and (W_x, W_y) solve the
    generalised eigenproblem [[0, Σ_xy], [Σ_yx, 0]] v = ρ [[K_x, 0], [0, K_y]] v.

    Parameters
    ----------
    rank : int
        Number r of canonical pairs kept (≤ min(d_x, d_y)).
    ridge : float
        λ > 0, the ridge relative to the mean eigenvalue of each covariance (see above).
    center : bool
        Subtract the training means before computing the covariances and before encoding.
        Without centring Σ are the raw second moments.

    Attributes
    ----------
    Wx_ : ndarray of shape (d_x, rank)
        Canonical directions of the first view (float64).
    Wy_ : ndarray of shape (d_y, rank)
        Canonical directions of the second view (float64).
    correlations_ : ndarray of shape (rank,)
        The top-r (regularised) canonical correlations, descending, in [0, 1).
    mean_x_ : ndarray of shape (d_x,)
    mean_y_ : ndarray of shape (d_y,)
        Training means (zeros when ``center=False``).
    shift_x_, shift_y_ : float
        The absolute ridges λ · tr(Σ)/d added to each covariance's diagonal.
    n_inputs_x_, n_inputs_y_ : int
        Input dimensions d_x, d_y.
    fit_seconds_ : float
        Wall-clock seconds of ``fit``.

    Notes
    -----
    The computation runs in float64 on the device of the inputs (a torch tensor on a
    GPU stays there); numpy input is computed on the CPU.  Memory is O(n·d + d²) and time
    O(n d² + d³) with d = max(d_x, d_y).

    ``encode_x(X)`` is normalise((X − mean_x_) W_x): retrieval scores are cosines of the
    canonical variates, each direction weighted equally (not by its correlation).

    References
    ----------
    H. Hotelling, "Relations between two sets of variates", Biometrika 28 (1936).
    H. D. Vinod, "Canonical ridge and econometrics of joint production", J. Econometrics 4 (1976).
    D. R. Hardoon, S. Szedmak & J. Shawe-Taylor, "Canonical correlation analysis: an overview
    with application to learning methods", Neural Computation 16 (2004).
    """

    _fitted_attr = "Wx_"

    def __init__(self, rank: int = 128, *, ridge: float = 1e-3, center: bool = True):
        self.rank = rank
        self.ridge = ridge
        self.center = center

    def fit(self, X, Y):
        """Fit the canonical directions on paired views.

        Parameters
        ----------
        X : array_like or torch.Tensor, shape (n, d_x)
        Y : array_like or torch.Tensor, shape (n, d_y)
            Row i of X and row i of Y are a pair; float32 or float64, finite.

        Returns
        -------
        self
        """
        t0 = time.perf_counter()
        ridge = check_positive("ridge", self.ridge)
        center = check_bool("center", self.center)
        X, Y = check_views(X, Y)
        n, dx, dy = X.shape[0], X.shape[1], Y.shape[1]
        rank = check_rank(self.rank, dx, dy)
        X, Y = X.to(torch.float64), Y.to(torch.float64)
        mx = X.mean(0) if center else torch.zeros(dx, dtype=torch.float64, device=X.device)
        my = Y.mean(0) if center else torch.zeros(dy, dtype=torch.float64, device=Y.device)
        Xc, Yc = X - mx, Y - my
        Kx_isqrt, self.shift_x_ = _regularized_inverse_sqrt(Xc.T @ Xc / n, ridge, "X", center)
        Ky_isqrt, self.shift_y_ = _regularized_inverse_sqrt(Yc.T @ Yc / n, ridge, "Y", center)
        M = Kx_isqrt @ (Xc.T @ Yc / n) @ Ky_isqrt
        U, s, Vh = truncated_svd(M, rank)
        self.mean_x_ = mx.cpu().numpy()
        self.mean_y_ = my.cpu().numpy()
        self.Wx_ = (Kx_isqrt @ U).cpu().numpy()
        self.Wy_ = (Ky_isqrt @ Vh.T).cpu().numpy()
        self.correlations_ = s.cpu().numpy()
        self.n_inputs_x_, self.n_inputs_y_ = int(dx), int(dy)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _projection(self, which: str):
        return (self.Wx_, self.mean_x_) if which == "x" else (self.Wy_, self.mean_y_)


def _regularized_inverse_sqrt(S: torch.Tensor, ridge: float, name: str, centered: bool):
    """(K^{-1/2}, shift) for K = S + shift·I, shift = ridge · tr(S)/d, by a float64 eigendecomposition."""
    d = S.shape[0]
    trace = float(torch.diagonal(S).sum())
    if not trace > 0:
        what = "every row equals the mean" if centered else "every entry is zero"
        raise ValueError(f"{name} has no variance ({what}); CCA needs variation in both views")
    shift = ridge * trace / d
    K = S + shift * torch.eye(d, dtype=S.dtype, device=S.device)
    evals, Q = torch.linalg.eigh(K)
    # K ⪰ shift·I exactly; round-off cannot be allowed to push an eigenvalue below it
    evals = evals.clamp_min(shift)
    return (Q * evals.rsqrt()[None, :]) @ Q.T, float(np.float64(shift))
