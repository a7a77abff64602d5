"""Block-size planning: a pure function of shapes, dtype and a memory budget.

The math in :mod:`unicon_dist.streamed` takes block sizes as arguments and never
chooses them; this module is the one place that does (after Falkon's split of
kernel arithmetic from memory planning).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TilePlan", "plan_tiles", "plan_feature_rows"]

# Measured on the 2-core development machine (benchmarks/bench_cross_product.py):
# tall-thin tiles of about 2^21 elements keep one tile plus its temporaries in L2/L3
# while the GEMMs that form and consume it stay efficient.
_DEFAULT_TILE_ELEMENTS = 1 << 21
_MIN_BLOCK_ROWS = 64
_DEFAULT_BLOCK_ROWS = 256


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

    Returns
    -------
    TilePlan
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    # a tile, its exp temporary and up to two boolean/slot temporaries
    per_element = itemsize * (3 + max(slots, 1))
    if memory_budget is None:
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


# Row blocks of K(X, L) in the Nyström maps: each float64 temporary of the kernel block
# stays near 8 MiB.  Measured on the 2-core development machine: blocks of 32 MiB
# temporaries (4096 rows × 1000 landmarks) ran 1.5× slower than 8 MiB ones, because
# allocations that large are fresh mmaps and page-fault on every block.
_FEATURE_BLOCK_BYTES = 8 << 20


def plan_feature_rows(n_landmarks: int, itemsize: int = 8) -> int:
    """Rows per block of the Nyström feature map for ``n_landmarks`` landmarks."""
    return max(64, _FEATURE_BLOCK_BYTES // (max(int(n_landmarks), 1) * itemsize))
