"""Benchmark: does ``memory_budget`` bound a fit?  Peak RSS above the loaded data.

Each configuration runs in a fresh process.  The worker generates (or opens) the data,
fits once on 5,000 rows with the same options (so that torch's and zarr's one-off
allocations -- thread pools, kernels' workspaces, the event loop -- are not counted),
then resets the Linux high-water mark (``/proc/self/clear_refs``) and fits on all rows.
The figure is VmHWM minus the resident size just before the fit: for arrays the arrays
are already resident and not counted (they are the "loaded data"); for a store nothing
of it is resident.

Data: n = 200,000 pairs of 64 + 64 float32 features (x Gaussian, y = x·A + noise), the
case of issue 16; rank 32, negatives 4,096, three iterations.  Sources: arrays, and a
pair store of the same rows (chunks of 4,096 rows, zstd), with random batches and with
``batch_split="contiguous"``.  Budgets: 64 MiB and 256 MiB;
one Nyström configuration (RBF, 256 landmarks per view, ``verify=8``) at 64 MiB; and no
budget, for reference.

Usage::

    python benchmarks/bench_memory.py            # all configurations, ~5 min on 2 cores
    python benchmarks/bench_memory.py --n 50000  # smaller

Writes ``benchmarks/results/memory.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402

H.use_checkout()

MIB = 1 << 20
DATA_DIR = H.REPO / "data" / "bench"
OPTIONS = dict(rank=32, negatives=4096, max_iter=3, tol=0.0, loss_tol=0.0)
CONFIGS = [
    {"source": "arrays", "budget_mib": 64},
    {"source": "arrays", "budget_mib": 256},
    {"source": "store", "budget_mib": 64},
    {"source": "store", "budget_mib": 256},
    {"source": "store", "budget_mib": 64, "batch_split": "contiguous"},
    {"source": "arrays", "budget_mib": 64, "kernel": "rbf", "n_landmarks": 256, "verify": 8},
    {"source": "store", "budget_mib": 64, "kernel": "rbf", "n_landmarks": 256, "verify": 8, "batch_split": "contiguous"},
    {"source": "arrays", "budget_mib": None},
]


def make_data(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 64), dtype=np.float32)
    A = rng.standard_normal((64, 64), dtype=np.float32) / 8
    Y = (X @ A + rng.standard_normal((n, 64), dtype=np.float32)).astype(np.float32)
    return X, Y


def store_for(n: int) -> Path:
    import unicon_dist as ud

    path = DATA_DIR / f"memory-{n}x64.zarr"
    if not path.exists():
        X, Y = make_data(n)
        store = ud.PairStore.create(path, 64, 64, chunk_rows=4096)
        for i in range(0, n, 50_000):
            store.append(X[i:i + 50_000], Y[i:i + 50_000])
    return path


def worker(params: dict) -> dict:
    import torch

    import unicon_dist as ud

    n = params["n"]
    budget = None if params["budget_mib"] is None else params["budget_mib"] * MIB
    options = dict(OPTIONS, memory_budget=budget)
    options.update({k: params[k] for k in ("kernel", "n_landmarks", "verify", "batch_split") if k in params})
    if params["source"] == "store":
        src, warm = (ud.PairStore.open(store_for(n)), ud.PairStore.open(store_for(5000)))
        args, warm_args = (src,), (warm,)
    else:
        X, Y = make_data(n)
        Xw, Yw = make_data(5000, seed=1)
        args, warm_args = (X, Y), (Xw, Yw)
    ud.UniCon(**dict(options, max_iter=1)).fit(*warm_args)
    base = H.rss_mib()
    H.reset_peak()
    model = ud.UniCon(**options)
    t0 = time.perf_counter()
    model.fit(*args)
    seconds = time.perf_counter() - t0
    peak = H.maxrss_mib() - base
    plan = getattr(model, "plan_", None)
    return {
        **params, "peak_mib": round(peak, 1), "seconds": round(seconds, 2),
        "planned_mib": None if plan is None else round(plan.planned_bytes / MIB, 1),
        "panel_rows": None if plan is None else plan.panel_rows,
        "within_budget": None if budget is None else bool(peak * MIB <= budget),
        "threads": torch.get_num_threads(), "loss": model.loss_,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--worker")
    ap.add_argument("--params")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.params))))
        return
    store_for(args.n), store_for(5000)
    rows = []
    for cfg in CONFIGS:
        row = H.spawn(Path(__file__), "fit", {"n": args.n, **cfg})
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"machine": H.machine_line(), "commit": H.git_commit(), "n": args.n, "options": OPTIONS, "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "memory.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{out['machine']}; commit {out['commit']}; n = {args.n}\n")
    print("| source | features | budget | planned | peak RSS above data | within | panel rows | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        feats = f"RBF, {r['n_landmarks']} landmarks, verify={r['verify']}" if r.get("kernel") else "linear"
        if r.get("batch_split"):
            feats += f", batch_split={r['batch_split']}"
        budget = "none" if r["budget_mib"] is None else f"{r['budget_mib']} MiB"
        if "error" in r:
            print(f"| {r['source']} | {feats} | {budget} | | error: {r['error']} | | | |")
            continue
        planned = "" if r["planned_mib"] is None else f"{r['planned_mib']} MiB"
        within = {True: "yes", False: "**no**", None: ""}[r["within_budget"]]
        print(f"| {r['source']} | {feats} | {budget} | {planned} | {r['peak_mib']} MiB | {within} | "
              f"{r['panel_rows'] or ''} | {r['seconds']} |")


if __name__ == "__main__":
    main()
