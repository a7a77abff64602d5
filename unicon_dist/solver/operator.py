"""Streamed products with the similarity weight matrix S(γ), which is never formed.

C = Aᵀ S B for tall operands A (n × a) and B (n × b) is a sum over tiles of the
n × n similarity matrix s = z_x z_yᵀ (DESIGN §3):

* pass 1 streams the tiles once for per-anchor statistics: for CLIP/InfoNCE the
  log-sum-exp over negatives of every row *and* every column, combined across tiles
  with ``logaddexp`` as in the online softmax of FlashAttention (Dao et al., 2022);
  for a general ψ the sums A_ik = Σ_j εψ(s_ij − ν s_ik) + εψ((1−ν)s_ik) and
  D_ik = Σ_j εψ'(s_ij − ν s_ik) per (anchor, positive) pair;
* a short pass over the tiles that hold positives finishes the per-anchor weights;
* pass 2 recomputes each tile, turns it into a tile of −2n·S and accumulates
  R_I = Σ_J (−2nS)_{IJ} B_J, then C −= A_Iᵀ R_I / (2n) once per row block, in float64.

For ψ = exp the weight of a negative factorises, S_ij = −(e^{t_ij} a_i + e^{t_ij} ã_j)/(2n)
with t = s/τ and a_i = mean_{k∈P(i)} 1/(N_i + e^{t_ik}), so many-to-many positives cost
O(n²) plus O(Σ_i |P(i)|); everything is evaluated in log space, so |s/τ| ≈ 80 does not
overflow float32.  Memory is O((tile + n)(r + a + b)), independent of n².

With one positive per row (CLIP), a batch that fits can take both passes at once instead: its
tile of e^{s/τ} formed once and kept, or two fused attention kernels (:mod:`.fused`).

:class:`CrossProductOperator` is a facade: the formulas are in :mod:`unicon_dist.math.weights`,
the batches and panels in :mod:`.layout`, the loops, partial results and merges in
:mod:`.passes`, the panel cache in :mod:`.panels`; block sizes come from
:func:`unicon_dist.solver.planning.plan_tiles`.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ..math import weights as W
from ..math.validation import check_matrix, check_same_rows, resolve_device, resolve_dtype
from ..math.losses import ContrastiveLoss, get_loss
from . import passes, products
from .layout import BATCH_SPLITS, Layout
from .options import PassOptions
from .panels import PanelSource, Scratch, TensorRows
from .passes import statistics_summary

__all__ = ["CrossProductOperator", "weighted_cross_product"]


class CrossProductOperator:
    """Matrix-free C = Φ_Xᵀ S(γ) Φ_Y with S(γ) evaluated at s = z_x z_yᵀ.

    Construction runs pass 1 (the per-anchor statistics, and the loss value); every
    product afterwards is one pass 2 over the tiles.

    Rows are visited in *panels* of at most ``panel_rows`` positions (never splitting a
    group of positives): a pass loads one row panel and streams every column panel past
    it, so only two panels are resident at a time.  With the default (one panel) this is
    the in-memory operator; :meth:`from_loader` builds one whose panels are read on
    demand (from a :class:`unicon_dist.PairStore`, through the model's feature maps), so
    memory is bounded by the panel size instead of n.  The result does not depend on
    the panelling beyond float round-off.

    Parameters
    ----------
    phi_x : array_like, shape (n, m_x)
    phi_y : array_like, shape (n, m_y)
        Feature maps of the pairs (rows may already carry the cosine row scaling).
    z_x, z_y : array_like, shape (n, r)
        Embeddings whose inner products are the similarities s_ij.
    loss, temperature, nu
        The loss (see :func:`unicon_dist.math.losses.get_loss`).
    negatives : "full" or int
        All n² pairs, or a seeded split of the rows into batches of this size
        (S block-diagonal, the loss keeps the global 1/(2n) normalisation).
    groups : array_like of int, shape (n,), optional
        Many-to-many positives: x_i and y_j are positives iff groups[i] == groups[j].
    seed : int
        Seed of the batch split.
    block_rows, block_cols, memory_budget
        Tile shape, or the budget the planner fits it into (default: cache-sized tiles
        on the CPU, 1 GiB of tiles on CUDA; see :func:`unicon_dist.plan_tiles`).
    device, dtype
        Where and in which precision the tiles are computed (default: those of z_x;
        float32 unless the inputs are float64).  C is accumulated in float64.
    progress : callable, optional
        Called as ``progress(stage, done, total)`` after each block of rows (stage
        "statistics" or "product"), e.g. :class:`unicon_dist.solver.progress.LogProgress`.
    panel_rows : int, optional
        Positions per panel (default: all rows in one panel).
    batch_split : {"random", "contiguous"}
        How ``negatives=B`` cuts the rows into batches (see :func:`make_batches`).
    fused : {"auto", "off", "attention", "one-pass"}
        One-to-one CLIP batches with both passes in one, through fused attention kernels or
        a stored tile (:mod:`unicon_dist.solver.fused`): "auto" where faster and as accurate.
    matrix_free : bool
        Products with thin Ω will follow rather than :meth:`materialize` (read by "auto").

    Attributes
    ----------
    shape : tuple (m_x, m_y)
    loss : float
        L(s) at the given embeddings (under the ``negatives`` restriction).
    statistics : dict
        Summary of pass 1 (:func:`unicon_dist.solver.passes.statistics_summary`).
    n, rank : int
    options : PassOptions
    layout : Layout
        The batches and panels.
    n_loads, n_fetches : int
        Panel loads so far (one per panel and pass when there is one panel per batch), and
        panels taken from those other workers published.
    """

    def __init__(self, phi_x, phi_y, z_x, z_y, loss="clip", temperature: float = 0.07, nu: float = 1.0,
                 negatives="full", groups=None, seed: int = 0, block_rows: int | None = None,
                 block_cols: int | None = None, memory_budget: int | None = None, device=None, dtype=None,
                 progress=None, panel_rows: int | None = None, batch_split: str = "random", fused: str = "auto",
                 matrix_free: bool = False):
        zx = check_matrix(z_x, "z_x")
        zy = check_matrix(z_y, "z_y")
        device = resolve_device(device) if device is not None else zx.device
        if dtype is None:
            dtype = torch.float64 if zx.dtype == torch.float64 else torch.float32
        phi_x = check_matrix(phi_x, "phi_x", dtype=dtype, device=device)
        phi_y = check_matrix(phi_y, "phi_y", dtype=dtype, device=device)
        zx = zx.to(dtype=dtype, device=device)
        zy = zy.to(dtype=dtype, device=device)
        n = check_same_rows(phi_x=phi_x, phi_y=phi_y, z_x=zx, z_y=zy)
        if zx.shape[1] != zy.shape[1]:
            raise ValueError(f"z_x and z_y must have the same width (embedding dim), got {zx.shape[1]} and {zy.shape[1]}")
        options = PassOptions(loss=loss, temperature=temperature, nu=nu, negatives=negatives, seed=seed,
                              batch_split=batch_split, panel_rows=panel_rows, block_rows=block_rows,
                              block_cols=block_cols, memory_budget=memory_budget,
                              constant=not bool(zx.any()) or not bool(zy.any()), device=device, dtype=dtype,
                              progress=progress, fused=fused, matrix_free=matrix_free)
        self._setup(TensorRows(phi_x, phi_y, zx, zy), n, (phi_x.shape[1], phi_y.shape[1]), zx.shape[1], options,
                    groups)

    @classmethod
    def from_loader(cls, loader, n: int, shape: tuple[int, int], rank: int, *, groups=None, owned=None,
                    compute_stats: bool = True, options: PassOptions | None = None,
                    **keywords) -> "CrossProductOperator":
        """An operator whose rows are produced on demand by ``loader``.

        Parameters
        ----------
        loader : callable
            ``loader(rows) -> (phi_x, phi_y, z_x, z_y)`` for ``rows`` a slice or an int64
            array of row numbers (in any order), returning tensors of ``dtype`` on
            ``device`` with one row per requested row, in that order.
        n : int
            Number of rows.
        shape : (m_x, m_y)
            Feature widths.
        rank : int
            Width r of the embeddings.
        groups : array_like of int, shape (n,), optional
            As for the constructor.
        owned : iterable of (batch, panel), optional
            The outer panels this instance computes (a worker's share; see
            :attr:`panel_keys`); products then return this share's part of C.
        compute_stats : bool
            Run pass 1 now; a distributed driver runs it through :meth:`compute_stats`
            over its workers instead and installs the result with :meth:`set_stats`.
        options : PassOptions, optional
            The pass options; ``keywords`` (any field of :class:`PassOptions`: ``loss``,
            ``temperature``, ``nu``, ``negatives``, ``seed``, ``batch_split``,
            ``panel_rows``, ``constant``, ``norm_bound``, ``block_rows``, ``block_cols``,
            ``memory_budget``, ``device`` (default "cpu"), ``dtype`` (default float32),
            ``progress``) replace its fields.
        """
        options = PassOptions.of(options, **keywords)
        options = dataclasses.replace(
            options, device=resolve_device("cpu" if options.device is None else options.device),
            dtype=resolve_dtype(torch.float32 if options.dtype is None else options.dtype))
        self = cls.__new__(cls)
        self._setup(loader, int(n), (int(shape[0]), int(shape[1])), int(rank), options, groups, owned, compute_stats)
        return self

    def _setup(self, loader, n, shape, rank, options: PassOptions, groups, owned=None, compute_stats=True):
        self.loss_fn: ContrastiveLoss = get_loss(options.loss, temperature=options.temperature, nu=options.nu)
        self.options = options
        self.device, self.dtype = options.device, options.dtype
        self.n, self.shape, self.rank = n, shape, rank
        self.layout = Layout.build(n, groups=groups, negatives=options.negatives, seed=options.seed,
                                   batch_split=options.batch_split, panel_rows=options.panel_rows, device=self.device)
        exp = self.loss_fn.exponential
        source = PanelSource(loader, self.layout, (1.0 / self.loss_fn.temperature) if exp else None)
        self._ctx = passes.PassContext(self.layout, source, self.loss_fn, options, rank, shape, exp,
                                       Scratch(self.dtype, self.device), fits_direct=self._direct)
        self._owner = None if owned is None else frozenset(map(tuple, owned))
        self._stats: list[dict] | None = None
        self._seconds = {"statistics": 0.0, "product": 0.0}
        if compute_stats:
            t0 = time.perf_counter()
            self.set_stats(self.compute_stats(lambda name, *args: [self.run_round(name, *args)]))
            self._seconds["statistics"] += time.perf_counter() - t0

    # ------------------------------------------------------------- layout
    @property
    def panel_keys(self) -> list[tuple[int, int]]:
        """(batch, panel) of every panel, in the order passes visit them."""
        return self.layout.panel_keys

    def panel_sizes(self) -> list[int]:
        """Positions of every panel, in :attr:`panel_keys` order."""
        return self.layout.panel_sizes()

    @property
    def owned_keys(self) -> list[tuple[int, int]]:
        """The (batch, panel) keys this instance visits as outer panels, sorted."""
        return self.panel_keys if self._owner is None else sorted(self._owner)

    @property
    def batches(self):
        """The batches of the layout (:class:`~unicon_dist.solver.layout.Batch`)."""
        return self.layout.batches

    def tile_plan(self, key: int, width: int):
        """The :class:`~unicon_dist.TilePlan` of batch ``key`` for operands ``width`` wide."""
        b = self.layout.batches[key]
        return self._ctx.plan(b.n, width, b.pos)

    def batch_rows(self, key: int, p0: int, p1: int) -> np.ndarray:
        """The source row numbers at positions p0:p1 of batch ``key`` (for error messages)."""
        return self.layout.batches[key].row_numbers(p0, p1)

    @property
    def n_loads(self) -> int:
        return self._ctx.source.n_loads

    @property
    def n_fetches(self) -> int:
        return self._ctx.source.n_fetches

    # ------------------------------------------------------------- pass 1
    def compute_stats(self, run, split=()) -> list[dict]:
        """Statistics of every batch (:func:`unicon_dist.solver.passes.compute_statistics`).

        ``run(round, *args)`` returns one partial result per worker; ``split`` names the
        batches whose panels several workers share (none when one worker owns all).
        """
        return passes.compute_statistics(self._ctx, run, split)

    def run_round(self, name: str, *args):
        """This instance's part of a pass-1 round over the panels it owns."""
        return passes.run_round(self._ctx, self._owner, name, *args)

    def set_stats(self, stats: list[dict]) -> None:
        """Install the merged statistics (one dict per batch) and the loss."""
        self._stats = list(stats)
        self.loss = passes.loss_value(self._stats, self.n)
        self.statistics = statistics_summary(self._stats)

    # ------------------------------------------------------------- panels
    def published_panel(self, key) -> tuple:
        """(Φ_X, Φ_Y, z_x, z_y) of panel ``key`` as the passes use it (z_x scaled for ψ = exp),
        for publishing to other workers."""
        return self._ctx.source.published(key)

    def use_published(self, fetch) -> None:
        """Take every panel from ``fetch(key) -> (Φ_X, Φ_Y, z_x, z_y)`` from now on."""
        self._ctx.source.use_published(fetch)

    def release(self) -> None:
        """Drop the cached panels, scratch tiles and fused parts of C (the statistics are kept)."""
        self._ctx.source.release()
        self._ctx.fused_parts.clear()
        self._ctx.scratch.clear()

    def phase_seconds(self) -> dict:
        """Seconds spent so far: pass 1 ("statistics"), products ("product"), and, when the
        loader keeps them (:class:`unicon_dist.data.rows.StoreRows`), reading rows ("read") and
        computing features and embeddings ("features") within those passes."""
        out = dict(self._seconds)
        out.update(getattr(self._ctx.source.loader, "seconds", {}))
        return out

    # ------------------------------------------------------------- pass 2
    # the tile hooks are methods so that a test can corrupt one tile (tests/test_diagnostics.py)
    def _tile_exp(self, b, P, Q, i0, i1, j0, j1) -> torch.Tensor:
        return products.exp_weight_tile(self._ctx, self._stats[b.key], b, P, Q, i0, i1, j0, j1)

    def _tile_general(self, b, P, Q, i0, i1, j0, j1) -> torch.Tensor:
        return products.general_weight_tile(self._ctx, self._stats[b.key], b, P, Q, i0, i1, j0, j1)

    def _tile(self):
        return self._tile_exp if self._ctx.exp else self._tile_general

    def _direct(self, U: float) -> bool:
        # a method so that benchmarks/stability.py can switch the log-space guard off
        return W.fits_direct(U, self.dtype)

    def product(self, omega_x=None, omega_y=None) -> torch.Tensor:
        """This instance's share of (Φ_X Ω_x)ᵀ S (Φ_Y Ω_y), float64 (Ω None: the identity;
        all of it unless built with ``owned``); Ω in the operator's dtype and device."""
        t0 = time.perf_counter()
        C = products.product(self._ctx, self._stats, self._owner, self._tile(), omega_x, omega_y)
        self._seconds["product"] += time.perf_counter() - t0
        return C

    def materialize(self) -> torch.Tensor:
        """C = Φ_Xᵀ S Φ_Y, float64 (m_x × m_y)."""
        return self.product()

    def matmul(self, omega) -> torch.Tensor:
        """C Ω without forming C: Φ_Xᵀ S (Φ_Y Ω); Ω has shape (m_y, k)."""
        return self.product(omega_y=torch.as_tensor(omega, device=self.device).to(self.dtype))

    def rmatmul(self, omega) -> torch.Tensor:
        """Cᵀ Ω without forming C: (Ωᵀ Φ_Xᵀ S Φ_Y)ᵀ; Ω has shape (m_x, k)."""
        return self.product(omega_x=torch.as_tensor(omega, device=self.device).to(self.dtype)).T

    # ------------------------------------------------------- single tiles (the verifier)
    def tile_keys(self) -> list[tuple]:
        """Every tile of a :meth:`materialize` pass over the panels this instance owns, as
        (batch, row panel, column panel, i0, i1, j0, j1) with positions inside the batch.

        Tiles of a constant batch (s ≡ 0, the first step) are not listed: that pass never
        forms them.
        """
        return products.tile_keys(self._ctx, self._stats, self._owner)

    def tile_product(self, key) -> torch.Tensor:
        """One tile's part of C, Φ_X[I]ᵀ S[I, J] Φ_Y[J] (float64, formed in the tile dtype),
        for a ``key`` of :meth:`tile_keys`; the parts of all keys sum to :meth:`materialize`."""
        return products.tile_product(self._ctx, self._tile(), key)

    # ------------------------------------------------------- kept for tests/test_devices.py
    @property
    def _batches(self):
        return self.layout.batches

    def _plan(self, n, width, pos):
        return self._ctx.plan(n, width, pos)


def weighted_cross_product(
    phi_x,
    phi_y,
    z_x,
    z_y,
    loss="clip",
    temperature: float = 0.07,
    nu: float = 1.0,
    negatives="full",
    groups=None,
    *,
    seed: int = 0,
    block_rows: int | None = None,
    block_cols: int | None = None,
    memory_budget: int | None = None,
    return_loss: bool = False,
    device=None,
    dtype=None,
    progress=None,
    fused: str = "auto",
):
    """C = Φ_Xᵀ S(γ)(z_x z_yᵀ) Φ_Y, streamed in tiles; S(γ) is never formed.

    Parameters
    ----------
    phi_x : array_like, shape (n, m_x)
    phi_y : array_like, shape (n, m_y)
    z_x, z_y : array_like, shape (n, r)
        Embeddings; s = z_x z_yᵀ.
    loss, temperature, nu, negatives, groups, seed
        See :class:`CrossProductOperator`.
    block_rows, block_cols, memory_budget
        Tile shape or the budget the planner fits it into.
    return_loss : bool
        Also return L(s), which pass 1 yields at no extra cost.
    device, dtype
        Where and in which precision the tiles are computed.
    progress : callable, optional
        ``progress(stage, done, total)`` after each block of rows.
    fused : {"auto", "off", "attention", "one-pass"}
        Both passes in one for one-to-one CLIP (see :class:`CrossProductOperator`).

    Returns
    -------
    C : ndarray or torch.Tensor, shape (m_x, m_y), float64
        An ndarray when ``phi_x`` is not a tensor.
    loss : float
        Only with ``return_loss=True``.

    Notes
    -----
    Time O(n²(r + m_y) + n m_x m_y) for CLIP/InfoNCE with any positive structure
    (plus O(Σ|P(i)|)), O(n² p (r + m_y)) for a general ψ with at most p positives
    per anchor; memory O((tile + n)(r + m)).
    """
    op = CrossProductOperator(
        phi_x, phi_y, z_x, z_y, loss=loss, temperature=temperature, nu=nu, negatives=negatives,
        groups=groups, seed=seed, block_rows=block_rows, block_cols=block_cols,
        memory_budget=memory_budget, device=device, dtype=dtype, progress=progress, fused=fused,
    )
    C = op.materialize()
    if not isinstance(phi_x, torch.Tensor):
        C = C.cpu().numpy()
    return (C, op.loss) if return_loss else C
