"""Benchmark: UniCon against regularised CCA, SGD-trained CLIP heads and batch-averaged UniCon.

The evidence to read before adopting UniCon: retrieval quality and fit cost of every
method on the same features, at the same rank r, scored on held-out test pairs.

Usage::

    python benchmarks/bench_compare.py --datasets fashion-mnist     # every method on Fashion-MNIST
    python benchmarks/bench_compare.py --datasets wordnet           # every method on WordNet
    python benchmarks/bench_compare.py --datasets wordnet --methods sgd-clip --sgd-grid small
    python benchmarks/bench_compare.py --report      # Markdown tables + PNG plots from results/compare.json

    python benchmarks/bench_compare.py --quick --datasets fashion-mnist   # smoke run (-> compare_quick.json)
    python benchmarks/bench_compare.py --quick --datasets wordnet
    python benchmarks/bench_compare.py --quick --report

Run it on a quiet machine: every row records ``cpu_utilisation`` (CPU seconds /
(wall seconds × torch threads)) and a warning is printed for rows below 0.8.

Datasets (each loaded fully into memory, float32, in every worker):

``fashion-mnist``
    Left/right 28×14 halves (392 pixels each; Debian's ``dataset-fashion-mnist``).
    Train: the 60,000 training images minus a seeded validation split of 6,000; test: the
    10,000 test images, instance retrieval (a half must retrieve its own other half).
    r = 64.  10 classes without class text: no zero-shot.
``wordnet``
    ``data/wordnet.zarr``: x = 256-d wordllama lemma embeddings, y = 384-d MiniLM
    definition embeddings, groups = synset, labels = 45 lexicographer classes.  Split by
    synset (seeded): 10 % of synsets test, 5 % validation, the rest train.  r = 128.
    Test retrieval is group-aware (any row of the query's synset counts) on a seeded
    subset of at most 10,000 test rows; zero-shot top-1 on the same rows: the class c
    maximising ⟨encode_x(x), encode_y(label_embeddings_y[c])⟩.

Validation pairs (at most 5,000, a seeded subset of the validation split, the same for every
method) select CCA's ridge, the SGD-CLIP configuration and epoch, and weight the batch maps
of ``batch-avg``.

Methods (one fresh process each, see ``_harness.spawn``: the worker loads the data,
resets VmHWM, times the fit, then evaluates):

``cca``
    ``RegularizedCCA(rank=r, ridge=λ)``, λ ∈ (1e-4, 1e-3, 1e-2, 1e-1) chosen by validation
    mean R@1 (group-aware on WordNet).  Fit seconds include the selection (four fits and
    their validation scores); the final fit alone is reported too.
``sgd-clip``
    ``sgd_clip_sweep(lrs=(3e-4, 1e-3, 3e-3), temperatures=(0.03, 0.07, 0.2),
    max_epochs=50, patience=5, batch_size=1024)``; ``--sgd-grid small``: lrs (1e-3, 3e-3) ×
    τ (0.07,).  Fit seconds are the whole sweep; the best run's seconds and epochs, and the
    sweep table, are reported.
``batch-avg``
    ``BatchAveragedUniCon(rank=r, batch_size=4096)`` with the paper's per-batch options
    (τ = 0.07, "orthonormal", damping 1, loss_tol 0, max_iter 10), fed the training data
    centred with its means (it does not centre); validation and test centred with the same means.
``unicon-default``
    ``UniCon(rank=r)``: the library defaults as they are (since issue 18: safeguarded
    Anderson solver, ``negatives="auto"`` = batches of 2,048 above 8,192 pairs, ``max_iter``
    30, ``tol`` 1e-5 on the certified residual), on the whole training set.
``unicon-full``
    ``UniCon(rank=r, negatives="full")`` (library defaults otherwise, explicit full
    negatives).  On WordNet a seeded 40,000-row subset of train (n² work per iteration),
    unless ``--wordnet-full-all``.
``unicon-batched``
    ``UniCon(rank=r, negatives=4096, batch_split="random")``.
``unicon-rbf``
    ``UniCon(rank=r, kernel="rbf", n_landmarks=2048, negatives=4096)``.
``unicon-paper``
    ``UniCon(rank=r, center=False, whiten=None, factorization="orthonormal", damping=1.0,
    loss_tol=0.0, temperature=0.07, max_iter=10, negatives=4096, solver="plain")``: the
    paper's (undamped, un-accelerated) map.

Every UniCon row records ``stop_reason``, ``n_iter``, the kept iteration and the certified
residual of the kept iterate (``final_residual``; ``residuals`` per iteration).

On WordNet the UniCon methods get the synset ids as ``groups`` (many-to-many positives,
what a fit from the store does by default); the baselines have no such option and treat
every row as its own pair.  ``--no-groups`` fits UniCon one-to-one as well.

``--quick`` shrinks everything (3,000 train, 1,000 validation and 1,000 test rows, r = 16,
2×2 SGD grid of at most 3 epochs, batches / negatives of 1,024, 256 landmarks, unicon-full
on a 2,000-row subset so that the subset path runs, one torch thread) and writes
``benchmarks/results/compare_quick.json`` instead of ``compare.json``.  Results are merged
into the JSON by dataset and method: rerunning one method replaces only its entry.
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

DATASETS = ("fashion-mnist", "wordnet")
METHODS = ("cca", "sgd-clip", "batch-avg", "unicon-default", "unicon-full", "unicon-batched", "unicon-rbf", "unicon-paper")
WORDNET_STORE = H.REPO / "data" / "wordnet.zarr"
RESULTS = HERE / "results"

CCA_RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)
SGD_GRIDS = {
    "full": ((3e-4, 1e-3, 3e-3), (0.03, 0.07, 0.2)),
    "small": ((1e-3, 3e-3), (0.07,)),
    "quick": ((1e-3, 3e-3), (0.07, 0.2)),
}
# the paper's per-batch closed form (BatchAveragedUniCon and unicon-paper)
PAPER = dict(factorization="orthonormal", damping=1.0, loss_tol=0.0, temperature=0.07, max_iter=10)

# sizes of a real run and of a --quick smoke run
FULL = dict(rank={"fashion-mnist": 64, "wordnet": 128}, train_max=None, val_max=5000, test_max=10000,
            fashion_val=6000, sgd_epochs=50, sgd_batch=1024, negatives=4096, landmarks=2048, batch_avg=4096,
            wordnet_full_rows=40000)
QUICK = dict(rank={"fashion-mnist": 16, "wordnet": 16}, train_max=3000, val_max=1000, test_max=1000,
             fashion_val=6000, sgd_epochs=3, sgd_batch=1024, negatives=1024, landmarks=256, batch_avg=1024,
             wordnet_full_rows=2000)  # below train_max, so that the subset path runs too


# ------------------------------------------------------------------------------ data
def _subset(rows: np.ndarray, limit, seed_key) -> np.ndarray:
    """At most ``limit`` of ``rows`` (a sorted seeded subset)."""
    if limit is None or len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed_key).choice(rows, size=limit, replace=False))


def load_data(dataset: str, cfg: dict, seed: int) -> dict:
    """Train / validation / test arrays (float32) of one dataset.

    Keys: Xtr, Ytr, Gtr (groups or None), Xv, Yv, Gv, Xte, Yte, Gte (retrieval groups or
    None), Lte (class labels of the test rows), label_emb (class embeddings on the y side, or
    None), info (split sizes).
    """
    if dataset == "fashion-mnist":
        from unicon_dist.data.datasets import load_fashion_mnist_halves

        left, right, _ = load_fashion_mnist_halves("train")
        tl, tr, tlab = load_fashion_mnist_halves("test")
        order = np.random.default_rng([seed, 0]).permutation(len(left))
        val_all, train_all = np.sort(order[:cfg["fashion_val"]]), np.sort(order[cfg["fashion_val"]:])
        train = _subset(train_all, cfg["train_max"], [seed, 1])
        val = _subset(val_all, cfg["val_max"], [seed, 2])
        test = _subset(np.arange(len(tl)), cfg["test_max"], [seed, 3])
        return dict(Xtr=left[train], Ytr=right[train], Gtr=None, Xv=left[val], Yv=right[val], Gv=None,
                    Xte=tl[test], Yte=tr[test], Gte=None, Lte=tlab[test], label_emb=None,
                    info=dict(n_train_split=len(train_all), n_val_split=len(val_all), n_test_split=len(tl),
                              n_val=len(val), n_test=len(test), retrieval="instance"))
    if dataset == "wordnet":
        import unicon_dist as ud

        store = ud.PairStore.open(WORDNET_STORE)
        groups, labels = store.read_groups(), store.read_labels()
        synsets = np.unique(groups)
        perm = np.random.default_rng([seed, 0]).permutation(len(synsets))
        n_test, n_val = int(round(0.10 * len(synsets))), int(round(0.05 * len(synsets)))
        in_test = np.isin(groups, synsets[perm[:n_test]])
        in_val = np.isin(groups, synsets[perm[n_test:n_test + n_val]])
        train_all = np.flatnonzero(~(in_test | in_val))
        val_all, test_all = np.flatnonzero(in_val), np.flatnonzero(in_test)
        train = _subset(train_all, cfg["train_max"], [seed, 1])
        val = _subset(val_all, cfg["val_max"], [seed, 2])
        test = _subset(test_all, cfg["test_max"], [seed, 3])
        needed = np.union1d(np.union1d(train, val), test)
        if len(needed) > len(store) // 2:
            x, y, _ = store.read(slice(None))
            pos = lambda rows: rows  # noqa: E731
        else:
            x, y, _ = store.read(needed)
            pos = lambda rows: np.searchsorted(needed, rows)  # noqa: E731
        out = dict(Xtr=x[pos(train)], Ytr=y[pos(train)], Gtr=groups[train], Xv=x[pos(val)], Yv=y[pos(val)],
                   Gv=groups[val], Xte=x[pos(test)], Yte=y[pos(test)], Gte=groups[test], Lte=labels[test],
                   label_emb=np.asarray(store.get_array("label_embeddings_y"), dtype=np.float32),
                   info=dict(n_synsets=len(synsets), n_train_split=len(train_all), n_val_split=len(val_all),
                             n_test_split=len(test_all), n_val=len(val), n_test=len(test),
                             retrieval="group-aware (synset)"))
        del x, y
        return out
    raise ValueError(f"unknown dataset {dataset!r}")


# ---------------------------------------------------------------------------- scoring
def mean_r1(zx, zy, groups=None) -> float:
    import unicon_dist as ud

    m = ud.retrieval_metrics(zx, zy, ks=(1,), groups=groups)
    return 0.5 * (m["x2y_R@1"] + m["y2x_R@1"])


def evaluate(enc_x, enc_y, data: dict) -> dict:
    """Test metrics of the encoders ``enc_x``, ``enc_y`` (functions returning unit rows)."""
    import unicon_dist as ud

    t0 = time.perf_counter()
    zx, zy = np.asarray(enc_x(data["Xte"])), np.asarray(enc_y(data["Yte"]))
    m = ud.retrieval_metrics(zx, zy, ks=(1, 10), groups=data["Gte"])
    out = {k: float(v) for k, v in m.items()}
    out["mean_R@1"] = 0.5 * (m["x2y_R@1"] + m["y2x_R@1"])
    out["mean_R@10"] = 0.5 * (m["x2y_R@10"] + m["y2x_R@10"])
    c = ud.retrieval_metrics(zx, zy, ks=(1,), groups=data["Lte"])
    out["class_mean_R@1"] = 0.5 * (c["x2y_R@1"] + c["y2x_R@1"])
    out["zero_shot_top1"] = None
    if data["label_emb"] is not None:
        zc = np.asarray(enc_y(data["label_emb"]))
        pred = np.argmax(zx @ zc.T, axis=1)
        out["zero_shot_top1"] = float(np.mean(pred == data["Lte"]))
    out["eval_s"] = time.perf_counter() - t0
    return out


def _kept_residual(model):
    """Certified fixed-point residual of the kept iterate (``best_iteration_``), or None."""
    for h in model.history_:
        if h.get("iteration") == model.best_iteration_ and h.get("residual") is not None:
            return float(h["residual"])
    return None


def unicon_details(model, fit_seconds: float) -> dict:
    phases: dict = {}
    for h in model.history_:
        for k, v in (h.get("phases") or {}).items():
            phases[k] = phases.get(k, 0.0) + float(v)
    iter_s = float(sum(h["seconds"] for h in model.history_))
    return {
        "n_iter": int(model.n_iter_), "stop_reason": model.stop_reason_, "best_iteration": int(model.best_iteration_),
        "converged": bool(model.converged_), "phase_seconds": phases, "iteration_seconds": iter_s,
        "setup_seconds": fit_seconds - iter_s, "svd_solver": model.svd_solver_,
        "n_features": [int(model.n_features_x_), int(model.n_features_y_)],
        "initial_loss": float(model.initial_loss_), "loss": float(model.loss_),
        "losses": [float(h["loss"]) for h in model.history_],
        "residuals": [None if h.get("residual") is None else float(h["residual"]) for h in model.history_],
        "final_residual": _kept_residual(model), "tol": getattr(model, "tol_", None),
        "steps": [h.get("step") for h in model.history_],
        "options": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                    for k, v in model.get_params().items()},
    }


# ----------------------------------------------------------------------------- worker
def unicon_options(method: str, rank: int, cfg: dict) -> dict:
    B = cfg["negatives"]
    if method == "unicon-default":
        return dict(rank=rank)
    if method == "unicon-full":
        return dict(rank=rank, negatives="full")
    if method == "unicon-batched":
        return dict(rank=rank, negatives=B, batch_split="random")
    if method == "unicon-rbf":
        return dict(rank=rank, kernel="rbf", n_landmarks=cfg["landmarks"], negatives=B)
    if method == "unicon-paper":
        return dict(rank=rank, center=False, whiten=None, negatives=B, solver="plain", **PAPER)
    raise ValueError(method)


def worker(method: str, params: dict) -> dict:
    import torch

    import unicon_dist as ud
    from unicon_dist.baselines import BatchAveragedUniCon, RegularizedCCA, sgd_clip_sweep

    if params.get("threads"):
        torch.set_num_threads(int(params["threads"]))
    cfg = QUICK if params["quick"] else FULL
    dataset, seed = params["dataset"], params["seed"]
    rank = cfg["rank"][dataset]
    data = load_data(dataset, cfg, seed)
    Xtr, Ytr, Gtr = data["Xtr"], data["Ytr"], data["Gtr"]
    Xv, Yv, Gv = data["Xv"], data["Yv"], data["Gv"]
    row = {"dataset": dataset, "method": method, "rank": rank, "seed": seed, "quick": params["quick"],
           "n_train": int(len(Xtr)), "dim_x": int(Xtr.shape[1]), "dim_y": int(Ytr.shape[1]), **data["info"]}
    details: dict = {}

    if method == "unicon-full" and dataset == "wordnet" and not params["wordnet_full_all"] \
            and len(Xtr) > cfg["wordnet_full_rows"]:
        sub = np.sort(np.random.default_rng([seed, 5]).choice(len(Xtr), cfg["wordnet_full_rows"], replace=False))
        Xtr, Ytr, Gtr = Xtr[sub], Ytr[sub], Gtr[sub]
        row["n_train"] = int(len(Xtr))
        row["train_subset"] = (f"seeded {len(Xtr):,}-row subset of the {len(data['Xtr']):,} training rows "
                               "(full negatives are n² per iteration)")
        del sub
    H.reset_peak()
    rss_before = H.maxrss_mib()

    if method == "cca":
        with H.Timer() as t:
            table, best = [], None
            for lam in CCA_RIDGES:
                model = RegularizedCCA(rank=rank, ridge=lam).fit(Xtr, Ytr)
                score = mean_r1(model.encode_x(Xv), model.encode_y(Yv), Gv)
                table.append({"ridge": lam, "val_mean_R@1": score, "seconds": model.fit_seconds_})
                if best is None or score > best[0]:
                    best = (score, lam, model)
                del model
        _, lam, model = best
        details = {"ridge": lam, "selection": table, "final_fit_seconds": model.fit_seconds_,
                   "correlations_top5": [float(c) for c in model.correlations_[:5]]}
        enc_x, enc_y = model.encode_x, model.encode_y
    elif method == "sgd-clip":
        lrs, temps = SGD_GRIDS[params["sgd_grid"]]
        with H.Timer() as t:
            model, table = sgd_clip_sweep(Xtr, Ytr, lrs=lrs, temperatures=temps, validation=(Xv, Yv), rank=rank,
                                          max_epochs=cfg["sgd_epochs"], patience=5, batch_size=cfg["sgd_batch"],
                                          seed=seed)
        details = {"grid": params["sgd_grid"], "lrs": list(lrs), "temperatures": list(temps),
                   "max_epochs": cfg["sgd_epochs"], "patience": 5, "batch_size": cfg["sgd_batch"],
                   "best": {"lr": model.lr, "temperature": model.temperature, "val_R@1": model.best_score_,
                            "seconds": model.fit_seconds_, "epochs": model.n_epochs_,
                            "best_epoch": model.best_epoch_, "stopped_early": model.stopped_early_},
                   "sweep": table}
        enc_x, enc_y = model.encode_x, model.encode_y
    elif method == "batch-avg":
        with H.Timer() as t:
            mx, my = Xtr.mean(0, dtype=np.float64), Ytr.mean(0, dtype=np.float64)
            mx, my = mx.astype(np.float32), my.astype(np.float32)
            model = BatchAveragedUniCon(rank=rank, batch_size=cfg["batch_avg"], validation=(Xv - mx, Yv - my),
                                        seed=seed, **PAPER).fit(Xtr - mx, Ytr - my)
        details = {"batch_size": cfg["batch_avg"], "n_batches": int(model.n_batches_), "weighting": model.weighting_,
                   "per_batch_options": {**PAPER, "center": False, "whiten": None},
                   "per_batch_iterations": [h["n_iter"] for h in model.history_],
                   "per_batch_converged": sum(bool(h["converged"]) for h in model.history_),
                   "batch_scores": None if model.scores_ is None else [float(s) for s in model.scores_]}

        def enc_x(A):
            return model.encode_x(A - mx)

        def enc_y(A):
            return model.encode_y(A - my)
    elif method.startswith("unicon-"):
        options = unicon_options(method, rank, cfg)
        groups = Gtr if params["groups"] else None
        model = ud.UniCon(**options)
        with H.Timer() as t:
            model.fit(Xtr, Ytr, groups=groups)
        details = unicon_details(model, t.seconds)
        details["groups"] = groups is not None
        enc_x, enc_y = model.encode_x, model.encode_y
    else:
        raise ValueError(f"unknown method {method!r}")

    peak = H.maxrss_mib()
    row.update(fit_seconds=t.seconds, cpu_seconds=t.cpu, cpu_utilisation=t.utilisation,
               threads=torch.get_num_threads(), rss_before_fit_mib=rss_before, peak_rss_mib=peak,
               rss_increment_mib=peak - rss_before, details=details)
    row["metrics"] = evaluate(enc_x, enc_y, data)
    return row


# ----------------------------------------------------------------------------- driver
def results_path(quick: bool) -> Path:
    return RESULTS / ("compare_quick.json" if quick else "compare.json")


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"results": {}}


def save_results(path: Path, data: dict) -> None:
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run(args) -> int:
    path = results_path(args.quick)
    machine, commit = H.machine_line(), H.git_commit()
    run_id = datetime.datetime.now().isoformat(timespec="seconds")
    print(machine, file=sys.stderr)
    for dataset in args.datasets:
        for method in args.methods:
            params = {"dataset": dataset, "seed": args.seed, "quick": args.quick, "sgd_grid":
                      "small" if args.sgd_grid == "small" else ("quick" if args.quick else "full"),
                      "wordnet_full_all": args.wordnet_full_all, "groups": not args.no_groups,
                      "threads": args.threads if args.threads is not None else (1 if args.quick else None)}
            print(f"{dataset} {method} ...", file=sys.stderr, flush=True)
            row = H.spawn(Path(__file__), method, params)
            row.update(dataset=dataset, method=method, machine=machine, commit=commit, run=run_id,
                       date=datetime.date.today().isoformat())
            if "error" in row:
                print(f"  ERROR: {row['error']}\n  " + "\n  ".join(row.get("stderr_tail", [])), file=sys.stderr)
            else:
                m = row["metrics"]
                zs = "" if m["zero_shot_top1"] is None else f", zero-shot {m['zero_shot_top1']:.3f}"
                print(f"  mean R@1 {m['mean_R@1']:.3f}, mean R@10 {m['mean_R@10']:.3f}{zs}; fit "
                      f"{row['fit_seconds']:.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB "
                      f"(process {row['process_wall_s']:.1f} s)", file=sys.stderr, flush=True)
                if row["cpu_utilisation"] < 0.8:
                    print(f"  WARNING: CPU utilisation {row['cpu_utilisation']:.2f} < 0.8 (another process "
                          "took the cores; the timing is not representative)", file=sys.stderr)
            data = load_results(path)  # re-read: another run may have written meanwhile
            data.setdefault("results", {}).setdefault(dataset, {})[method] = row
            data.update(machine=machine, date=datetime.date.today().isoformat())
            save_results(path, data)
    print(f"wrote {path.relative_to(H.REPO)}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- report
def _fmt(v, spec=".3f") -> str:
    return "—" if v is None else format(v, spec)


def _secs(v) -> str:
    return "—" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}")


def note(row: dict) -> str:
    d, method = row.get("details", {}), row["method"]
    parts = []
    if method == "cca":
        parts.append(f"λ = {d['ridge']:g} (best of {len(d['selection'])} on validation); final fit "
                     f"{_secs(d['final_fit_seconds'])} s")
    elif method == "sgd-clip":
        b = d["best"]
        parts.append(f"best lr {b['lr']:g}, τ {b['temperature']:g}: {_secs(b['seconds'])} s, {b['epochs']} epochs "
                     f"(kept {b['best_epoch']}); sweep of {len(d['sweep'])} runs")
    elif method == "batch-avg":
        conv = d.get("per_batch_converged", 0)
        parts.append(f"{d['n_batches']} batches of ≤{d['batch_size']:,}, {d['weighting']} weights; "
                     f"{conv}/{d['n_batches']} batch fits converged")
    else:
        ph = d.get("phase_seconds", {})
        phase = ", ".join(f"{k} {_secs(v)}" for k, v in ph.items())
        res = d.get("final_residual")
        res = "" if res is None else f", residual {res:.1e}"
        parts.append(f"{d['n_iter']} it, {d['stop_reason']}, kept {d['best_iteration']}{res}; {phase}; "
                     f"setup {_secs(d['setup_seconds'])} s")
        if d.get("groups"):
            parts.append("synset groups as positives")
    if row.get("train_subset"):
        parts.append(f"**{row['n_train']:,}-row train subset**")
    if row.get("cpu_utilisation", 1.0) < 0.8:
        parts.append(f"CPU util. {row['cpu_utilisation']:.2f}")
    return "; ".join(parts)


def report_dataset(dataset: str, rows: dict) -> str:
    ordered = [rows[m] for m in METHODS if m in rows] + [r for m, r in rows.items() if m not in METHODS]
    ok = [r for r in ordered if "error" not in r]
    lines = []
    if ok:
        r0 = ok[0]
        lines.append(f"### {dataset} (r = {r0['rank']}, {r0['n_test']:,} test pairs, "
                     f"{r0.get('retrieval', 'instance')} retrieval)\n")
    lines.append("| method | n train | R@1 x→y | R@1 y→x | R@1 mean | R@10 mean | zero-shot top-1 | fit s | "
                 "peak RSS MiB | notes |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in ordered:
        if "error" in r:
            lines.append(f"| {r['method']} | | | | | | | | | error: {r['error']} |")
            continue
        m = r["metrics"]
        lines.append(f"| {r['method']} | {r['n_train']:,} | {m['x2y_R@1']:.3f} | {m['y2x_R@1']:.3f} | "
                     f"{m['mean_R@1']:.3f} | {m['mean_R@10']:.3f} | {_fmt(m['zero_shot_top1'])} | "
                     f"{_secs(r['fit_seconds'])} | {r['peak_rss_mib']:.0f} | {note(r)} |")
    sgd = rows.get("sgd-clip")
    unicons = [r for r in ok if r["method"].startswith("unicon-")]
    if sgd and "error" not in sgd and unicons:
        best_s, sweep_s = sgd["details"]["best"]["seconds"], sgd["fit_seconds"]
        lines.append("")
        lines.append(f"SGD-CLIP: best run {_secs(best_s)} s, whole sweep {_secs(sweep_s)} s "
                     f"(mean R@1 {sgd['metrics']['mean_R@1']:.3f}).\n")
        lines.append("| UniCon method | fit s | R@1 mean | Δ R@1 mean vs SGD-CLIP | best SGD run s / UniCon s | "
                     "SGD sweep s / UniCon s |")
        lines.append("|---|---|---|---|---|---|")
        for r in unicons:
            d = r["metrics"]["mean_R@1"] - sgd["metrics"]["mean_R@1"]
            lines.append(f"| {r['method']} | {_secs(r['fit_seconds'])} | {r['metrics']['mean_R@1']:.3f} | "
                         f"{d:+.3f} | {best_s / r['fit_seconds']:.2f} | {sweep_s / r['fit_seconds']:.2f} |")
    runs = {(r.get("run"), r.get("machine"), r.get("commit")) for r in ok}
    if len({(m, c) for _, m, c in runs}) > 1:
        lines.append("\nNote: these rows come from different machines or commits: " +
                     "; ".join(f"{c} on {m}" for _, m, c in sorted(runs, key=str)))
    elif len(runs) > 1:
        lines.append(f"\nNote: rows from {len(runs)} separate runs (same machine and commit): " +
                     ", ".join(sorted(str(r) for r, _, _ in runs)))
    return "\n".join(lines)


def plot_dataset(dataset: str, rows: dict, out: Path, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [rows[m] for m in METHODS if m in rows and "error" not in rows[m]]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, r in enumerate(ok):
        colour = f"C{k}"
        x, y = r["fit_seconds"], r["metrics"]["mean_R@1"]
        ax.scatter([x], [y], color=colour, zorder=3)
        label = r["method"] + (f" ({r['n_train']:,} rows)" if r.get("train_subset") else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        single = (r["details"]["final_fit_seconds"] if r["method"] == "cca" else
                  r["details"]["best"]["seconds"] if r["method"] == "sgd-clip" else None)
        if single is not None:  # the tuned methods: the one kept run, hollow, joined to the total
            ax.scatter([single], [y], facecolors="none", edgecolors=colour, zorder=3)
            ax.plot([single, x], [y, y], color=colour, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.1)  # room for the labels right of the points
    ax.set_xlabel("fit wall time, s (log; hollow: the selected run alone, filled: with the selection)")
    ax.set_ylabel("mean R@1 (x→y, y→x) on test")
    r0 = ok[0]
    ax.set_title(f"{dataset}{' (quick)' if quick else ''}: r = {r0['rank']}, {r0['n_test']:,} test pairs",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def report(args) -> int:
    path = results_path(args.quick)
    if not path.exists():
        print(f"{path} not found; run the benchmark first", file=sys.stderr)
        return 1
    data = load_results(path)
    print(f"Machine: {data.get('machine', '?')}; last written {data.get('date', '?')}"
          + (" (QUICK smoke run: not results)" if args.quick else "") + "\n")
    for dataset in [d for d in DATASETS if d in data["results"]] + \
            [d for d in data["results"] if d not in DATASETS]:
        rows = data["results"][dataset]
        print(report_dataset(dataset, rows) + "\n")
        png = RESULTS / f"compare_{dataset}{'_quick' if args.quick else ''}.png"
        plot_dataset(dataset, rows, png, args.quick)
        print(f"(plot: {png.relative_to(H.REPO)})\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="small smoke run, written to compare_quick.json")
    parser.add_argument("--report", action="store_true", help="no fitting: tables and plots from the JSON")
    parser.add_argument("--sgd-grid", choices=("full", "small"), default="full",
                        help="SGD-CLIP sweep: full 3×3 grid or lrs (1e-3, 3e-3) × τ (0.07,)")
    parser.add_argument("--wordnet-full-all", action="store_true",
                        help="unicon-full on all WordNet training rows (default: a 40,000-row subset)")
    parser.add_argument("--no-groups", action="store_true",
                        help="do not pass the WordNet synset ids to UniCon as groups")
    parser.add_argument("--threads", type=int,
                        help="torch threads of every worker (default: torch's default; 1 with --quick, where "
                             "the timings do not matter and one thread is robust to a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker")
    parser.add_argument("--params")
    args = parser.parse_args(argv)
    if args.worker:
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        print(json.dumps(worker(args.worker, json.loads(args.params))))
        return 0
    if args.report:
        return report(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
