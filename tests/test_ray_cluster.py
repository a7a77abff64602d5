"""A `unicon-dist solve` job submitted with `ray job submit` to a two-node Ray cluster.

Both nodes run on this machine, on loopback, inside a network namespace that has only
``lo`` (see ``tests/_ray_cluster.py``), with Ray's token authentication on.  The job joins
the cluster (``[executor] kind = "ray"``, ``address = "auto"``), places one actor per node
and writes a model equal to a LocalExecutor fit of the same store and options.

Skipped where network namespaces cannot be created (not root, no CAP_SYS_ADMIN, no
iproute2), and where Ray is the minimal install: the job server runs in Ray's dashboard,
which needs ``ray[default]``.
"""

import json
import sys
import uuid

import numpy as np
import pytest

import unicon_dist as ud

from _budgets import panel_budget

pytest.importorskip("ray")
if not sys.platform.startswith("linux"):
    pytest.skip("network namespaces are Linux only", allow_module_level=True)

from _ray_cluster import LoopbackCluster, NamespaceUnavailable  # noqa: E402  (tests/ is on sys.path)


def _dashboard_missing():
    """Why Ray's dashboard (which runs the job server) cannot start here, or None."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401  (what `ray start --include-dashboard` checks)
    except ImportError as exc:
        return exc
    return None


if _dashboard_missing() is not None:  # the job server lives in the dashboard: ray[default]
    pytest.skip(f"`ray job submit` needs ray[default] (the dashboard's packages): {_dashboard_missing()}",
                allow_module_level=True)

# memory_budget: panels of 272 rows, so each of the two workers owns at least one of the 3
OPTIONS = dict(rank=4, temperature=0.3, max_iter=2, tol=0.0)


@pytest.fixture(scope="module")
def cluster():
    c = LoopbackCluster(num_cpus=1)
    try:
        try:
            c.start()
        except NamespaceUnavailable as exc:
            pytest.skip(f"no network namespace for a loopback Ray cluster: {exc}")
        yield c
    finally:
        c.stop()


def _store(path, n=600, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 12)).astype(np.float32)
    Y = (X[:, :10] + 0.6 * rng.standard_normal((n, 10))).astype(np.float32)
    store = ud.PairStore.create(path, 12, 10, chunk_rows=128)
    store.append(X, Y)
    return store


def test_solve_job_submitted_to_a_two_node_cluster(cluster, tmp_path):
    store_path = tmp_path / "pairs.zarr"
    _store(store_path)
    options = dict(OPTIONS, memory_budget=panel_budget(store_path, rows=272, **OPTIONS))
    out = tmp_path / "out"
    model_path, metrics_path = out / "model.npz", out / "metrics.json"
    # the working dir holds only the job file: its paths are absolute (the uploaded copy
    # lives elsewhere); the store and outputs are on storage both nodes see (this machine)
    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()
    model_table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    (submit_dir / "job.toml").write_text(
        f"[data]\nstore = {json.dumps(str(store_path))}\n\n"
        f"[model]\n{model_table}\n\n"
        '[executor]\nkind = "ray"\naddress = "auto"\nnum_workers = 2\n\n'
        f"[output]\nmodel = {json.dumps(str(model_path))}\nmetrics = {json.dumps(str(metrics_path))}\n"
    )
    sid = f"unicon-solve-{uuid.uuid4().hex[:8]}"

    r = cluster.submit(submit_dir, "unicon-dist", "solve", "job.toml", submission_id=sid, timeout=180)
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"ray job submit failed:\n{log}\n{cluster.log_tail()}"
    assert f"Job '{sid}' succeeded" in log, log
    assert "ray (address auto, workers 2" in log, log  # the plan the job printed
    assert "iteration   1  loss" in log and "iteration   2  loss" in log, log
    assert f"model written to {model_path}" in log, log

    info = cluster.probe("--wait-nodes", "2", "--actors", "PanelWorker", "--job", sid)
    assert info["job"]["status"] == "SUCCEEDED", info
    alive = [n for n in info["nodes"] if n["state"] == "ALIVE"]
    assert len(alive) == 2, info["nodes"]
    assert {n["node_ip"] for n in alive} == {"127.0.0.1"}, info["nodes"]
    # one actor per node: two bundles of 1 CPU, SPREAD over two 1-CPU nodes
    actors = info["actors"]
    assert len(actors) == 2, actors
    assert {a["node_id"] for a in actors} == {n["node_id"] for n in alive}, (actors, alive)

    record = json.loads(metrics_path.read_text())
    assert record["job"]["executor"] == {"kind": "ray", "address": "auto", "num_workers": 2,
                                         "num_gpus_per_worker": 0}
    assert record["fit"]["n_iter"] == 2

    dist = ud.UniCon.load(model_path)
    local = ud.UniCon(**options).fit(str(store_path), executor=ud.LocalExecutor())
    assert local.plan_.panel_rows <= 300  # the passes really were split into panels, ≥ 1 per worker
    np.testing.assert_allclose(dist.W_, local.W_, rtol=0, atol=1e-6 * np.abs(local.W_).max())
    np.testing.assert_allclose([h["loss"] for h in dist.history_], [h["loss"] for h in local.history_], rtol=1e-6)
