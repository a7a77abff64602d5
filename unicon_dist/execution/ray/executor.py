"""Old path of the Ray executor (before worker/driver/cluster were split), kept for one release."""

from ...solver.layout import assign_panels
from .driver import DistributedOperator, RayExecutor
from .worker import PanelWorker

__all__ = ["RayExecutor", "PanelWorker", "DistributedOperator", "assign_panels"]
