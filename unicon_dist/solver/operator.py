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

Block sizes are arguments; :func:`unicon_dist.solver.planning.plan_tiles` chooses them.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..math.losses import ContrastiveLoss, get_loss
from .planning import plan_tiles
from ..math.positives import Positives, canonical_groups
from ..math.validation import check_matrix, check_same_rows, resolve_device, resolve_dtype

__all__ = ["CrossProductOperator", "weighted_cross_product", "make_batches"]

_NEG_INF = -math.inf


BATCH_SPLITS = ("random", "contiguous")


def make_batches(n: int, negatives, seed: int = 0, split: str = "random") -> list[np.ndarray] | None:
    """Row batches for ``negatives``: None for "full", else a split into batches of B rows.

    ``split="random"``: the rows are permuted with ``np.random.default_rng(seed).permutation(n)``
    and cut into consecutive batches of ``negatives`` rows (the last may be smaller).
    ``split="contiguous"``: batches of consecutive rows, for rows already in random order
    (e.g. shuffled at ingest); read from a store, each batch is then a run of rows instead
    of rows spread over every chunk.

    ``negatives`` is "full" or an integer >= 2 (a ValueError otherwise); a last batch of
    one row, left when B does not divide n, is kept and contributes no negatives.
    """
    if split not in BATCH_SPLITS:
        raise ValueError(f"batch_split must be one of {BATCH_SPLITS}, got {split!r}")
    if isinstance(negatives, str):
        if negatives != "full":
            raise ValueError(f"negatives must be 'full' or a positive batch size, got {negatives!r}")
        return None
    if isinstance(negatives, (bool, np.bool_)) or not isinstance(negatives, (int, np.integer)):
        raise ValueError(f"negatives must be 'full' or a positive batch size, got {negatives!r}")
    if negatives <= 0:
        raise ValueError(f"negatives batch size must be positive, got {negatives}")
    if negatives == 1:
        # every batch would hold one pair and no negative: nothing to contrast, and C would
        # come out as round-off
        raise ValueError("negatives batch size must be at least 2, got 1: a batch of one row holds only its "
                         "own pair, so there is no negative to contrast it with")
    if negatives >= n:
        return None
    order = np.arange(n) if split == "contiguous" else np.random.default_rng(seed).permutation(n)
    return [order[k : k + int(negatives)] for k in range(0, n, int(negatives))]


@dataclass
class _Batch:
    """One independent block of S over ``n`` positions, in group order.

    ``rows`` maps positions to source rows (None: position p is row p).  ``panels`` cut
    the positions into ranges that are loaded as a whole; a cut never splits a group,
    so every positive pair lies inside one panel.
    """

    key: int
    n: int
    rows: np.ndarray | None
    pos: Positives
    panels: list[tuple[int, int]]
    stats: dict


@dataclass
class _Panel:
    """Positions p0:p1 of a batch, loaded: features and embeddings (z_x pre-scaled by 1/τ for ψ = exp)."""

    p0: int
    p1: int
    phi_x: torch.Tensor
    phi_y: torch.Tensor
    zx: torch.Tensor
    zy: torch.Tensor

    def local(self, i0: int, i1: int) -> slice:
        return slice(i0 - self.p0, i1 - self.p0)


class _TensorRows:
    """The loader of an operator built on in-memory tensors."""

    def __init__(self, phi_x, phi_y, zx, zy):
        self.tensors = (phi_x, phi_y, zx, zy)

    def __call__(self, rows):
        if isinstance(rows, slice):
            return tuple(t[rows] for t in self.tensors)
        index = torch.as_tensor(rows, dtype=torch.long, device=self.tensors[0].device)
        return tuple(t.index_select(0, index) for t in self.tensors)


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

    Attributes
    ----------
    shape : tuple (m_x, m_y)
    loss : float
        L(s) at the given embeddings (under the ``negatives`` restriction).
    n : int
    n_loads : int
        Panel loads so far (one per panel and pass when there is one panel per batch).
    """

    def __init__(
        self,
        phi_x,
        phi_y,
        z_x,
        z_y,
        loss="clip",
        temperature: float = 0.07,
        nu: float = 1.0,
        negatives="full",
        groups=None,
        seed: int = 0,
        block_rows: int | None = None,
        block_cols: int | None = None,
        memory_budget: int | None = None,
        device=None,
        dtype=None,
        progress=None,
        panel_rows: int | None = None,
        batch_split: str = "random",
        _force_general: bool = False,
    ):
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
        self._setup(
            _TensorRows(phi_x, phi_y, zx, zy), n, (phi_x.shape[1], phi_y.shape[1]), zx.shape[1],
            loss=loss, temperature=temperature, nu=nu, negatives=negatives, groups=groups, seed=seed,
            block_rows=block_rows, block_cols=block_cols, memory_budget=memory_budget, device=device,
            dtype=dtype, progress=progress, panel_rows=panel_rows, constant=_is_zero(zx) or _is_zero(zy),
            norm_bound=None, force_general=_force_general, batch_split=batch_split,
        )

    @classmethod
    def from_loader(
        cls,
        loader,
        n: int,
        shape: tuple[int, int],
        rank: int,
        *,
        loss="clip",
        temperature: float = 0.07,
        nu: float = 1.0,
        negatives="full",
        groups=None,
        seed: int = 0,
        batch_split: str = "random",
        panel_rows: int | None = None,
        constant: bool = False,
        norm_bound: tuple[float, float] | None = None,
        block_rows: int | None = None,
        block_cols: int | None = None,
        memory_budget: int | None = None,
        device="cpu",
        dtype=torch.float32,
        progress=None,
        owned=None,
        compute_stats: bool = True,
    ) -> "CrossProductOperator":
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
        constant : bool
            The embeddings are all zero (s ≡ 0, the first fixed-point step): the
            statistics then need no pass over the rows.
        norm_bound : (float, float), optional
            Upper bounds of ‖z_x,i‖ and ‖z_y,j‖ (e.g. 1 for unit embeddings); without them
            one extra sweep over the panels finds the maxima.
        owned : iterable of (batch, panel), optional
            The outer panels this instance computes (a worker's share; see
            :attr:`panel_keys`); products then return this share's part of C.
        compute_stats : bool
            Run pass 1 now; a distributed driver runs it through :meth:`compute_stats`
            over its workers instead and installs the result with :meth:`set_stats`.
        Other parameters
            As for the constructor.
        """
        self = cls.__new__(cls)
        self._setup(
            loader, int(n), (int(shape[0]), int(shape[1])), int(rank), loss=loss, temperature=temperature, nu=nu,
            negatives=negatives, groups=groups, seed=seed, block_rows=block_rows, block_cols=block_cols,
            memory_budget=memory_budget, device=resolve_device(device), dtype=resolve_dtype(dtype),
            progress=progress, panel_rows=panel_rows, constant=constant, norm_bound=norm_bound,
            force_general=False, batch_split=batch_split, owned=owned, compute_stats=compute_stats,
        )
        return self

    # ------------------------------------------------------------------ setup
    def _setup(self, loader, n, shape, rank, *, loss, temperature, nu, negatives, groups, seed, block_rows,
               block_cols, memory_budget, device, dtype, progress, panel_rows, constant, norm_bound,
               force_general, batch_split, owned=None, compute_stats=True):
        self.loss_fn: ContrastiveLoss = get_loss(loss, temperature=temperature, nu=nu)
        self.device, self.dtype = device, dtype
        self.n, self.shape, self.rank = n, shape, rank
        if panel_rows is not None and (isinstance(panel_rows, bool) or int(panel_rows) < 1):
            raise ValueError(f"panel_rows must be a positive integer, got {panel_rows!r}")
        self._loader = loader
        self._exp = self.loss_fn.exponential and not force_general
        self._constant = bool(constant)
        self._norm_bound = norm_bound
        self._block_rows, self._block_cols, self._budget = block_rows, block_cols, memory_budget
        self._panel_rows = int(panel_rows) if panel_rows is not None else n
        self._progress = progress
        self._buffers: dict[str, torch.Tensor] = {}
        self._cache: OrderedDict = OrderedDict()  # one loaded group of panels at a time
        self.n_loads = 0
        self.n_fetches = 0
        self._fetch = None
        self._seconds = {"statistics": 0.0, "product": 0.0}
        labels = canonical_groups(groups, n)
        batches = make_batches(n, negatives, seed, batch_split)
        self._batches = [self._make_batch(k, labels, rows) for k, rows in enumerate(batches or [None])]
        self._owner = None if owned is None else set(map(tuple, owned))
        if compute_stats:
            t0 = time.perf_counter()
            self.set_stats(self.compute_stats(lambda name, *args: [self.run_round(name, *args)]))
            self._seconds["statistics"] += time.perf_counter() - t0

    def phase_seconds(self) -> dict:
        """Seconds spent so far: pass 1 ("statistics"), products ("product"), and, when the
        loader keeps them (:class:`unicon_dist.data.rows.StoreRows`), reading rows ("read") and
        computing features and embeddings ("features") within those passes."""
        out = dict(self._seconds)
        out.update(getattr(self._loader, "seconds", {}))
        return out

    # ------------------------------------------------------------- ownership
    @property
    def panel_keys(self) -> list[tuple[int, int]]:
        """(batch, panel) of every panel, in the order passes visit them."""
        return [(b.key, k) for b in self._batches for k in range(len(b.panels))]

    def panel_sizes(self) -> list[int]:
        return [p1 - p0 for b in self._batches for p0, p1 in b.panels]

    def _owned(self, b: _Batch) -> list[int]:
        """Panels of b this instance visits as outer panels (all of them unless ``owned`` says)."""
        return [k for k in range(len(b.panels)) if self._owner is None or (b.key, k) in self._owner]

    def _whole(self, b: _Batch) -> bool:
        return len(self._owned(b)) == len(b.panels)

    # ---------------------------------------------------- pass 1 as rounds
    # Pass 1 is written as rounds: every worker computes a partial result over the outer
    # panels it owns, the driver merges the partials in worker order and hands the merged
    # values to the next round.  A batch whose panels one worker owns entirely (every batch
    # when there is one worker) is finished inside the first round, so a local pass reads
    # each panel as often as a plain loop would.
    def compute_stats(self, run, split=()) -> list[dict]:
        """Statistics of every batch.

        ``run(round, *args)`` returns one partial result per worker; ``split`` names the
        batches whose panels several workers share (none when one worker owns all).
        """
        split = list(split)
        args = self._first_round_args(run, split)
        first = run("negatives", args)
        stats: dict[int, dict] = {}
        for part in first:
            stats.update(part["done"])
        for k in split:
            b = self._batches[k]
            parts = [p["partial"][k] for p in first if k in p["partial"]]
            if self._exp:
                direct = args[k]
                if direct:
                    sums = [sum(q[i] for q in parts) for i in range(2)]
                    args[k] = (direct, torch.log(sums[0]), torch.log(sums[1]))
                else:
                    args[k] = (direct, _logaddexp_all([q[0] for q in parts]), _logaddexp_all([q[1] for q in parts]))
            else:
                stats[k] = self._finish_general(b, *args[k], *[sum(q[i] for q in parts) for i in range(4)])
        if split and self._exp:
            pos = run("positives", {k: args[k] for k in split})
            for k in split:
                parts = [p[k] for p in pos if k in p]
                direct, lneg_row, lneg_col = args[k]
                stats[k] = self._finish_exp(
                    self._batches[k], direct, lneg_row, lneg_col, _logaddexp_all([q[0] for q in parts]),
                    _logaddexp_all([q[1] for q in parts]), sum(q[2] for q in parts),
                )
        return [stats[b.key] for b in self._batches]

    def _first_round_args(self, run, split) -> dict:
        """What the first round needs for batches spread over workers: the exp path's
        choice between plain sums and log space (from the global norm maxima), and the
        positive-slot similarities of the general path."""
        if not split:
            return {}
        if not self._exp:
            slots = run("slots", split)
            return {k: tuple(sum(p[k][i] for p in slots if k in p) for i in range(2)) for k in split}
        if self._constant:
            return {k: True for k in split}
        if self._norm_bound is not None:
            bx, by = self._norm_bound
            return {k: self._direct(bx * by / self.loss_fn.temperature) for k in split}
        norms = run("norms", split)  # of z_x/τ and z_y
        return {k: self._direct(max(p[k][0] for p in norms if k in p) * max(p[k][1] for p in norms if k in p))
                for k in split}

    def run_round(self, name: str, *args):
        """One worker's part of a pass-1 round over the panels it owns."""
        return getattr(self, f"_round_{name}")(*args)

    def set_stats(self, stats: list[dict]):
        """Install the merged statistics (one dict per batch) and the loss."""
        for b, st in zip(self._batches, stats):
            b.stats = st
        self.loss = float(sum(b.stats["loss_sum"] for b in self._batches) / (2 * self.n))
        self.statistics = statistics_summary(stats)

    def _make_batch(self, key, labels, rows) -> _Batch:
        if rows is None and labels is None:
            sorted_labels = None
        else:
            rows = np.arange(self.n) if rows is None else np.asarray(rows)
            if labels is not None:
                rows = rows[np.argsort(labels[rows], kind="stable")]
                sorted_labels = labels[rows]
            else:
                sorted_labels = None
        nb = self.n if rows is None else rows.size
        pos = Positives.build(sorted_labels, nb, self.device)
        return _Batch(key, nb, rows, pos, _cut_panels(sorted_labels, nb, self._panel_rows), {})

    def _plan(self, n, width, pos):
        slots = 1 if (self._exp or pos.one_to_one) else pos.max_size
        return plan_tiles(
            n,
            width,
            itemsize=torch.finfo(self.dtype).bits // 8,
            slots=slots,
            memory_budget=self._budget,
            block_rows=self._block_rows,
            block_cols=self._block_cols,
            device_type=self.device.type,
        )

    # ---------------------------------------------------------------- panels
    def _load(self, b: _Batch, k: int) -> _Panel:
        """Panel k of batch b, from the cache or loaded with the panels after it that fit.

        Consecutive panels (of the same or later batches) are loaded together up to
        ``panel_rows`` positions, so that many small batches cost one read of the source
        rather than one each.  Only the latest group stays cached: a pass holds its row
        panel itself and streams the column panels through the cache.
        """
        for group in self._cache.values():
            if (b.key, k) in group:
                return group[(b.key, k)]
        self._cache.clear()  # before loading: at most the caller's row panel and one group alive
        if self._fetch is not None:
            # panels published once per operator (e.g. in Ray's object store) instead of
            # being read from the store on every visit
            p0, p1 = b.panels[k]
            panel = _Panel(p0, p1, *self._fetch((b.key, k)))
            self.n_fetches += 1
            self._cache[(b.key, k)] = {(b.key, k): panel}
            return panel
        keys, total = [], 0
        bi, kk = b.key, k
        while bi < len(self._batches):
            p0, p1 = self._batches[bi].panels[kk]
            if keys and total + (p1 - p0) > self._panel_rows:
                break
            keys.append((bi, kk, p0, p1))
            total += p1 - p0
            kk += 1
            if kk == len(self._batches[bi].panels):
                bi, kk = bi + 1, 0
        parts = [self._rows(self._batches[bi], p0, p1) for bi, _, p0, p1 in keys]
        if all(isinstance(p, slice) for p in parts) and all(
            a.stop == c.start for a, c in zip(parts[:-1], parts[1:])
        ):
            rows = slice(parts[0].start, parts[-1].stop)
        else:
            rows = np.concatenate([np.arange(p.start, p.stop) if isinstance(p, slice) else p for p in parts])
        phi_x, phi_y, zx, zy = self._loader(rows)
        self.n_loads += 1
        if self._exp:
            zx = zx * (1.0 / self.loss_fn.temperature)
        group, at = {}, 0
        for bi, kk, p0, p1 in keys:
            sl = slice(at, at + p1 - p0)
            group[(bi, kk)] = _Panel(p0, p1, phi_x[sl], phi_y[sl], zx[sl], zy[sl])
            at += p1 - p0
        self._cache[id(group)] = group
        return group[(b.key, k)]

    @staticmethod
    def _rows(b: _Batch, p0: int, p1: int):
        if b.rows is None:
            return slice(p0, p1)
        r = b.rows[p0:p1]
        if r.size and r[-1] - r[0] == r.size - 1 and (r.size == 1 or bool((np.diff(r) == 1).all())):
            return slice(int(r[0]), int(r[-1]) + 1)  # a run of rows reads as one range
        return r

    def published_panel(self, key) -> tuple:
        """(Φ_X, Φ_Y, z_x, z_y) of panel ``key`` as the passes use it (z_x scaled for ψ = exp),
        for publishing to other workers."""
        P = self._load(self._batches[key[0]], key[1])
        return P.phi_x, P.phi_y, P.zx, P.zy

    def use_published(self, fetch) -> None:
        """Take every panel from ``fetch(key) -> (Φ_X, Φ_Y, z_x, z_y)`` from now on."""
        self._cache.clear()
        self._fetch = fetch

    def release(self):
        """Drop the cached panels (the statistics are kept)."""
        self._cache.clear()
        self._buffers.clear()

    def _tiles(self, b: _Batch, plan, stage, rows):
        """(P, Q, i0, i1, j0, j1) over the tiles of batch b in the row panels ``rows``
        (indices into b.panels) against every column panel, row panel by row panel."""
        br, bc = plan.block_rows, plan.block_cols
        total = sum(-(-(b.panels[k][1] - b.panels[k][0]) // br) for k in rows) * len(b.panels)
        done = 0
        for kp in rows:
            P = Q = None
            P = self._load(b, kp)
            for kq in range(len(b.panels)):
                Q = None  # let the previous column panel go before the next one loads
                Q = P if kq == kp else self._load(b, kq)
                for i0 in range(P.p0, P.p1, br):
                    i1 = min(i0 + br, P.p1)
                    for j0 in range(Q.p0, Q.p1, bc):
                        yield P, Q, i0, i1, j0, min(j0 + bc, Q.p1)
                    done += 1
                    self._report(stage, done, total)

    def _buffer(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """A reusable tile-sized scratch tensor: fresh multi-megabyte allocations per tile
        cost page faults that showed up as ~20% of a pass (measured on CPU)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < rows * cols:
            buf = torch.empty(rows * cols, dtype=self.dtype, device=self.device)
            self._buffers[name] = buf
        return buf[: rows * cols].view(rows, cols)

    def _report(self, stage, done, total):
        if self._progress is not None:
            self._progress(stage, done, total)

    # --------------------------------------------------- pass 1: exponential ψ
    def _direct(self, U: float) -> bool:
        """Whether plain e^{t_ij} and the weights a_i stay normal floats in every tile.

        |t_ij| ≤ U := max‖z_x‖·max‖z_y‖/τ (Cauchy–Schwarz), so e^{t} ∈ [e^{−U}, e^{U}] and
        a_i = mean_k 1/(N_i + e^{t_ik}) ∈ [e^{−U}/n, e^{U}/(n − 1)].  With U ≤ 40 (float32;
        300 in float64) both, and their products that form S, are representable, so the
        passes need one exp per entry, plain row/column sums and no max subtraction.
        Beyond that (small τ, unnormalised embeddings) they fall back to per-row and
        per-column maxima as in FlashAttention's online softmax, which cost more.
        """
        return U <= (40.0 if self.dtype != torch.float64 else 300.0)

    def _norm_maxima(self, b: _Batch, panels) -> tuple[float, float]:
        mx = my = 0.0
        for k in panels:
            P = self._load(b, k)
            mx = max(mx, float(P.zx.norm(dim=1).max()))
            my = max(my, float(P.zy.norm(dim=1).max()))
        return mx, my

    def _round_norms(self, split) -> dict:
        return {k: self._norm_maxima(b, self._owned(b)) for k in split if (b := self._batches[k]) and self._owned(b)}

    def _round_negatives(self, args) -> dict:
        """Whole batches: their statistics; shared ones: partial row/column sums."""
        done, partial = {}, {}
        for b in self._batches:
            owned = self._owned(b)
            if not owned:
                continue
            plan = self._plan(b.n, self.rank + max(self.shape), b.pos)
            if self._whole(b):
                done[b.key] = (self._stats_exp if self._exp else self._stats_general)(b, plan)
            elif self._exp:
                partial[b.key] = self._negatives_exp(b, plan, args[b.key], owned)
            else:
                partial[b.key] = self._negatives_general(b, plan, *args[b.key], owned)
        return {"done": done, "partial": partial}

    def _round_positives(self, merged) -> dict:
        out = {}
        for k, (direct, lneg_row, lneg_col) in merged.items():
            b = self._batches[k]
            if self._owned(b):
                plan = self._plan(b.n, self.rank + max(self.shape), b.pos)
                out[k] = self._positives_exp(b, plan, lneg_row, lneg_col, self._owned(b))
        return out

    def _stats_exp(self, b: _Batch, plan) -> dict:
        """All statistics of a batch whose panels this instance owns."""
        panels = range(len(b.panels))
        if self._constant:
            direct = True
        elif self._norm_bound is not None:
            direct = self._direct(self._norm_bound[0] * self._norm_bound[1] / self.loss_fn.temperature)
        else:
            mx, my = self._norm_maxima(b, panels)
            direct = self._direct(mx * my)
        row, col = self._negatives_exp(b, plan, direct, panels)
        lneg_row, lneg_col = (torch.log(row), torch.log(col)) if direct else (row, col)
        return self._finish_exp(b, direct, lneg_row, lneg_col,
                                *self._positives_exp(b, plan, lneg_row, lneg_col, panels))

    def _negatives_exp(self, b: _Batch, plan, direct: bool, panels):
        """Σ_{j∉P(i)} e^{t_ij} over rows i of ``panels`` and every column j (its partial
        column sums); in log space unless ``direct``."""
        n, pos = b.n, b.pos
        f64 = dict(dtype=torch.float64, device=self.device)
        if self._constant:  # s ≡ 0: every negative contributes e^0 = 1
            row, col = torch.zeros((n,), **f64), torch.zeros((n,), **f64)
            for k in panels:
                p0, p1 = b.panels[k]
                row[p0:p1] = n - pos.size[p0:p1].double()
                col[p0:p1] = n - pos.size[p0:p1].double()
            return row, col
        if direct:
            row, col = torch.zeros((n,), **f64), torch.zeros((n,), **f64)
        else:
            row, col = torch.full((n,), _NEG_INF, **f64), torch.full((n,), _NEG_INF, **f64)
        for P, Q, i0, i1, j0, j1 in self._tiles(b, plan, "statistics", panels):
            zx, zy = P.zx[P.local(i0, i1)], Q.zy[Q.local(j0, j1)]
            if direct:
                e = torch.mm(zx, zy.T, out=self._buffer("e", i1 - i0, j1 - j0)).exp_()
                if pos.tile_has_positives(i0, i1, j0, j1):
                    self._zero_positives(e, pos, i0, i1, j0, j1)
                row[i0:i1] += e.sum(1)
                col[j0:j1] += e.sum(0)
                continue
            t = zx @ zy.T
            if pos.tile_has_positives(i0, i1, j0, j1):
                if pos.one_to_one:
                    t[pos.diagonal(i0, i1, j0, j1)] = _NEG_INF
                else:
                    t.masked_fill_(pos.mask(i0, i1, j0, j1), _NEG_INF)
            row[i0:i1] = torch.logaddexp(row[i0:i1], _logsumexp(t, 1).double())
            col[j0:j1] = torch.logaddexp(col[j0:j1], _logsumexp(t, 0).double())
        return row, col

    def _positives_exp(self, b: _Batch, plan, lneg_row, lneg_col, panels):
        """log Σ_{k∈P(i)} 1/(N_i + e^{t_ik}) for rows and columns of ``panels`` (−inf elsewhere),
        and their part of the loss sum."""
        lf, n = self.loss_fn, b.n
        f64 = dict(dtype=torch.float64, device=self.device)
        la_row = torch.full((n,), _NEG_INF, **f64)
        la_col = torch.full((n,), _NEG_INF, **f64)
        loss_sum = torch.zeros((), **f64)
        log_eps = math.log(lf.epsilon)
        if b.pos.one_to_one:
            # one positive per row, on the diagonal: vectors instead of diagonal tiles
            # (on a GPU the (k × k) tiles cost a third of an iteration's host time, RESULTS §10)
            for k in panels:
                P = self._load(b, k)
                for i0 in range(P.p0, P.p1, plan.block_rows):
                    i1 = min(i0 + plan.block_rows, P.p1)
                    li = P.local(i0, i1)
                    t = (P.zx[li].double() * P.zy[li].double()).sum(1)
                    ld_r = torch.logaddexp(lneg_row[i0:i1], t)
                    ld_c = torch.logaddexp(lneg_col[i0:i1], t)
                    la_row[i0:i1], la_col[i0:i1] = -ld_r, -ld_c
                    loss_sum += (2.0 * (log_eps - lf.nu * t) + ld_r + ld_c).sum()
            return la_row, la_col, float(loss_sum)
        inv_size = 1.0 / b.pos.size.double()
        for k in panels:
            for _, i0, i1, j0, j1, m, t in self._positive_tiles_of(b, self._load(b, k), plan):
                ld_r = torch.logaddexp(lneg_row[i0:i1, None], t)
                ld_c = torch.logaddexp(lneg_col[None, j0:j1], t)
                la_row[i0:i1] = torch.logaddexp(la_row[i0:i1], torch.logsumexp((-ld_r).masked_fill(~m, _NEG_INF), 1))
                la_col[j0:j1] = torch.logaddexp(la_col[j0:j1], torch.logsumexp((-ld_c).masked_fill(~m, _NEG_INF), 0))
                base = log_eps - lf.nu * t
                terms = (base + ld_r) * inv_size[i0:i1, None] + (base + ld_c) * inv_size[None, j0:j1]
                loss_sum += terms.masked_fill(~m, 0.0).sum()
        return la_row, la_col, float(loss_sum)

    def _finish_exp(self, b: _Batch, direct, lneg_row, lneg_col, la_row, la_col, loss_sum) -> dict:
        log_size = torch.log(b.pos.size.double())
        la_row = la_row - log_size  # log a_i = log mean_k 1/(N_i + e^{t_ik})
        la_col = la_col - log_size
        stats = {
            "lneg_row": lneg_row,
            "lneg_col": lneg_col,
            "la_row": la_row.to(self.dtype),
            "la_col": la_col.to(self.dtype),
            "loss_sum": float(loss_sum) * self.loss_fn.temperature,
            "direct": bool(direct),
        }
        if direct:
            # −2n·S_ij = e^{t_ij}(a_i + ã_j) for negatives (see _direct for the range)
            stats["alpha"] = torch.exp(la_row).to(self.dtype)
            stats["beta"] = torch.exp(la_col).to(self.dtype)
        if self._constant:
            stats["constant"] = (torch.exp(la_row), torch.exp(la_col))
        return stats

    @staticmethod
    def _zero_positives(e, pos, i0, i1, j0, j1):
        if pos.one_to_one:
            e[pos.diagonal(i0, i1, j0, j1)] = 0.0
        else:
            e.masked_fill_(pos.mask(i0, i1, j0, j1), 0.0)

    @staticmethod
    def _positive_tiles_of(b: _Batch, P: _Panel, plan):
        pos = b.pos
        for i0 in range(P.p0, P.p1, plan.block_rows):
            i1 = min(i0 + plan.block_rows, P.p1)
            li = P.local(i0, i1)
            if pos.one_to_one:
                # the diagonal, as an (i1 − i0)² tile with only its diagonal set; the
                # square tile keeps one code path for row and column reductions
                t = (P.zx[li].double() * P.zy[li].double()).sum(1)
                k = i1 - i0
                tt = torch.zeros((k, k), dtype=t.dtype, device=t.device)
                tt.diagonal().copy_(t)
                yield P, i0, i1, i0, i1, torch.eye(k, dtype=torch.bool, device=t.device), tt
                continue
            s0, s1 = pos.span(i0, i1)
            for j0 in range(s0, s1, plan.block_cols):
                j1 = min(j0 + plan.block_cols, s1)
                t = P.zx[li].double() @ P.zy[P.local(j0, j1)].double().T
                yield P, i0, i1, j0, j1, pos.mask(i0, i1, j0, j1), t

    # ----------------------------------------------------- pass 1: general ψ
    def _positive_slots(self, b: _Batch, plan, panels):
        """s_{i, start_i+q} and s_{start_j+q, j} for slots q < |P| of the rows of ``panels``:
        two (n, p) matrices, zero in other rows."""
        n, pos = b.n, b.pos
        p = pos.max_size
        ar = torch.arange(p, device=self.device)
        spos_row = torch.zeros((n, p), dtype=self.dtype, device=self.device)
        spos_col = torch.zeros((n, p), dtype=self.dtype, device=self.device)
        for k in panels:
            P = self._load(b, k)
            for i0 in range(P.p0, P.p1, plan.block_rows):
                i1 = min(i0 + plan.block_rows, P.p1)
                li = P.local(i0, i1)
                # slots past a group's size point at any row of the panel; `valid` masks them
                partner = (pos.start[i0:i1, None] + ar[None, :]).clamp(max=P.p1 - 1) - P.p0
                spos_row[i0:i1] = torch.einsum("ir,iqr->iq", P.zx[li], P.zy[partner])
                spos_col[i0:i1] = torch.einsum("ir,iqr->iq", P.zy[li], P.zx[partner])
        return spos_row, spos_col

    def _round_slots(self, split) -> dict:
        out = {}
        for k in split:
            b = self._batches[k]
            if self._owned(b):
                out[k] = self._positive_slots(b, self._plan(b.n, self.rank + max(self.shape), b.pos), self._owned(b))
        return out

    def _stats_general(self, b: _Batch, plan) -> dict:
        """All statistics of a batch whose panels this instance owns."""
        panels = range(len(b.panels))
        spos_row, spos_col = self._positive_slots(b, plan, panels)
        return self._finish_general(b, spos_row, spos_col, *self._negatives_general(b, plan, spos_row, spos_col, panels))

    def _negatives_general(self, b: _Batch, plan, spos_row, spos_col, panels):
        """A_ik and D_ik sums over the negatives, for rows of ``panels`` and (partial) for
        every column."""
        n, pos, lf = b.n, b.pos, self.loss_fn
        nu = lf.nu
        p = spos_row.shape[1]
        acc = dict(dtype=torch.float64, device=self.device)
        a_row, d_row = torch.zeros((n, p), **acc), torch.zeros((n, p), **acc)
        a_col, d_col = torch.zeros((n, p), **acc), torch.zeros((n, p), **acc)
        if self._constant:  # s ≡ 0: each anchor has n − |P(i)| negatives, all with x = 0
            zero = torch.zeros((), **acc)
            for k in panels:
                p0, p1 = b.panels[k]
                negs = (n - pos.size[p0:p1].double())[:, None].expand(p1 - p0, p)
                a_row[p0:p1] += negs * lf.psi(zero)
                d_row[p0:p1] += negs * lf.dpsi(zero)
                a_col[p0:p1] += negs * lf.psi(zero)
                d_col[p0:p1] += negs * lf.dpsi(zero)
            return a_row, d_row, a_col, d_col
        for P, Q, i0, i1, j0, j1 in self._tiles(b, plan, "statistics", panels):
            s = P.zx[P.local(i0, i1)] @ Q.zy[Q.local(j0, j1)].T
            neg = ~pos.mask(i0, i1, j0, j1) if pos.tile_has_positives(i0, i1, j0, j1) else None
            for q in range(int(pos.size[i0:i1].max())):
                x = s - nu * spos_row[i0:i1, q, None]
                a_row[i0:i1, q] += _masked_sum(lf.psi(x), neg, 1)
                d_row[i0:i1, q] += _masked_sum(lf.dpsi(x), neg, 1)
            for q in range(int(pos.size[j0:j1].max())):
                x = s - nu * spos_col[None, j0:j1, q]
                a_col[j0:j1, q] += _masked_sum(lf.psi(x), neg, 0)
                d_col[j0:j1, q] += _masked_sum(lf.dpsi(x), neg, 0)
        return a_row, d_row, a_col, d_col

    def _finish_general(self, b: _Batch, spos_row, spos_col, a_row, d_row, a_col, d_col) -> dict:
        lf, pos = self.loss_fn, b.pos
        nu, eps = lf.nu, lf.epsilon
        acc = dict(dtype=torch.float64, device=self.device)
        valid = torch.arange(spos_row.shape[1], device=self.device)[None, :] < pos.size[:, None]
        inv_size = (1.0 / pos.size.double())[:, None]
        out = {"loss_sum": 0.0}
        for side, a, d, sp in (("row", a_row, d_row, spos_row), ("col", a_col, d_col, spos_col)):
            own = (1.0 - nu) * sp.double()
            a = eps * (a + lf.psi(own))
            d = eps * d
            c = lf.dphi(a) * inv_size * valid
            if self._constant:  # a negative's weight at s ≡ 0 is Σ_q c_q ψ'(0) (see _cross_constant)
                out.setdefault("constant", []).append(eps * c.sum(1) * lf.dpsi(torch.zeros((), **acc)))
            out["loss_sum"] += float((lf.phi(a) * inv_size * valid).sum())
            out[f"c_{side}"] = (eps * c).to(self.dtype)  # weight of ψ' for the negatives
            out[f"pos_{side}"] = (c * (-nu * d + (1.0 - nu) * eps * lf.dpsi(own))).to(self.dtype)
            out[f"spos_{side}"] = sp
        return out

    # ------------------------------------------------------------- pass 2
    def _product(self, omega_x=None, omega_y=None) -> torch.Tensor:
        """(Φ_X Ω_x)ᵀ S (Φ_Y Ω_y) in float64 (Ω = None: the identity).

        Each tile G of −2n·S is multiplied by the narrower operand: by B_J into
        row-panel accumulators when b ≤ a, else by A_I (as Gᵀ A_I) into column-panel
        accumulators, so a product with a thin side (C·Ω, Cᵀ·Ω) costs O(n² min(a, b)).
        Block products are formed in tile precision and summed into C in float64.
        """
        a = self.shape[0] if omega_x is None else omega_x.shape[1]
        w = self.shape[1] if omega_y is None else omega_y.shape[1]
        C = torch.zeros((a, w), dtype=torch.float64, device=self.device)
        by_rows = w <= a
        tile = self._tile_exp if self._exp else self._tile_general
        left = lambda P: P.phi_x if omega_x is None else P.phi_x @ omega_x  # noqa: E731
        right = lambda P: P.phi_y if omega_y is None else P.phi_y @ omega_y  # noqa: E731
        for b in self._batches:
            if not self._owned(b):
                continue
            plan = self._plan(b.n, self.rank + min(a, w), b.pos)
            br, bc = plan.block_rows, plan.block_cols
            if "constant" in b.stats:
                C -= self._cross_constant(b, left, right, plan, tile)
                continue
            # outer panels O carry the accumulator R_O; inner panels stream past them
            outer_block, inner_block = (br, bc) if by_rows else (bc, br)
            owned = self._owned(b)
            total = sum(-(-(b.panels[k][1] - b.panels[k][0]) // outer_block) for k in owned) * len(b.panels)
            done = 0
            for ko in owned:
                O = keep = R = I = other = None
                O = self._load(b, ko)
                keep = left(O) if by_rows else right(O)
                R = torch.zeros((O.p1 - O.p0, w if by_rows else a), dtype=self.dtype, device=self.device)
                for ki in range(len(b.panels)):
                    I = other = None  # let the previous inner panel go before the next one loads
                    I = O if ki == ko else self._load(b, ki)
                    other = right(I) if by_rows else left(I)
                    for o0 in range(O.p0, O.p1, outer_block):
                        o1 = min(o0 + outer_block, O.p1)
                        acc = R[O.local(o0, o1)]
                        for i0 in range(I.p0, I.p1, inner_block):
                            i1 = min(i0 + inner_block, I.p1)
                            if by_rows:
                                acc.addmm_(tile(b, O, I, o0, o1, i0, i1), other[I.local(i0, i1)])
                            else:
                                acc.addmm_(tile(b, I, O, i0, i1, o0, o1).T, other[I.local(i0, i1)])
                        done += 1
                        self._report("product", done, total)
                for o0 in range(O.p0, O.p1, outer_block):
                    lo = O.local(o0, min(o0 + outer_block, O.p1))
                    C -= (keep[lo].T @ R[lo]).double() if by_rows else (R[lo].T @ keep[lo]).double()
        return C / (2 * self.n)

    def _cross_constant(self, b: _Batch, left, right, plan, tile) -> torch.Tensor:
        """Aᵀ(−2n·S)B in float64 when s ≡ 0 (the first step of the fixed point).

        Every negative then has the weight α_i + β_j, so off the positives −2n·S is the
        rank-two matrix α1ᵀ + 1βᵀ; the positives, a block diagonal in group order, are
        corrected tile by tile.  O(n(a + b) + Σ|P(i)|·block) instead of O(n²).
        """
        alpha, beta = b.stats["constant"]
        sums = corrections = None
        owned = self._owned(b)
        for k in owned:
            P = self._load(b, k)
            A, B = left(P), right(P)
            part = (*_weighted_column_sums(A, alpha[P.p0:P.p1], plan.block_rows),
                    *_weighted_column_sums(B, beta[P.p0:P.p1], plan.block_rows))
            sums = part if sums is None else tuple(s + q for s, q in zip(sums, part))
            for _, i0, i1, j0, j1, m, _ in self._positive_tiles_of(b, P, plan):
                corr = tile(b, P, P, i0, i1, j0, j1).double() - alpha[i0:i1, None] - beta[None, j0:j1]
                corr = corr.masked_fill_(~m, 0.0).to(self.dtype)
                Ai, Bj = A[P.local(i0, i1)], B[P.local(j0, j1)]
                if b.pos.one_to_one:  # a diagonal tile: scale rows instead of multiplying by it
                    c = ((Ai * corr.diagonal()[:, None]).T @ Bj).double()
                else:
                    c = (Ai.T @ (corr @ Bj)).double()
                corrections = c if corrections is None else corrections.add_(c)
        if len(owned) < len(b.panels):
            # a share of the rows: the rank-two term couples them with every column, so
            # the column sums are taken over all panels (one extra read, first step only)
            col = None
            for k in range(len(b.panels)):
                P = self._load(b, k)
                part = _weighted_column_sums(right(P), beta[P.p0:P.p1], plan.block_rows)
                col = part if col is None else tuple(s + q for s, q in zip(col, part))
            sums = (*sums[:2], *col)
        a_alpha, a_one, b_beta, b_one = sums
        out = torch.outer(a_alpha, b_one) + torch.outer(a_one, b_beta)
        if corrections is not None:
            out += corrections
        self._report("product", 1, 1)
        return out

    def _tile_exp(self, b: _Batch, P: _Panel, Q: _Panel, i0, i1, j0, j1) -> torch.Tensor:
        """A tile of −2n·S for ψ = exp; rows i0:i1 from panel P, columns j0:j1 from Q."""
        st = b.stats
        zx, zy = P.zx[P.local(i0, i1)], Q.zy[Q.local(j0, j1)]
        if st["direct"]:
            e = torch.mm(zx, zy.T, out=self._buffer("e", i1 - i0, j1 - j0)).exp_()
            g = torch.mul(e, st["alpha"][i0:i1, None], out=self._buffer("g", i1 - i0, j1 - j0))
            g.addcmul_(e, st["beta"][None, j0:j1])
        else:
            t = zx @ zy.T
            floor = _exp_floor(t.dtype)
            g = torch.add(t, st["la_row"][i0:i1, None]).clamp_(min=floor).exp_()
            g += t.add_(st["la_col"][None, j0:j1]).clamp_(min=floor).exp_()
            # entries below √tiny (1.1e-19 in float32) are set to 0: the GEMMs that take this
            # tile would form subnormal products with them, which run ~70× slower on CPU
            # (RESULTS §9).  C changes by less than n·B·√tiny·max|φ_x||φ_y| in absolute
            # terms: far below its float32 rounding unless all of S is that small (every
            # pair separated by more than ~45τ in similarity: a loss at its floor).
            torch.nn.functional.threshold_(g, _flush_below(g.dtype), 0.0)
        pos = b.pos
        if pos.tile_has_positives(i0, i1, j0, j1):
            # positives: (ν − σ_ik)/|P(i)| + (ν − σ̃_ik)/|P(k)| with σ the softmax weight of
            # the positive against the anchor's negatives, from float64 similarities
            nu = self.loss_fn.nu
            inv = 1.0 / pos.size.double()
            if pos.one_to_one:
                li, lj = pos.diagonal(i0, i1, j0, j1)
                r, c = li + i0, lj + j0
                t64 = (zx[li].double() * zy[lj].double()).sum(1)
                sig_r = torch.exp(t64 - torch.logaddexp(st["lneg_row"][r], t64))
                sig_c = torch.exp(t64 - torch.logaddexp(st["lneg_col"][c], t64))
                g[li, lj] = -((nu - sig_r) + (nu - sig_c)).to(g.dtype)
            else:
                m = pos.mask(i0, i1, j0, j1)
                t64 = zx.double() @ zy.double().T
                sig_r = torch.exp(t64 - torch.logaddexp(st["lneg_row"][i0:i1, None], t64))
                sig_c = torch.exp(t64 - torch.logaddexp(st["lneg_col"][None, j0:j1], t64))
                q = (nu - sig_r) * inv[i0:i1, None] + (nu - sig_c) * inv[None, j0:j1]
                g = torch.where(m, (-q).to(g.dtype), g)
        return g

    def _tile_general(self, b: _Batch, P: _Panel, Q: _Panel, i0, i1, j0, j1) -> torch.Tensor:
        """A tile of −2n·S = 2n·∂L/∂s for a general ψ."""
        st, pos, lf = b.stats, b.pos, self.loss_fn
        nu = lf.nu
        s = P.zx[P.local(i0, i1)] @ Q.zy[Q.local(j0, j1)].T
        g = torch.zeros_like(s)
        for q in range(int(pos.size[i0:i1].max())):
            g += st["c_row"][i0:i1, q, None] * lf.dpsi(s - nu * st["spos_row"][i0:i1, q, None])
        for q in range(int(pos.size[j0:j1].max())):
            g += st["c_col"][None, j0:j1, q] * lf.dpsi(s - nu * st["spos_col"][None, j0:j1, q])
        if pos.tile_has_positives(i0, i1, j0, j1):
            m = pos.mask(i0, i1, j0, j1)
            rows = torch.arange(i0, i1, device=self.device)[:, None]
            cols = torch.arange(j0, j1, device=self.device)[None, :]
            p = st["pos_row"].shape[1]
            slot_r = (cols - pos.start[i0:i1, None]).clamp(0, p - 1)
            slot_c = (rows - pos.start[None, j0:j1]).clamp(0, p - 1)
            val = st["pos_row"][i0:i1].gather(1, slot_r) + st["pos_col"][j0:j1].T.gather(0, slot_c)
            g = torch.where(m, val, g)
        return g

    # ------------------------------------------------------ single tiles
    def tile_keys(self) -> list[tuple]:
        """Every tile of a :meth:`materialize` pass over the panels this instance owns, as
        (batch, row panel, column panel, i0, i1, j0, j1) with positions inside the batch.

        Tiles of a constant batch (s ≡ 0, the first step) are not listed: that pass never
        forms them (see ``_cross_constant``).
        """
        keys = []
        width = self.rank + min(self.shape)
        for b in self._batches:
            if "constant" in b.stats:
                continue
            plan = self._plan(b.n, width, b.pos)
            br, bc = plan.block_rows, plan.block_cols
            for kp in self._owned(b):
                p0, p1 = b.panels[kp]
                for kq, (q0, q1) in enumerate(b.panels):
                    for i0 in range(p0, p1, br):
                        for j0 in range(q0, q1, bc):
                            keys.append((b.key, kp, kq, i0, min(i0 + br, p1), j0, min(j0 + bc, q1)))
        return keys

    def tile_product(self, key) -> torch.Tensor:
        """One tile's part of C, Φ_X[I]ᵀ S[I, J] Φ_Y[J] (float64, formed in the tile dtype),
        for a ``key`` of :meth:`tile_keys`; the parts of all keys sum to :meth:`materialize`."""
        bk, kp, kq, i0, i1, j0, j1 = key
        b = self._batches[bk]
        P = self._load(b, kp)
        Q = P if kq == kp else self._load(b, kq)
        tile = self._tile_exp if self._exp else self._tile_general
        G = tile(b, P, Q, i0, i1, j0, j1)
        part = P.phi_x[P.local(i0, i1)].T @ (G @ Q.phi_y[Q.local(j0, j1)])
        return -part.double() / (2 * self.n)

    def batch_rows(self, key: int, p0: int, p1: int) -> np.ndarray:
        """The source row numbers at positions p0:p1 of batch ``key`` (for error messages)."""
        rows = self._batches[key].rows
        return np.arange(p0, p1) if rows is None else np.asarray(rows[p0:p1])

    # --------------------------------------------------------- public products
    def _timed_product(self, omega_x=None, omega_y=None) -> torch.Tensor:
        t0 = time.perf_counter()
        C = self._product(omega_x, omega_y)
        self._seconds["product"] += time.perf_counter() - t0
        return C

    def materialize(self) -> torch.Tensor:
        """C = Φ_Xᵀ S Φ_Y, float64 (m_x × m_y)."""
        return self._timed_product()

    def matmul(self, omega) -> torch.Tensor:
        """C Ω without forming C: Φ_Xᵀ S (Φ_Y Ω); Ω has shape (m_y, k)."""
        omega = torch.as_tensor(omega, device=self.device).to(self.dtype)
        return self._timed_product(omega_y=omega)

    def rmatmul(self, omega) -> torch.Tensor:
        """Cᵀ Ω without forming C: (Ωᵀ Φ_Xᵀ S Φ_Y)ᵀ; Ω has shape (m_x, k)."""
        omega = torch.as_tensor(omega, device=self.device).to(self.dtype)
        return self._timed_product(omega_x=omega).T


def statistics_summary(stats: list[dict]) -> dict:
    """Range of pass 1's log-sum-exp statistics, and whether the overflow guard fired.

    ``lse_min``/``lse_max``: the extremes of log Σ_{j∉P(i)} e^{s_ij/τ} over every row and
    column of every batch (finite values; None for a general ψ, whose pass 1 keeps plain
    sums).  ``log_space_batches``: batches whose statistics were kept in log space because
    e^{s/τ} could overflow the tile dtype (see ``CrossProductOperator._direct``).
    """
    lo, hi, log_space = math.inf, -math.inf, 0
    for st in stats:
        if "lneg_row" not in st:
            continue
        log_space += not st["direct"]
        for key in ("lneg_row", "lneg_col"):
            v = st[key][torch.isfinite(st[key])]
            if v.numel():
                lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    finite = lo <= hi
    return {"lse_min": lo if finite else None, "lse_max": hi if finite else None,
            "log_space_batches": log_space, "batches": len(stats)}


def _cut_panels(sorted_labels, n: int, panel_rows: int) -> list[tuple[int, int]]:
    """Consecutive position ranges of at most ``panel_rows`` that never split a group.

    A group larger than ``panel_rows`` gets a panel of its own, of its size.
    """
    if n <= panel_rows:
        return [(0, n)]
    if sorted_labels is None:
        return [(p, min(p + panel_rows, n)) for p in range(0, n, panel_rows)]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_labels)) + 1, [n]])
    panels, p0 = [], 0
    while p0 < n:
        # the last group start within reach, or the end of p0's group when it is too big
        k = np.searchsorted(starts, p0 + panel_rows, side="right") - 1
        p1 = int(starts[k]) if starts[k] > p0 else int(starts[np.searchsorted(starts, p0, side="right")])
        panels.append((p0, p1))
        p0 = p1
    return panels


def _exp_floor(dtype: torch.dtype) -> float:
    """Where exp arguments are clamped before an exp that may underflow.

    torch's CPU exp is 10–40× slower on inputs whose result underflows (subnormal, zero,
    or exp(−inf)) than on ordinary ones, and at τ = 0.01 most of a log-space tile
    underflows: a float32 solve took 25× as long as its float64 twin (RESULTS §9).
    Clamping the argument at log(tiny) + 1 keeps every result a normal float.  A term that
    should have been below e·tiny (1.2e-38 · e in float32, 2.2e-308 · e in float64)
    becomes e·tiny instead: an absolute change far below the rounding of the terms it is
    summed with, which are relative to a maximum of 1 (``_logsumexp``); ``_tile_exp``
    then drops such entries altogether (``_flush_below``).
    """
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _flush_below(dtype: torch.dtype) -> float:
    """√tiny of ``dtype``: tile entries below it are dropped (see ``_tile_exp``)."""
    return math.sqrt(torch.finfo(dtype).tiny)


def _logsumexp(t: torch.Tensor, dim: int) -> torch.Tensor:
    """log Σ exp along ``dim``, −inf for all −inf slices.

    Written out because torch.logsumexp over dim 0 of a row-major tile is several
    times slower than the max/exp/sum sequence here (measured on CPU); t − max is clamped
    at ``_exp_floor`` (see there), and slices that are all −inf are set back to −inf.
    """
    m = t.amax(dim, keepdim=True)
    empty = m == _NEG_INF
    m = torch.where(empty, torch.zeros_like(m), m)
    out = (torch.sub(t, m).clamp_(min=_exp_floor(t.dtype)).exp_().sum(dim, keepdim=True).log_() + m)
    return out.masked_fill_(empty, _NEG_INF).squeeze(dim)


def _weighted_column_sums(A: torch.Tensor, w: torch.Tensor, block: int):
    """(Aᵀw, Aᵀ1) in float64, one row block at a time (no float64 copy of A)."""
    aw = torch.zeros(A.shape[1], dtype=torch.float64, device=A.device)
    a1 = torch.zeros_like(aw)
    for i0 in range(0, A.shape[0], block):
        blk = A[i0 : i0 + block].double()
        aw += blk.T @ w[i0 : i0 + block]
        a1 += blk.sum(0)  # float64: a plain float32 column sum over millions of rows loses digits
    return aw, a1


def _logaddexp_all(parts: list[torch.Tensor]) -> torch.Tensor:
    """log Σ exp over a list of log-space partials, combined in list order."""
    out = parts[0]
    for p in parts[1:]:
        out = torch.logaddexp(out, p)
    return out


def _is_zero(t: torch.Tensor) -> bool:
    return not bool(t.any())


def _masked_sum(v: torch.Tensor, keep: torch.Tensor | None, dim: int) -> torch.Tensor:
    if keep is not None:
        v = v.masked_fill(~keep, 0.0)
    return v.sum(dim).double()


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
        memory_budget=memory_budget, device=device, dtype=dtype, progress=progress,
    )
    C = op.materialize()
    if not isinstance(phi_x, torch.Tensor):
        C = C.cpu().numpy()
    return (C, op.loss) if return_loss else C
