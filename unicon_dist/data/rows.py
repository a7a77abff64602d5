"""Rows of a pair store as the passes see them: features and embeddings at the current encoders.

:class:`StoreRows` is the loader a store-backed :class:`~unicon_dist.CrossProductOperator`
calls for each panel.  It is a small picklable object (the store is reopened from its path
in whichever process calls it), so the same loader runs in this process or in a Ray actor.
:class:`ArrayPairs` gives in-memory views the reading interface of a store, so that a fit
from arrays under a ``memory_budget`` streams its rows through the same panels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .allocator import release_free_memory
from ..math.nystrom import NystroemMap

__all__ = ["ArrayPairs", "StoreRows", "embed", "inverse_norms"]


def inverse_norms(Z: torch.Tensor) -> torch.Tensor:
    """1/‖z_i‖, with 0 for zero rows (they then take no part instead of dividing by 0)."""
    norms = torch.linalg.norm(Z, dim=1)
    return torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(Z.dtype).tiny), torch.zeros_like(norms))


def embed(phi_x, phi_y, F1, F2, similarity: str):
    """(Φ_X, Φ_Y, z_x, z_y) at the encoders F1, F2 (None: s = 0, the first step).

    For cosine similarity the embeddings are normalised and the feature rows scaled by
    the same 1/‖f(x_i)‖, which linearises the normalisation at the current encoders.
    """
    if F1 is None:
        z = torch.zeros((phi_x.shape[0], 1), dtype=phi_x.dtype, device=phi_x.device)
        return phi_x, phi_y, z, z
    zx = phi_x @ F1.to(device=phi_x.device, dtype=phi_x.dtype).T
    zy = phi_y @ F2.to(device=phi_y.device, dtype=phi_y.dtype).T
    if similarity == "cosine":
        sx, sy = inverse_norms(zx), inverse_norms(zy)
        zx, zy = zx * sx[:, None], zy * sy[:, None]
        phi_x, phi_y = phi_x * sx[:, None], phi_y * sy[:, None]
    return phi_x, phi_y, zx, zy


def features(A: torch.Tensor, fmap: NystroemMap | None, dtype) -> torch.Tensor:
    """The inputs themselves (linear kernel) or their Nyström features, in ``dtype``."""
    return A.to(dtype) if fmap is None else fmap.transform(A, dtype=dtype)


@dataclass
class StoreRows:
    """``loader(rows) -> (Φ_X, Φ_Y, z_x, z_y)`` for rows of the pair store at ``path``.

    Parameters
    ----------
    path : str
        The store (opened read-only on first use, in the calling process).
    map_x, map_y : NystroemMap or None
        Feature maps (None: the inputs are the features).
    F1, F2 : torch.Tensor or None
        Current encoders; None for the first step (s = 0).
    similarity : {"cosine", "dot"}
    dtype, device
        Precision and device of the returned tensors.
    """

    path: str
    map_x: NystroemMap | None
    map_y: NystroemMap | None
    F1: torch.Tensor | None
    F2: torch.Tensor | None
    similarity: str
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    _store: object = field(default=None, repr=False, compare=False)
    seconds: dict = field(default_factory=lambda: {"read": 0.0, "features": 0.0}, repr=False, compare=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None  # reopened where the loader runs
        state["seconds"] = {"read": 0.0, "features": 0.0}
        return state

    def __call__(self, rows):
        release_free_memory()
        if self._store is None:
            from .store import PairStore

            self._store = PairStore.open(Path(self.path))
        t0 = time.perf_counter()
        x, y, _ = self._store.read(rows)
        t1 = time.perf_counter()
        dev = torch.device(self.device)
        X = torch.as_tensor(x, device=dev)
        Y = torch.as_tensor(y, device=dev)
        out = embed(features(X, self.map_x, self.dtype), features(Y, self.map_y, self.dtype),
                    self.F1, self.F2, self.similarity)
        self.seconds["read"] += t1 - t0
        self.seconds["features"] += time.perf_counter() - t1
        return out


class ArrayPairs:
    """Two in-memory views read as a :class:`~unicon_dist.PairStore` is (``read``, sizes).

    A fit from arrays under a ``memory_budget`` streams its rows through the panels of a
    store fit instead of holding every feature row: only the rows of one panel are
    gathered (slices are views, index arrays copy just those rows).  In-process only
    (the views are not written anywhere a Ray worker could reopen them).
    """

    path = "arrays in memory"

    def __init__(self, X: torch.Tensor, Y: torch.Tensor, groups=None):
        self.X, self.Y = X, Y
        self._groups = groups

    def __len__(self) -> int:
        return int(self.X.shape[0])

    dim_x = property(lambda self: int(self.X.shape[1]))
    dim_y = property(lambda self: int(self.Y.shape[1]))
    itemsize = property(lambda self: max(self.X.element_size(), self.Y.element_size()))
    dtype = property(lambda self: str(self.X.dtype).replace("torch.", ""))
    has_groups = property(lambda self: self._groups is not None)

    def read_groups(self):
        return self._groups

    def read_buffer_bytes(self) -> int:
        return 0

    def read(self, rows):
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows, device=self.X.device)
        return self.X[rows], self.Y[rows], None
