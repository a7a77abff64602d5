"""Nyström feature maps Φ = K(X, L) K_LL^{-1/2}, computed block by block.

With landmarks L (m rows), ΦΦᵀ = K_XL K_LL⁺ K_LX approximates K_XX, and equals it
when the landmarks are all the points (Williams & Seeger, 2001).  K_LL is
eigendecomposed in float64 and eigenvalues below ``eig_floor`` × λ_max are dropped:
duplicated or near-collinear landmarks would otherwise put 1/√λ ≈ 1/√0 into the map.
The feature dimension is the effective rank k ≤ m that survives the floor.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .linalg import column_signs
from .kernels import Kernel, get_kernel

__all__ = ["NystroemMap", "select_landmarks", "uniform_landmarks", "spectrum_summary", "plan_feature_rows",
           "LANDMARK_METHODS"]

logger = logging.getLogger(__name__)

LANDMARK_METHODS = ("uniform", "kmeans++", "leverage")


# Row blocks of K(X, L) in the Nyström maps: each float64 temporary of the kernel block
# stays near 8 MiB.  Measured on the 2-core development machine: blocks of 32 MiB
# temporaries (4096 rows × 1000 landmarks) ran 1.5× slower than 8 MiB ones, because
# allocations that large are fresh mmaps and page-fault on every block.
_FEATURE_BLOCK_BYTES = 8 << 20


def plan_feature_rows(n_landmarks: int, itemsize: int = 8) -> int:
    """Rows per block of the Nyström feature map for ``n_landmarks`` landmarks."""
    return max(64, _FEATURE_BLOCK_BYTES // (max(int(n_landmarks), 1) * itemsize))


def _kernel_blocks(kernel: Kernel, X: torch.Tensor, L: torch.Tensor, block: int):
    """K(X_block, L) row block by row block, each block cast to L's dtype (float64)."""
    for i0 in range(0, X.shape[0], block):
        yield i0, kernel(X[i0 : i0 + block].to(L.dtype), L)


def _kmeanspp(kernel: Kernel, X: torch.Tensor, m: int, rng: np.random.Generator, block: int) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) with kernel-space distances.

    d²(x, l) = k(x, x) + k(l, l) − 2 k(x, l); each new landmark is drawn with
    probability proportional to the squared distance to the nearest chosen one.
    """
    n = X.shape[0]
    diag = kernel.diag(X).double()
    chosen = [int(rng.integers(n))]
    d2 = torch.full((n,), np.inf, dtype=torch.float64, device=X.device)
    for _ in range(1, m):
        last = X[chosen[-1] : chosen[-1] + 1]
        k_last = torch.cat([blk.flatten() for _, blk in _kernel_blocks(kernel, X, last.double(), block)])
        d2 = torch.minimum(d2, (diag + diag[chosen[-1]] - 2.0 * k_last).clamp_min(0.0))
        p = d2.cpu().numpy()
        p[chosen] = 0.0
        total = p.sum()
        if not total > 0:  # all remaining points coincide with landmarks: fall back to uniform
            rest = np.setdiff1d(np.arange(n), chosen)
            chosen.extend(rng.choice(rest, m - len(chosen), replace=False).tolist())
            break
        chosen.append(int(rng.choice(n, p=p / total)))
    return np.asarray(chosen)


def _ridge_leverage(kernel: Kernel, X: torch.Tensor, m: int, rng: np.random.Generator, block: int) -> np.ndarray:
    """Sampling by approximate ridge leverage scores (Alaoui & Mahoney, 2015).

    A uniform sketch S of 2m points gives features Ψ = K_XS K_SS^{-1/2}; the score of
    row i at ridge λ is ψ_iᵀ(ΨᵀΨ + λI)^{-1}ψ_i plus the residual (k_ii − ‖ψ_i‖²)/λ,
    which keeps the estimate from underrating points the sketch misses.  λ is set by
    bisection so that the scores sum to m (effective dimension m).
    """
    n = X.shape[0]
    s = min(n, 2 * m)
    sketch = rng.choice(n, s, replace=False)
    S = X[torch.as_tensor(sketch, device=X.device)].double()
    inner = NystroemMap._fit_map(kernel, S, 1e-10)
    feats = torch.cat([blk @ inner for _, blk in _kernel_blocks(kernel, X, S, block)])
    resid = (kernel.diag(X).double() - (feats * feats).sum(1)).clamp_min(0.0)
    evals, evecs = torch.linalg.eigh(feats.T @ feats)
    proj2 = (feats @ evecs) ** 2

    def scores(lam):
        return (proj2 / (evals.clamp_min(0.0) + lam)).sum(1) + resid / lam

    lo, hi = 1e-12 * float(evals.max().clamp_min(1e-300)), 1e6 * float(kernel.diag(X).double().sum())
    for _ in range(100):
        mid = np.sqrt(lo * hi)
        if float(scores(mid).sum()) > m:
            lo = mid
        else:
            hi = mid
    p = scores(np.sqrt(lo * hi)).cpu().numpy()
    p = np.maximum(p, 0.0)
    p = p / p.sum() if p.sum() > 0 else None
    nonzero = n if p is None else int((p > 0).sum())
    if nonzero < m:  # too few points with positive score: top up uniformly
        p = None
    return rng.choice(n, m, replace=False, p=p)


def spectrum_summary(evals, eig_floor: float) -> dict:
    """What the eigenvalue floor did to a K_LL with eigenvalues ``evals`` (float64, any order).

    Returns a JSON-able dict: ``n_landmarks`` m; ``largest`` and ``smallest`` eigenvalue;
    ``condition_number`` λ_max/λ_min (inf when λ_min ≤ 0: K_LL is singular in float64);
    ``effective_rank`` the eigenvalues kept (> ``eig_floor``·λ_max), the feature count;
    ``n_floored`` the eigenvalues dropped; ``condition_kept`` λ_max over the smallest kept
    eigenvalue, the amplification 1/√λ puts into the map is its square root.
    """
    evals = torch.as_tensor(evals, dtype=torch.float64)
    top, low = float(evals.max()), float(evals.min())
    keep = evals > eig_floor * top
    kept_min = float(evals[keep].min()) if bool(keep.any()) else float("nan")
    return {
        "n_landmarks": int(evals.numel()),
        "largest": top,
        "smallest": low,
        "condition_number": top / low if low > 0 else float("inf"),
        "effective_rank": int(keep.sum()),
        "n_floored": int((~keep).sum()),
        "condition_kept": top / kept_min,
        "eig_floor": float(eig_floor),
    }


def uniform_landmarks(n: int, m: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``m`` of ``n`` rows drawn uniformly without replacement (seeded)."""
    return np.sort(np.random.default_rng(seed).choice(n, m, replace=False))


def select_landmarks(kernel: Kernel, X: torch.Tensor, m: int, method: str = "uniform", seed: int = 0,
                     block: int = 4096) -> np.ndarray:
    """Indices of ``m`` landmark rows of X, seeded.

    Parameters
    ----------
    method : {"uniform", "kmeans++", "leverage"}
        Uniform without replacement; k-means++ seeding in kernel space; or sampling by
        approximate ridge leverage scores.
    """
    n = X.shape[0]
    if not 1 <= m <= n:
        raise ValueError(f"n_landmarks must be in [1, n={n}], got {m}")
    if method == "uniform":
        return uniform_landmarks(n, m, seed)
    rng = np.random.default_rng(seed)
    if method == "kmeans++":
        return np.sort(_kmeanspp(kernel, X, m, rng, block))
    if method == "leverage":
        return np.sort(_ridge_leverage(kernel, X, m, rng, block))
    raise ValueError(f"unknown landmark method {method!r}; expected one of {LANDMARK_METHODS}")


@dataclass
class NystroemMap:
    """A fitted Nyström feature map: landmarks, the resolved kernel and K_LL^{-1/2}.

    Attributes
    ----------
    kernel : Kernel
        With data-dependent parameters fixed.
    landmarks : torch.Tensor, shape (m, d)
    normalization : torch.Tensor, shape (m, k), float64
        U_k Λ_k^{-1/2} from the eigendecomposition of K_LL.
    eig_floor : float
    spectrum : dict or None
        Summary of the eigenvalues of K_LL (see :func:`spectrum_summary`), recorded when
        the map is built; None for a map restored from a file that predates it.
    """

    kernel: Kernel
    landmarks: torch.Tensor
    normalization: torch.Tensor
    eig_floor: float = 1e-10
    spectrum: dict | None = None

    @property
    def n_features(self) -> int:
        return int(self.normalization.shape[1])

    @staticmethod
    def _fit_map(kernel: Kernel, L: torch.Tensor, eig_floor: float, spectrum: dict | None = None) -> torch.Tensor:
        K = kernel(L.double(), L.double())
        K = 0.5 * (K + K.T)
        evals, evecs = torch.linalg.eigh(K)
        evecs = evecs * column_signs(evecs)  # the same feature basis on every device
        top = float(evals.max())
        if not top > 0:
            raise ValueError("the landmark kernel matrix K_LL is zero: all landmarks are degenerate for this kernel")
        keep = evals > eig_floor * top
        if spectrum is not None:
            spectrum.update(spectrum_summary(evals, eig_floor))
        return evecs[:, keep] / torch.sqrt(evals[keep])[None, :]

    @classmethod
    def fit(cls, X, kernel="rbf", n_landmarks: int = 1000, method: str = "uniform", seed: int = 0,
            eig_floor: float = 1e-10, block: int = 4096, name: str = "X") -> "NystroemMap":
        """Choose landmarks from X and build the map.

        Warns (naming the effective rank) when the floor drops eigenvalues of K_LL.
        """
        if not 0 <= eig_floor < 1:
            raise ValueError(f"eig_floor must be in [0, 1), got {eig_floor}")
        X = torch.as_tensor(X)
        kernel = get_kernel(kernel).resolve(X, seed=seed)
        m = min(int(n_landmarks), X.shape[0])
        idx = select_landmarks(kernel, X, m, method, seed, block)
        return cls.from_landmarks(kernel, X[torch.as_tensor(idx, device=X.device)], eig_floor, name)

    @classmethod
    def from_landmarks(cls, kernel: Kernel, L, eig_floor: float = 1e-10, name: str = "X") -> "NystroemMap":
        """The map of given landmark rows ``L`` for a kernel with its parameters resolved."""
        if not 0 <= eig_floor < 1:
            raise ValueError(f"eig_floor must be in [0, 1), got {eig_floor}")
        L = torch.as_tensor(L).double()
        m = L.shape[0]
        spectrum = {}
        norm = cls._fit_map(kernel, L, eig_floor, spectrum)
        if norm.shape[1] < m:
            warnings.warn(
                f"Nyström map of {name}: K_LL has effective rank {norm.shape[1]} of {m} landmarks "
                f"(eigenvalues below {eig_floor:g} x the largest dropped; duplicated or near-collinear "
                f"landmarks); the map has {norm.shape[1]} features",
                RuntimeWarning,
                stacklevel=3,
            )
        return cls(kernel, L, norm, eig_floor, spectrum)

    def transform(self, X, block: int | None = None, dtype=None) -> torch.Tensor:
        """Φ(X) = K(X, L) U_k Λ_k^{-1/2}, computed in row blocks; float64 unless ``dtype``.

        ``block`` rows at a time (default: :func:`plan_feature_rows`).
        The product is formed in float64 whatever ``dtype`` is: rounding in K(X, L)·U is
        amplified by 1/√λ in directions with small eigenvalues of K_LL.
        """
        block = block or plan_feature_rows(self.landmarks.shape[0])
        X = torch.as_tensor(X)
        L = self.landmarks.to(X.device)
        norm = self.normalization.to(X.device)
        out = torch.empty((X.shape[0], norm.shape[1]), dtype=dtype or torch.float64, device=X.device)
        # one reused float64 product buffer: a fresh multi-megabyte tensor per block costs
        # page faults comparable to the GEMM itself (measured on CPU)
        buf = torch.empty((min(block, X.shape[0]), norm.shape[1]), dtype=norm.dtype, device=X.device)
        for i0, blk in _kernel_blocks(self.kernel, X, L, block):
            prod = torch.matmul(blk, norm, out=buf[: blk.shape[0]])
            out[i0 : i0 + blk.shape[0]].copy_(prod)
        return out
