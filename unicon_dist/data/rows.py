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

import numpy as np
import torch

from .allocator import release_free_memory
from ..math.nystrom import NystroemMap

__all__ = ["ArrayPairs", "FeatureRows", "StoreRows", "embed", "inverse_norms"]


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


class HostToDevice:
    """Copies of host arrays to a CUDA device, through pinned memory on a stream of their own.

    A copy from pageable memory is synchronous: the host waits until the GPU has drained
    the work queued before it (the previous panel's tiles) and then for the copy itself.
    From pinned memory, on a copy stream, the transfer overlaps that work and the host goes
    on; the current stream waits for the copy before it uses the result (after the
    "pinned memory and non_blocking" guide of the PyTorch tutorials).

    Parameters
    ----------
    device : torch.device
        A CUDA device.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._in_flight: list = []

    def __call__(self, *arrays) -> list[torch.Tensor]:
        """``arrays`` (numpy arrays or tensors) on the device, ready for the current stream."""
        host = [torch.as_tensor(a) for a in arrays]
        if any(t.device.type != "cpu" for t in host):
            # already on a device (in-memory views): nothing to stage
            return [t.to(self.device) for t in host]
        # the staged sources stay referenced until their copies have run (the events say
        # when), so that their pinned memory is not reused under a copy in flight
        self._in_flight = [(event, staged) for event, staged in self._in_flight if not event.query()]
        # a second host copy of the read rows (cached by torch's pinned allocator): on CUDA
        # the host holds no features, which the panel plan counts, so it fits the budget
        staged = [t.pin_memory() for t in host]
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            out = [t.to(self.device, non_blocking=True) for t in staged]
            event = torch.cuda.Event()
            event.record(self.stream)
        self._in_flight.append((event, staged))
        current.wait_stream(self.stream)
        for t in out:
            # allocated on the copy stream, used on the current one: the allocator must not
            # hand their memory to the next copy while the current stream still reads it
            t.record_stream(current)
        return out


class FeatureRows:
    """In-memory features Φ_X, Φ_Y as loaders ``loader(rows) -> (Φ_X, Φ_Y, z_x, z_y)`` at given encoders.

    A fit visits its rows in the same seeded order at every iteration, so the feature rows
    gathered for one order are kept and reused: an iteration then computes only the
    embeddings, instead of gathering four n-row tensors (at n = 200,000 the gather and its
    fresh allocations took about 0.5 s of a 3 s iteration, RESULTS §1b).

    Parameters
    ----------
    phi_x, phi_y : torch.Tensor
        Features, one row per pair.
    similarity : {"cosine", "dot"}
    """

    def __init__(self, phi_x: torch.Tensor, phi_y: torch.Tensor, similarity: str):
        self.phi_x, self.phi_y, self.similarity = phi_x, phi_y, similarity
        self._order: np.ndarray | None = None
        self._gathered: tuple | None = None

    def at(self, F1, F2):
        """The loader at encoders F1, F2 (None: s = 0)."""
        return lambda rows: self.load(rows, F1, F2)

    def load(self, rows, F1, F2):
        if isinstance(rows, slice):
            px, py = self.phi_x[rows], self.phi_y[rows]
        else:
            rows = np.asarray(rows)
            if self._order is None or not np.array_equal(self._order, rows):
                index = torch.as_tensor(rows, dtype=torch.long, device=self.phi_x.device)
                self._order = rows.copy()
                self._gathered = (self.phi_x.index_select(0, index), self.phi_y.index_select(0, index))
            px, py = self._gathered
        return embed(px, py, F1, F2, self.similarity)


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
        Precision and device of the returned tensors.  On CUDA the read rows go through
        :class:`HostToDevice` (pinned memory, a copy stream), so that the host does not wait
        for the GPU to finish the previous panel before this one is copied.
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
    _copies: object = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None  # reopened where the loader runs
        state["_copies"] = None  # a CUDA stream and pinned buffers: made again where the loader runs
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
        if dev.type == "cuda":
            if self._copies is None:
                self._copies = HostToDevice(dev)
            X, Y = self._copies(x, y)
        else:
            X, Y = torch.as_tensor(x, device=dev), torch.as_tensor(y, device=dev)
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
