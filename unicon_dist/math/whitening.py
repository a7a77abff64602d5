"""Centring and ridge whitening of one view's features: a linear stage after the feature map.

For features φ(x) ∈ R^m (the inputs, or their Nyström features) with mean μ and
covariance Σ over the training rows,

    φ̃(x) = (φ(x) − μ) A,    A = (Σ + λ·(tr Σ / m)·I)^{−1/2}

(A = I when only centring).  With both views whitened, the first closed-form step
(s = 0, the centred cross-covariance) is regularised CCA (Hotelling 1936; the ridge
form of Vinod 1976): the SVD of Σ̃_xx^{−1/2} Σ_xy Σ̃_yy^{−1/2}.  Without it the
cross-covariance SVD is dominated by the directions of largest variance of each
view, whether or not they are shared.  The ridge λ is relative to the mean
eigenvalue tr Σ / m, so one value suits features of any scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FeatureWhitening", "Moments"]


class Moments:
    """Running first and second moments of feature rows, accumulated in float64.

    Rows arrive in blocks (``add``), in any order; the sums are merged in the order
    given, so the same blocks give the same result bit for bit.
    """

    def __init__(self, n_features: int):
        self.n = 0
        self.total = torch.zeros(n_features, dtype=torch.float64)
        self.outer = torch.zeros((n_features, n_features), dtype=torch.float64)

    def add(self, F: torch.Tensor) -> None:
        F = F.to(dtype=torch.float64)
        self.n += int(F.shape[0])
        self.total += F.sum(0).cpu()
        self.outer += (F.T @ F).cpu()

    def mean(self) -> torch.Tensor:
        return self.total / self.n

    def covariance(self, center: bool = True) -> torch.Tensor:
        """Σ about the mean (``center``) or the raw second moment E[φφᵀ]."""
        second = self.outer / self.n
        if center:
            mu = self.mean()
            second = second - torch.outer(mu, mu)
        return 0.5 * (second + second.T)


@dataclass
class FeatureWhitening:
    """A fitted centring/whitening stage: φ̃(x) = (base(x) − mean) · matrix.

    Attributes
    ----------
    base : NystroemMap or None
        The feature map applied first (None: the inputs are the features).
    mean : torch.Tensor, shape (m,), float64
        Subtracted from every feature row (zeros when not centring).
    matrix : torch.Tensor, shape (m, m), float64, or None
        (Σ + λ·(tr Σ/m)·I)^{−1/2}; None when only centring.
    ridge : float or None
        λ, or None when only centring.
    spectrum : dict
        Summary of Σ's eigenvalues: largest, smallest, mean, and the condition number
        of the regularised Σ + λ·(tr Σ/m)·I that A inverts.
    """

    base: object
    mean: torch.Tensor
    matrix: torch.Tensor | None
    ridge: float | None
    spectrum: dict

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_moments(cls, base, moments: Moments, center: bool, ridge: float | None, name: str = "X"):
        """The stage for features with the given moments.

        Parameters
        ----------
        base : NystroemMap or None
        moments : Moments
            Of the features ``base`` produces, over the training rows.
        center : bool
            Subtract the mean.
        ridge : float or None
            λ > 0 to whiten; None to centre only.
        """
        if moments.n < 2:
            raise ValueError(f"whitening of {name} needs at least 2 rows, got {moments.n}")
        m = moments.total.shape[0]
        mean = moments.mean() if center else torch.zeros(m, dtype=torch.float64)
        if ridge is None:
            return cls(base, mean, None, None, {})
        sigma = moments.covariance(center)
        evals, evecs = torch.linalg.eigh(sigma)
        # round-off can leave tiny negative eigenvalues of a PSD matrix: clip them
        clipped = int((evals < 0).sum())
        evals = evals.clamp_min(0.0)
        shift = float(ridge) * float(evals.sum()) / m
        if not shift > 0:
            raise ValueError(f"whitening of {name}: the features have zero variance on the training rows")
        matrix = (evecs / torch.sqrt(evals + shift)[None, :]) @ evecs.T
        spectrum = {
            "largest": float(evals[-1]), "smallest": float(evals[0]), "mean": float(evals.mean()),
            "condition_regularised": float((evals[-1] + shift) / (evals[0] + shift)),
            "shift": shift, "n_clipped": clipped,
        }
        return cls(base, mean, 0.5 * (matrix + matrix.T), float(ridge), spectrum)

    def transform(self, X, block: int | None = None, dtype=None) -> torch.Tensor:
        """φ̃(X), shape (n, m), in ``dtype`` (default float64).

        The affine stage runs in ``dtype``: in float32 its rounding (relative 1e-7 times
        the at most (m/λ)^{1/2} gain of A) is of the order of that of the float32 inputs
        themselves, and it runs once per panel load, so float64 would double the cost of
        every pass for no accuracy the stored features have.
        """
        dtype = torch.float64 if dtype is None else dtype
        X = torch.as_tensor(X)
        return self.apply(X.to(dtype) if self.base is None else self.base.transform(X, block=block, dtype=dtype))

    def apply(self, F: torch.Tensor) -> torch.Tensor:
        """The affine stage alone, (F − mean)·matrix, on features ``F`` that ``base`` made."""
        F = F - self.mean.to(device=F.device, dtype=F.dtype)
        if self.matrix is not None:
            F = F @ self.matrix.to(device=F.device, dtype=F.dtype)
        return F

    # ------------------------------------------------------------------ storage
    def state(self) -> tuple[dict, dict]:
        """(JSON part, arrays) of the stage itself, without its base map."""
        arrays = {"mean": self.mean.cpu().numpy()}
        if self.matrix is not None:
            arrays["matrix"] = self.matrix.cpu().numpy()
        return {"ridge": self.ridge, "spectrum": self.spectrum}, arrays

    @classmethod
    def from_state(cls, base, spec: dict, arrays: dict, device=None) -> "FeatureWhitening":
        matrix = arrays.get("matrix")
        return cls(
            base,
            torch.as_tensor(arrays["mean"], device=device),
            None if matrix is None else torch.as_tensor(matrix, device=device),
            spec.get("ridge"),
            dict(spec.get("spectrum", {})),
        )
