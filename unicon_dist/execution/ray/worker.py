"""One Ray worker's share of the passes: a plain class, and the thin ``ray.remote`` wrapper.

:class:`PanelWorker` holds a :class:`~unicon_dist.CrossProductOperator` that owns some outer
panels and answers the driver's calls with partial results (pass-1 rounds, its part of C).
It is an ordinary Python object, testable without Ray; :func:`remote_worker` turns it (or a
subclass) into a Ray actor class, as xgboost_ray does with its actor.  Ray is imported only
inside the methods that need it.

Tests inject failures from the outside by subclassing (``tests/test_ray.py``), not through
an argument of this class.
"""

from __future__ import annotations

import os
import socket

import torch

from ...solver.operator import CrossProductOperator

__all__ = ["PanelWorker", "remote_worker"]


def _to(obj, device):
    """``obj`` with every tensor inside (dicts, lists, tuples) moved to ``device``: partial
    results travel between workers and the driver on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


class PanelWorker:
    """One worker's share of the passes: an operator that owns some outer panels.

    Parameters
    ----------
    index : int
        The worker's position among the executor's workers.

    Attributes
    ----------
    op : CrossProductOperator or None
        The share's operator, after :meth:`build`.
    """

    def __init__(self, index: int):
        self.index = index
        self.op = None

    def build(self, loader, n, shape, rank, owned, options, groups=None) -> int:
        """Build the operator over ``loader``'s rows that owns the panels ``owned``
        (``options``: a :class:`~unicon_dist.solver.options.PassOptions`); returns the pid."""
        self.op = CrossProductOperator.from_loader(loader, n, shape, rank, groups=groups, owned=owned,
                                                   compute_stats=False, options=options)
        return os.getpid()

    def publish(self):
        """This worker's panels, embedded at the current encoders, one return value each
        (so that the driver owns them and they outlive this actor), and their count last
        (a small value the driver waits on without fetching the panels)."""
        keys = self.op.owned_keys
        return (*(tuple(t.cpu() for t in self.op.published_panel(key)) for key in keys), len(keys))

    def use_published(self, refs: dict) -> None:
        """Take every panel from the object references ``refs[(batch, panel)]`` from now on."""
        import ray

        device = self.op.device
        self.op.use_published(lambda key: tuple(t.to(device) for t in ray.get(refs[key])))

    def round(self, name, *args):
        """This share's partial result of pass-1 round ``name`` (on the CPU)."""
        return _to(self.op.run_round(name, *_to(args, self.op.device)), "cpu")

    def set_stats(self, stats) -> None:
        """Install the merged statistics."""
        self.op.set_stats(_to(stats, self.op.device))

    def product(self, omega_x, omega_y) -> torch.Tensor:
        """This share's part of (Φ_X Ω_x)ᵀ S (Φ_Y Ω_y), float64, on the CPU."""
        return self.op.product(*_to((omega_x, omega_y), self.op.device)).cpu()

    def release(self) -> None:
        if self.op is not None:
            self.op.release()

    def phase_seconds(self) -> dict:
        return {} if self.op is None else self.op.phase_seconds()

    def info(self) -> dict:
        """pid, host name, and the operator's panel loads and fetches so far."""
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "loads": None if self.op is None else self.op.n_loads,
                "fetches": None if self.op is None else self.op.n_fetches}


def remote_worker(worker_class: type = PanelWorker):
    """``ray.remote(worker_class)``: the actor class of a :class:`PanelWorker` (sub)class."""
    import ray

    if not (isinstance(worker_class, type) and issubclass(worker_class, PanelWorker)):
        raise TypeError(f"worker_class must be PanelWorker or a subclass of it, got {worker_class!r}")
    return ray.remote(worker_class)
