"""The options of the streamed passes, in one frozen dataclass (after Falkon's ``FalkonOptions``).

:class:`PassOptions` is what the operator, the executors and the Ray workers pass along
instead of a list of keywords; the data -- the row loader, n, the widths and the groups
of positives -- travel beside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..math.validation import resolve_dtype
from .planning import device_tile_budget

__all__ = ["PassOptions"]


@dataclass(frozen=True)
class PassOptions:
    """How S(γ) is defined and how its passes are cut and computed.

    Attributes
    ----------
    loss : str or ContrastiveLoss
        The loss (:func:`unicon_dist.math.losses.get_loss`), with ``temperature`` and ``nu``.
    temperature, nu : float
    negatives : "full" or int
        All n² pairs, or a seeded split into batches of this size
        (:func:`unicon_dist.solver.layout.make_batches`).
    seed : int
        Seed of the batch split.
    batch_split : {"random", "contiguous"}
    panel_rows : int, optional
        Positions per panel (default: one panel per batch).
    block_rows, block_cols, memory_budget
        Tile shape, or the budget the planner fits it into (:func:`unicon_dist.plan_tiles`).
    constant : bool
        The embeddings are all zero (s ≡ 0, the first fixed-point step): pass 1 needs no
        pass over the rows and pass 2 is closed form.
    norm_bound : (float, float), optional
        Upper bounds of ‖z_x,i‖ and ‖z_y,j‖ (e.g. 1 for unit embeddings); without them one
        extra sweep over the panels finds the maxima.
    device, dtype
        Where and in which precision the tiles are computed (None: the builder's default).
    progress : callable, optional
        ``progress(stage, done, total)`` after each block of rows.
    fused : {"auto", "off", "attention", "one-pass"}
        Whether one-to-one CLIP batches take both passes at once, through fused attention
        kernels or a stored tile of e^{s/τ}, instead of the two tiled passes
        (:mod:`unicon_dist.solver.fused`); "auto" where eligible, faster by its cost model
        and as accurate.
    matrix_free : bool
        The operator will serve products with thin Ω (the randomized SVD) rather than be
        materialised; the fused path's cost model reads it.
    """

    loss: Any = "clip"
    temperature: float = 0.07
    nu: float = 1.0
    negatives: Any = "full"
    seed: int = 0
    batch_split: str = "random"
    panel_rows: int | None = None
    block_rows: int | None = None
    block_cols: int | None = None
    memory_budget: int | None = None
    constant: bool = False
    norm_bound: tuple[float, float] | None = None
    device: Any = None
    dtype: Any = None
    progress: Callable | None = None
    fused: str = "auto"
    matrix_free: bool = False

    def __post_init__(self):
        if self.fused not in ("auto", "off", "attention", "one-pass"):
            raise ValueError(f"fused must be 'auto', 'off', 'attention' or 'one-pass', got {self.fused!r}")

    @classmethod
    def of(cls, options: "PassOptions | None" = None, **keywords) -> "PassOptions":
        """``options`` (default: the defaults) with ``keywords`` replaced; an unknown keyword
        is a TypeError naming it."""
        base = cls() if options is None else options
        if not isinstance(base, cls):
            raise TypeError(f"options must be a PassOptions, got {type(base).__name__}")
        unknown = sorted(set(keywords) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown pass option(s) {', '.join(map(repr, unknown))}")
        return dataclasses.replace(base, **keywords) if keywords else base

    def with_plan(self, plan) -> "PassOptions":
        """These options cut as a :class:`~unicon_dist.solver.planning.PanelPlan` says.

        The panels follow the plan; so do the tiles on the CPU.  On CUDA the tiles take
        :func:`~unicon_dist.solver.planning.device_tile_budget` (the plan's budget at least):
        the plan bounds host memory, and its small tiles would leave the GPU launch-bound.
        """
        device = "cpu" if self.device is None else self.device
        itemsize = torch.finfo(torch.float32 if self.dtype is None else resolve_dtype(self.dtype)).bits // 8
        return dataclasses.replace(self, panel_rows=plan.panel_rows,
                                   memory_budget=device_tile_budget(device, plan.tile_budget, itemsize=itemsize))
