"""Benchmark: the batch size B of the negatives, and where full negatives stop paying (issue 18).

``negatives="auto"`` resolves to full negatives up to ``AUTO_FULL_ROWS`` pairs and to batches
of ``AUTO_BATCH`` rows above (``unicon_dist.solver.layout``).  This script measures the two
things those numbers rest on, with the current code (``solver="anderson"``, library defaults
otherwise):

``cost``
    Seconds of one UniCon pass (``history_[k]["seconds"]``, median over iterations 2..5 of a
    fit with ``max_iter=5``, ``tol=0``, so that it never stops early) for negatives in
    (256, 512, 1024, 2048, 4096, "full") on seeded subsets of n in (2000, 4000, 8000, 16000)
    Fashion-MNIST training halves, r = 64.  A batch size B ≥ n is full negatives and is
    recorded as such.  The report gives the seconds and the ratio full / batched next to n/B.
``quality``
    Fit seconds, ``n_iter_``, ``stop_reason_``, the certified residual of the kept iterate and
    held-out R@1 (x→y, y→x) for negatives in (512, 1024, 2048, 4096, 8192) at ``max_iter=30``
    (the default) on

    * ``fashion-mnist``: ``bench_compare.load_data`` with no validation split, i.e. all 60,000
      training halves; the 10,000 test images, instance retrieval; r = 64.  Plus a "full" row
      on a seeded 20,000-row subset of train (``--fashion-full-rows``; full negatives on all
      60,000 rows are n² per pass, ≈ 13 s a pass on 2 cores) and, on the same subset, B = 2048
      for a like-for-like comparison.
    * ``wordnet``: ``bench_compare.load_data("wordnet")`` (synset split, synset ids as
      ``groups``, group-aware retrieval on 10,000 seeded test rows), r = 128, on a seeded
      40,000-row training subset (``--wordnet-rows``; 0 = all 175,925 rows, ≈ 18 s a pass at
      B = 4096 on 2 cores, too slow for a sweep of 30-iteration fits here).

Every fit runs in a fresh process (``_harness.spawn``) with ``torch.set_num_threads(2)``,
started under ``flock /tmp/bench.lock`` (``--lock``), so that timed runs never overlap with
the other benchmarks: do NOT wrap this driver in ``flock`` as well (it would wait on itself).

Usage (the numbers in ``benchmarks/results/negatives.json``)::

    flock /tmp/bench.lock python benchmarks/bench_negatives.py --lock ''   # what made the JSON
    python benchmarks/bench_negatives.py                     # the same, locking per fit
    python benchmarks/bench_negatives.py --parts cost
    python benchmarks/bench_negatives.py --parts quality --datasets wordnet
    python benchmarks/bench_negatives.py --report            # Markdown tables

    python benchmarks/bench_negatives.py --quick             # smoke run -> negatives_quick.json
    python benchmarks/bench_negatives.py --quick --report

Results are merged into the JSON by configuration: rerunning one part replaces only its rows.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402
import bench_compare as BC  # noqa: E402

H.use_checkout()

RESULTS = HERE / "results"
LOCK = "/tmp/bench.lock"

FULL = dict(cost_n=(2000, 4000, 8000, 16000), cost_negatives=(256, 512, 1024, 2048, 4096, "full"),
            cost_iter=5, quality_negatives=(512, 1024, 2048, 4096, 8192), max_iter=30,
            rank={"fashion-mnist": 64, "wordnet": 128}, fashion_full_rows=20000, wordnet_rows=40000,
            test_max=10000)
QUICK = dict(cost_n=(500, 1000), cost_negatives=(256, "full"), cost_iter=5, quality_negatives=(256, 512),
             max_iter=3, rank={"fashion-mnist": 16, "wordnet": 16}, fashion_full_rows=1500, wordnet_rows=2000,
             test_max=1000, fashion_train=3000)


# ----------------------------------------------------------------------------- worker
def _data_cfg(dataset: str, cfg: dict, quick: bool) -> dict:
    """The ``bench_compare.load_data`` configuration of a data set."""
    if dataset == "fashion-mnist":
        train_max = cfg.get("fashion_train")  # None: all 60,000
        return dict(fashion_val=0, train_max=train_max, val_max=0, test_max=cfg["test_max"])
    return dict(train_max=cfg["wordnet_rows"] or None, val_max=0, test_max=cfg["test_max"])


def _seeded_rows(n_total: int, n: int, key) -> np.ndarray:
    """A sorted seeded subset of ``n`` of ``n_total`` rows (all of them when n >= n_total)."""
    if n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(key).choice(n_total, size=n, replace=False))


def _kept_residual(model):
    for h in model.history_:
        if h.get("iteration") == model.best_iteration_ and h.get("residual") is not None:
            return float(h["residual"])
    return None


def worker(kind: str, p: dict) -> dict:
    """One fit: ``kind`` "cost" (per-pass seconds) or "quality" (a full fit, scored on test)."""
    import torch

    import unicon_dist as ud
    from unicon_dist.solver.layout import resolve_negatives

    torch.set_num_threads(int(p["threads"]))
    cfg = QUICK if p["quick"] else FULL
    dataset, seed, neg = p["dataset"], p["seed"], p["negatives"]
    data = BC.load_data(dataset, _data_cfg(dataset, cfg, p["quick"]), seed)
    X, Y, G = data["Xtr"], data["Ytr"], data["Gtr"]
    n_avail = len(X)
    if p.get("n"):  # a seeded training subset
        sub = _seeded_rows(len(X), int(p["n"]), [seed, 7])
        X, Y, G = X[sub], Y[sub], (None if G is None else G[sub])
    n = len(X)
    effective = resolve_negatives(n, neg)
    if not isinstance(effective, str) and effective >= n:
        effective = "full"
    opts = dict(rank=cfg["rank"][dataset], negatives=neg, solver="anderson")
    if kind == "cost":
        opts.update(max_iter=cfg["cost_iter"], tol=0.0)
    else:
        opts.update(max_iter=cfg["max_iter"])
    model = ud.UniCon(**opts)
    with H.Timer() as t:
        model.fit(X, Y, groups=G)
    hist = model.history_
    secs = [float(h["seconds"]) for h in hist]
    row = {"kind": kind, "dataset": dataset, "negatives": neg, "effective_negatives": effective, "n_train": n,
           "n_available": n_avail, "rank": opts["rank"], "options": opts, "groups": G is not None,
           "fit_seconds": t.seconds, "cpu_utilisation": t.utilisation, "threads": torch.get_num_threads(),
           "n_iter": int(model.n_iter_), "stop_reason": model.stop_reason_, "converged": bool(model.converged_),
           "best_iteration": int(model.best_iteration_), "final_residual": _kept_residual(model),
           "tol": getattr(model, "tol_", None), "iteration_seconds": secs,
           "residuals": [None if h.get("residual") is None else float(h["residual"]) for h in hist],
           "steps": [h.get("step") for h in hist], "setup_seconds": t.seconds - sum(secs),
           "n_test": int(data["info"]["n_test"]), "retrieval": data["info"]["retrieval"]}
    if kind == "cost":
        later = [float(h["seconds"]) for h in hist if 2 <= int(h["iteration"]) <= 5]
        row["pass_seconds"] = statistics.median(later) if later else None
        row["pass_iterations"] = len(later)
    else:
        row["metrics"] = BC.evaluate(model.encode_x, model.encode_y, data)
    return row


# ----------------------------------------------------------------------------- driver
def results_path(quick: bool) -> Path:
    return RESULTS / ("negatives_quick.json" if quick else "negatives.json")


def _key(row: dict) -> str:
    return f"{row['dataset']}|n={row.get('n') or 'all'}|neg={row['negatives']}"


def spawn_locked(kind: str, params: dict, lock: str) -> dict:
    """``_harness.spawn`` holding an exclusive ``flock`` on ``lock`` (the same lock as ``flock(1)``)."""
    if not lock:
        return H.spawn(Path(__file__), kind, params)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            return H.spawn(Path(__file__), kind, params)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def plan(args, cfg: dict) -> list[tuple[str, dict]]:
    jobs = []
    base = dict(seed=args.seed, quick=args.quick, threads=args.threads)
    if "cost" in args.parts:
        for n in cfg["cost_n"]:
            for neg in cfg["cost_negatives"]:
                jobs.append(("cost", dict(base, dataset="fashion-mnist", n=n, negatives=neg)))
    if "quality" in args.parts:
        for dataset in args.datasets:
            for neg in cfg["quality_negatives"]:
                jobs.append(("quality", dict(base, dataset=dataset, n=None, negatives=neg)))
            if dataset == "fashion-mnist":
                m = args.fashion_full_rows if args.fashion_full_rows is not None else cfg["fashion_full_rows"]
                jobs.append(("quality", dict(base, dataset=dataset, n=m or None, negatives="full")))
                if m:
                    jobs.append(("quality", dict(base, dataset=dataset, n=m, negatives=2048)))
    return jobs


def run(args) -> int:
    cfg = dict(QUICK if args.quick else FULL)
    if args.wordnet_rows is not None:
        cfg["wordnet_rows"] = args.wordnet_rows
    path = results_path(args.quick)
    machine, commit = H.machine_line(), H.git_commit()
    print(machine, file=sys.stderr)
    for kind, params in plan(args, cfg):
        if kind == "quality" and params["dataset"] == "wordnet":
            params["wordnet_rows"] = cfg["wordnet_rows"]
        label = f"{kind} {params['dataset']} n={params.get('n') or 'all'} negatives={params['negatives']}"
        print(label + " ...", file=sys.stderr, flush=True)
        row = spawn_locked(kind, params, args.lock)
        row.update(n=params.get("n"), machine=machine, commit=commit, date=datetime.date.today().isoformat())
        if "error" in row:
            print(f"  ERROR: {row['error']}\n  " + "\n  ".join(row.get("stderr_tail", [])), file=sys.stderr)
        elif kind == "cost":
            print(f"  {row['pass_seconds']:.3f} s a pass ({row['effective_negatives']})", file=sys.stderr)
        else:
            m = row["metrics"]
            print(f"  R@1 {m['x2y_R@1']:.3f}/{m['y2x_R@1']:.3f}; fit {row['fit_seconds']:.1f} s, "
                  f"{row['n_iter']} it, {row['stop_reason']}, residual {row['final_residual']:.2e}",
                  file=sys.stderr, flush=True)
        if "error" not in row and row["cpu_utilisation"] < 0.8:
            print(f"  WARNING: CPU utilisation {row['cpu_utilisation']:.2f} < 0.8", file=sys.stderr)
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault(kind, {})[_key(row | {"dataset": params["dataset"], "negatives": params["negatives"]})] = row
        data.update(machine=machine, cpu=H.cpu_model(), date=datetime.date.today().isoformat())
        BC.save_results(path, data)
    print(f"wrote {path.relative_to(H.REPO)}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- report
def _s(v) -> str:
    return "—" if v is None else (f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100
                                  else f"{v:.0f}")


def report_cost(rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    ns = sorted({r["n_train"] for r in ok})
    negs = [b for b in (256, 512, 1024, 2048, 4096, 8192) if any(r["negatives"] == b for r in ok)]
    cell = {(r["n_train"], r["negatives"]): r for r in ok}
    out = ["Seconds of one pass (median of iterations 2..5; * = B ≥ n, i.e. full negatives; † = CPU "
           "utilisation of the fit < 0.8, another process had the cores):\n",
           "| n | " + " | ".join(f"B = {b}" for b in negs) + " | full |",
           "|---|" + "---|" * (len(negs) + 1)]
    for n in ns:
        cells = []
        for b in negs + ["full"]:
            r = cell.get((n, b))
            star = "*" if r is not None and b != "full" and r["effective_negatives"] == "full" else ""
            noisy = "†" if r is not None and r["cpu_utilisation"] < 0.8 else ""
            cells.append("—" if r is None else _s(r["pass_seconds"]) + star + noisy)
        out.append(f"| {n:,} | " + " | ".join(cells) + " |")
    out += ["", "Full pass ÷ batched pass, with n/B in brackets (the cost model: ratio ≈ n/B):\n",
            "| n | " + " | ".join(f"B = {b}" for b in negs) + " |", "|---|" + "---|" * len(negs)]
    for n in ns:
        full = cell.get((n, "full"))
        cells = []
        for b in negs:
            r = cell.get((n, b))
            if r is None or full is None or r["effective_negatives"] == "full":
                cells.append("—")
            else:
                cells.append(f"{full['pass_seconds'] / r['pass_seconds']:.2f} ({n / b:.2f})")
        out.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def report_quality(dataset: str, rows: list[dict]) -> str:
    def order(r):
        return (r["n_train"] != max(x["n_train"] for x in rows), r["negatives"] == "full",
                r["negatives"] if r["negatives"] != "full" else 0)

    rows = sorted(rows, key=order)
    r0 = next((r for r in rows if "error" not in r), None)
    head = (f"### {dataset} (r = {r0['rank']}, {r0['n_test']:,} test pairs, {r0['retrieval']} retrieval, "
            f"{'groups = synsets, ' if r0['groups'] else ''}max_iter {r0['options']['max_iter']})\n") if r0 else ""
    out = [head, "| negatives | n train | fit s | s / iteration | n_iter | stop | kept residual | R@1 x→y | R@1 y→x "
           "| R@1 mean |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['negatives']} | | | | | | error: {r['error']} | | | |")
            continue
        m, its = r["metrics"], r["iteration_seconds"]
        per = statistics.median(its[1:]) if len(its) > 1 else (its[0] if its else None)
        res = "—" if r["final_residual"] is None else f"{r['final_residual']:.1e}"
        util = "" if r["cpu_utilisation"] >= 0.8 else f" (CPU util. {r['cpu_utilisation']:.2f})"
        same = " (= full)" if r["negatives"] != "full" and r["effective_negatives"] == "full" else ""
        out.append(f"| {r['negatives']}{same} | {r['n_train']:,} | {_s(r['fit_seconds'])}{util} | {_s(per)} | "
                   f"{r['n_iter']} | {r['stop_reason']} | {res} | {m['x2y_R@1']:.3f} | {m['y2x_R@1']:.3f} | "
                   f"{m['mean_R@1']:.3f} |")
    return "\n".join(out)


def report(args) -> int:
    path = results_path(args.quick)
    if not path.exists():
        print(f"{path} not found; run the benchmark first", file=sys.stderr)
        return 1
    data = json.loads(path.read_text())
    print(f"Machine: {data.get('machine', '?')}; last written {data.get('date', '?')}"
          + (" (QUICK smoke run: not results)" if args.quick else "") + "\n")
    if data.get("cost"):
        print("### Cost of one pass, Fashion-MNIST halves (r = 64)\n")
        print(report_cost(list(data["cost"].values())) + "\n")
    by_ds: dict = {}
    for r in data.get("quality", {}).values():
        by_ds.setdefault(r["dataset"], []).append(r)
    for dataset in sorted(by_ds):
        print(report_quality(dataset, by_ds[dataset]) + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("cost", "quality"), default=["cost", "quality"])
    parser.add_argument("--datasets", nargs="+", choices=BC.DATASETS, default=list(BC.DATASETS))
    parser.add_argument("--quick", action="store_true", help="small smoke run, written to negatives_quick.json")
    parser.add_argument("--report", action="store_true", help="no fitting: Markdown tables from the JSON")
    parser.add_argument("--fashion-full-rows", type=int,
                        help="rows of the Fashion-MNIST 'full' row (default 20,000; 0 = all 60,000)")
    parser.add_argument("--wordnet-rows", type=int, help="WordNet training rows (default 40,000; 0 = all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every worker (default 2)")
    parser.add_argument("--lock", default=LOCK, help="flock file held around every fit ('' = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker")
    parser.add_argument("--params")
    args = parser.parse_args(argv)
    if args.worker:
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        params = json.loads(args.params)
        if params.get("wordnet_rows") is not None:
            (QUICK if params["quick"] else FULL)["wordnet_rows"] = params["wordnet_rows"]
        print(json.dumps(worker(args.worker, params)))
        return 0
    if args.report:
        return report(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
