"""Kernel functions evaluated on blocks (torch, device-agnostic).

A kernel only computes the block K(A, B) for the rows it is given; it never chooses
block sizes and holds no data.  Data-dependent parameters (the median-heuristic
bandwidth of "rbf" and "laplacian", the default γ of "polynomial") are resolved once
by :meth:`Kernel.resolve` from a sample and then stored as plain numbers, so a saved
model reproduces its kernel exactly.

Parameters are checked when a kernel is constructed (a ValueError naming the kernel and
the parameter): a bandwidth of 0 or a negative γ would otherwise surface as a division by
zero or a kernel that is not positive semi-definite, deep inside a pass.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

__all__ = [
    "Kernel", "Linear", "RBF", "Laplacian", "Polynomial", "Cosine", "Angular", "ArcCosine",
    "KERNELS", "get_kernel", "kernel_from_params", "median_sample",
]

_MEDIAN_SAMPLE = 1000


def _sq_dists(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    # ‖a‖² + ‖b‖² − 2aᵀb can go slightly negative through cancellation
    d = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * (A @ B.T)
    return d.clamp_(min=0.0)


def _cosines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    na = torch.linalg.norm(A, dim=1)
    nb = torch.linalg.norm(B, dim=1)
    inv_a = torch.where(na > 0, 1.0 / na.clamp_min(torch.finfo(A.dtype).tiny), torch.zeros_like(na))
    inv_b = torch.where(nb > 0, 1.0 / nb.clamp_min(torch.finfo(B.dtype).tiny), torch.zeros_like(nb))
    return ((A @ B.T) * inv_a[:, None] * inv_b[None, :]).clamp_(-1.0, 1.0)


def _unit_rows(A: torch.Tensor) -> torch.Tensor:
    n = torch.linalg.norm(A, dim=1, keepdim=True)
    return torch.where(n > 0, A / n.clamp_min(torch.finfo(A.dtype).tiny), torch.zeros_like(A))


def _angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """θ_ij = 2 atan2(‖â_i − b̂_j‖, ‖â_i + b̂_j‖), the angle between rows.

    arccos of the cosine loses half the digits near θ = 0 (k(a, a) would come out as
    1 − 1e-8 and K slightly indefinite); the half-angle form is accurate everywhere.
    The distances are taken without the ‖a‖² + ‖b‖² − 2aᵀb shortcut for the same reason.
    A zero row is given the angle π/2 to everything.
    """
    ua, ub = _unit_rows(A), _unit_rows(B)
    mode = "donot_use_mm_for_euclid_dist"
    theta = 2.0 * torch.atan2(torch.cdist(ua, ub, compute_mode=mode), torch.cdist(ua, -ub, compute_mode=mode))
    zero = (torch.linalg.norm(A, dim=1)[:, None] == 0) | (torch.linalg.norm(B, dim=1)[None, :] == 0)
    return torch.where(zero, torch.full_like(theta, math.pi / 2), theta)


def _is_real(v) -> bool:
    # bool is an int subclass, but True as a bandwidth or degree is a mistake, not a 1
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _is_integer(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _check_number(kernel: str, name: str, value, *, none_means: str | None = None, zero: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite real > 0 (>= 0 with ``zero``).

    ``none_means``: None is allowed too, and the message says what it stands for.
    """
    if value is None and none_means is not None:
        return
    if not (_is_real(value) and math.isfinite(value) and (value >= 0 if zero else value > 0)):
        alt = "" if none_means is None else f" or None ({none_means})"
        raise ValueError(f"{kernel} kernel {name} must be a finite number {'>=' if zero else '>'} 0{alt}, "
                         f"got {value!r}")


def median_sample(n: int, seed: int) -> np.ndarray | None:
    """Rows (seeded) from which the median heuristic is computed; None means all ``n`` rows.

    Exposed so that a caller holding rows out of core can read just these rows and pass
    them to :meth:`Kernel.resolve`, which then gives the same bandwidth as on all rows.
    """
    if n <= _MEDIAN_SAMPLE:
        return None
    return np.random.default_rng(seed).choice(n, _MEDIAN_SAMPLE, replace=False)


def _median_distance(X: torch.Tensor, p: float, seed: int) -> float:
    """Median of the nonzero pairwise distances of a seeded sample of rows.

    The median heuristic (Schölkopf & Smola, 2002); zero distances between duplicated
    rows are left out so that duplicates cannot drive the bandwidth to 0.
    """
    idx = median_sample(X.shape[0], seed)
    if idx is not None:
        X = X[torch.as_tensor(idx, device=X.device)]
    X = X.double()
    d = torch.cdist(X, X, p=p)
    iu = torch.triu_indices(X.shape[0], X.shape[0], offset=1, device=X.device)
    vals = d[iu[0], iu[1]]
    vals = vals[vals > 0]
    if vals.numel() == 0:
        return 1.0
    return float(torch.quantile(vals, 0.5))


@dataclass(frozen=True)
class Kernel:
    """A positive semi-definite kernel k(a, b) evaluated on blocks of rows."""

    name = "abstract"

    def __call__(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def diag(self, A: torch.Tensor) -> torch.Tensor:
        """k(a_i, a_i) for each row (overridden where it has a cheaper form)."""
        return torch.stack([self(A[i : i + 1], A[i : i + 1])[0, 0] for i in range(A.shape[0])])

    def resolve(self, X: torch.Tensor, seed: int = 0) -> "Kernel":
        """This kernel with every data-dependent parameter fixed from ``X``."""
        return self

    def params(self) -> dict:
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class Linear(Kernel):
    """k(a, b) = aᵀb."""

    name = "linear"

    def __call__(self, A, B):
        return A @ B.T

    def diag(self, A):
        return (A * A).sum(1)


@dataclass(frozen=True)
class RBF(Kernel):
    """Gaussian kernel k(a, b) = exp(−‖a − b‖² / (2σ²)); σ by the median heuristic if None."""

    bandwidth: float | None = None
    name = "rbf"

    def __post_init__(self):
        # σ = 0 divides by zero in every tile, σ < 0 squares to a valid-looking kernel that
        # a saved model would then carry: both are refused here rather than inside a pass
        _check_number(self.name, "bandwidth", self.bandwidth, none_means="the median heuristic")

    def __call__(self, A, B):
        return torch.exp(_sq_dists(A, B) * (-0.5 / self.bandwidth**2))

    def diag(self, A):
        return torch.ones(A.shape[0], dtype=A.dtype, device=A.device)

    def resolve(self, X, seed=0):
        return self if self.bandwidth is not None else replace(self, bandwidth=_median_distance(X, 2.0, seed))


@dataclass(frozen=True)
class Laplacian(Kernel):
    """Laplacian kernel k(a, b) = exp(−‖a − b‖₁ / σ); σ by the median heuristic (L1) if None."""

    bandwidth: float | None = None
    name = "laplacian"

    def __post_init__(self):
        # σ < 0 gives exp(+‖a − b‖₁/|σ|), which grows with distance and is not positive definite
        _check_number(self.name, "bandwidth", self.bandwidth, none_means="the median heuristic")

    def __call__(self, A, B):
        return torch.exp(torch.cdist(A, B, p=1.0) * (-1.0 / self.bandwidth))

    def diag(self, A):
        return torch.ones(A.shape[0], dtype=A.dtype, device=A.device)

    def resolve(self, X, seed=0):
        return self if self.bandwidth is not None else replace(self, bandwidth=_median_distance(X, 1.0, seed))


@dataclass(frozen=True)
class Polynomial(Kernel):
    """k(a, b) = (γ aᵀb + c)^degree; γ = 1/d if None."""

    degree: int = 3
    gamma: float | None = None
    coef0: float = 1.0
    name = "polynomial"

    def __post_init__(self):
        # (γ aᵀb + c)^d is positive semi-definite for an integer d >= 1, γ > 0 and c >= 0
        # (a sum of products of linear kernels with nonnegative weights); a fractional d
        # of a negative base is NaN, and γ = 0 or d = 0 is a constant kernel
        if not (_is_integer(self.degree) and self.degree >= 1):
            raise ValueError(f"polynomial kernel degree must be an integer >= 1, got {self.degree!r}")
        _check_number(self.name, "gamma", self.gamma, none_means="1 / the input dimension")
        _check_number(self.name, "coef0", self.coef0, zero=True)

    def __call__(self, A, B):
        return (self.gamma * (A @ B.T) + self.coef0) ** self.degree

    def diag(self, A):
        return (self.gamma * (A * A).sum(1) + self.coef0) ** self.degree

    def resolve(self, X, seed=0):
        return self if self.gamma is not None else replace(self, gamma=1.0 / X.shape[1])


@dataclass(frozen=True)
class Cosine(Kernel):
    """k(a, b) = aᵀb / (‖a‖‖b‖) (0 for a zero row)."""

    name = "cosine"

    def __call__(self, A, B):
        return _cosines(A, B)

    def diag(self, A):
        return (torch.linalg.norm(A, dim=1) > 0).to(A.dtype)


@dataclass(frozen=True)
class ArcCosine(Kernel):
    """Arc-cosine kernel of Cho & Saul (2009), order 0 or 1.

    k_0(a, b) = 1 − θ/π;  k_1(a, b) = ‖a‖‖b‖ (sin θ + (π − θ) cos θ) / π,
    with θ the angle between a and b.
    """

    order: int = 1
    name = "arccos"

    def __post_init__(self):
        # True == 1 and 1.0 == 1 would pass a bare ``in (0, 1)``
        if not _is_integer(self.order) or self.order not in (0, 1):
            raise ValueError(f"arc-cosine kernel order must be 0 or 1, got {self.order!r}")

    def __call__(self, A, B):
        theta = _angles(A, B)
        if self.order == 0:
            return 1.0 - theta / math.pi
        norms = torch.linalg.norm(A, dim=1)[:, None] * torch.linalg.norm(B, dim=1)[None, :]
        return norms * (torch.sin(theta) + (math.pi - theta) * torch.cos(theta)) / math.pi

    def diag(self, A):
        if self.order == 0:
            return torch.ones(A.shape[0], dtype=A.dtype, device=A.device)
        return (A * A).sum(1)


@dataclass(frozen=True)
class Angular(Kernel):
    """Angular kernel k(a, b) = 1 − θ/π (θ the angle between a and b).

    The same function as the order-0 arc-cosine kernel; kept under its own name,
    the one the UniCon paper's kernel ablation uses.
    """

    name = "angular"

    def __call__(self, A, B):
        return 1.0 - _angles(A, B) / math.pi

    def diag(self, A):
        return torch.ones(A.shape[0], dtype=A.dtype, device=A.device)


KERNELS = {
    "linear": Linear,
    "rbf": RBF,
    "laplacian": Laplacian,
    "polynomial": Polynomial,
    "cosine": Cosine,
    "angular": Angular,
    "arccos": ArcCosine,
    "arccos0": lambda **kw: ArcCosine(order=0, **kw),
    "arccos1": lambda **kw: ArcCosine(order=1, **kw),
}


def get_kernel(kernel, **params) -> Kernel:
    """Resolve a kernel name (with constructor ``params``) or pass a Kernel through."""
    if isinstance(kernel, Kernel):
        if params:
            raise ValueError("kernel parameters cannot be given alongside a Kernel object")
        return kernel
    if not isinstance(kernel, str) or kernel.lower() not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; available kernels: {sorted(KERNELS)}")
    try:
        return KERNELS[kernel.lower()](**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for kernel {kernel!r}: {exc}") from None


def kernel_from_params(params: dict) -> Kernel:
    """Inverse of :meth:`Kernel.params` (used when loading a model)."""
    params = dict(params)
    name = params.pop("name")
    return get_kernel(name, **params)
