"""Benchmark: the whitening folded into the encoders (issue 19) on the 1M-pair out-of-core fit.

The "synthetic batched" fit of ``bench_scaling.py`` at n = 1,000,000 (RESULTS §8: the
clustered 1M × (512 + 512) store of ``bench_store_io.py build``, rank 128, linear kernel,
``memory_budget`` 2 GiB, B = 4096 contiguous batches, the library's defaults otherwise,
i.e. centred views whitened with λ = 1e-3), but for a fixed 3 iterations (``max_iter=3``,
``tol=0``, ``loss_tol=0``) so that both runs do the same work: once with the whitening
applied on every panel load (``unicon_dist.solver.folded.ENABLED = False``, the code
before issue 19) and once folded into the encoders (the default).  Each fit runs in a
fresh process, from a cold page cache, after a warm-up fit (``bench_store_io.measured_fit``).

Writes ``benchmarks/results/fold.json``: per fit the phase seconds summed over the
iterations (read, features, tiles, svd), wall seconds, peak RSS, the per-iteration losses,
and the relative differences of W and of the losses between the two fits.

Usage::

    python benchmarks/bench_store_io.py build             # the 1M store, once (~3 min)
    flock /tmp/bench.lock python benchmarks/bench_fold.py   # ~12 min on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402
from bench_scaling import BATCHED, BUDGET, RANK  # noqa: E402
from bench_store_io import BENCH_DIR, _Prefix, _TimedReads, measured_fit, store_path  # noqa: E402

H.use_checkout()

RESULTS = HERE / "results" / "fold.json"
OPTIONS = dict(BATCHED, max_iter=3, tol=0.0, loss_tol=0.0)


def _weights(fold: bool) -> Path:
    return BENCH_DIR / f"fold-W-{'on' if fold else 'off'}.npy"


def fold_worker(params: dict) -> dict:
    import torch

    import unicon_dist as ud
    from unicon_dist.solver import folded

    folded.ENABLED = bool(params["fold"])
    path = Path(params["path"])
    store = ud.PairStore.open(path)
    if params.get("rows"):
        store = _Prefix(store, params["rows"])
    timed = _TimedReads(store)
    model, t, base, _ = measured_fit(timed, path, dict(rank=RANK, memory_budget=BUDGET, **OPTIONS))
    phases = {}
    for h in model.history_:
        for k, v in h["phases"].items():
            phases[k] = phases.get(k, 0.0) + v
    np.save(_weights(params["fold"]), model.W_)
    return {
        "fold": bool(params["fold"]), "n": len(timed), "options": OPTIONS, "wall_seconds": t.seconds,
        "cpu_utilisation": t.utilisation, "iterations": model.n_iter_, "stop_reason": model.stop_reason_,
        "phases": phases, "read_seconds": timed.seconds, "panel_rows": model.plan_.panel_rows,
        "peak_rss_mib": H.maxrss_mib(), "rss_before_mib": base, "threads": torch.get_num_threads(),
        "loss": [h["loss"] for h in model.history_], "best_iteration": model.best_iteration_,
        "whitening_condition": [m.spectrum.get("condition_regularised") for m in (model.map_x_, model.map_y_)],
    }


def run(rows: int | None) -> dict:
    path = store_path(1_000_000)
    if not path.exists():
        raise SystemExit(f"{path} is missing: run python benchmarks/bench_store_io.py build first")
    out = []
    for fold in (False, True):
        row = H.spawn(Path(__file__), "fit", {"path": str(path), "rows": rows, "fold": fold})
        if "error" in row:
            raise SystemExit(json.dumps(row))
        print(json.dumps({k: v for k, v in row.items() if k != "options"}), flush=True)
        out.append(row)
    off, on = out
    W_off, W_on = np.load(_weights(False)), np.load(_weights(True))
    loss_off, loss_on = np.array(off["loss"]), np.array(on["loss"])
    comparison = {
        "W_rel_frobenius": float(np.linalg.norm(W_on - W_off) / np.linalg.norm(W_off)),
        "W_max_abs_over_max_abs": float(np.abs(W_on - W_off).max() / np.abs(W_off).max()),
        "loss_max_rel": float(np.max(np.abs(loss_on - loss_off) / np.abs(loss_off))),
    }
    data = {"machine": H.machine_line(), "commit": H.git_commit(), "date": datetime.date.today().isoformat(),
            "rows": out, "comparison": comparison}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1))
    return data


def report(data: dict) -> None:
    print(f"machine: {data['machine']}; commit {data['commit']}; {data['date']}\n")
    print("| whitening | n | iterations | wall s | read | features | tiles | svd | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in data["rows"]:
        p = r["phases"]
        print(f"| {'folded into the encoders' if r['fold'] else 'applied per panel load'} | {r['n']:,} | "
              f"{r['iterations']} ({r['stop_reason']}) | {r['wall_seconds']:.0f} | {p.get('read', 0):.0f} | "
              f"{p.get('features', 0):.0f} | {p.get('tiles', 0):.0f} | {p.get('svd', 0):.1f} | "
              f"{r['peak_rss_mib']:.0f} |")
    c = data["comparison"]
    print(f"\nW: relative difference {c['W_rel_frobenius']:.2e} (Frobenius), max |ΔW|/max |W| "
          f"{c['W_max_abs_over_max_abs']:.2e}; loss: max relative difference {c['loss_max_rel']:.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", choices=("run", "report"), default="run")
    parser.add_argument("--rows", type=int, help="a prefix of the store (a quick look); default all 1M rows")
    parser.add_argument("--worker")
    parser.add_argument("--params")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(fold_worker(json.loads(args.params))))
        return 0
    report(run(args.rows) if args.part == "run" else json.loads(RESULTS.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
