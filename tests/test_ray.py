"""RayExecutor: the passes on Ray actors equal the local passes; failures are survived."""

import ipaddress
import os
from pathlib import Path

import numpy as np
import psutil
import pytest

import unicon_dist as ud

from _budgets import panel_budget
from unicon_dist.execution.ray.worker import PanelWorker

ray = pytest.importorskip("ray")


def _store(path, n=900, groups=False, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 12)).astype(np.float32)
    Y = (X[:, :10] + 0.6 * rng.standard_normal((n, 10))).astype(np.float32)
    store = ud.PairStore.create(path, 12, 10, chunk_rows=128, groups=groups)
    store.append(X, Y, rng.integers(0, 300, n) if groups else None)
    return store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    return {"plain": _store(root / "plain.zarr"), "groups": _store(root / "groups.zarr", groups=True)}


@pytest.fixture(scope="module")
def executors():
    """A 1-worker and a 2-worker executor on one embedded Ray (a quarter CPU per worker, so
    that other executors still fit on the 2 logical CPUs)."""
    two = ud.RayExecutor(num_workers=2, num_cpus_per_worker=0.25).start()
    one = ud.RayExecutor(num_workers=1, num_cpus_per_worker=0.25).start()
    yield {1: one, 2: two}
    one.shutdown()
    two.shutdown()  # started Ray, so it stops it


# a budget that cuts the 900 rows into panels of about 260 (see tests/test_outofcore.py)
BUDGET = 700_000

CASES = [
    ("plain", dict()),
    ("groups", dict(loss="triplet", temperature=0.2)),
    ("plain", dict(negatives=200, batch_split="contiguous")),
    ("plain", dict(kernel="rbf", n_landmarks=40, similarity="dot", temperature=1.0)),
]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("name, options", CASES)
def test_ray_fit_equals_local_fit(stores, executors, name, options, workers):
    # four iterations: the library's solver takes Anderson steps from the third on
    params = dict(rank=5, temperature=0.3, max_iter=4, tol=0.0)
    params.update(options)
    params["memory_budget"] = panel_budget(stores[name], **params)
    local = ud.UniCon(**params).fit(stores[name])
    dist = ud.UniCon(**params).fit(stores[name], executor=executors[workers])
    assert local.plan_.panel_rows < len(stores[name])
    np.testing.assert_allclose(dist.W_, local.W_, rtol=0, atol=1e-6 * np.abs(local.W_).max())
    np.testing.assert_allclose([h["loss"] for h in dist.history_], [h["loss"] for h in local.history_], rtol=1e-6)
    assert [h["step"] for h in dist.history_] == [h["step"] for h in local.history_]
    assert dist.history_[-1]["step"].startswith("anderson(")
    # the diagnostics come through the distributed passes too (pass 1's statistics are merged
    # on the driver) and agree with the local ones
    for key in ("lse_min", "lse_max", "spectral_gap"):
        a, b = [h[key] for h in dist.history_], [h[key] for h in local.history_]
        assert None not in a or options.get("loss") == "triplet"
        np.testing.assert_allclose(np.array(a, dtype=float), np.array(b, dtype=float), rtol=1e-5)


def exiting_worker(worker: int, method: str, call: int, marker: str) -> type:
    """A PanelWorker class whose worker ``worker`` exits its process on its ``call``-th call
    (from 0) of ``method``, unless ``marker`` exists; it creates ``marker`` first, so its
    replacement does not exit again (the kill callback of xgboost_ray's tests, as a class).

    Defined inside a function so that Ray pickles it by value: the actor processes cannot
    import this test module.
    """

    class ExitingWorker(PanelWorker):
        def __init__(self, index):
            super().__init__(index)
            self.calls = 0

        def _maybe_exit(self, name):
            if name != method or self.index != worker:
                return
            k, self.calls = self.calls, self.calls + 1
            if k == call and not os.path.exists(marker):
                Path(marker).write_text(f"worker {self.index} exits in {name} call {k}\n")
                os._exit(1)  # the process dies mid-call, as a crashed or preempted worker would

        def build(self, *args):
            self._maybe_exit("build")
            return super().build(*args)

        def publish(self):
            self._maybe_exit("publish")
            return super().publish()

        def round(self, *args):
            self._maybe_exit("round")
            return super().round(*args)

        def product(self, *args):
            self._maybe_exit("product")
            return super().product(*args)

    return ExitingWorker


def test_a_killed_worker_is_replaced_and_the_model_is_unchanged(stores, tmp_path):
    params = dict(rank=5, temperature=0.3, max_iter=2, tol=0.0, memory_budget=BUDGET)
    local = ud.UniCon(**params).fit(stores["plain"])
    for method, call in (("product", 1), ("round", 2), ("publish", 1), ("build", 1)):
        marker = tmp_path / f"died-{method}"
        worker_class = exiting_worker(1, method, call, str(marker))
        with ud.RayExecutor(num_workers=2, num_cpus_per_worker=0.5, worker_class=worker_class) as ex:
            pids = {w: ray.get(wk.info.remote())["pid"] for w, wk in enumerate(ex.workers)}
            dist = ud.UniCon(**params).fit(stores["plain"], executor=ex)
            after = {w: ray.get(wk.info.remote())["pid"] for w, wk in enumerate(ex.workers)}
        assert marker.exists()  # the worker did exit mid-pass
        assert after[0] == pids[0] and after[1] != pids[1]  # worker 1 runs in a new process
        np.testing.assert_allclose(dist.W_, local.W_, rtol=0, atol=1e-6 * np.abs(local.W_).max())


def test_worker_class_must_be_a_panel_worker():
    with pytest.raises(ValueError, match="worker_class must be PanelWorker"):
        ud.RayExecutor(worker_class=object)


def test_panel_worker_runs_without_ray():
    """The actor is a plain class: a worker owning every panel is the local operator."""
    import torch

    rng = np.random.default_rng(0)
    tensors = [torch.as_tensor(rng.standard_normal((60, d)), dtype=torch.float64) for d in (4, 3, 2, 2)]
    loader = lambda rows: tuple(t[rows] if isinstance(rows, slice) else t[torch.as_tensor(rows)] for t in tensors)  # noqa: E731
    from unicon_dist.solver.options import PassOptions

    options = PassOptions(temperature=0.5, dtype=torch.float64, panel_rows=25)
    worker = PanelWorker(0)
    keys = ud.CrossProductOperator.from_loader(loader, 60, (4, 3), 2, options=options).panel_keys
    worker.build(loader, 60, (4, 3), 2, keys, options)
    first = worker.round("negatives", {})
    worker.set_stats([first["done"][0]])
    local = ud.CrossProductOperator.from_loader(loader, 60, (4, 3), 2, options=options)
    assert worker.op.loss == local.loss
    assert torch.equal(worker.product(None, None), local.materialize())  # the same operations, in order


def test_embedded_ray_listens_on_loopback_only(executors):
    ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening, "expected Ray's processes to listen on some port"
    addresses = {ipaddress.ip_address(c.laddr.ip) for c in listening}
    # loopback, written as IPv4, IPv6 or IPv4-mapped IPv6; never 0.0.0.0 / :: / a real address
    assert all(a.is_loopback or (a.version == 6 and a.ipv4_mapped and a.ipv4_mapped.is_loopback)
               for a in addresses), addresses


def test_placement_timeout_names_what_is_missing():
    ex = ud.RayExecutor(num_workers=1, num_gpus_per_worker=1, placement_timeout_s=2)
    if ray.is_initialized() and ray.cluster_resources().get("GPU"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match=r"could not place 1 workers of \{'CPU': 1.0, 'GPU': 1.0\}"):
        ex.start()


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_workers"):
        ud.RayExecutor(num_workers=0)
    with pytest.raises(ValueError, match="num_gpus_per_worker"):
        ud.RayExecutor(num_gpus_per_worker=-1)


@pytest.mark.parametrize("share", [True, False])
def test_shared_panels_are_read_once_per_iteration(stores, share):
    """With share_panels each worker reads only its own panels from the store (once per
    operator) and fetches the others from the object store; without, it rereads them."""
    import torch

    from unicon_dist.data.rows import StoreRows

    store = stores["plain"]
    plan = ud.plan_panels(len(store), dim_x=12, dim_y=10, features_x=12, features_y=10, rank=4, memory_budget=BUDGET)
    loader = StoreRows(str(store.path), None, None, torch.randn(4, 12), torch.randn(4, 10), "cosine")
    kw = dict(loss="clip", temperature=0.2, norm_bound=(1.0, 1.0))
    local = ud.LocalExecutor().cross_product_operator(loader, len(store), (12, 10), 4, plan=plan, **kw)
    with ud.RayExecutor(num_workers=2, num_cpus_per_worker=0.5, share_panels=share) as ex:
        op = ex.cross_product_operator(loader, len(store), (12, 10), 4, plan=plan, **kw)
        C = op.materialize()
        info = ray.get([w.info.remote() for w in ex.workers])
    np.testing.assert_allclose(C.numpy(), local.materialize().numpy(), rtol=0, atol=1e-12)
    panels = len(local.batches[0].panels)
    owned = [len(s) for s in op.shares]
    if share:
        assert [i["loads"] for i in info] == owned  # publish read each own panel once
        assert all(i["fetches"] > 0 for i in info)
    else:
        assert all(i["fetches"] == 0 for i in info)
        assert sum(i["loads"] for i in info) > panels * panels  # every pass streams the store
