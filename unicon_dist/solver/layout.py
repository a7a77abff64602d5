"""How the passes cut the rows: batches (the negatives), panels (what is loaded at once), owners.

* A *batch* is an independent diagonal block of S: all n rows (``negatives="full"``) or a
  seeded split of them into batches of B rows (:func:`make_batches`).  Within a batch the
  rows are put in group order, so every group of positives is a contiguous range of
  *positions* (:class:`unicon_dist.math.positives.Positives`).
* A *panel* is a range of positions loaded as a whole; panels never split a group
  (:func:`cut_panels`), so every positive pair lies inside one panel.
* An *owner* (a worker) visits some panels as outer panels; :func:`assign_panels` deals
  them out in contiguous runs balanced by rows.  A panel is named by its key
  (batch, panel index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..math.positives import Positives, canonical_groups

__all__ = ["AUTO_BATCH", "AUTO_FULL_ROWS", "BATCH_SPLITS", "resolve_negatives", "make_batches", "cut_panels", "Batch", "Layout", "assign_panels", "shared_batches"]

BATCH_SPLITS = ("random", "contiguous")


# negatives="auto": full negatives up to AUTO_FULL_ROWS pairs, batches of AUTO_BATCH above.
# Measured (benchmarks/bench_negatives.py, RESULTS §12): held-out R@1 is the same for B from
# 512 to 8192 on Fashion-MNIST (0.542-0.545) and WordNet (0.117-0.118) while the cost grows
# with B; B = 1024 costs 0.91 s per iteration on Fashion-MNIST (60k rows) against 1.51 s for
# 2048 and 0.88 s for 512 (on WordNet 40k: 2.0, 2.9 and 1.0 s).  1024 rather than 512 keeps
# each pass to half as many batches (kernel launches on a GPU, RESULTS §10), at up to 2x
# the CPU cost of 512 (WordNet).
# A full pass at n = 4,000 costs 1.65 passes of B = 1024, so full negatives stay within a few
# batched passes up to 4 B.
AUTO_BATCH = 1024
AUTO_FULL_ROWS = 4 * AUTO_BATCH


def resolve_negatives(n: int, negatives):
    """``negatives`` with "auto" resolved for n pairs: "full" up to :data:`AUTO_FULL_ROWS`, else :data:`AUTO_BATCH`."""
    if isinstance(negatives, str) and negatives == "auto":
        return "full" if n <= AUTO_FULL_ROWS else AUTO_BATCH
    return negatives


def make_batches(n: int, negatives, seed: int = 0, split: str = "random") -> list[np.ndarray] | None:
    """Row batches for ``negatives``: None for "full", else a split into batches of B rows.

    "auto" is resolved first (:func:`resolve_negatives`).

    ``split="random"``: the rows are permuted with ``np.random.default_rng(seed).permutation(n)``
    and cut into consecutive batches of ``negatives`` rows (the last may be smaller).
    ``split="contiguous"``: batches of consecutive rows, for rows already in random order
    (e.g. shuffled at ingest); read from a store, each batch is then a run of rows instead
    of rows spread over every chunk.

    ``negatives`` is "full", "auto" or an integer >= 2 (a ValueError otherwise); a last batch of
    one row, left when B does not divide n, is kept and contributes no negatives.
    """
    if split not in BATCH_SPLITS:
        raise ValueError(f"batch_split must be one of {BATCH_SPLITS}, got {split!r}")
    negatives = resolve_negatives(n, negatives)
    if isinstance(negatives, str):
        if negatives != "full":
            raise ValueError(f"negatives must be 'full', 'auto' or a positive batch size, got {negatives!r}")
        return None
    if isinstance(negatives, (bool, np.bool_)) or not isinstance(negatives, (int, np.integer)):
        raise ValueError(f"negatives must be 'full', 'auto' or a positive batch size, got {negatives!r}")
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


def cut_panels(sorted_labels, n: int, panel_rows: int) -> list[tuple[int, int]]:
    """Consecutive position ranges of at most ``panel_rows`` that never split a group.

    ``sorted_labels``: the group label of each position, non-decreasing (None: one-to-one
    pairs).  A group larger than ``panel_rows`` gets a panel of its own, of its size.
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


@dataclass(frozen=True, eq=False)
class Batch:
    """One independent block of S over ``n`` positions, in group order.

    Attributes
    ----------
    key : int
        Its index in the layout.
    n : int
        Positions (rows) in the batch.
    rows : ndarray of int64 or None
        Source row of each position (None: position p is row p).
    pos : Positives
        The positive structure over the positions.
    panels : list of (p0, p1)
        The position ranges loaded as a whole (:func:`cut_panels`).
    """

    key: int
    n: int
    rows: np.ndarray | None
    pos: Positives
    panels: list[tuple[int, int]]

    def source_rows(self, p0: int, p1: int):
        """The rows at positions p0:p1 as a loader takes them: a slice when they are a run."""
        if self.rows is None:
            return slice(p0, p1)
        r = self.rows[p0:p1]
        if r.size and r[-1] - r[0] == r.size - 1 and (r.size == 1 or bool((np.diff(r) == 1).all())):
            return slice(int(r[0]), int(r[-1]) + 1)  # a run of rows reads as one range
        return r

    def row_numbers(self, p0: int, p1: int) -> np.ndarray:
        """The source row numbers at positions p0:p1, as an array (for error messages)."""
        return np.arange(p0, p1) if self.rows is None else np.asarray(self.rows[p0:p1])


def _batch(key: int, n: int, labels, rows, panel_rows: int, device) -> Batch:
    if rows is None and labels is None:
        sorted_labels = None
    else:
        rows = np.arange(n) if rows is None else np.asarray(rows)
        if labels is not None:
            rows = rows[np.argsort(labels[rows], kind="stable")]
            sorted_labels = labels[rows]
        else:
            sorted_labels = None
    nb = n if rows is None else rows.size
    pos = Positives.build(sorted_labels, nb, device)
    return Batch(key, nb, rows, pos, cut_panels(sorted_labels, nb, panel_rows))


@dataclass(frozen=True, eq=False)
class Layout:
    """The batches and panels of a pass over n rows (built once per operator).

    Attributes
    ----------
    n : int
    panel_rows : int
        Most positions per panel, and per group of consecutive panels loaded together.
    batches : tuple of Batch
    """

    n: int
    panel_rows: int
    batches: tuple[Batch, ...]

    @classmethod
    def build(cls, n: int, *, groups=None, negatives="full", seed: int = 0, batch_split: str = "random",
              panel_rows: int | None = None, device="cpu") -> "Layout":
        """The layout of n pairs: ``groups`` (one label per row, or None) as positives,
        ``negatives``/``seed``/``batch_split`` as for :func:`make_batches`, panels of at most
        ``panel_rows`` positions (default: one panel per batch); ``device`` holds the
        positive structure."""
        if panel_rows is not None and (isinstance(panel_rows, bool) or int(panel_rows) < 1):
            raise ValueError(f"panel_rows must be a positive integer, got {panel_rows!r}")
        panel_rows = int(panel_rows) if panel_rows is not None else n
        labels = canonical_groups(groups, n)
        split = make_batches(n, negatives, seed, batch_split)
        return cls(n, panel_rows, tuple(_batch(k, n, labels, rows, panel_rows, device)
                                        for k, rows in enumerate(split or [None])))

    @property
    def panel_keys(self) -> list[tuple[int, int]]:
        """(batch, panel) of every panel, in the order passes visit them."""
        return [(b.key, k) for b in self.batches for k in range(len(b.panels))]

    def panel_sizes(self) -> list[int]:
        """Positions of every panel, in :attr:`panel_keys` order."""
        return [p1 - p0 for b in self.batches for p0, p1 in b.panels]

    def owned(self, b: Batch, owner) -> list[int]:
        """Panels of ``b`` an owner visits as outer panels: all when ``owner`` is None, else
        those whose key is in ``owner`` (a set of (batch, panel))."""
        return [k for k in range(len(b.panels)) if owner is None or (b.key, k) in owner]

    def whole(self, b: Batch, owner) -> bool:
        """Whether ``owner`` visits every panel of ``b`` (then it finishes b's statistics alone)."""
        return len(self.owned(b, owner)) == len(b.panels)

    def load_group(self, key: tuple[int, int]) -> list[tuple[int, int, int, int]]:
        """(batch, panel, p0, p1) of panel ``key`` and the panels after it (of the same or
        later batches) that fit with it in ``panel_rows`` positions: one read of the source
        for many small batches."""
        keys, total = [], 0
        bi, kk = key
        while bi < len(self.batches):
            p0, p1 = self.batches[bi].panels[kk]
            if keys and total + (p1 - p0) > self.panel_rows:
                break
            keys.append((bi, kk, p0, p1))
            total += p1 - p0
            kk += 1
            if kk == len(self.batches[bi].panels):
                bi, kk = bi + 1, 0
        return keys


def assign_panels(sizes: list[int], n_workers: int) -> list[list[int]]:
    """Contiguous runs of panel indices, one per worker, balanced by rows.

    Worker w takes the panels whose first row falls in [w·N/W, (w+1)·N/W) of the N rows.
    """
    total = sum(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    owner = np.minimum((starts * n_workers) // max(total, 1), n_workers - 1)
    return [np.flatnonzero(owner == w).tolist() for w in range(n_workers)]


def shared_batches(shares: list[list[tuple[int, int]]]) -> list[int]:
    """Batches whose panels several owners share (``shares``: each owner's panel keys),
    in order of first appearance: pass 1 merges their partial statistics in rounds."""
    owners: dict[int, set] = {}
    for w, share in enumerate(shares):
        for b, _ in share:
            owners.setdefault(b, set()).add(w)
    return [b for b, ws in owners.items() if len(ws) > 1]
