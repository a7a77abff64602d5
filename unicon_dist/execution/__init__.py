"""Executors: where the passes run.

:class:`Executor` (the protocol) and :class:`LocalExecutor` live in the solver, their
consumer (:mod:`unicon_dist.solver.executor`); :class:`RayExecutor` in :mod:`.ray`.  All
three are re-exported here, loaded on first use.
"""

__all__ = ["Executor", "LocalExecutor", "RayExecutor"]


def __getattr__(name):
    if name in ("Executor", "LocalExecutor"):
        from ..solver import executor

        return getattr(executor, name)
    if name == "RayExecutor":
        from .ray.driver import RayExecutor

        return RayExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
