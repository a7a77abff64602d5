"""Benchmark: the same out-of-core fit on the LocalExecutor and on Ray with 1 and 2 workers.

A synthetic clustered store of n = 200,000 pairs, d = 64 per view (float32, 102 MB), is
fitted with UniCon rank 32, CLIP τ = 0.1, full negatives, 2 iterations (tol = 0) and a
256 MiB memory budget (14 panels), each configuration in a fresh process:

* ``local``: :class:`LocalExecutor`, torch with 2 threads;
* ``ray-1x2``: :class:`RayExecutor`, one worker with 2 CPUs (torch uses 2 threads in it);
* ``ray-2x1``: two workers with 1 CPU each.

On this 2-core machine all three have the same cores, so the ideal for every Ray row is
the local time: the difference is Ray's overhead (actor start, shipping statistics and
partial C, each worker reading its panels) and, for 2x1, how well two processes with a
thread each use the cores compared with one process with two threads.  The script also
checks that every configuration gives the same W as the local one.

Usage::

    python benchmarks/bench_ray.py            # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402

H.use_checkout()

N, DIM = 200_000, 64
STORE = H.REPO / "data" / "bench" / f"clustered-{N}x{DIM}.zarr"
CONFIGS = {"local": None, "ray-1x2": (1, 2), "ray-2x1": (2, 1)}


def build() -> None:
    import unicon_dist as ud

    if STORE.exists():
        return
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((32, DIM)).astype(np.float32)
    rotation = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].astype(np.float32)
    store = ud.PairStore.create(STORE, DIM, DIM, provenance={"generator": "benchmarks/bench_ray.py"})
    for a in range(0, N, 50_000):
        c = rng.integers(0, 32, 50_000)
        x = centres[c] + 0.7 * rng.standard_normal((50_000, DIM), dtype=np.float32)
        y = centres[c] @ rotation + 0.7 * rng.standard_normal((50_000, DIM), dtype=np.float32)
        store.append(x, y)


def worker(params: dict) -> dict:
    import torch

    import unicon_dist as ud

    name = params["name"]
    options = dict(rank=32, temperature=0.1, max_iter=2, tol=0.0, memory_budget=256 << 20)
    t0 = time.perf_counter()
    if CONFIGS[name] is None:
        executor = ud.LocalExecutor()
        start = 0.0
    else:
        workers, cpus = CONFIGS[name]
        executor = ud.RayExecutor(num_workers=workers, num_cpus_per_worker=cpus).start()
        start = time.perf_counter() - t0
    with H.Timer() as t:
        model = ud.UniCon(**options).fit(STORE, executor=executor)
    if CONFIGS[name] is not None:
        executor.shutdown()
    out = Path(params["out"])
    np.save(out, model.W_)
    return {"name": name, "n": N, "dim": DIM, "fit_seconds": t.seconds, "ray_start_seconds": start,
            "panel_rows": model.plan_.panel_rows, "iterations": model.n_iter_,
            "driver_cpu_utilisation": t.utilisation, "threads": torch.get_num_threads(),
            "phases": [h.get("phases") for h in model.history_]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker")
    parser.add_argument("--params")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.params))))
        return 0
    print(H.machine_line())
    build()
    rows = []
    for name in CONFIGS:
        row = H.spawn(Path(__file__), "run", {"name": name, "out": str(HERE / "results" / f"_ray_W_{name}.npy")})
        rows.append(row)
        print(json.dumps(row), flush=True)
    ref = np.load(HERE / "results" / "_ray_W_local.npy")
    local = next(r for r in rows if r["name"] == "local")
    for r in rows:
        if "error" in r:
            continue
        W = np.load(HERE / "results" / f"_ray_W_{r['name']}.npy")
        r["max_rel_diff_W"] = float(np.abs(W - ref).max() / np.abs(ref).max())
        r["vs_local"] = r["fit_seconds"] / local["fit_seconds"]
    (HERE / "results" / "ray.json").write_text(json.dumps({"machine": H.machine_line(), "rows": rows}, indent=1))
    print("| config | fit s | vs local (ideal 1.0) | Ray start s | max rel diff of W |\n|---|---|---|---|---|")
    for r in rows:
        if "error" not in r:
            print(f"| {r['name']} | {r['fit_seconds']:.1f} | {r['vs_local']:.2f} | {r['ray_start_seconds']:.1f} "
                  f"| {r['max_rel_diff_W']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
