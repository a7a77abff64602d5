"""Benchmark: iterations and seconds to convergence of the fixed point, before and after issue 18.

For each data set three fits, each in a fresh process (``torch.set_num_threads(2)``); the
driver holds ``flock /tmp/bench.lock`` for the whole run so that timed runs never overlap:

``before``
    The code before issue 18 (commit 8163e80, a separate clone on ``PYTHONPATH``) with its
    defaults (full negatives, damping 0.2, tol 1e-4 on ΔW, loss plateau 1e-4): stop reason,
    iterations, kept iteration, fit seconds, the last ΔW and the last "input_residual" (the
    old tangent residual ‖P_T(ρW − C)‖/‖P_T(C)‖, not the certificate of the new code).
``after``
    The current code with its defaults (Anderson mixing, damping 0.5, tol 1e-5 on the
    certified residual, negatives "auto"): stop reason, iterations, fit seconds, seconds to
    the first iterate with residual ≤ 1e-5 (cumulative per-iteration "seconds"), the kept
    iterate's residual and the residual of every iterate.
``after-plain``
    As ``after`` with ``solver="plain"`` (the damped map without acceleration).

Every fit is scored on held-out pairs: R@1 in both directions (group-aware on WordNet) and,
where the set has classes, class-level R@1.

Data sets (rank r):

``synthetic``  ``clustered_pairs``: 6,000 training pairs (seed 0, exactly the library's
    ``clustered_pairs(6000)``) and 2,000 held-out pairs drawn from seed 1 with the SAME
    centres and map A; r = 8.
``digits``  digits halves, seeded split 1,400 train / 397 test; r = 16.
``digits-t0.5``  the same at temperature 0.5 (the demo's τ for digits).
``fashion-mnist``  halves, all 60,000 training images; the 10,000 test images (instance
    retrieval); r = 64.  Loaded through ``bench_compare.load_data`` (no validation split).
``wordnet``  ``bench_compare.load_data("wordnet")`` (synset split, 10,000 seeded test rows,
    groups = synsets); r = 128.  The old code with full negatives needs n² work per iteration
    (≈ 25 min on 2 cores for the 176k training rows), so ``before`` runs only on
    ``wordnet-40k``, the seeded 40,000-row training subset of ``bench_compare``'s
    ``unicon-full``; ``after`` and ``after-plain`` run on both.

``warm`` (synthetic and Fashion-MNIST): a PairStore with 90 % of the training rows (a seeded
permutation), a default fit, an append of the other 10 %, ``warm = model.refit()`` and
``cold = UniCon(same options).fit(store)``: iterations, seconds, residuals,
‖W_warm − W_cold‖/‖W_cold‖ and max |s_warm − s_cold| over the 1000 × 1000 similarities of
1,000 test pairs.

Usage::

    python benchmarks/bench_convergence.py                      # everything (≈ 30 min on 2 cores)
    python benchmarks/bench_convergence.py --datasets digits synthetic
    python benchmarks/bench_convergence.py --report             # Markdown tables from the JSON
    python benchmarks/bench_convergence.py --quick              # smoke run, < 2 min (-> convergence_quick.json)

Results are merged into ``benchmarks/results/convergence.json`` by data set and variant.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
BEFORE_COMMIT = "8163e80"
BEFORE_CLONE = Path("/tmp/before_conv")
LOCK = "/tmp/bench.lock"
TOL = 1e-5

DATASETS = ("synthetic", "digits", "digits-t0.5", "fashion-mnist", "wordnet-40k", "wordnet")
VARIANTS = ("before", "after", "after-plain", "warm")
RANK = {"synthetic": 8, "digits": 16, "digits-t0.5": 16, "fashion-mnist": 64, "wordnet": 128, "wordnet-40k": 128}
TEMPERATURE = {"digits-t0.5": 0.5}
WARM_SETS = ("synthetic", "fashion-mnist")
SKIP = {("wordnet", "before"): "old full negatives on 176k rows: ≈ 25 min per fit; see wordnet-40k"}
QUICK = dict(synthetic=(1500, 500), digits=(None, None), fashion=(2000, 500), wordnet=(2000, 500),
             wordnet_sub=1500, rank={"fashion-mnist": 16, "wordnet": 16, "wordnet-40k": 16})


# ------------------------------------------------------------------------------ data
def clustered_split(n_train: int = 6000, n_test: int = 2000, n_centres: int = 20, dim_x: int = 16,
                    dim_y: int = 12, noise: float = 0.5):
    """Training and held-out clustered pairs sharing their centres and map A.

    The training draw repeats ``unicon_dist.data.datasets.clustered_pairs(n_train, seed=0)``
    (same generator order: centres, A, labels, x noise, y noise); the held-out draw takes
    labels and noise from seed 1 with the centres and A of seed 0.

    Returns
    -------
    tuple
        (X, Y, labels) of the training set, then (X, Y, labels) of the held-out set.
    """
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((n_centres, dim_x))
    A = rng.standard_normal((dim_x, dim_y)) / np.sqrt(dim_x)
    out = []
    for n, r in ((n_train, rng), (n_test, np.random.default_rng(1))):
        lab = r.integers(0, n_centres, n)
        X = centres[lab] + noise * r.standard_normal((n, dim_x))
        Y = np.tanh(centres[lab] @ A) + noise * r.standard_normal((n, dim_y))
        out += [X.astype(np.float32), Y.astype(np.float32), lab.astype(np.int64)]
    return tuple(out)


def prepare(dataset: str, quick: bool, path: Path) -> dict:
    """Write the train / test arrays of ``dataset`` to ``path`` (.npz) with the current code."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    none = np.zeros(0, dtype=np.int64)
    out = dict(Gtr=none, Gte=none, Lte=none)
    if dataset == "synthetic":
        ntr, nte = QUICK["synthetic"] if quick else (6000, 2000)
        Xtr, Ytr, _, Xte, Yte, Lte = clustered_split(ntr, nte)
        out.update(Xtr=Xtr, Ytr=Ytr, Xte=Xte, Yte=Yte, Lte=Lte)
        if not quick:
            from unicon_dist.data.datasets import clustered_pairs

            X0, Y0, _ = clustered_pairs(6000)
            assert np.array_equal(X0, Xtr) and np.array_equal(Y0, Ytr), "clustered_split differs from the library"
    elif dataset.startswith("digits"):
        from unicon_dist.data.datasets import load_digits_halves

        left, right, labels = load_digits_halves()
        order = np.random.default_rng(0).permutation(len(left))
        tr, te = np.sort(order[:1400]), np.sort(order[1400:])
        out.update(Xtr=left[tr], Ytr=right[tr], Xte=left[te], Yte=right[te], Lte=labels[te])
    else:
        import bench_compare as BC

        key = "fashion" if dataset == "fashion-mnist" else "wordnet"
        ntr, nte = QUICK[key] if quick else (None, 10000)
        cfg = dict(BC.FULL, train_max=ntr, val_max=0, test_max=nte, fashion_val=0)
        d = BC.load_data("fashion-mnist" if key == "fashion" else "wordnet", cfg, 0)
        Xtr, Ytr, Gtr = d["Xtr"], d["Ytr"], d["Gtr"]
        if dataset == "wordnet-40k":
            k = QUICK["wordnet_sub"] if quick else BC.FULL["wordnet_full_rows"]
            sub = np.sort(np.random.default_rng([0, 5]).choice(len(Xtr), k, replace=False))  # bench_compare's
            Xtr, Ytr, Gtr = Xtr[sub], Ytr[sub], Gtr[sub]
        out.update(Xtr=Xtr, Ytr=Ytr, Xte=d["Xte"], Yte=d["Yte"], Lte=d["Lte"])
        if Gtr is not None:
            out.update(Gtr=Gtr, Gte=d["Gte"])
    np.savez(path, **out)
    return {"n_train": int(len(out["Xtr"])), "n_test": int(len(out["Xte"])), "dim_x": int(out["Xtr"].shape[1]),
            "dim_y": int(out["Ytr"].shape[1]), "groups": bool(len(out["Gtr"]))}


# ---------------------------------------------------------------------------- scoring
def score(ud, model, d: dict) -> dict:
    """Held-out R@1 (group-aware where the set has groups) and class-level R@1."""
    zx, zy = np.asarray(model.encode_x(d["Xte"])), np.asarray(model.encode_y(d["Yte"]))
    g = d["Gte"] if len(d["Gte"]) else None
    m = ud.retrieval_metrics(zx, zy, ks=(1,), groups=g)
    out = {"x2y_R@1": float(m["x2y_R@1"]), "y2x_R@1": float(m["y2x_R@1"])}
    if len(d["Lte"]):
        c = ud.retrieval_metrics(zx, zy, ks=(1,), groups=d["Lte"])
        out["class_R@1"] = 0.5 * float(c["x2y_R@1"] + c["y2x_R@1"])
    return out


def after_record(model, seconds: float) -> dict:
    """Convergence record of a fit by the current code."""
    h = model.history_
    res = [None if r.get("residual") is None else float(r["residual"]) for r in h]
    cum, first_it, first_s = 0.0, None, None
    for r, v in zip(h, res):
        cum += float(r["seconds"])
        if first_it is None and v is not None and v <= TOL:
            first_it, first_s = int(r["iteration"]), cum
    kept = [r for r in h if r["iteration"] == model.best_iteration_]
    return {"stop_reason": model.stop_reason_, "converged": bool(model.converged_), "n_iter": int(model.n_iter_),
            "best_iteration": int(model.best_iteration_), "fit_seconds": seconds,
            "iteration_seconds": cum, "setup_seconds": seconds - cum,
            "first_iter_residual_le_tol": first_it, "seconds_to_residual_le_tol": first_s,
            "final_residual": None if not kept or kept[0].get("residual") is None else float(kept[0]["residual"]),
            "min_residual": min((v for v in res if v is not None), default=None),
            "residuals": res, "steps": [r.get("step") for r in h], "accepted": [r.get("accepted") for r in h],
            "losses": [float(r["loss"]) for r in h], "negatives": repr(model.get_params().get("negatives")),
            "tol": model.get_params().get("tol")}


# ----------------------------------------------------------------------------- worker
def _cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def worker(variant: str, params: dict) -> dict:
    import torch

    torch.set_num_threads(2)
    import unicon_dist as ud

    dataset, data = params["dataset"], dict(np.load(params["data"]))
    rank = (QUICK["rank"].get(dataset) if params["quick"] else None) or RANK[dataset]
    opts = dict(rank=rank)
    if dataset in TEMPERATURE:
        opts["temperature"] = TEMPERATURE[dataset]
    if params["quick"]:
        opts["max_iter"] = 8
    groups = data["Gtr"] if len(data["Gtr"]) else None
    row = {"module": ud.__file__, "rank": rank, "options": opts, "threads": torch.get_num_threads()}
    if variant in ("before", "after", "after-plain"):
        if variant == "after-plain":
            opts = dict(opts, solver="plain")
        model = ud.UniCon(**opts)
        c0, t0 = _cpu(), time.perf_counter()
        model.fit(data["Xtr"], data["Ytr"], groups=groups)
        seconds = time.perf_counter() - t0
        row["cpu_utilisation"] = (_cpu() - c0) / (2 * seconds)
        if variant == "before":
            h = model.history_
            row.update(stop_reason=model.stop_reason_, converged=bool(model.converged_), n_iter=int(model.n_iter_),
                       best_iteration=int(model.best_iteration_), fit_seconds=seconds,
                       last_delta_w=float(h[-1]["delta_w"]),
                       last_input_residual=None if h[-1].get("input_residual") is None
                       else float(h[-1]["input_residual"]),
                       delta_w=[float(r["delta_w"]) for r in h],
                       input_residuals=[None if r.get("input_residual") is None else float(r["input_residual"])
                                        for r in h],
                       losses=[float(r["loss"]) for r in h])
        else:
            row.update(after_record(model, seconds))
        row["metrics"] = score(ud, model, data)
        return row
    # warm re-solve after a 10 % append, from a store
    n = len(data["Xtr"])
    perm = np.random.default_rng(7).permutation(n)
    n_old = int(round(0.9 * n))
    old, new = np.sort(perm[:n_old]), np.sort(perm[n_old:])
    c0, t_all = _cpu(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = ud.PairStore.create(Path(tmp) / "pairs.zarr", data["Xtr"].shape[1], data["Ytr"].shape[1])
        store.append(data["Xtr"][old], data["Ytr"][old])
        t0 = time.perf_counter()
        parent = ud.UniCon(**opts).fit(store)
        parent_s = time.perf_counter() - t0
        store.append(data["Xtr"][new], data["Ytr"][new])
        t0 = time.perf_counter()
        warm = parent.refit()
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cold = ud.UniCon(**opts).fit(store)
        cold_s = time.perf_counter() - t0
    row["cpu_utilisation"] = (_cpu() - c0) / (2 * (time.perf_counter() - t_all))
    m = min(1000, len(data["Xte"]))
    sims = [np.asarray(mod.encode_x(data["Xte"][:m])) @ np.asarray(mod.encode_y(data["Yte"][:m])).T
            for mod in (warm, cold)]
    row.update(n_old=n_old, n_new=n - n_old, parent=after_record(parent, parent_s), warm=after_record(warm, warm_s),
               cold=after_record(cold, cold_s),
               W_rel_diff=float(np.linalg.norm(warm.W_ - cold.W_) / np.linalg.norm(cold.W_)),
               max_sim_diff=float(np.max(np.abs(sims[0] - sims[1]))), n_sim_pairs=m,
               metrics_warm=score(ud, warm, data), metrics_cold=score(ud, cold, data))
    return row


# ----------------------------------------------------------------------------- driver
def machine() -> str:
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    import torch

    return f"{' '.join(cpu.split())}; {os.cpu_count()} logical CPUs; torch {torch.__version__}, 2 threads; " \
           f"Python {sys.version.split()[0]}"


def before_clone() -> Path:
    """A clone of the repository at the commit before issue 18 (made once, outside the checkout)."""
    if not (BEFORE_CLONE / "unicon_dist").exists():
        subprocess.run(["git", "clone", "-q", str(REPO), str(BEFORE_CLONE)], check=True)
        subprocess.run(["git", "-C", str(BEFORE_CLONE), "checkout", "-q", BEFORE_COMMIT], check=True)
    return BEFORE_CLONE


def spawn(kind: str, params: dict, pythonpath: Path) -> dict:
    """``python THIS --worker KIND --params JSON`` in /tmp with PYTHONPATH set; its last stdout line is JSON."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="2")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
           "--params", json.dumps(params)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp", env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"worker exited with {proc.returncode}", "stderr_tail": proc.stderr.strip().splitlines()[-8:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = wall
    return out


def results_path(quick: bool) -> Path:
    return RESULTS / ("convergence_quick.json" if quick else "convergence.json")


def run(args) -> int:
    import fcntl

    lock = open(LOCK, "a")
    print(f"waiting for {LOCK} ...", file=sys.stderr, flush=True)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held for the whole run: no other timed job between the fits
    path, mach = results_path(args.quick), machine()
    print(mach, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench_conv_") as tmp:
        for dataset in args.datasets:
            npz = Path(tmp) / f"{dataset}.npz"
            info = spawn("prepare", {"dataset": dataset, "quick": args.quick, "data": str(npz)}, REPO)
            if "error" in info:
                print(f"{dataset}: data failed: {info}", file=sys.stderr)
                continue
            for variant in args.variants:
                if variant == "warm" and dataset not in WARM_SETS:
                    continue
                if (dataset, variant) in SKIP and not args.quick:
                    row = {"skipped": SKIP[(dataset, variant)]}
                else:
                    print(f"{dataset} {variant} ...", file=sys.stderr, flush=True)
                    pp = before_clone() if variant == "before" else REPO
                    row = spawn(variant, {"dataset": dataset, "quick": args.quick, "data": str(npz)}, pp)
                    if variant == "before" and "error" not in row:
                        assert row["module"].startswith(str(BEFORE_CLONE)), row["module"]
                print("  " + summary(row), file=sys.stderr, flush=True)
                row.update(info, dataset=dataset, variant=variant, machine=mach,
                           date=datetime.date.today().isoformat(), commit_before=BEFORE_COMMIT)
                data = json.loads(path.read_text()) if path.exists() else {"results": {}}
                data["results"].setdefault(dataset, {})[variant] = row
                data.update(machine=mach, date=datetime.date.today().isoformat())
                tmp_json = path.with_suffix(".json.tmp")
                tmp_json.write_text(json.dumps(data, indent=1))
                os.replace(tmp_json, path)
    print(f"wrote {path}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- report
def _e(v) -> str:
    return "—" if v is None else f"{v:.1e}"


def _s(v) -> str:
    return "—" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}")


def _u(row) -> str:
    return "—" if row.get("cpu_utilisation") is None else f"{row['cpu_utilisation']:.2f}"


def _r1(m) -> str:
    if not m:
        return "—"
    s = f"{m['x2y_R@1']:.3f} / {m['y2x_R@1']:.3f}"
    return s + (f" ({m['class_R@1']:.3f})" if "class_R@1" in m else "")


def summary(row: dict) -> str:
    if "error" in row:
        return "ERROR " + row["error"] + "\n  " + "\n  ".join(row.get("stderr_tail", []))
    if "skipped" in row:
        return "skipped: " + row["skipped"]
    if "warm" in row:
        w, c = row["warm"], row["cold"]
        return (f"warm {w['n_iter']} it {w['fit_seconds']:.1f} s res {_e(w['final_residual'])}; cold {c['n_iter']} it "
                f"{c['fit_seconds']:.1f} s res {_e(c['final_residual'])}; ΔW {row['W_rel_diff']:.1e}, "
                f"max Δs {row['max_sim_diff']:.1e}")
    return (f"{row['stop_reason']}, {row['n_iter']} it, {row['fit_seconds']:.1f} s, R@1 {_r1(row['metrics'])}, "
            f"residual {_e(row.get('final_residual', row.get('last_input_residual')))}")


def report(args) -> int:
    data = json.loads(results_path(args.quick).read_text())
    res = data["results"]
    print(f"Machine: {data['machine']} ({data['date']}).\n")
    print("| data set | n train | r | variant | stop | iterations (kept) | fit s | iterations / s to residual ≤ 1e-5 "
          "| final residual | last ΔW (old) | R@1 x→y / y→x (class) | CPU util. |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for ds in DATASETS:
        for v in ("before", "after", "after-plain"):
            row = res.get(ds, {}).get(v)
            if row is None:
                continue
            name = ds + (" (τ = 0.5)" if ds in TEMPERATURE else "")
            if "skipped" in row or "error" in row:
                print(f"| {name} | {row.get('n_train', '')} | {RANK[ds]} | {v} | {row.get('skipped', 'error')} "
                      "| | | | | | | |")
                continue
            if v == "before":
                to_tol = "—"
                res_s = f"{_e(row['last_input_residual'])} (old tangent)"
                dw = _e(row["last_delta_w"])
            else:
                it = row["first_iter_residual_le_tol"]
                to_tol = "never" if it is None else f"{it} / {_s(row['seconds_to_residual_le_tol'])}"
                res_s, dw = _e(row["final_residual"]), "—"
            print(f"| {name} | {row['n_train']:,} | {row['rank']} | {v} | {row['stop_reason']} | {row['n_iter']} "
                  f"({row['best_iteration']}) | {_s(row['fit_seconds'])} | {to_tol} | {res_s} | {dw} "
                  f"| {_r1(row['metrics'])} | {_u(row)} |")
    warm = [(ds, res[ds]["warm"]) for ds in DATASETS if "warm" in res.get(ds, {}) and "warm" in res[ds]["warm"]]
    if warm:
        print("\nWarm re-solve after a 10 % append (store fits, current defaults):\n")
        print("| data set | rows old + new | fit | stop | iterations | seconds | residual | ‖W − W_cold‖/‖W_cold‖ "
              "| max \\|s − s_cold\\| | R@1 x→y / y→x |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for ds, row in warm:
            for k in ("parent", "warm", "cold"):
                r = row[k]
                diff = (f"{row['W_rel_diff']:.1e}", f"{row['max_sim_diff']:.1e}") if k == "warm" else ("—", "—")
                m = row.get(f"metrics_{k}")
                print(f"| {ds} | {row['n_old']:,} + {row['n_new']:,} | {k} | {r['stop_reason']} | {r['n_iter']} "
                      f"| {_s(r['fit_seconds'])} | {_e(r['final_residual'])} | {diff[0]} | {diff[1]} | {_r1(m)} |")
    print("\nResidual per iteration (after / after-plain):\n")
    for ds in DATASETS:
        for v in ("after", "after-plain"):
            row = res.get(ds, {}).get(v)
            if row and "residuals" in row:
                print(f"- {ds} {v}: " + " ".join(_e(x) for x in row["residuals"]))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--quick", action="store_true", help="small subsets; writes convergence_quick.json")
    p.add_argument("--report", action="store_true", help="print Markdown tables from the JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import logging
        import warnings

        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
        params = json.loads(args.params)
        out = prepare(params["dataset"], params["quick"], Path(params["data"])) if args.worker == "prepare" \
            else worker(args.worker, params)
        print(json.dumps(out))
        return 0
    return report(args) if args.report else run(args)


if __name__ == "__main__":
    sys.exit(main())
