"""Fitting a UniCon's feature maps: the Nyström map of each view, then centring/whitening.

The maps themselves (:class:`~unicon_dist.math.nystrom.NystroemMap`,
:class:`~unicon_dist.math.whitening.FeatureWhitening`) are pure array code; this module
decides which map a fit gets from its options, draws the landmarks from rows in memory or
read on demand from a store, and accumulates the whitening moments in one read.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from ..data.rows import features
from ..math.kernels import Kernel, Linear, median_sample
from ..math.nystrom import NystroemMap, uniform_landmarks
from ..math.whitening import FeatureWhitening, Moments
from .progress import FIT_LOGGER

__all__ = ["DEFAULT_LANDMARKS", "MOMENT_ROWS", "MapFitter", "landmark_counts", "base_map", "carry_encoder"]

logger = logging.getLogger(FIT_LOGGER)

# landmarks per view when a nonlinear kernel is given without n_landmarks
DEFAULT_LANDMARKS = 1000
# rows per block of the moment pass of centring/whitening
MOMENT_ROWS = 16384


@dataclasses.dataclass(frozen=True)
class MapFitter:
    """Fits the feature maps a :class:`~unicon_dist.UniCon` with these options uses.

    Parameters are the estimator's of the same names.  ``restored``: the maps
    {"x": ..., "y": ...} of a checkpoint being resumed, returned instead of fitting.
    """

    n_landmarks: int | None = None
    landmarks: str = "uniform"
    eig_floor: float = 1e-10
    center: bool = True
    whiten: float | None = 1e-3
    seed: int = 0
    verbose: bool = False
    restored: dict | None = None

    @classmethod
    def from_estimator(cls, model, restored: dict | None = None) -> "MapFitter":
        return cls(model.n_landmarks, model.landmarks, model.eig_floor, model.center, model.whiten, model.seed,
                   bool(model.verbose), restored)

    def size(self, kernel: Kernel, n: int) -> int | None:
        """Landmarks of the Nyström map of one view of n rows (None: the inputs are the features)."""
        if self.n_landmarks is None and isinstance(kernel, Linear):
            return None
        return int(self.n_landmarks) if self.n_landmarks is not None else min(n, DEFAULT_LANDMARKS)

    def fit(self, A: torch.Tensor, kernel: Kernel, name: str) -> NystroemMap | None:
        """The Nyström map of one view from its rows ``A`` (n, d), or None when the inputs are the features."""
        if self.restored is not None:
            return self.restored[name.lower()]
        if self.n_landmarks is None and isinstance(kernel, Linear):
            return None
        m = int(self.n_landmarks) if self.n_landmarks is not None else min(A.shape[0], DEFAULT_LANDMARKS)
        if m > A.shape[0]:
            raise ValueError(f"n_landmarks={m} exceeds the number of pairs n={A.shape[0]}")
        return NystroemMap.fit(A, kernel, m, method=self.landmarks, seed=self.seed, eig_floor=self.eig_floor,
                               name=name)

    def fit_rows(self, read, n: int, dim: int, kernel: Kernel, name: str) -> NystroemMap | None:
        """:meth:`fit` reading only the rows it needs: ``read(rows)`` returns them."""
        if self.restored is not None:
            return self.restored[name.lower()]
        if self.n_landmarks is None and isinstance(kernel, Linear):
            return None
        if self.landmarks != "uniform":
            raise ValueError(f"landmarks={self.landmarks!r} needs every row in memory; fit from a store "
                             "supports landmarks='uniform'")
        m = int(self.n_landmarks) if self.n_landmarks is not None else min(n, DEFAULT_LANDMARKS)
        if m > n:
            raise ValueError(f"n_landmarks={m} exceeds the number of pairs n={n}")
        # the same rows, in the same order, as the in-memory fit samples
        sample = median_sample(n, self.seed)
        kernel = kernel.resolve(read(np.arange(n) if sample is None else sample), seed=self.seed)
        return NystroemMap.from_landmarks(kernel, read(uniform_landmarks(n, m, self.seed)), self.eig_floor, name)

    def preprocess(self, bases, read_pair, n: int, block: int, dtype, featurized: bool = False) -> list:
        """The maps ``bases`` (x, y) wrapped in the centring/whitening stage the options ask for.

        The moments of both views are accumulated (in float64) in one read of the rows, in
        blocks of ``block`` rows in row order (``read_pair(slice) -> (x, y)``: inputs, or
        with ``featurized`` the base features already), of the features in ``dtype``, the
        precision the passes see them in.  Without ``center`` and ``whiten`` the bases are
        returned as they are.
        """
        if not self.center and self.whiten is None:
            return list(bases)
        if self.restored is not None:
            return [self.restored["x"], self.restored["y"]]
        moments = [None, None]
        for start in range(0, n, max(1, int(block))):
            blocks = read_pair(slice(start, min(n, start + int(block))))
            for k, (A, base) in enumerate(zip(blocks, bases)):
                F = A if featurized else features(A, base, dtype)
                moments[k] = Moments(F.shape[1]) if moments[k] is None else moments[k]
                moments[k].add(F)
        ridge = None if self.whiten is None else float(self.whiten)
        stages = [FeatureWhitening.from_moments(base, mom, bool(self.center), ridge, name)
                  for base, mom, name in zip(bases, moments, ("X", "Y"))]
        for stage, name in zip(stages, ("X", "Y")):
            if self.verbose and stage.spectrum:
                logger.info("whitening of %s: covariance eigenvalues in [%.3g, %.3g], regularised condition %.3g",
                            name, stage.spectrum["smallest"], stage.spectrum["largest"],
                            stage.spectrum["condition_regularised"])
        return stages


def base_map(fmap):
    """The Nyström map (or None) under a centring/whitening stage."""
    return fmap.base if isinstance(fmap, FeatureWhitening) else fmap


def landmark_counts(maps) -> list:
    """Landmarks of each feature map (None where the inputs are the features)."""
    return [None if base_map(m) is None else int(base_map(m).landmarks.shape[0]) for m in maps]


def carry_encoder(F, old, new):
    """F' with F'·Ã'(φ) = F·Ã(φ) up to the mean shift: F' = F A A'^{−1} (A, A' symmetric).

    Parameters
    ----------
    F : array_like of shape (r, m)
        An encoder on the features whitened by ``old``.
    old, new : FeatureWhitening, NystroemMap or None
        The maps before and after re-estimating the whitening (``matrix`` A, A'; a map
        without one counts as the identity).

    Returns
    -------
    Tensor of shape (r, m), float64
    """
    F = torch.as_tensor(F, dtype=torch.float64)
    A_old = getattr(old, "matrix", None)
    A_new = getattr(new, "matrix", None)
    G = F if A_old is None else F @ A_old.to(device=F.device)
    if A_new is not None:
        G = torch.linalg.solve(A_new.to(device=F.device), G.T).T
    return G
