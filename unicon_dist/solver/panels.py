"""Where the passes get their rows: loaded panels, the panel cache, scratch tiles.

A *loader* is a callable ``loader(rows) -> (phi_x, phi_y, z_x, z_y)`` for ``rows`` a
slice or an int64 array of row numbers; :class:`PanelSource` turns it into panels of a
:class:`~unicon_dist.solver.layout.Layout`, loading consecutive panels together and
keeping only the latest group (or taking panels published by other workers).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .layout import Batch, Layout

__all__ = ["Panel", "TensorRows", "PanelSource", "Scratch"]


@dataclass
class Panel:
    """Positions p0:p1 of a batch, loaded: features and embeddings (z_x pre-scaled by 1/τ for ψ = exp)."""

    p0: int
    p1: int
    phi_x: torch.Tensor
    phi_y: torch.Tensor
    zx: torch.Tensor
    zy: torch.Tensor

    def local(self, i0: int, i1: int) -> slice:
        """Positions i0:i1 of the batch as rows of this panel's tensors."""
        return slice(i0 - self.p0, i1 - self.p0)


class TensorRows:
    """The loader of an operator built on in-memory tensors (Φ_X, Φ_Y, z_x, z_y)."""

    def __init__(self, phi_x, phi_y, zx, zy):
        self.tensors = (phi_x, phi_y, zx, zy)

    def __call__(self, rows):
        if isinstance(rows, slice):
            return tuple(t[rows] for t in self.tensors)
        index = torch.as_tensor(rows, dtype=torch.long, device=self.tensors[0].device)
        return tuple(t.index_select(0, index) for t in self.tensors)


class PanelSource:
    """Panels of ``layout`` read through ``loader``, one group of panels cached at a time.

    Parameters
    ----------
    loader : callable
        ``loader(rows) -> (phi_x, phi_y, z_x, z_y)``.
    layout : Layout
    zx_scale : float, optional
        Factor applied to z_x once per load (1/τ for ψ = exp, so tiles are e^{s/τ}).

    Attributes
    ----------
    n_loads : int
        Calls of the loader so far.
    n_fetches : int
        Panels taken from published ones (:meth:`use_published`) so far.
    """

    def __init__(self, loader, layout: Layout, zx_scale: float | None = None):
        self.loader = loader
        self.layout = layout
        self.zx_scale = zx_scale
        self.n_loads = 0
        self.n_fetches = 0
        self._cache: OrderedDict = OrderedDict()  # one loaded group of panels at a time
        self._fetch = None

    def load(self, b: Batch, k: int) -> Panel:
        """Panel k of batch b, from the cache or loaded with the panels after it that fit.

        Consecutive panels (of the same or later batches) are loaded together up to
        ``panel_rows`` positions (:meth:`Layout.load_group`), so that many small batches
        cost one read of the source rather than one each.  Only the latest group stays
        cached: a pass holds its row panel itself and streams the column panels through
        the cache.
        """
        for group in self._cache.values():
            if (b.key, k) in group:
                return group[(b.key, k)]
        self._cache.clear()  # before loading: at most the caller's row panel and one group alive
        if self._fetch is not None:
            # panels published once per operator (e.g. in Ray's object store) instead of
            # being read from the store on every visit
            p0, p1 = b.panels[k]
            panel = Panel(p0, p1, *self._fetch((b.key, k)))
            self.n_fetches += 1
            self._cache[(b.key, k)] = {(b.key, k): panel}
            return panel
        keys = self.layout.load_group((b.key, k))
        batches = self.layout.batches
        parts = [batches[bi].source_rows(p0, p1) for bi, _, p0, p1 in keys]
        if all(isinstance(p, slice) for p in parts) and all(
            a.stop == c.start for a, c in zip(parts[:-1], parts[1:])
        ):
            rows = slice(parts[0].start, parts[-1].stop)
        else:
            rows = np.concatenate([np.arange(p.start, p.stop) if isinstance(p, slice) else p for p in parts])
        phi_x, phi_y, zx, zy = self.loader(rows)
        self.n_loads += 1
        if self.zx_scale is not None:
            zx = zx * self.zx_scale
        group, at = {}, 0
        for bi, kk, p0, p1 in keys:
            sl = slice(at, at + p1 - p0)
            group[(bi, kk)] = Panel(p0, p1, phi_x[sl], phi_y[sl], zx[sl], zy[sl])
            at += p1 - p0
        self._cache[id(group)] = group
        return group[(b.key, k)]

    def published(self, key: tuple[int, int]) -> tuple:
        """(Φ_X, Φ_Y, z_x, z_y) of panel ``key`` as the passes use it (z_x scaled), for
        publishing to other workers."""
        P = self.load(self.layout.batches[key[0]], key[1])
        return P.phi_x, P.phi_y, P.zx, P.zy

    def use_published(self, fetch) -> None:
        """Take every panel from ``fetch(key) -> (Φ_X, Φ_Y, z_x, z_y)`` from now on."""
        self._cache.clear()
        self._fetch = fetch

    def release(self) -> None:
        """Drop the cached panels."""
        self._cache.clear()


class Scratch:
    """Reusable tile-sized scratch tensors, by name: fresh multi-megabyte allocations per
    tile cost page faults that showed up as ~20% of a pass (measured on CPU)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, rows: int, cols: int) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < rows * cols:
            buf = torch.empty(rows * cols, dtype=self.dtype, device=self.device)
            self._buffers[name] = buf
        return buf[: rows * cols].view(rows, cols)

    def clear(self) -> None:
        self._buffers.clear()
