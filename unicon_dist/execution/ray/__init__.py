"""Ray execution: the passes on Ray actors (worker, driver, cluster start-up)."""

from .executor import RayExecutor

__all__ = ["RayExecutor"]
