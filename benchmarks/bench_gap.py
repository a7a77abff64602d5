"""Benchmark: what closes linear UniCon's Fashion-MNIST gap to SGD-CLIP (issue 18 (b)).

Fashion-MNIST halves with the splits and scoring of ``bench_compare.py`` (54,000 training
pairs, 10,000 held-out test pairs, instance retrieval, r = 64), one fit per row: first
``UniCon(rank=64)`` with the library defaults, then one factor at a time varied from them:

========== ==========================================
factor     values
========== ==========================================
temperature 0.05, 0.1, 0.2, 0.5
rho        0.3, 1, 3  (with cosine similarity only the scale of W)
nu         0.5, 1.0, 1.5
rank       32, 64, 128  (128 is a larger model than SGD-CLIP's r = 64)
ridge      0, 0.1, 1.0
whiten     None, 1e-3, 1e-2, 1e-1
========== ==========================================

Values equal to the default are not refitted (the default row stands for them).  Combined
settings are extra rows given as JSON with ``--combo``.  Per row: test R@1 (x→y, y→x, mean),
``stop_reason_``, ``n_iter_``, the kept iteration (lowest residual unless converged), the certified residual of
the kept iterate and the lowest one of the run, fit seconds.  Rows are merged by name into ``benchmarks/results/gap.json``.

Reproduce (2 cores, nothing else running)::

    flock /tmp/bench.lock python benchmarks/bench_gap.py
    flock /tmp/bench.lock python benchmarks/bench_gap.py --only none --skip-default \\
        --combo '{"temperature": 0.2, "nu": 1.5}' --combo '{"temperature": 0.2, "rank": 128}'
    python benchmarks/bench_gap.py --report          # the Markdown table from gap.json

    python benchmarks/bench_gap.py --quick           # smoke run (3,000 pairs, r = 16; gap_quick.json)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402

H.use_checkout()
import bench_compare as BC  # noqa: E402

FACTORS = {
    "temperature": (0.05, 0.1, 0.2, 0.5),
    "rho": (0.3, 1.0, 3.0),
    "nu": (0.5, 1.0, 1.5),
    "rank": (32, 64, 128),
    "ridge": (0.0, 0.1, 1.0),
    "whiten": (None, 1e-3, 1e-2, 1e-1),
}
SGD_CLIP_R1 = 0.572  # RESULTS.md §7a, best SGD-CLIP run (mean test R@1)


def rows_to_fit(rank: int, only, combos, skip_default: bool = False) -> list:
    """(name, options) of every row: the default, one-factor variations, combined settings."""
    import unicon_dist as ud

    defaults = ud.UniCon(rank=rank).get_params()
    out = [] if skip_default else [("default", {"rank": rank})]
    for factor, values in FACTORS.items():
        if only is not None and factor not in only:
            continue
        for v in values:
            if factor == "rank" and rank != 64:
                v = max(4, int(v * rank / 64))
            if v == defaults[factor] or (v is None and defaults[factor] is None):
                continue
            out.append((f"{factor}={v}", {"rank": rank, factor: v}))
    for c in combos:
        opts = {"rank": rank, **c}
        out.append(("combo " + ", ".join(f"{k}={v}" for k, v in c.items()), opts))
    return out


def fit_row(options: dict, data: dict) -> dict:
    """One fit and its test scores."""
    import unicon_dist as ud

    model = ud.UniCon(**options)
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(data["Xtr"], data["Ytr"])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    m = BC.evaluate(model.encode_x, model.encode_y, data)
    return {
        "options": options, "x2y_R@1": m["x2y_R@1"], "y2x_R@1": m["y2x_R@1"], "mean_R@1": m["mean_R@1"],
        "mean_R@10": m["mean_R@10"], "stop_reason": model.stop_reason_, "n_iter": int(model.n_iter_),
        "best_iteration": int(model.best_iteration_), "converged": bool(model.converged_),
        "final_residual": BC._kept_residual(model), "tol": model.tol_,
        "lowest_residual": min((h["residual"] for h in model.history_ if h.get("residual") is not None),
                               default=None),
        "residuals": [h.get("residual") for h in model.history_],
        "losses": [float(h["loss"]) for h in model.history_], "loss": float(model.loss_),
        "w_norm": float(np.linalg.norm(np.asarray(model.W_))), "seconds": seconds,
        "cpu_utilisation": cpu / (seconds * max(1, __import__("torch").get_num_threads())),
    }


def run(args) -> int:
    import torch

    torch.set_num_threads(1 if args.quick else args.threads)
    cfg = BC.QUICK if args.quick else BC.FULL
    rank = cfg["rank"]["fashion-mnist"]
    path = BC.RESULTS / ("gap_quick.json" if args.quick else "gap.json")
    data = BC.load_data("fashion-mnist", cfg, args.seed)
    machine, commit = H.machine_line(), H.git_commit()
    print(machine, f"{len(data['Xtr']):,} train / {len(data['Xte']):,} test pairs, r = {rank}", file=sys.stderr)
    combos = [json.loads(c) for c in args.combo]
    for name, options in rows_to_fit(rank, args.only, combos, args.skip_default):
        row = fit_row(options, data)
        row.update(name=name, machine=machine, commit=commit, date=datetime.date.today().isoformat(),
                   n_train=int(len(data["Xtr"])), n_test=int(len(data["Xte"])))
        print(f"{name:28s} R@1 {row['mean_R@1']:.3f} ({row['x2y_R@1']:.3f}/{row['y2x_R@1']:.3f}) "
              f"{row['stop_reason']}, {row['n_iter']} it, residual {row['final_residual']:.1e}, "
              f"{row['seconds']:.1f} s, util {row['cpu_utilisation']:.2f}", file=sys.stderr, flush=True)
        out = json.loads(path.read_text()) if path.exists() else {"rows": {}}
        out["rows"][name] = row
        out.update(machine=machine, sgd_clip_reference=SGD_CLIP_R1)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, path)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def report(args) -> int:
    path = BC.RESULTS / ("gap_quick.json" if args.quick else "gap.json")
    rows = json.loads(path.read_text())["rows"]
    base = rows.get("default", {}).get("mean_R@1")
    print("| setting | R@1 x→y | R@1 y→x | R@1 mean | Δ vs default | Δ vs SGD-CLIP 0.572 | stop | it | kept |"
          " residual (kept / lowest) | fit s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        d = "—" if base is None else f"{r['mean_R@1'] - base:+.3f}"
        flag = " (util %.2f)" % r["cpu_utilisation"] if r["cpu_utilisation"] < 0.8 else ""
        print(f"| {name} | {r['x2y_R@1']:.3f} | {r['y2x_R@1']:.3f} | {r['mean_R@1']:.3f} | {d} | "
              f"{r['mean_R@1'] - SGD_CLIP_R1:+.3f} | {r['stop_reason']} | {r['n_iter']} | {r['best_iteration']} | "
              f"{r['final_residual']:.1e} / {r['lowest_residual']:.1e} | {r['seconds']:.1f}{flag} |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (3,000 pairs, r = 16) -> gap_quick.json")
    parser.add_argument("--report", action="store_true", help="Markdown table from the JSON, no fitting")
    parser.add_argument("--only", nargs="+", help="factors to vary (default: all; 'none' for the default row "
                        "and the --combo rows only)")
    parser.add_argument("--combo", action="append", default=[], help="JSON options of a combined row")
    parser.add_argument("--skip-default", action="store_true", help="do not refit the default row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return report(args) if args.report else run(args)


if __name__ == "__main__":
    sys.exit(main())
