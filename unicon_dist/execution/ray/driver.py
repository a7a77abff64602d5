"""Passes over a pair store on Ray actors: each worker owns a contiguous share of the panels.

The driver (:class:`DistributedOperator`) keeps only the batch layout and the O(n)
statistics; the workers (:class:`~.worker.PanelWorker`) compute.  Per pass, every worker
reads the panels it owns as outer panels from the store itself (the store must be on a
filesystem all nodes see at the same path) and streams the other panels past them:

* pass 1 runs as rounds (:func:`unicon_dist.solver.passes.compute_statistics`): partial
  row and column statistics per worker, merged on the driver in worker order, then
  broadcast;
* pass 2 returns each worker's part of C (or C·Ω, Cᵀ·Ω), summed on the driver in worker
  order, in float64 (:func:`unicon_dist.solver.products.merge_products`).

A worker that dies mid-call is replaced by a fresh actor on the same placement-group
bundle; the driver replays what the worker held (its share, the statistics) and repeats
the call, which only reads and computes, so the result is unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from ...solver.layout import assign_panels, shared_batches
from ...solver.operator import CrossProductOperator
from ...solver.options import PassOptions
from ...solver.products import merge_products
from ...solver.planning import PanelPlan, plan_panels
from ...solver.progress import LogProgress
from . import cluster
from .worker import PanelWorker, remote_worker

__all__ = ["RayExecutor", "DistributedOperator"]

logger = logging.getLogger(__name__)


class DistributedOperator:
    """The :class:`CrossProductOperator` interface over Ray workers (built by :class:`RayExecutor`).

    Attributes
    ----------
    n : int
    shape : (m_x, m_y)
    loss : float
    statistics : dict
    shares : list of list of (batch, panel)
        The panels each worker owns.
    """

    def __init__(self, executor: "RayExecutor", loader, n, shape, rank, options: PassOptions, groups=None):
        import ray

        self._ex = executor
        self.n, self.shape = n, tuple(shape)
        progress = options.progress  # reported on the driver, per worker done
        if isinstance(progress, LogProgress):
            progress = LogProgress(progress.logger, progress.interval, rows=progress.rows, unit="workers")
        self._progress = progress
        options = dataclasses.replace(options, progress=None)
        self._driver = CrossProductOperator.from_loader(loader, n, shape, rank, groups=groups, owned=[],
                                                        compute_stats=False,
                                                        options=dataclasses.replace(options, device="cpu"))
        keys = self._driver.panel_keys
        shares = assign_panels(self._driver.panel_sizes(), len(executor.workers))
        self.shares = [[keys[k] for k in share] for share in shares]
        split = shared_batches(self.shares)
        self._build = (ray.put(loader), n, tuple(shape), rank, ray.put(options), ray.put(groups))
        self._stats_ref = self._panels = None
        self._call("build", self._build_args)
        if executor.share_panels:
            self._publish()
        t0 = time.perf_counter()
        stats = self._driver.compute_stats(lambda name, *args: self._call("round", lambda w: (name, *args)), split)
        self._stats_ref = ray.put(stats)
        self._call("set_stats", lambda w: (self._stats_ref,))
        self._driver.set_stats(stats)
        self.loss = self._driver.loss
        self.statistics = self._driver.statistics
        self._seconds = {"statistics": time.perf_counter() - t0, "product": 0.0}

    @property
    def dtype(self) -> torch.dtype:
        return self._driver.dtype

    def _build_args(self, w: int) -> tuple:
        loader, n, shape, rank, options, groups = self._build
        return loader, n, shape, rank, self.shares[w], options, groups

    def _call(self, method, args_of):
        """Call ``method`` on every worker (arguments ``args_of(w)``) and return the
        results in worker order, replacing any worker that dies and repeating its call."""
        import ray

        workers = self._ex.workers
        pending = {getattr(wk, method).remote(*args_of(w)): w for w, wk in enumerate(workers)}
        out, failures, done = [None] * len(workers), [0] * len(workers), 0
        stage = {"round": "statistics", "product": "product"}.get(method)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            w = pending.pop(ref)
            try:
                out[w] = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                failures[w] += 1
                if failures[w] > self._ex.max_retries:
                    raise RuntimeError(f"Ray worker {w} failed {failures[w]} times in {method!r}: {exc}") from exc
                logger.warning("Ray worker %d died in %r (%s); replacing it and repeating the call", w, method,
                               type(exc).__name__)
                self._replace(w, upto=method)
                pending[getattr(self._ex.workers[w], method).remote(*args_of(w))] = w
                continue
            done += 1
            if stage and self._progress is not None:
                self._progress(stage, done, len(workers))
        return out

    def _publish(self):
        """Every worker embeds its own panels once and returns them into the object store;
        the passes then fetch column panels from there instead of rereading the store."""
        import ray

        refs = {}
        shares = [sorted(share) for share in self.shares]
        launch = lambda w: self._ex.workers[w].publish.options(num_returns=len(shares[w]) + 1).remote()  # noqa: E731
        pending = {w: launch(w) for w in range(len(shares)) if shares[w]}
        for w, out in pending.items():
            for attempt in range(self._ex.max_retries + 1):
                try:
                    ray.get(out[-1])  # the count; raises if the worker died while publishing
                    break
                except ray.exceptions.RayActorError:
                    if attempt == self._ex.max_retries:
                        raise
                    logger.warning("Ray worker %d died while publishing its panels; replacing it", w)
                    self._replace(w, upto="publish")
                    out = launch(w)
            refs.update(zip(shares[w], out[:-1]))
        self._panels = [refs]  # in a list: workers receive the refs, not the tensors
        self._call("use_published", lambda w: (refs,))

    def _replace(self, w, upto):
        """A fresh actor for worker w, given the share and statistics the old one held."""
        import ray

        self._ex.restart_worker(w)
        wk = self._ex.workers[w]
        if upto != "build":
            ray.get(wk.build.remote(*self._build_args(w)))
        if self._stats_ref is not None and upto != "set_stats":
            ray.get(wk.set_stats.remote(self._stats_ref))
        if self._panels is not None and upto != "use_published":
            ray.get(wk.use_published.remote(self._panels[0]))

    def product(self, omega_x=None, omega_y=None) -> torch.Tensor:
        """(Φ_X Ω_x)ᵀ S (Φ_Y Ω_y), float64: the workers' parts summed in worker order."""
        t0 = time.perf_counter()
        C = merge_products(self._call("product", lambda w: (omega_x, omega_y)))
        self._seconds["product"] += time.perf_counter() - t0
        return C

    def materialize(self) -> torch.Tensor:
        """C = Φ_Xᵀ S Φ_Y, float64."""
        return self.product()

    def matmul(self, omega) -> torch.Tensor:
        """C Ω; Ω has shape (m_y, k)."""
        return self.product(omega_y=torch.as_tensor(omega).to(self._driver.dtype))

    def rmatmul(self, omega) -> torch.Tensor:
        """Cᵀ Ω; Ω has shape (m_x, k)."""
        return self.product(omega_x=torch.as_tensor(omega).to(self._driver.dtype)).T

    def phase_seconds(self) -> dict:
        """The driver's wall seconds of pass 1 and products, and the seconds the slowest
        worker spent reading rows and computing features (workers run side by side)."""
        out = dict(self._seconds)
        for part in self._call("phase_seconds", lambda w: ()):
            for k in ("read", "features"):
                out[k] = max(out.get(k, 0.0), part.get(k, 0.0))
        return out

    def release(self):
        import ray

        ray.get([wk.release.remote() for wk in self._ex.workers])


class RayExecutor:
    """Run the passes over a pair store on Ray actors, one per worker.

    Parameters
    ----------
    address : str, optional
        None: start an embedded local Ray whose sockets all listen on 127.0.0.1 (and
        stop it in :meth:`shutdown`).  ``"auto"`` or ``"ray://host:port"``: join a
        running cluster (its token authentication applies: ``RAY_AUTH_MODE=token`` and
        the token in ``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``).
    num_workers : int
        Actors; the panels are dealt out to them in contiguous runs balanced by rows
        (:func:`unicon_dist.solver.layout.assign_panels`).
    num_cpus_per_worker, num_gpus_per_worker : float
        Resources of each actor's placement-group bundle.  With GPUs, pass
        ``UniCon(device="cuda")``: each actor sees its own GPU.
    placement_timeout_s : float
        How long to wait for the cluster to grant the bundles before giving up with an
        error that lists what was asked for and what is available.
    max_retries : int
        Replacements of a worker that dies in one call before the fit fails.
    share_panels : bool
        Each worker embeds its own panels once per iteration and puts them in Ray's object
        store, and the passes fetch column panels from there (default).  False: every
        worker reads every column panel from the pair store on every pass, which keeps
        the object store empty at the cost of k² panel reads per pass.
    worker_class : type
        The actors' class: :class:`~.worker.PanelWorker` or a subclass, built as
        ``worker_class(index)`` on each bundle (tests pass one that exits on a chosen call,
        to check that a killed worker is replaced and the result unchanged).

    Notes
    -----
    Every worker reads its panels from the store by path, so on a cluster the store
    must be on storage all nodes mount at the same path.
    """

    distributed = True  # the model keeps its driver state on the CPU

    def __init__(self, address=None, num_workers: int = 2, *, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float = 0, placement_timeout_s: float = 60.0, max_retries: int = 2,
                 share_panels: bool = True, worker_class: type = PanelWorker):
        if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        for name, v in (("num_cpus_per_worker", num_cpus_per_worker), ("num_gpus_per_worker", num_gpus_per_worker)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if address is not None and not isinstance(address, str):
            raise ValueError(f"address must be None, 'auto' or 'ray://host:port', got {address!r}")
        if not (isinstance(worker_class, type) and issubclass(worker_class, PanelWorker)):
            raise ValueError(f"worker_class must be PanelWorker or a subclass of it, got {worker_class!r}")
        self.address = address
        self.num_workers = int(num_workers)
        self.num_cpus_per_worker = num_cpus_per_worker
        self.num_gpus_per_worker = num_gpus_per_worker
        self.placement_timeout_s = placement_timeout_s
        self.max_retries = int(max_retries)
        self.share_panels = bool(share_panels)
        self.worker_class = worker_class
        self.workers: list = []
        self._pg = None
        self._started_ray = False

    def __repr__(self) -> str:
        where = "embedded local Ray" if self.address is None else self.address
        return (f"RayExecutor({where}, num_workers={self.num_workers}, num_cpus_per_worker={self.num_cpus_per_worker}, "
                f"num_gpus_per_worker={self.num_gpus_per_worker})")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "RayExecutor":
        """Connect (or start the embedded Ray), reserve the bundles and create the actors."""
        if self.workers:
            return self
        if cluster.connect(self.address, num_cpus=self.num_workers * self.num_cpus_per_worker,
                           num_gpus=self.num_workers * self.num_gpus_per_worker):
            self._started_ray = True
        bundle = {"CPU": float(self.num_cpus_per_worker)}
        if self.num_gpus_per_worker:
            bundle["GPU"] = float(self.num_gpus_per_worker)
        try:
            self._pg = cluster.reserve_bundles(bundle, self.num_workers, timeout_s=self.placement_timeout_s,
                                               strategy="SPREAD" if self.address is not None else "PACK")
        except RuntimeError:
            self.shutdown()
            raise
        self.workers = [self._actor(w) for w in range(self.num_workers)]
        return self

    def _actor(self, w: int):
        return cluster.start_actor(remote_worker(self.worker_class), self._pg, w, w,
                                   num_cpus=self.num_cpus_per_worker, num_gpus=self.num_gpus_per_worker)

    def restart_worker(self, w: int) -> None:
        """Kill worker w (if it still runs) and start a fresh actor on its bundle."""
        cluster.kill_actor(self.workers[w])
        self.workers[w] = self._actor(w)

    def shutdown(self) -> None:
        """Remove the actors and the placement group; stop Ray if this executor started it."""
        for wk in self.workers:
            cluster.kill_actor(wk)
        self.workers = []
        if self._pg is not None:
            cluster.remove_bundles(self._pg)
            self._pg = None
        if self._started_ray:
            cluster.disconnect()
            self._started_ray = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()
        return False

    # ------------------------------------------------------------------ executor interface
    def plan(self, n: int, *, memory_budget=None, **sizes) -> PanelPlan:
        """Panels sized so that each worker stays within ``memory_budget``."""
        return plan_panels(n, memory_budget=memory_budget, **sizes)

    def cross_product_operator(self, loader, n, shape, rank, *, plan, groups=None,
                               options: PassOptions | None = None, **keywords) -> DistributedOperator:
        """A :class:`DistributedOperator` over ``loader``'s rows on this executor's workers
        (starting them if needed); arguments as for
        :meth:`unicon_dist.LocalExecutor.cross_product_operator`."""
        self.start()
        options = PassOptions.of(options, **keywords).with_plan(plan)
        return DistributedOperator(self, loader, n, shape, rank, options, groups)
