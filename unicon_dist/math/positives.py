"""The positive structure P(i) = {j : g_j = g_i} in a form the tiled passes can use.

Rows are put in group order once, so every group is a contiguous range of rows and
the positives of any row block lie in one contiguous range of columns.  A tile then
holds positives only where that range meets it, and the passes mask just those
tiles; every other tile is pure negatives.  C = Φ_Xᵀ S Φ_Y is unchanged when the
rows of Φ_X, Φ_Y and the embeddings are permuted together, so nothing is lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Positives", "canonical_groups"]


def canonical_groups(groups, n: int) -> np.ndarray | None:
    """Validate ``groups`` and relabel to 0..G-1; return None for one-to-one pairs.

    Raises
    ------
    ValueError
        If ``groups`` is not one integer label per row.
    """
    if groups is None:
        return None
    if isinstance(groups, torch.Tensor):
        groups = groups.detach().cpu().numpy()
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must be a 1-D array with one label per pair (n={n}), got shape {g.shape}")
    if g.dtype.kind not in "iub":
        if g.dtype.kind == "f" and np.all(np.isfinite(g)) and np.all(g == np.round(g)):
            g = g.astype(np.int64)
        else:
            raise ValueError(f"groups must hold integer labels, got dtype {g.dtype}")
    _, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    if counts.max(initial=1) == 1:
        return None
    return inverse.astype(np.int64)


@dataclass
class Positives:
    """Group layout of n rows already sorted by group.

    Attributes
    ----------
    n : int
    one_to_one : bool
        True when every group has one member (positives are the diagonal).
    group : torch.Tensor or None, shape (n,)
        Sorted group label of each row (None when one-to-one).
    start : torch.Tensor, shape (n,)
        First row of each row's group.
    size : torch.Tensor, shape (n,)
        |P(i)|, the size of each row's group.
    max_size : int
    """

    n: int
    one_to_one: bool
    group: torch.Tensor | None
    start: torch.Tensor
    size: torch.Tensor
    max_size: int

    @classmethod
    def build(cls, sorted_labels: np.ndarray | None, n: int, device) -> "Positives":
        """From labels already in sorted (non-decreasing) order, or None for one-to-one."""
        if sorted_labels is None:
            ar = torch.arange(n, device=device)
            return cls(n, True, None, ar, torch.ones(n, dtype=torch.long, device=device), 1)
        lab = np.asarray(sorted_labels)
        boundaries = np.flatnonzero(np.diff(lab)) + 1
        starts = np.concatenate([[0], boundaries])
        sizes = np.diff(np.concatenate([starts, [n]]))
        row_start = np.repeat(starts, sizes)
        row_size = np.repeat(sizes, sizes)
        return cls(
            n,
            bool(sizes.max() == 1),
            torch.as_tensor(lab, dtype=torch.long, device=device),
            torch.as_tensor(row_start, dtype=torch.long, device=device),
            torch.as_tensor(row_size, dtype=torch.long, device=device),
            int(sizes.max()),
        )

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """Columns holding the positives of rows ``lo:hi``."""
        if self.one_to_one:
            return lo, hi
        return int(self.start[lo]), int(self.start[hi - 1] + self.size[hi - 1])

    def tile_has_positives(self, i0: int, i1: int, j0: int, j1: int) -> bool:
        s0, s1 = self.span(i0, i1)
        return s0 < j1 and j0 < s1

    def diagonal(self, i0: int, i1: int, j0: int, j1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One-to-one only: local (row, col) positions of the positives in a tile."""
        k = torch.arange(max(i0, j0), min(i1, j1), device=self.start.device)
        return k - i0, k - j0

    def mask(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """Boolean tile, True where (i, j) is a positive pair."""
        if self.one_to_one:
            rows = torch.arange(i0, i1, device=self.start.device)
            cols = torch.arange(j0, j1, device=self.start.device)
            return rows[:, None] == cols[None, :]
        return self.group[i0:i1, None] == self.group[None, j0:j1]
