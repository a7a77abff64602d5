"""Simulated arrivals: a store grows in k appends and a model is re-solved after each.

Rows of a source pair store (default: the Fashion-MNIST training store of
``pipelines/fashion_mnist.py``) are appended to a new store: a first part of
``--base-rows`` rows, then ``--appends`` parts of ``--append-rows`` rows each.  After the
first part a model is fitted from scratch; after every later append three models are
compared on a held-out store:

* ``fast``:  the previous model's ``refit(mode="fast")`` (one pass over the new rows);
* ``warm``:  the previous model's ``refit()`` (the exact fixed point, warm-started);
* ``cold``:  a fresh fit on all rows so far.

The chain continues from the warm model.  The report (JSON and a Markdown table) gives,
per step, rows, iterations, how each fit stopped, seconds and R@1 in both directions on
the held-out pairs, and how far the fast and warm maps are from the cold one.

Usage (the issue-6 benchmark, RESULTS §6: 30,000 rows, then 10 appends of 10 %)::

    python pipelines/fashion_mnist.py --out-dir data
    python pipelines/arrivals.py --source data/fashion-mnist-train.zarr \
        --test data/fashion-mnist-test.zarr --base-rows 30000 --append-rows 3000 --appends 10 \
        --negatives 4096 --out runs/arrivals
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

import unicon_dist as ud


def _evaluate(model, x, y) -> dict:
    m = ud.retrieval_metrics(model.encode_x(x), model.encode_y(y), ks=(1,))
    return {"x2y_R@1": m["x2y_R@1"], "y2x_R@1": m["y2x_R@1"]}


def _fit_record(model, seconds: float, tx, ty) -> dict:
    return {"seconds": seconds, "iterations": model.n_iter_, "converged": model.converged_,
            "stop_reason": model.stop_reason_, **_evaluate(model, tx, ty)}


def simulate(source, test, out, *, base_rows: int, append_rows: int, appends: int, options: dict,
             test_rows: int = 5000) -> list[dict]:
    """Run the simulation; returns one record per step (see the module docstring)."""
    src = ud.PairStore.open(source)
    rows = base_rows + appends * append_rows
    if rows > len(src):
        raise ValueError(f"{source} holds {len(src):,} rows; base {base_rows:,} + {appends} x {append_rows:,} "
                         f"= {rows:,} asked for")
    tst = ud.PairStore.open(test)
    tx, ty, _ = tst.read(slice(0, min(test_rows, len(tst))))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = ud.PairStore.create(out / "growing.zarr", src.dim_x, src.dim_y, overwrite=True,
                                provenance={"pipeline": "pipelines/arrivals.py", "source": str(source)})
    cuts = [0] + [base_rows + k * append_rows for k in range(appends + 1)]
    records, prev = [], None
    for k in range(appends + 1):
        x, y, _ = src.read(slice(int(cuts[k]), int(cuts[k + 1])))
        store.append(x, y, source=f"arrival {k + 1}")
        rec = {"step": k + 1, "rows": len(store)}
        t0 = time.perf_counter()
        cold = ud.UniCon(**options).fit(store)
        rec["cold"] = _fit_record(cold, time.perf_counter() - t0, tx, ty)
        if prev is not None:
            for mode in ("fast", "exact"):
                if mode == "fast" and prev.stop_reason_ not in ("converged", "loss plateau"):
                    rec["fast"] = {"skipped": f"the previous model stopped at {prev.stop_reason_}"}
                    continue
                t0 = time.perf_counter()
                model = prev.refit(store, mode=mode)
                name = "warm" if mode == "exact" else "fast"
                rec[name] = {**_fit_record(model, time.perf_counter() - t0, tx, ty),
                             "W_rel_diff_to_cold": float(np.linalg.norm(model.W_ - cold.W_) / np.linalg.norm(cold.W_))}
                if mode == "exact":
                    warm = model
            prev = warm
        else:
            prev = cold
        records.append(rec)
        logging.getLogger("arrivals").info("step %d: %s", k + 1, json.dumps(rec))
    prev.save(out / f"model.v{prev.lineage_[-1]['version']}.npz")
    return records


def table(records: list[dict]) -> str:
    lines = ["| step | rows | cold it / s / R@1 | warm it / s / R@1 | fast s / R@1 | W diff warm, fast |",
             "|---|---|---|---|---|---|"]
    for r in records:
        c = r["cold"]
        cells = [str(r["step"]), f"{r['rows']:,}", f"{c['iterations']} / {c['seconds']:.1f} / {c['x2y_R@1']:.3f}"]
        # (iterations end at a fixed point, a loss plateau or max_iter: see "stop_reason" in the JSON)
        if "warm" in r:
            w, f = r["warm"], r["fast"]
            fast = "skipped" if "skipped" in f else f"{f['seconds']:.2f} / {f['x2y_R@1']:.3f}"
            fdiff = "–" if "skipped" in f else f"{f['W_rel_diff_to_cold']:.1e}"
            cells += [f"{w['iterations']} / {w['seconds']:.1f} / {w['x2y_R@1']:.3f}", fast,
                      f"{w['W_rel_diff_to_cold']:.1e}, {fdiff}"]
        else:
            cells += ["–", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _machine() -> str:
    import os
    import platform

    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pipelines/arrivals.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="data/fashion-mnist-train.zarr")
    parser.add_argument("--test", default="data/fashion-mnist-test.zarr")
    parser.add_argument("--base-rows", type=int, default=30_000)
    parser.add_argument("--append-rows", type=int, default=3_000)
    parser.add_argument("--appends", type=int, default=10)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--negatives", default="full", help='"full" or a batch size B (contiguous batches)')
    parser.add_argument("--out", default="runs/arrivals")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("unicon_dist").setLevel(logging.ERROR)
    options = dict(rank=args.rank)  # the library's defaults otherwise
    if args.negatives != "full":
        options.update(negatives=int(args.negatives), batch_split="contiguous")
    records = simulate(args.source, args.test, args.out, base_rows=args.base_rows, append_rows=args.append_rows,
                       appends=args.appends, options=options)
    report = {"options": options, "base_rows": args.base_rows, "append_rows": args.append_rows,
              "appends": args.appends, "machine": _machine(), "records": records}
    Path(args.out, "report.json").write_text(json.dumps(report, indent=1))
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
