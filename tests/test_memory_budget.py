"""``memory_budget`` bounds the peak resident memory of a fit (arrays and store).

Each fit runs in a fresh Python process that reports its high-water mark (VmHWM, reset
with ``/proc/self/clear_refs`` after the data are loaded and a small warm-up fit has made
torch's and zarr's one-off allocations).  The figure compared with the budget is the
peak above the resident size just before the fit: the arrays themselves (the loaded
data) are not counted; a store is not resident at all.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import unicon_dist as ud
from unicon_dist.solver.fit_paths import budget_bytes

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                reason="needs Linux's /proc/self/clear_refs to reset the high-water mark")

N, D, MIB = 100_000, 32, 1 << 20
OPTIONS = dict(rank=16, negatives=2048, max_iter=2, tol=0.0, loss_tol=0.0)

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import unicon_dist as ud

    def hwm():
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))

    def rss():
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS:"))

    source, store, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    rng = np.random.default_rng(0)
    X = rng.standard_normal((%(n)d, %(d)d), dtype=np.float32)
    Y = (X + rng.standard_normal((%(n)d, %(d)d), dtype=np.float32)).astype(np.float32)
    warm = dict(options, max_iter=1)
    if source == "store":
        del X, Y
        ud.UniCon(**warm).fit(ud.PairStore.open(store + ".warm"))
        args = (ud.PairStore.open(store),)
    else:
        ud.UniCon(**warm).fit(X[:4000], Y[:4000])
        args = (X, Y)
    base = rss()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    model = ud.UniCon(**options).fit(*args)
    plan = getattr(model, "plan_", None)
    print(json.dumps({"peak": hwm() - base, "planned": plan and plan.planned_bytes}))
""") % {"n": N, "d": D}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, D), dtype=np.float32)
    Y = (X + rng.standard_normal((N, D), dtype=np.float32)).astype(np.float32)
    path = tmp_path_factory.mktemp("mem") / "pairs.zarr"
    ud.PairStore.create(path, D, D, chunk_rows=4096).append(X, Y)
    ud.PairStore.create(str(path) + ".warm", D, D, chunk_rows=4096).append(X[:4000], Y[:4000])
    return path


def _peak(source, store, **options):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", WORKER, source, str(store), json.dumps(options)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("source, options", [
    ("arrays", dict(OPTIONS)),
    # random batches from a store re-read every chunk per panel: contiguous ones keep the
    # test fast; the random case is measured in benchmarks/bench_memory.py
    ("store", dict(OPTIONS, batch_split="contiguous")),
])
def test_peak_memory_stays_within_the_budget(store, source, options):
    budget = 32 * MIB
    got = _peak(source, store, memory_budget=budget, **options)
    assert got["planned"] <= budget
    assert got["peak"] <= budget, f"{source}: peak {got['peak'] / MIB:.1f} MiB above the data, budget 32 MiB"


def test_without_a_budget_the_same_array_fit_needs_more():
    """The check above can fail: the unbudgeted fit of the same arrays holds every
    feature row and exceeds the 32 MiB."""
    got = _peak("arrays", "-", **OPTIONS)
    assert got["planned"] is None
    assert got["peak"] > 32 * MIB


def test_too_small_a_budget_fails_before_any_work_naming_the_smallest():
    X = np.zeros((N, D), np.float32)
    with pytest.raises(ValueError, match=r"too small for 100000 pairs .*the smallest budget that fits is") as info:
        ud.UniCon(memory_budget="4MiB", **OPTIONS).fit(X, X)
    smallest = int(str(info.value).rsplit("(", 1)[1].split()[0])
    assert ud.UniCon(memory_budget=smallest, **OPTIONS).memory_plan(X, X).planned_bytes <= smallest
    with pytest.raises(ValueError, match="too small"):
        ud.UniCon(memory_budget=smallest - 1024, **OPTIONS).memory_plan(X, X)


@pytest.mark.parametrize("value, expected", [("64MiB", 64 * MIB), ("1.5GB", 1_500_000_000), (np.int64(5 * MIB), 5 * MIB)])
def test_memory_budget_accepts_size_strings(value, expected):
    model = ud.UniCon(memory_budget=value)
    assert budget_bytes(model.memory_budget) == expected
    assert model.get_params()["memory_budget"] == value  # the parameter itself is kept as given


@pytest.mark.parametrize("value", ["lots", 0, -1, 1.5, True])
def test_memory_budget_rejects_bad_values_before_work(value):
    with pytest.raises(ValueError, match="memory_budget"):
        ud.UniCon(memory_budget=value).fit(np.zeros((10, 2)), np.zeros((10, 2)))


def test_verified_fit_under_a_budget_cuts_both_precisions_alike():
    """With a small budget the tiles are cut by bytes, so a float32 fit and its float64
    verifier would cut them differently (the verifier compares tile by tile); both follow
    one plan of as many elements per tile."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((12_000, 16), dtype=np.float32)
    Y = (X + rng.standard_normal((12_000, 16), dtype=np.float32)).astype(np.float32)
    model = ud.UniCon(rank=4, negatives=4096, max_iter=2, tol=0.0, verify=4, memory_budget="8MiB").fit(X, Y)
    assert model.plan_.panel_rows < 12_000
    # float32 tiles against float64 ones: C agrees to float32 round-off
    assert model.diagnostics_["verify"]["c_rel_error"] < 1e-5
