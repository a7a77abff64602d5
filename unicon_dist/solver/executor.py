"""Executors: where and how the passes over stored pairs run.

The solver (:class:`unicon_dist.UniCon`) is written against the operator interface of
:class:`unicon_dist.CrossProductOperator` (``loss``, ``statistics``, ``shape``,
``materialize``, ``matmul``, ``rmatmul``, ``release``, ``phase_seconds``); an executor
turns a row loader into such an operator.  :class:`Executor` states that contract.

It lives here, in the solver, rather than in :mod:`unicon_dist.execution`: the solver is
its consumer, and runs with :class:`LocalExecutor` (every pass in this process, row panel
after row panel, panel sizes planned from the model's memory budget) when no executor is
given -- and the solver may not import the execution layer above it.  Executors that need
more machinery (:class:`unicon_dist.RayExecutor`) live in :mod:`unicon_dist.execution` and
are built on the solver's public layout and passes (:mod:`.layout`, :mod:`.passes`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .operator import CrossProductOperator
from .options import PassOptions
from .planning import PanelPlan, plan_panels

__all__ = ["Executor", "LocalExecutor"]


@runtime_checkable
class Executor(Protocol):
    """What the solver needs of an executor.

    Attributes
    ----------
    distributed : bool
        The passes run outside this process; the solver then keeps its own state (feature
        maps, encoders, W) on the CPU and only the workers use the model's device.
    """

    distributed: bool

    def plan(self, n: int, *, memory_budget=None, **sizes) -> PanelPlan:
        """The :class:`~unicon_dist.solver.planning.PanelPlan` of passes over n pairs
        (``sizes`` as for :func:`~unicon_dist.solver.planning.plan_panels`)."""
        ...

    def cross_product_operator(self, loader, n: int, shape, rank: int, *, plan, **options):
        """An operator over ``loader``'s n rows, cut as ``plan`` says; ``options`` are those
        of :meth:`CrossProductOperator.from_loader` (keywords of
        :class:`~unicon_dist.solver.options.PassOptions`, ``options=``, ``groups=``)."""
        ...


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

    distributed = False

    def __repr__(self) -> str:
        return "LocalExecutor()"

    def plan(self, n: int, *, memory_budget=None, **sizes) -> PanelPlan:
        """The :class:`~unicon_dist.solver.planning.PanelPlan` for n pairs of the given sizes."""
        return plan_panels(n, memory_budget=memory_budget, **sizes)

    def cross_product_operator(self, loader, n: int, shape, rank: int, *, plan, groups=None,
                               options: PassOptions | None = None, **keywords) -> CrossProductOperator:
        """A :class:`CrossProductOperator` over ``loader``'s rows, cut as ``plan`` says.

        ``options`` (a :class:`~unicon_dist.solver.options.PassOptions`) and ``keywords``
        (its fields) are those of :meth:`CrossProductOperator.from_loader`; the plan sets
        ``panel_rows`` and ``memory_budget``.
        """
        options = PassOptions.of(options, **keywords).with_plan(plan)
        return CrossProductOperator.from_loader(loader, n, shape, rank, groups=groups, options=options)
