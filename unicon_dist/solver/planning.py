"""Block-size planning: a pure function of shapes, dtype and a memory budget.

The math in :mod:`unicon_dist.solver.operator` takes block sizes as arguments and never
chooses them; this module is the one place that does (after Falkon's split of
kernel arithmetic from memory planning).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

import torch

from ..math.nystrom import plan_feature_rows

__all__ = [
    "parse_bytes", "format_bytes", "TilePlan", "plan_tiles", "plan_feature_rows", "PanelPlan", "plan_panels",
    "device_tile_budget", "cuda_free_bytes", "step_bytes", "feature_map_bytes", "feature_transform_row_bytes",
    "landmark_selection_bytes",
]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_bytes(value) -> int:
    """A byte count from an integer or a size string.

    ``"2GiB"`` = 2·1024³ (binary units KiB, MiB, GiB, TiB), ``"2GB"`` = 2·10⁹ (decimal
    units kB, MB, GB, TB), ``"512"`` or ``512`` = bytes.  Units are case-insensitive.

    Raises
    ------
    ValueError
        Not a positive integer or a size string, or a size below one byte.
    """
    if isinstance(value, bool):
        raise ValueError(f"must be a byte count or a size string like '2GiB', got {value!r}")
    if isinstance(value, numbers.Integral):
        value = int(value)
        if value < 1:
            raise ValueError(f"must be a positive number of bytes, got {value!r}")
        return value
    if not isinstance(value, str) or not (m := _SIZE.match(value)) or (m.group(3) and not m.group(2)):
        raise ValueError(f"must be a byte count or a size string like '2GiB' or '500MB', got {value!r}")
    number, prefix, binary, _ = m.groups()
    base = 1024 if binary else 1000
    n = int(float(number) * base ** _POWERS[prefix.lower()])
    if n < 1:
        raise ValueError(f"must be at least one byte, got {value!r}")
    return n


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it at least 1 (e.g. "64 MiB")."""
    for unit, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if n >= 1024**power:
            return f"{n / 1024**power:.3g} {unit}"
    return f"{n} B"



# Measured on the 2-core development machine (benchmarks/bench_cross_product.py):
# tall-thin tiles of about 2^21 elements keep one tile plus its temporaries in L2/L3
# while the GEMMs that form and consume it stay efficient.
_DEFAULT_TILE_ELEMENTS = 1 << 21
_MIN_BLOCK_ROWS = 64
_DEFAULT_BLOCK_ROWS = 256
# On a GPU the same tiles leave the iteration bound by kernel launches (an H200 profile,
# RESULTS §10: 69,603 launches for 0.33 s of kernel time per iteration at n = 200,000), so
# the default there is a tile budget of 1 GiB: a whole batch of 4,096 per tile.
_DEFAULT_DEVICE_TILE_BYTES = {"cuda": 1 << 30}


@dataclass(frozen=True)
class TilePlan:
    """Tile shape for the streamed passes.

    Attributes
    ----------
    block_rows, block_cols : int
        Rows (anchors x) and columns (candidates y) of one similarity tile.
    tile_bytes : int
        Estimated peak bytes of one tile and its temporaries.
    """

    block_rows: int
    block_cols: int
    tile_bytes: int


def plan_tiles(
    n: int,
    width: int,
    *,
    itemsize: int = 4,
    slots: int = 1,
    memory_budget: int | None = None,
    block_rows: int | None = None,
    block_cols: int | None = None,
    device_type: str = "cpu",
) -> TilePlan:
    """Choose tile sizes for an n × n similarity matrix streamed against ``width`` columns.

    Parameters
    ----------
    n : int
        Number of pairs in the (batch) problem.
    width : int
        Columns of the operands multiplied by a tile (embedding rank + feature dim).
    itemsize : int
        Bytes per element of the tile arithmetic.
    slots : int
        Positives per anchor held at once (general ψ keeps one temporary per slot).
    memory_budget : int, optional
        Bytes the tiles may use; default about 64 MiB worth of elements.
    block_rows, block_cols : int, optional
        Fixed sizes; either one overrides the plan.
    device_type : str
        ``torch.device(...).type`` of the tile arithmetic: without a ``memory_budget``,
        "cuda" plans tiles of 1 GiB instead of the CPU's cache-sized ones.

    Returns
    -------
    TilePlan
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    # a tile, its exp temporary and up to two boolean/slot temporaries
    per_element = itemsize * (3 + max(slots, 1))
    if memory_budget is None and device_type in _DEFAULT_DEVICE_TILE_BYTES:
        elements = _DEFAULT_DEVICE_TILE_BYTES[device_type] // per_element
    elif memory_budget is None:
        elements = _DEFAULT_TILE_ELEMENTS
    else:
        if memory_budget <= 0:
            raise ValueError(f"memory_budget must be positive, got {memory_budget}")
        elements = max(memory_budget // per_element, _MIN_BLOCK_ROWS * _MIN_BLOCK_ROWS)
    br = block_rows or min(n, _DEFAULT_BLOCK_ROWS)
    bc = block_cols or min(n, max(_MIN_BLOCK_ROWS, elements // br))
    if block_rows is None and bc == n:
        # small problems: spend the budget on taller tiles instead
        br = min(n, max(_DEFAULT_BLOCK_ROWS, elements // max(n, 1)))
    if br <= 0 or bc <= 0:
        raise ValueError(f"block sizes must be positive, got {br} x {bc}")
    return TilePlan(int(br), int(bc), int(br) * int(bc) * per_element + int(br) * width * itemsize)


# Working memory of a pass over a store when no budget is given.
_DEFAULT_PASS_BUDGET = 2 << 30
# O(n) statistics kept for every pair during a pass: float64 log-sums and weights of rows
# and columns, the int64 group layout and batch order (rounded up).
_STATS_BYTES_PER_PAIR = 96
_MIN_PANEL_ROWS = 256
_TILE_BYTES = _DEFAULT_TILE_ELEMENTS * 16
_SLACK = 0.15


@dataclass(frozen=True)
class PanelPlan:
    """How a pass over rows that do not fit in memory is cut.

    Attributes
    ----------
    panel_rows : int
        Rows loaded at a time (two panels are resident: a row panel and a column panel).
    tile_budget : int
        Bytes given to the similarity tiles (for :func:`plan_tiles`).
    row_bytes : int
        Estimated bytes of one loaded row.
    fixed_bytes : int
        Bytes independent of the panel size: per-pair statistics, tiles and the
        caller's ``extra_bytes`` (the step's C and SVD, feature maps, read buffers).
    budget : int
        The budget planned for.
    bytes_per_panel_row : int
        What each row of ``panel_rows`` costs at the peak of a pass: two resident
        panels and pass 2's accumulator.
    """

    panel_rows: int
    tile_budget: int
    row_bytes: int
    fixed_bytes: int
    budget: int = _DEFAULT_PASS_BUDGET
    bytes_per_panel_row: int = 0

    @property
    def planned_bytes(self) -> int:
        """The working memory this plan expects at its peak (at most 85 % of ``budget``)."""
        return self.fixed_bytes + self.panel_rows * self.bytes_per_panel_row


def plan_panels(
    n: int,
    *,
    dim_x: int,
    dim_y: int,
    features_x: int,
    features_y: int,
    rank: int,
    itemsize: int = 4,
    store_itemsize: int = 4,
    memory_budget: int | None = None,
    extra_bytes: int = 0,
    row_extra_bytes: int = 0,
    what: str = "pairs",
) -> PanelPlan:
    """Panel size for a pass over n pairs within ``memory_budget`` bytes.

    A loaded row holds the read x and y, both feature maps, the embeddings and the
    row-scaled copies the passes make of them; pass 2 adds an accumulator and an operand
    of at most max(m_x, m_y) columns for the row panel.  Two panels are resident at
    once (a row panel, and a column panel while the next one loads).  The O(n) per-pair
    statistics, the tiles and ``extra_bytes`` (working memory outside the passes: see
    :func:`step_bytes`, :func:`feature_map_bytes`) come off the budget first.

    Parameters
    ----------
    memory_budget : int, optional
        Bytes for the whole fit in this process (default 2 GiB).
    extra_bytes : int
        Bytes needed alongside the panels.
    row_extra_bytes : int
        Bytes per row of the panel being loaded beyond a loaded row (e.g. a Nyström
        transform's temporaries, :func:`feature_transform_row_bytes`).
    what : str
        Names the rows in the error message (e.g. "pairs in store s.zarr").

    Raises
    ------
    ValueError
        When the budget cannot hold the fixed part and a panel of 256 rows (or of all
        rows, when fewer); the message gives the smallest budget that would.
    """
    budget = _DEFAULT_PASS_BUDGET if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget}")
    # the plan fills (1 - slack) of the budget: the allocator's free lists, the
    # interpreter's objects and small temporaries are not modelled (before the heap was
    # trimmed per panel, peaks exceeded a plan of the whole budget by up to 8 %)
    usable = int(budget * (1 - _SLACK))
    tile = min(_TILE_BYTES, usable // 8)
    row = store_itemsize * (dim_x + dim_y) + itemsize * (2 * (features_x + features_y) + 4 * rank)
    acc = itemsize * 2 * max(features_x, features_y)
    fixed = n * _STATS_BYTES_PER_PAIR + tile + int(extra_bytes)
    # two panels are live: the row panel, and a column panel while the next one loads
    per_row = 2 * row + acc + int(row_extra_bytes)
    rows = (usable - fixed) // per_row
    smallest = min(n, _MIN_PANEL_ROWS)
    if rows < smallest:
        # the tiles take budget // 8 up to a cap, so the smallest budget solves
        # b = fixed(b) + panel with tile = min(cap, b // 8)
        panel = smallest * per_row
        rest = n * _STATS_BYTES_PER_PAIR + int(extra_bytes) + panel
        usable_need = rest + _TILE_BYTES if rest >= 7 * _TILE_BYTES else -(-rest * 8 // 7)
        need = math.ceil(usable_need / (1 - _SLACK)) + 1
        raise ValueError(
            f"memory_budget={format_bytes(budget)} ({budget} bytes) is too small for {n} {what}: "
            f"the per-pair statistics take {format_bytes(n * _STATS_BYTES_PER_PAIR)}, the step, feature maps and "
            f"read buffers {format_bytes(int(extra_bytes))}, the tiles {format_bytes(tile)} and a panel of "
            f"{smallest} rows {format_bytes(panel)}; the smallest budget that fits is {format_bytes(need)} "
            f"({need} bytes)"
        )
    rows = int(min(rows, n))
    return PanelPlan(rows, int(tile), int(row), int(fixed), budget, int(per_row))


# Out-of-core fits on a GPU: the host budget bounds the panels in host RAM, and tiles cut
# to its share (at most _TILE_BYTES) leave each GPU iteration launch-bound (RESULTS §10), so
# there the tiles are sized from the device instead.  They share it with what the host plan
# does not count against the GPU -- two resident panels, pass 2's accumulator, the per-pair
# statistics, the step's C and SVD, the allocator's fragmentation -- so they take at most a
# quarter of the memory the allocator could still hand out, leaving three quarters to the rest.
_DEVICE_FREE_FRACTION = 4


def cuda_free_bytes(device) -> int | None:
    """Bytes the caching allocator could still hand out on a CUDA ``device``.

    The driver's free memory (``torch.cuda.mem_get_info``) plus the blocks the allocator
    holds but no tensor uses: those are free to this process, and without them a second
    iteration would see less memory than the first (the first one's tiles stay cached).

    Returns
    -------
    int or None
        None when this process has no CUDA (e.g. a Ray driver planning for GPU workers).
    """
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _power_of_two_below(n: int) -> int:
    return 1 << (int(n).bit_length() - 1) if n > 0 else 0


def device_tile_budget(device, floor: int = 0, *, itemsize: int = 4, free_bytes=None) -> int:
    """Tile budget (bytes) of a pass whose tiles are computed on ``device``.

    On CUDA: the default of an in-memory fit (1 GiB of float32 tiles), capped so that the
    same tiles in float64 take at most a quarter of :func:`cuda_free_bytes` (rounded down
    to a power of two), and never below ``floor``.  Elsewhere: ``floor`` unchanged.

    The budget is one element count in every precision (bytes scale with ``itemsize``):
    a float32 fit and its float64 verifier then cut their tiles alike, as the verifier's
    tile-by-tile comparison requires (the host plans scale their tile budgets the same way).

    Parameters
    ----------
    device : str or torch.device
        Where the tiles are computed.
    floor : int
        The host plan's tile budget (:attr:`PanelPlan.tile_budget`); on CUDA the result is
        at least this, elsewhere it is this.
    itemsize : int
        Bytes per element of the tile arithmetic.
    free_bytes : callable, optional
        ``free_bytes(device) -> int or None``, the memory available on the device (default
        :func:`cuda_free_bytes`; None: not measurable here, the default is not capped).

    Returns
    -------
    int
    """
    device = torch.device(device)
    if device.type not in _DEFAULT_DEVICE_TILE_BYTES:
        return int(floor)
    # bytes of the float64 tiles: twice the float32 default
    widest = 2 * _DEFAULT_DEVICE_TILE_BYTES[device.type]
    available = (cuda_free_bytes if free_bytes is None else free_bytes)(device)
    if available is not None:
        # the power of two keeps the cut (and so the summation order) from changing with
        # small changes in free memory between iterations, or between a fit and its verifier
        widest = min(widest, _power_of_two_below(available // _DEVICE_FREE_FRACTION))
    return max(int(floor), widest * int(itemsize) // 8)


def step_bytes(features_x: int, features_y: int, rank: int, *, matrix_free: bool = False,
               oversampling: int = 10) -> int:
    """Bytes of one closed-form step outside the passes (float64).

    The exact step holds C, its copy inside the SVD, the singular vectors (at most
    min(m_x, m_y) of each side), W and the previous W: six m_x × m_y matrices at most.
    The matrix-free step never forms C; the randomized SVD (Halko et al. 2011, Alg. 4.4)
    keeps test, range and product blocks of (m_x + m_y) × (rank + oversampling), about
    six of them, and the encoders.
    """
    mx, my = int(features_x), int(features_y)
    if matrix_free:
        return 8 * (6 * (mx + my) * (int(rank) + int(oversampling)) + 2 * (mx + my) * int(rank))
    return 8 * 6 * mx * my


def feature_map_bytes(n_landmarks: int, dim: int) -> int:
    """Bytes of a fitted Nyström map: landmarks and K_LL^{-1/2} with the eigendecomposition
    that forms it (float64)."""
    L = int(n_landmarks)
    return 8 * (L * int(dim) + 3 * L * L)


def feature_transform_row_bytes(n_landmarks: int) -> int:
    """Working memory of a Nyström transform per row transformed: the float64 kernel
    block, product buffer and distance temporary (blocks of :func:`plan_feature_rows`
    rows at most, so an upper bound for every panel size)."""
    return 3 * int(n_landmarks) * 8


def landmark_selection_bytes(n: int, n_landmarks: int, method: str) -> int:
    """Bytes the landmark selection holds over n rows (kept in memory: an array fit).

    "uniform" needs nothing per row; "kmeans++" keeps float64 squared distances and
    sampling weights of every row; "leverage" forms the features of every row on a
    sketch of 2L points (Alaoui & Mahoney 2015) and their squared projections.
    """
    L = int(n_landmarks)
    if method == "kmeans++":
        return 3 * 8 * int(n)
    if method == "leverage":
        return 2 * 8 * int(n) * min(int(n), 2 * L) + 8 * 3 * (2 * L) ** 2
    return 0
