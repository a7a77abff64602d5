"""Whitening folded into the encoders: the passes see centred features, C is whitened after.

With a whitening stage φ̃(x) = (φ(x) − μ)·A (A symmetric m × m,
:class:`~unicon_dist.math.whitening.FeatureWhitening`), the embeddings and the cross
product of a pass are

    z = φ̃ Fᵀ = (φ − μ)(A Fᵀ) = (φ − μ) F'ᵀ,   F' = F·A,
    C = Φ̃_Xᵀ S Φ̃_Y = A_x (Φ_cXᵀ S Φ_cY) A_y = A_x C_c A_y,

with Φ_c the centred features.  A fit that streams its rows (a pair store, or arrays under a
``memory_budget``) loads every panel once per pass, so applying A there costs an n×m by
m×m product per load, per pass, per iteration (68 s of a 277 s 1M-pair fit,
benchmarks/RESULTS.md §8).  Folded, the loader applies the centring only (O(nm)) and uses
the encoders F' (r × m, formed once per operator in float64), and :class:`FoldedOperator`
multiplies C_c by A once per iteration (m³, or m²k per product of a matrix-free SVD):

    C Ω = A_x (C_c (A_y Ω)),    Cᵀ Ω = A_y (C_cᵀ (A_x Ω)).

The embeddings, hence S(γ), the loss and the pass-1 statistics, are those of the unfolded
stage up to float round-off.  The rounding moves rather than grows: unfolded, each whitened
feature is rounded by up to eps₃₂·√m·cond(A) relative; folded, C_c's float32 tiles are
rounded on the centred features' scale before A multiplies them in float64, an error of the
same order (tests/test_folded_whitening.py derives the bound and measures both paths
against float64: the folded one is as accurate, and more so for linear kernels).

``ENABLED`` (module level, private to tests and benchmarks) turns the folding off, so the
two code paths can be compared.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..math.whitening import FeatureWhitening

__all__ = ["ENABLED", "foldable", "folded_loader_parts", "FoldedOperator"]

# fold whitening into the encoders in streamed fits (tests and benchmarks switch it off)
ENABLED = True


def _matrix(fmap):
    return fmap.matrix if isinstance(fmap, FeatureWhitening) else None


def foldable(maps) -> bool:
    """True when folding pays: folding is on and a view's stage whitens (has a matrix)."""
    return ENABLED and any(_matrix(m) is not None for m in maps)


def centring_stage(fmap):
    """``fmap`` without its whitening matrix: the base map and the centring only.

    A stage that neither whitens nor centres (mean 0, i.e. ``center=False``) is its base
    map: subtracting 0 changes no value, so it is skipped.
    """
    if _matrix(fmap) is None:
        return fmap
    if not bool(fmap.mean.any()):
        return fmap.base
    return dataclasses.replace(fmap, matrix=None, ridge=None, spectrum={})


def fold_encoder(F, fmap):
    """F' = F·A (A = ``fmap``'s whitening matrix, symmetric), in float64, on F's device;
    F itself (or None) when ``fmap`` does not whiten."""
    A = _matrix(fmap)
    if F is None or A is None:
        return F
    F = torch.as_tensor(F)
    return F.to(torch.float64) @ A.to(device=F.device, dtype=torch.float64)


def folded_loader_parts(maps, encoders):
    """((map_x, map_y), (F1', F2')) a row loader uses in place of ``maps`` and ``encoders``."""
    return (tuple(centring_stage(m) for m in maps),
            tuple(fold_encoder(F, m) for F, m in zip(encoders, maps)))


class FoldedOperator:
    """C = A_x C_c A_y over an operator of C_c (the centred features' cross product).

    ``op`` is a :class:`~unicon_dist.CrossProductOperator` (or any executor's operator with
    its interface) built over the centring-only maps and the folded encoders; ``A_x`` and
    ``A_y`` the whitening matrices (None: the identity).  Everything but the products is
    ``op``'s own: the loss, the statistics, the layout, ``release``.  The seconds of the
    m-sized multiplications by A are added to ``op``'s "product" phase (and kept as
    "fold").
    """

    def __init__(self, op, A_x, A_y):
        self.op = op
        self._A = (A_x, A_y)
        self._cache: dict = {}
        self._fold_seconds = 0.0

    # --------------------------------------------------------------- delegation
    def __getattr__(self, name):
        # only called for what this class does not define: loss, statistics, n, rank,
        # layout, n_loads, batch_rows, ...
        if name == "op":
            raise AttributeError(name)
        return getattr(self.op, name)

    @property
    def shape(self) -> tuple:
        return tuple(self.op.shape)

    def release(self) -> None:
        self.op.release()

    def phase_seconds(self) -> dict:
        seconds = getattr(self.op, "phase_seconds", None)
        out = dict(seconds()) if seconds is not None else {"product": 0.0, "statistics": 0.0}
        out["product"] = out.get("product", 0.0) + self._fold_seconds
        out["fold"] = self._fold_seconds
        return out

    # --------------------------------------------------------------- products
    def _a(self, side: int, device):
        """A of ``side`` (0: x, 1: y) in float64 on ``device``, or None."""
        A = self._A[side]
        if A is None:
            return None
        key = (side, str(device))
        if key not in self._cache:
            self._cache[key] = A.to(device=device, dtype=torch.float64)
        return self._cache[key]

    def _left(self, side: int, M: torch.Tensor) -> torch.Tensor:
        A = self._a(side, M.device)
        return M if A is None else A @ M

    def _fold(self, C: torch.Tensor) -> torch.Tensor:
        """A_x C A_y for a float64 C (m_x × m_y)."""
        t0 = time.perf_counter()
        C = self._left(0, C.to(torch.float64))
        A_y = self._a(1, C.device)
        C = C if A_y is None else C @ A_y
        self._fold_seconds += time.perf_counter() - t0
        return C

    def materialize(self) -> torch.Tensor:
        """C = A_x C_c A_y, float64 (m_x × m_y), on the device of ``op``'s C_c."""
        return self._fold(self.op.materialize())

    def product(self, omega_x=None, omega_y=None) -> torch.Tensor:
        """(Φ̃_X Ω_x)ᵀ S (Φ̃_Y Ω_y), float64 (Ω None: the identity): ``op``'s product with
        A Ω in place of Ω, then the identity sides multiplied by A."""
        t0 = time.perf_counter()
        wx = None if omega_x is None else self._left(0, torch.as_tensor(omega_x).to(torch.float64))
        wy = None if omega_y is None else self._left(1, torch.as_tensor(omega_y).to(torch.float64))
        self._fold_seconds += time.perf_counter() - t0
        # in the operator's dtype (and device, where it has one), as its own product takes Ω
        dtype, device = self.op.dtype, getattr(self.op, "device", None)
        P = self.op.product(*(None if w is None else w.to(device=device, dtype=dtype) for w in (wx, wy)))
        t0 = time.perf_counter()
        P = P.to(torch.float64)
        if omega_x is None:
            P = self._left(0, P)
        if omega_y is None:
            A_y = self._a(1, P.device)
            P = P if A_y is None else P @ A_y
        self._fold_seconds += time.perf_counter() - t0
        return P

    def matmul(self, omega) -> torch.Tensor:
        """C Ω = A_x (C_c (A_y Ω)); Ω has shape (m_y, k); float64."""
        t0 = time.perf_counter()
        w = self._left(1, torch.as_tensor(omega).to(torch.float64))
        self._fold_seconds += time.perf_counter() - t0
        P = self.op.matmul(w)
        t0 = time.perf_counter()
        P = self._left(0, P.to(torch.float64))
        self._fold_seconds += time.perf_counter() - t0
        return P

    def rmatmul(self, omega) -> torch.Tensor:
        """Cᵀ Ω = A_y (C_cᵀ (A_x Ω)); Ω has shape (m_x, k); float64."""
        t0 = time.perf_counter()
        w = self._left(0, torch.as_tensor(omega).to(torch.float64))
        self._fold_seconds += time.perf_counter() - t0
        P = self.op.rmatmul(w)
        t0 = time.perf_counter()
        P = self._left(1, P.to(torch.float64))
        self._fold_seconds += time.perf_counter() - t0
        return P

    # --------------------------------------------------------------- single tiles (the verifier)
    def tile_product(self, key) -> torch.Tensor:
        """One tile's part of C: A_x (Φ_c[I]ᵀ S[I, J] Φ_c[J]) A_y, float64."""
        return self._fold(self.op.tile_product(key))
