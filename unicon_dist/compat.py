"""Old flat module paths (``unicon_dist.model``, ``unicon_dist.streamed``, ...), kept for one release.

Before 0.2 the package was one folder of modules; they now live in their layer's folder
(ARCHITECTURE.md).  Importing an old path returns the new module itself -- the same
classes, so ``isinstance`` and saved files are unaffected -- and warns once with the new
path.  Nothing is imported until an old path is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["MOVED", "install"]

MOVED = {
    "kernels": "math.kernels", "losses": "math.losses", "positives": "math.positives", "dense": "math.dense",
    "nystrom": "math.nystrom", "whitening": "math.whitening", "metrics": "math.metrics",
    "closed_form": "math.closed_form", "randomized": "math.linalg", "validation": "math.validation",
    "planning": "solver.planning", "streamed": "solver.operator", "verify": "solver.verify",
    "diagnostics": "solver.diagnostics", "progress": "solver.progress", "model": "solver.estimator",
    "executors": "solver.executor", "ray_executor": "execution.ray",
    "store": "data.store", "store_check": "data.store_check", "rows": "data.rows", "ingest": "data.ingest",
    "datasets": "data.datasets", "versions": "data.provenance",
    "persistence": "io.artifacts", "checkpoint": "io.checkpoints",
    "jobs": "apps.jobs", "study": "apps.study", "evaluation": "apps.evaluation", "cli": "apps.cli",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        sys.modules[spec.name] = module
        return module

    def exec_module(self, module):
        pass


class _OldPaths(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != "unicon_dist" or name not in MOVED:
            return None
        new = f"unicon_dist.{MOVED[name]}"
        warnings.warn(f"{fullname} moved to {new}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Serve the old paths (called once by the package's ``__init__``)."""
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.append(_OldPaths())
