"""Benchmark: how an out-of-core UniCon fit scales with n, per phase, with its peak memory.

Every fit reads its rows from a pair store (local, out of core) and runs in a fresh
process (peak RSS = VmHWM after a warm-up fit on 5,000 rows, so torch's and zarr's
one-off allocations are not counted as the fit's).  Rank r = 128, linear kernel, the
library's default options otherwise (centred, whitened views; damped steps stopped at a
loss plateau), ``memory_budget`` 2 GiB for the panels.

``synthetic``
    Prefixes of the clustered store of ``bench_store_io.py build`` (1,000,000 pairs,
    d = m = 512 per view, 4.1 GB): n = 10k, 30k, 100k, 300k, 1M with batched negatives
    (B = 4096, contiguous batches) run to the library's own stopping rule, and
    n = 10k, 20k, 40k with full negatives for 3 iterations (tol = 0, no plateau stop).
    The 1M batched fit is the issue-7 target: under 15 minutes within 8 GB.
``real``
    The Fashion-MNIST training store (60,000 pairs, 392 + 392) and the WordNet store
    (206,978 pairs, 256 + 384) at their size, batched negatives as above.
``report``
    Tables (Markdown) and ``benchmarks/results/scaling.png`` from the JSON; the growth
    exponent a of seconds per iteration ∝ n^a, fitted by least squares on log-log.

Usage::

    python benchmarks/bench_store_io.py build        # the 1M store, once (~3 min)
    python benchmarks/bench_scaling.py synthetic     # ~25 min on 2 cores
    python benchmarks/bench_scaling.py real          # ~5 min
    python benchmarks/bench_scaling.py report
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402
from bench_store_io import _Prefix, _TimedReads, measured_fit, store_path  # noqa: E402

H.use_checkout()

RESULTS = HERE / "results" / "scaling.json"
RANK = 128
BUDGET = 2 * 2**30
BATCHED = dict(negatives=4096, batch_split="contiguous")
FULL_ITERATIONS = dict(max_iter=3, tol=0.0, loss_tol=0.0)
SYNTHETIC_BATCHED = (10_000, 30_000, 100_000, 300_000, 1_000_000)
SYNTHETIC_FULL = (10_000, 20_000, 40_000)
REAL = {"fashion-mnist": H.REPO / "data" / "fashion-mnist-train.zarr", "wordnet": H.REPO / "data" / "wordnet.zarr"}


def fit_worker(params: dict) -> dict:
    import torch

    import unicon_dist as ud

    path = Path(params["path"])
    store = ud.PairStore.open(path)
    if params.get("rows"):
        store = _Prefix(store, params["rows"])
    timed = _TimedReads(store)
    options = dict(rank=RANK, memory_budget=BUDGET, **params["options"])
    # the measured fit uses the store's groups when it has them (WordNet's synsets)
    model, t, base, _ = measured_fit(timed, path, options)
    phases = {}
    for h in model.history_:
        for k, v in h["phases"].items():
            phases[k] = phases.get(k, 0.0) + v
    return {
        "name": params["name"], "n": len(timed), "dim_x": store.dim_x, "dim_y": store.dim_y,
        "options": params["options"], "wall_seconds": t.seconds, "cpu_utilisation": t.utilisation,
        "iterations": model.n_iter_, "stop_reason": model.stop_reason_,
        "seconds_per_iteration": t.seconds / model.n_iter_, "phases": phases, "read_seconds": timed.seconds,
        "panel_rows": model.plan_.panel_rows, "peak_rss_mib": H.maxrss_mib(), "rss_before_mib": base,
        "threads": torch.get_num_threads(), "loss": [h["loss"] for h in model.history_],
    }


def _run(configs) -> list[dict]:
    rows = []
    for name, path, n, options in configs:
        row = H.spawn(Path(__file__), "fit", {"name": name, "path": str(path), "rows": n, "options": options})
        print(json.dumps({k: v for k, v in row.items() if k != "loss"}), flush=True)
        rows.append(row)
        _save(rows)
    return rows


def _save(new_rows) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    keep = [r for r in data["rows"] if (r.get("name"), r.get("n")) not in {(x.get("name"), x.get("n")) for x in new_rows}]
    data.update(machine=H.machine_line(), rows=keep + list(new_rows))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1))


def synthetic() -> None:
    path = store_path(1_000_000)
    if not path.exists():
        raise SystemExit(f"{path} is missing: run python benchmarks/bench_store_io.py build first")
    configs = [("synthetic batched", path, n, BATCHED) for n in SYNTHETIC_BATCHED]
    configs += [("synthetic full", path, n, FULL_ITERATIONS) for n in SYNTHETIC_FULL]
    _run(configs)


def real() -> None:
    _run([(f"{name} batched", path, None, BATCHED) for name, path in REAL.items()])


def exponent(rows, key="seconds_per_iteration") -> float:
    n = np.array([r["n"] for r in rows], dtype=float)
    y = np.array([r[key] for r in rows], dtype=float)
    return float(np.polyfit(np.log(n), np.log(y), 1)[0])


def report() -> None:
    data = json.loads(RESULTS.read_text())
    rows = [r for r in data["rows"] if "error" not in r]
    print(f"machine: {data['machine']}\n")
    print("| fit | n | iterations (stop) | wall s | s / iteration | read | features | tiles | svd | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["name"], r["n"])):
        p = r["phases"]
        print(f"| {r['name']} | {r['n']:,} | {r['iterations']} ({r['stop_reason']}) | {r['wall_seconds']:.0f} | "
              f"{r['seconds_per_iteration']:.1f} | {p.get('read', 0):.0f} | {p.get('features', 0):.0f} | "
              f"{p.get('tiles', 0):.0f} | {p.get('svd', 0):.1f} | {r['peak_rss_mib']:.0f} |")
    fits = {}
    for name in ("synthetic batched", "synthetic full"):
        series = sorted((r for r in rows if r["name"] == name), key=lambda r: r["n"])
        if len(series) >= 2:
            fits[name] = exponent(series)
            print(f"\n{name}: seconds per iteration grow as n^{fits[name]:.2f} "
                  f"({series[0]['n']:,} to {series[-1]['n']:,})")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in (("synthetic batched", "o"), ("synthetic full", "s")):
        series = sorted((r for r in rows if r["name"] == name), key=lambda r: r["n"])
        if series:
            label = f"{name} (n^{fits[name]:.2f})" if name in fits else name
            ax.loglog([r["n"] for r in series], [r["seconds_per_iteration"] for r in series], marker=marker,
                      label=label)
    for r in rows:
        if not r["name"].startswith("synthetic"):
            ax.loglog([r["n"]], [r["seconds_per_iteration"]], "^", label=r["name"])
    ax.set_xlabel("pairs n")
    ax.set_ylabel("seconds per iteration")
    ax.set_title(f"UniCon out-of-core fit, r = {RANK}, 2-core CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = HERE / "results" / "scaling.png"
    fig.savefig(out, dpi=120)
    print(f"\nplot: {out.relative_to(H.REPO)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", choices=("synthetic", "real", "report"), default="report")
    parser.add_argument("--worker")
    parser.add_argument("--params")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(fit_worker(json.loads(args.params))))
        return 0
    {"synthetic": synthetic, "real": real, "report": report}[args.part]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
