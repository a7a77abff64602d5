"""Benchmark: seconds per fit iteration with both passes at once (issue 20) against the tiled passes.

One process, one data set per configuration, the modes of ``unicon_dist.solver.fused``
interleaved repeat by repeat (off, one-pass, attention, auto, off, ...) so that they share the
machine's state; each fit is linear (whitened features), 3 iterations with no early stop,
batched negatives.  Reported per mode: the median and the minimum over the repeats of the
mean seconds per iteration, the ratio of the tiled median to each mode's median, the CPU
utilisation of each fit (CPU seconds / (wall seconds × threads); well below 1 means other
work took the cores), and the loss (equal across modes to float32 round-off).

With ``--c-only`` it times C alone instead: ``CrossProductOperator`` on synthetic unit
embeddings (r wide) and Gaussian features (m = ``--d`` wide), batches cut contiguously, the
modes interleaved, and reports the median and minimum seconds of building the operator
(statistics) and materialising C.

``--one-pass-blocks`` times :func:`unicon_dist.math.one_pass.clip_one_pass_product` alone over
the batches of n pairs (B = 1,024 by default, ``--configs`` giving r) for blocks of 256, 512 and
1,024 rows, and prints nanoseconds per entry of the B × B tiles (best of 3).  ``--exp-rates``
times torch's ``exp_`` against ``exp2_`` on one 512 × 1,024 float32 tile: the direct-regime tiles
are formed as 2^{(log₂e·z_x)z_yᵀ} (:func:`unicon_dist.math.weights.exp_scores`) because of it.

Usage::

    python benchmarks/bench_fused.py                          # n = 200,000; about 10 minutes
    python benchmarks/bench_fused.py --one-pass-blocks --configs 32:1024   # about 10 s
    python benchmarks/bench_fused.py --c-only --repeats 5     # about 4 minutes
    python benchmarks/bench_fused.py --exp-rates              # exp against exp2, about 5 s
    python benchmarks/bench_fused.py --n 20000 --repeats 1    # smoke test

Writes ``benchmarks/results/fused.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402

H.use_checkout()

import torch  # noqa: E402

import unicon_dist as ud  # noqa: E402
from unicon_dist.solver import fused  # noqa: E402

from bench_iteration import pairs  # noqa: E402

MODES = ("off", "one-pass", "attention", "auto")


def run(n: int, d: int, rank: int, negatives: int, repeats: int) -> dict:
    X, Y = pairs(n, d)
    opts = dict(rank=rank, negatives=negatives, seed=0)
    ud.UniCon(max_iter=1, **opts).fit(X[:5000], Y[:5000])  # warm-up
    rows = {m: {"seconds_per_iteration": [], "cpu_utilisation": [], "loss": None} for m in MODES}
    for _ in range(repeats):
        for m in MODES:
            fused.FORCE = m
            c0, t0 = H.cpu_s(), time.perf_counter()
            model = ud.UniCon(max_iter=3, tol=0.0, loss_tol=0.0, **opts).fit(X, Y)
            wall, cpu = time.perf_counter() - t0, H.cpu_s() - c0
            rows[m]["seconds_per_iteration"].append(sum(h["seconds"] for h in model.history_) / len(model.history_))
            rows[m]["cpu_utilisation"].append(cpu / (wall * torch.get_num_threads()))
            rows[m]["loss"] = float(model.loss_)
    fused.FORCE = None
    base = statistics.median(rows["off"]["seconds_per_iteration"])
    for m, r in rows.items():
        r["median"] = statistics.median(r["seconds_per_iteration"])
        r["min"] = min(r["seconds_per_iteration"])
        r["speedup_vs_tiled"] = base / r["median"]
    return {"n": n, "d": d, "rank": rank, "negatives": negatives, "repeats": repeats, "modes": rows}


def run_c(n: int, d: int, rank: int, negatives: int, repeats: int) -> dict:
    from unicon_dist.solver.operator import CrossProductOperator

    g = torch.Generator().manual_seed(0)
    px, py = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    zx = torch.nn.functional.normalize(torch.randn(n, rank, generator=g), dim=1)
    zy = torch.nn.functional.normalize(torch.randn(n, rank, generator=g), dim=1)
    rows = {m: {"seconds": [], "cpu_utilisation": [], "loss": None} for m in MODES}
    for _ in range(repeats):
        for m in MODES:
            c0, t0 = H.cpu_s(), time.perf_counter()
            op = CrossProductOperator(px, py, zx, zy, negatives=negatives, batch_split="contiguous", fused=m)
            op.materialize()
            wall, cpu = time.perf_counter() - t0, H.cpu_s() - c0
            rows[m]["seconds"].append(wall)
            rows[m]["cpu_utilisation"].append(cpu / (wall * torch.get_num_threads()))
            rows[m]["loss"] = float(op.loss)
            del op
    base = statistics.median(rows["off"]["seconds"])
    for r in rows.values():
        r["seconds_per_iteration"] = r["seconds"]  # one C: the table's column
        r["median"], r["min"] = statistics.median(r["seconds"]), min(r["seconds"])
        r["speedup_vs_tiled"] = base / r["median"]
    return {"n": n, "d": d, "rank": rank, "negatives": negatives, "repeats": repeats, "modes": rows}


def one_pass_blocks(n: int, d: int, rank: int, batch: int) -> dict:
    from unicon_dist.math.one_pass import clip_one_pass_product

    g = torch.Generator().manual_seed(0)
    nb = n // batch
    zx = torch.nn.functional.normalize(torch.randn(nb, batch, rank, generator=g), dim=-1) / 0.07
    zy = torch.nn.functional.normalize(torch.randn(nb, batch, rank, generator=g), dim=-1)
    A, B = torch.randn(nb, batch, d, generator=g), torch.randn(nb, batch, d, generator=g)
    E, G = torch.empty(batch, batch), torch.empty(batch, batch)
    out = {}
    for rows in (256, 512, 1024):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for k in range(nb):
                clip_one_pass_product(zx[k], zy[k], A[k], B[k], 1.0, 0.0, rows, E, G[: min(rows, batch)])
            best = min(best, time.perf_counter() - t0)
        out[rows] = best / (nb * batch * batch) * 1e9
    return {"n": nb * batch, "d": d, "rank": rank, "negatives": batch, "ns_per_entry": out}


def exp_rates(rows: int = 512, cols: int = 1024, repeats: int = 200) -> dict:
    """ns per entry of ``exp_``, ``exp2_`` and the copy both start from, on one float32 tile (best of 5).

    The arguments span [−40, 40], the direct regime's range (``math.weights.fits_direct``).
    """
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(rows, cols, generator=g) * 80.0 - 40.0)
    y = torch.empty_like(x)
    ops = {"copy": lambda: y.copy_(x), "exp": lambda: y.copy_(x).exp_(), "exp2": lambda: y.copy_(x).exp2_()}
    out = {}
    for name, f in ops.items():
        f()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(repeats):
                f()
            best = min(best, time.perf_counter() - t0)
        out[name] = best / (repeats * rows * cols) * 1e9
    return out


def table(results: list[dict], label: str = "s / iteration") -> str:
    lines = [f"| r | B | mode | {label}, median (min) | tiled ÷ this | CPU util. (min) | loss |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        for m, r in res["modes"].items():
            lines.append(f"| {res['rank']} | {res['negatives']:,} | {m} | {r['median']:.2f} ({r['min']:.2f}) | "
                         f"{r['speedup_vs_tiled']:.2f}× | {min(r['cpu_utilisation']):.2f} | {r['loss']:.10f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--configs", nargs="+", default=["32:1024", "128:1024", "32:4096", "128:4096"],
                   help="rank:batch pairs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON path (default results/fused.json, fused_c.json with --c-only)")
    p.add_argument("--c-only", action="store_true", help="time C alone, not fit iterations")
    p.add_argument("--one-pass-blocks", action="store_true", help="ns per entry of the one-pass tile by block rows")
    p.add_argument("--exp-rates", action="store_true",
                   help="ns per entry of exp and exp2 on a 512 x 1,024 float32 tile (math.weights.exp_scores)")
    args = p.parse_args(argv)
    if args.exp_rates:
        res = exp_rates()
        print(f"{H.machine_line()}; 512 x 1,024 float32 tile, ns per entry (best of 5): "
              + ", ".join(f"{k} {v:.3f}" for k, v in res.items())
              + f"; exp ÷ exp2 net of the copy {(res['exp'] - res['copy']) / (res['exp2'] - res['copy']):.2f}×")
        return 0
    if args.one_pass_blocks:
        for cfg in args.configs:
            rank, batch = (int(v) for v in cfg.split(":"))
            res = one_pass_blocks(args.n, args.d, rank, batch)
            print(f"{H.machine_line()}; r = {rank}, m = {args.d}, B = {batch}, {res['n']} pairs: ns per entry by "
                  "block rows " + ", ".join(f"{k}: {v:.2f}" for k, v in res["ns_per_entry"].items()))
        return 0
    args.out = args.out or str(HERE / "results" / ("fused_c.json" if args.c_only else "fused.json"))
    out = {"commit": H.git_commit(), "machine": H.machine_line(), "results": []}
    for cfg in args.configs:
        rank, batch = (int(v) for v in cfg.split(":"))
        print(f"r = {rank}, B = {batch} ...", file=sys.stderr, flush=True)
        out["results"].append((run_c if args.c_only else run)(args.n, args.d, rank, batch, args.repeats))
        Path(args.out).write_text(json.dumps(out, indent=2))
    what = "seconds for C (statistics + materialise)" if args.c_only else "linear, 3 iterations per fit"
    print(f"{out['machine']}; commit {out['commit']}; n = {args.n}, d = {args.d}, {what}\n")
    print(table(out["results"], "seconds for C" if args.c_only else "s / iteration"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
