"""The options of the streamed passes, in one frozen dataclass (after Falkon's ``FalkonOptions``).

:class:`PassOptions` is what the operator, the executors and the Ray workers pass along
instead of a list of keywords; the data -- the row loader, n, the widths and the groups
of positives -- travel beside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

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
        """These options cut as a :class:`~unicon_dist.solver.planning.PanelPlan` says."""
        return dataclasses.replace(self, panel_rows=plan.panel_rows, memory_budget=plan.tile_budget)
