"""Executors: where and how the passes over stored pairs run.

The solver (:class:`unicon_dist.UniCon`) is written against the operator interface of
:class:`unicon_dist.CrossProductOperator` (``loss``, ``shape``, ``materialize``,
``matmul``, ``rmatmul``, ``release``); an executor turns a row loader into such an
operator.  :class:`LocalExecutor` runs every pass in this process, row panel after row
panel, with panel sizes planned from the model's memory budget.
"""

from __future__ import annotations

from .planning import plan_panels
from .operator import CrossProductOperator

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """Run the passes in this process, reading the rows panel by panel.

    Memory is bounded by the model's ``memory_budget`` (default 2 GiB), not by the
    number of pairs: :func:`unicon_dist.solver.planning.plan_panels` sizes the panels, and each
    pass streams the stored rows through them.

    Examples
    --------
    >>> model = ud.UniCon(rank=64, memory_budget=1 << 30)          # doctest: +SKIP
    >>> model.fit("pairs.zarr", executor=ud.LocalExecutor())       # doctest: +SKIP
    """

    def __repr__(self) -> str:
        return "LocalExecutor()"

    def plan(self, n: int, *, memory_budget=None, **sizes):
        """The :class:`~unicon_dist.solver.planning.PanelPlan` for n pairs of the given sizes."""
        return plan_panels(n, memory_budget=memory_budget, **sizes)

    def cross_product_operator(self, loader, n: int, shape, rank: int, *, plan, **options) -> CrossProductOperator:
        """A :class:`CrossProductOperator` over ``loader``'s rows, cut as ``plan`` says.

        ``options`` are those of :meth:`CrossProductOperator.from_loader`.
        """
        return CrossProductOperator.from_loader(
            loader, n, shape, rank, panel_rows=plan.panel_rows, memory_budget=plan.tile_budget, **options
        )
