"""Ray execution: the passes on Ray actors (``worker``: the actor, ``driver``: RayExecutor
and the driver-side operator, ``cluster``: start-up and placement).  Ray itself is
imported only when an executor starts."""

from .driver import DistributedOperator, RayExecutor
from .worker import PanelWorker

__all__ = ["RayExecutor", "DistributedOperator", "PanelWorker"]
