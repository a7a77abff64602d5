"""Simulated arrivals: a store grows in k appends and a model is re-solved after each.

Rows of a source pair store (default: the Fashion-MNIST training store of
``pipelines/fashion_mnist.py``) are appended to a new store in ``--steps`` equal parts.
After the first part a model is fitted from scratch; after every later append three
models are compared on a held-out store:

* ``fast``:  the previous model's ``refit(mode="fast")`` (one pass over the new rows);
* ``warm``:  the previous model's ``refit()`` (the exact fixed point, warm-started);
* ``cold``:  a fresh fit on all rows so far.

The chain continues from the warm model.  The report (JSON and a Markdown table) gives,
per step, rows, iterations, seconds and R@1 in both directions on the held-out pairs.

Usage::

    python pipelines/fashion_mnist.py --out-dir data
    python pipelines/arrivals.py --source data/fashion-mnist-train.zarr \\
        --test data/fashion-mnist-test.zarr --rows 20000 --steps 10 --out runs/arrivals
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


def simulate(source, test, out, *, rows: int, steps: int, options: dict, test_rows: int = 5000) -> list[dict]:
    """Run the simulation; returns one record per step (see the module docstring)."""
    src = ud.PairStore.open(source)
    rows = min(rows, len(src))
    tst = ud.PairStore.open(test)
    tx, ty, _ = tst.read(slice(0, min(test_rows, len(tst))))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = ud.PairStore.create(out / "growing.zarr", src.dim_x, src.dim_y, overwrite=True,
                                provenance={"pipeline": "pipelines/arrivals.py", "source": str(source)})
    cuts = np.linspace(0, rows, steps + 1).round().astype(int)
    records, prev = [], None
    for k in range(steps):
        x, y, _ = src.read(slice(int(cuts[k]), int(cuts[k + 1])))
        store.append(x, y, source=f"arrival {k + 1}")
        rec = {"step": k + 1, "rows": len(store)}
        t0 = time.perf_counter()
        cold = ud.UniCon(**options).fit(store)
        rec["cold"] = {"seconds": time.perf_counter() - t0, "iterations": cold.n_iter_,
                       "converged": cold.converged_, **_evaluate(cold, tx, ty)}
        if prev is not None:
            for mode in ("fast", "exact"):
                if mode == "fast" and not prev.converged_:
                    rec["fast"] = {"skipped": "the previous model did not converge"}
                    continue
                t0 = time.perf_counter()
                model = prev.refit(store, mode=mode)
                name = "warm" if mode == "exact" else "fast"
                rec[name] = {"seconds": time.perf_counter() - t0, "iterations": model.n_iter_,
                             "converged": model.converged_, **_evaluate(model, tx, ty),
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pipelines/arrivals.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="data/fashion-mnist-train.zarr")
    parser.add_argument("--test", default="data/fashion-mnist-test.zarr")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--damping", type=float, default=0.5)
    parser.add_argument("--max-iter", type=int, default=30)
    parser.add_argument("--out", default="runs/arrivals")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("unicon_dist").setLevel(logging.ERROR)
    options = dict(rank=args.rank, temperature=args.temperature, damping=args.damping, max_iter=args.max_iter,
                   tol=1e-4)
    records = simulate(args.source, args.test, args.out, rows=args.rows, steps=args.steps, options=options)
    report = {"options": options, "rows": args.rows, "steps": args.steps, "records": records}
    Path(args.out, "report.json").write_text(json.dumps(report, indent=1))
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
