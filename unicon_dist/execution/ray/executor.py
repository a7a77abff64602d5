"""Passes over a pair store on Ray actors: each worker owns a contiguous share of the panels.

The worker is a plain class (:class:`PanelWorker`, testable without Ray) wrapped by
``ray.remote``; the driver (:class:`DistributedOperator`) keeps only the batch layout and
the O(n) statistics.  Per pass, every worker reads the panels it owns as outer panels
from the store itself (the store must be on a filesystem all nodes see at the same path)
and streams the other panels past them:

* pass 1 runs as rounds (:meth:`CrossProductOperator.compute_stats`): partial row and
  column statistics per worker, merged on the driver in worker order, then broadcast;
* pass 2 returns each worker's part of C (or C·Ω, Cᵀ·Ω), summed on the driver in worker
  order, in float64.

A worker that dies mid-call is replaced by a fresh actor on the same placement-group
bundle; the driver replays what the worker held (its share, the statistics) and repeats
the call, which only reads and computes, so the result is unchanged.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from ...solver.planning import plan_panels
from ...solver.progress import LogProgress
from ...solver.operator import CrossProductOperator

__all__ = ["RayExecutor", "PanelWorker", "DistributedOperator", "assign_panels"]

logger = logging.getLogger(__name__)


def assign_panels(sizes: list[int], n_workers: int) -> list[list[int]]:
    """Contiguous runs of panel indices, one per worker, balanced by rows.

    Worker w takes the panels whose first row falls in [w·N/W, (w+1)·N/W) of the N rows.
    """
    total = sum(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    owner = np.minimum((starts * n_workers) // max(total, 1), n_workers - 1)
    return [np.flatnonzero(owner == w).tolist() for w in range(n_workers)]


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
        The worker's position (used in errors and by failure injection).
    fail : dict, optional
        Deterministic failure injection for tests: ``{"worker": i, "method": name,
        "call": k, "marker": path}`` makes worker i exit on its k-th call of ``method``
        unless ``marker`` exists (it is created first, so a replacement does not fail).
    """

    def __init__(self, index: int, fail: dict | None = None):
        self.index = index
        self._fail = fail if fail and fail.get("worker") == index else None
        self._calls: dict[str, int] = {}
        self.op = None

    def _maybe_fail(self, method: str):
        k = self._calls.get(method, 0)
        self._calls[method] = k + 1
        f = self._fail
        if f and f["method"] == method and f["call"] == k and not os.path.exists(f["marker"]):
            with open(f["marker"], "w") as fh:
                fh.write(f"worker {self.index} exits in {method} call {k}\n")
            os._exit(1)

    def build(self, loader, n, shape, rank, owned, options) -> int:
        self._maybe_fail("build")
        self.op = CrossProductOperator.from_loader(loader, n, shape, rank, owned=owned, compute_stats=False, **options)
        return os.getpid()

    def publish(self):
        """This worker's panels, embedded at the current encoders, one return value each
        (so that the driver owns them and they outlive this actor), and their count last
        (a small value the driver waits on without fetching the panels)."""
        self._maybe_fail("publish")
        keys = sorted(self.op._owner)
        return (*(tuple(t.cpu() for t in self.op.published_panel(key)) for key in keys), len(keys))

    def use_published(self, refs: dict) -> None:
        import ray

        device = self.op.device
        self.op.use_published(lambda key: tuple(t.to(device) for t in ray.get(refs[key])))

    def round(self, name, *args):
        self._maybe_fail("round")
        return _to(self.op.run_round(name, *_to(args, self.op.device)), "cpu")

    def set_stats(self, stats) -> None:
        self.op.set_stats(_to(stats, self.op.device))

    def product(self, omega_x, omega_y) -> torch.Tensor:
        self._maybe_fail("product")
        return self.op._product(*_to((omega_x, omega_y), self.op.device)).cpu()

    def release(self) -> None:
        if self.op is not None:
            self.op.release()

    def phase_seconds(self) -> dict:
        return {} if self.op is None else self.op.phase_seconds()

    def info(self) -> dict:
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname(),
                "loads": None if self.op is None else self.op.n_loads,
                "fetches": None if self.op is None else self.op.n_fetches}


class DistributedOperator:
    """The :class:`CrossProductOperator` interface over Ray workers (built by :class:`RayExecutor`)."""

    def __init__(self, executor: "RayExecutor", loader, n, shape, rank, panel_rows, options):
        import ray

        self._ex = executor
        self.n, self.shape = n, tuple(shape)
        options = dict(options)
        self._progress = options.pop("progress", None)  # reported on the driver, per worker done
        if isinstance(self._progress, LogProgress):
            self._progress = LogProgress(self._progress.logger, self._progress.interval, rows=self._progress.rows,
                                         unit="workers")
        options["panel_rows"] = panel_rows
        self._driver = CrossProductOperator.from_loader(loader, n, shape, rank, owned=[], compute_stats=False,
                                                        **{**options, "device": "cpu"})
        keys = self._driver.panel_keys
        shares = assign_panels(self._driver.panel_sizes(), len(executor.workers))
        self._shares = [[keys[k] for k in share] for share in shares]
        owners: dict[int, set] = {}
        for w, share in enumerate(self._shares):
            for b, _ in share:
                owners.setdefault(b, set()).add(w)
        split = [b for b, ws in owners.items() if len(ws) > 1]
        self._build = (ray.put(loader), n, tuple(shape), rank, ray.put(options))
        self._stats_ref = self._panels = None
        self._call("build", lambda w: (*self._build[:4], self._shares[w], self._build[4]))
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
        shares = [sorted(share) for share in self._shares]
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

        self._ex._restart_worker(w)
        wk = self._ex.workers[w]
        if upto != "build":
            ray.get(wk.build.remote(*self._build[:4], self._shares[w], self._build[4]))
        if self._stats_ref is not None and upto != "set_stats":
            ray.get(wk.set_stats.remote(self._stats_ref))
        if self._panels is not None and upto != "use_published":
            ray.get(wk.use_published.remote(self._panels[0]))

    def _product(self, omega_x=None, omega_y=None) -> torch.Tensor:
        t0 = time.perf_counter()
        parts = self._call("product", lambda w: (omega_x, omega_y))
        C = parts[0].clone()
        for p in parts[1:]:  # fixed (worker) order: the same C whatever finishes first
            C += p
        self._seconds["product"] += time.perf_counter() - t0
        return C

    def materialize(self) -> torch.Tensor:
        """C = Φ_Xᵀ S Φ_Y, float64."""
        return self._product()

    def matmul(self, omega) -> torch.Tensor:
        return self._product(omega_y=torch.as_tensor(omega).to(self._driver.dtype))

    def rmatmul(self, omega) -> torch.Tensor:
        return self._product(omega_x=torch.as_tensor(omega).to(self._driver.dtype)).T

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
        Actors; the panels are dealt out to them in contiguous runs balanced by rows.
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

    Notes
    -----
    Every worker reads its panels from the store by path, so on a cluster the store
    must be on storage all nodes mount at the same path.
    """

    def __init__(self, address=None, num_workers: int = 2, *, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float = 0, placement_timeout_s: float = 60.0, max_retries: int = 2,
                 share_panels: bool = True, _fail: dict | None = None):
        if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        for name, v in (("num_cpus_per_worker", num_cpus_per_worker), ("num_gpus_per_worker", num_gpus_per_worker)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if address is not None and not isinstance(address, str):
            raise ValueError(f"address must be None, 'auto' or 'ray://host:port', got {address!r}")
        self.address = address
        self.num_workers = int(num_workers)
        self.num_cpus_per_worker = num_cpus_per_worker
        self.num_gpus_per_worker = num_gpus_per_worker
        self.placement_timeout_s = placement_timeout_s
        self.max_retries = int(max_retries)
        self.share_panels = bool(share_panels)
        self._fail = _fail
        self.workers: list = []
        self._pg = None
        self._started_ray = False

    distributed = True  # the model keeps its driver state on the CPU

    def __repr__(self) -> str:
        where = "embedded local Ray" if self.address is None else self.address
        return (f"RayExecutor({where}, num_workers={self.num_workers}, num_cpus_per_worker={self.num_cpus_per_worker}, "
                f"num_gpus_per_worker={self.num_gpus_per_worker})")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "RayExecutor":
        """Connect (or start the embedded Ray), reserve the bundles and create the actors."""
        if self.workers:
            return self
        import ray

        if not ray.is_initialized():
            if self.address is None:
                self._init_local_ray()
            else:
                ray.init(address=self.address, log_to_driver=False)
            self._started_ray = True
        from ray.util.placement_group import placement_group

        bundle = {"CPU": float(self.num_cpus_per_worker)}
        if self.num_gpus_per_worker:
            bundle["GPU"] = float(self.num_gpus_per_worker)
        self._pg = placement_group([dict(bundle) for _ in range(self.num_workers)], strategy="SPREAD"
                                   if self.address is not None else "PACK")
        try:
            ray.get(self._pg.ready(), timeout=self.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            available = ray.available_resources()
            self.shutdown()
            raise RuntimeError(
                f"Ray could not place {self.num_workers} workers of {bundle} within {self.placement_timeout_s:g}s; "
                f"the cluster has {({k: v for k, v in available.items() if k in ('CPU', 'GPU', 'memory')})} free. "
                "Lower num_workers or the per-worker resources, or add nodes."
            ) from None
        self.workers = [self._actor(w) for w in range(self.num_workers)]
        return self

    def _init_local_ray(self) -> None:
        """An embedded Ray whose sockets all listen on 127.0.0.1.

        Ray binds the machine's network address unless its "local only" switch is off.
        The switch is read from the environment at import (by this process and by the
        raylet and workers it starts), so it is set for the start and put back afterwards.
        """
        import ray
        from ray._private import ray_constants

        key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
        saved_env, saved_flag = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
        os.environ[key] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            # the machine's cores, or more if the workers ask for more (Ray's CPUs are a
            # scheduling count, not a pinning)
            cpus = max(int(np.ceil(self.num_workers * self.num_cpus_per_worker)), os.cpu_count() or 1)
            ray.init(num_cpus=cpus, num_gpus=int(np.ceil(self.num_workers * self.num_gpus_per_worker)) or None,
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        finally:
            if saved_env is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = saved_env
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag

    def _actor(self, w: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote = ray.remote(PanelWorker).options(
            num_cpus=self.num_cpus_per_worker, num_gpus=self.num_gpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=w),
        )
        return remote.remote(w, self._fail)

    def _restart_worker(self, w: int) -> None:
        import ray

        try:
            ray.kill(self.workers[w])
        except Exception:  # noqa: BLE001 - the actor is already gone; nothing to release
            pass
        self.workers[w] = self._actor(w)

    def shutdown(self) -> None:
        """Remove the actors and the placement group; stop Ray if this executor started it."""
        import ray

        for wk in self.workers:
            try:
                ray.kill(wk)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.workers = []
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
            self._pg = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()
        return False

    # ------------------------------------------------------------------ executor interface
    def plan(self, n: int, *, memory_budget=None, **sizes):
        """Panels sized so that each worker stays within ``memory_budget``."""
        return plan_panels(n, memory_budget=memory_budget, **sizes)

    def cross_product_operator(self, loader, n, shape, rank, *, plan, **options) -> DistributedOperator:
        self.start()
        options["memory_budget"] = plan.tile_budget
        return DistributedOperator(self, loader, n, shape, rank, plan.panel_rows, options)
