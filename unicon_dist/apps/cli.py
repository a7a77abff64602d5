"""Command-line entry point ``unicon-dist``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

__all__ = ["main"]


# ---------------------------------------------------------------------------- demo
_FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                  "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_FASHION_INSTALL = "sudo apt-get install -y dataset-fashion-mnist"
# per dataset: rank, temperature (RESULTS.md §3 settings)
_DEMO_DEFAULTS = {"fashion-mnist": (64, 0.1), "digits": (16, 0.5)}


def _demo_data(args):
    """(train_left, train_right, test_left, test_right, test_labels, class names, description)."""
    from ..data.datasets import (
        DIGITS_CLASSES, FASHION_MNIST_CLASSES, load_digits_halves, load_fashion_mnist_halves,
    )

    rng = np.random.default_rng(args.seed)
    if args.dataset == "digits":
        if not 0 < args.test_fraction < 1:
            raise ValueError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
        left, right, labels = load_digits_halves()
        perm = rng.permutation(len(left))
        n_test = int(round(args.test_fraction * len(left)))
        test, train = perm[:n_test], perm[n_test:]
        if args.n_train is not None:
            if not 2 <= args.n_train <= len(train):
                raise ValueError(f"--n-train must be in [2, {len(train)}] for digits, got {args.n_train}")
            train = train[:args.n_train]
        desc = (f"scikit-learn digits, left/right 8x4 halves: {len(train):,} training pairs, "
                f"{len(test):,} test pairs, 32 + 32 pixels")
        return left[train], right[train], left[test], right[test], labels[test], DIGITS_CLASSES, desc
    directory = Path(args.data_dir)
    missing = [str(directory / f) for f in _FASHION_FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found (missing {', '.join(missing)}); install Debian's package with\n"
            f"    {_FASHION_INSTALL}\n(as root: apt-get install -y dataset-fashion-mnist), "
            "or run the demo on scikit-learn's digits: unicon-dist demo --dataset digits"
        )
    left, right, _ = load_fashion_mnist_halves("train", directory=directory)
    n_train = 20_000 if args.n_train is None else args.n_train
    if not 2 <= n_train <= len(left):
        raise ValueError(f"--n-train must be in [2, {len(left)}] for fashion-mnist, got {n_train}")
    train = np.sort(rng.permutation(len(left))[:n_train])
    train_l, train_r = left[train], right[train]
    del left, right
    test_l, test_r, test_labels = load_fashion_mnist_halves("test", directory=directory)
    desc = (f"Fashion-MNIST, left/right 28x14 halves: {n_train:,} training pairs (seeded sample of the "
            f"60,000 training images), all {len(test_l):,} test pairs, 392 + 392 pixels")
    return train_l, train_r, test_l, test_r, test_labels, FASHION_MNIST_CLASSES, desc


def cmd_demo(args) -> int:
    import time

    from ..solver.diagnostics import kept_as
    from ..solver.estimator import UniCon
    from .evaluation import evaluate_arrays, format_evaluation

    t_start = time.perf_counter()
    rank_default, temperature_default = _DEMO_DEFAULTS[args.dataset]
    rank = rank_default if args.rank is None else args.rank
    temperature = temperature_default if args.temperature is None else args.temperature
    out = args.out if args.out is not None else Path(f"runs/demo/{args.dataset}-unicon.npz")
    limits = {k: v for k, v in (("max_iter", args.max_iter), ("tol", args.tol)) if v is not None}
    model = UniCon(rank=rank, kernel=args.kernel, temperature=temperature, seed=args.seed, verbose=args.verbose,
                      **limits)
    model.validate_params()  # before any data is read
    train_l, train_r, test_l, test_r, test_labels, classes, desc = _demo_data(args)
    # the model centres and whitens each view itself, with the training rows' moments
    xl, xr, tl, tr = train_l, train_r, test_l, test_r
    print(desc)
    t_load = time.perf_counter() - t_start

    t0 = time.perf_counter()
    model.fit(xl, xr)
    t_fit = time.perf_counter() - t0
    print(f"\nUniCon rank {rank}, {args.kernel} kernel, CLIP loss, temperature {temperature}; "
          "iterations (loss and fixed-point residual at W_k, and how W_k was made):")
    for h in model.history_:
        print(f"  {h['iteration']:>3}  loss {h['loss']:.5f}  residual {h['residual']:.2e}"
              f"  {h['seconds']:.3f}s  {h['step']}")
    print(f"  stopped: {model.stop_reason_}; kept iteration {model.best_iteration_}"
          f"{f' (residual <= tol = {model.tol_:.0e})' if model.converged_ else f' ({kept_as(model)})'}")

    t0 = time.perf_counter()
    result = evaluate_arrays(model, tl, tr, labels=test_labels, label_names=classes, max_rows=args.max_rows,
                             seed=args.seed)
    t_eval = time.perf_counter() - t0
    print("\ntest pairs: left half (x) vs right half (y); unaligned = cosine of the raw pixels\n")
    print(format_evaluation(result))
    path = model.save(out)
    print(f"\nmodel written to {path}")
    print(f"time: data {t_load:.1f}s, fit {t_fit:.1f}s, evaluation {t_eval:.1f}s, "
          f"total {time.perf_counter() - t_start:.1f}s")
    return 0


# ---------------------------------------------------------------------------- solve / evaluate
def cmd_solve(args) -> int:
    import time

    from .jobs import load_job, run_job

    t0 = time.perf_counter()
    job = load_job(args.job, resume=args.resume)
    validate_s = time.perf_counter() - t0
    print(job.describe())
    if args.dry_run:
        print("\ndry run: the job is valid; nothing was fitted or written")
        return 0
    print()
    if not args.quiet:
        logging.getLogger("unicon_dist").setLevel(logging.INFO)
    record = run_job(job, validate_seconds=validate_s)
    if record["evaluation"] is not None:
        from .evaluation import format_evaluation

        print()
        print(format_evaluation(record["evaluation"]))
    t = record["timings"]
    print(f"\ntime: validate {t['validate']:.2f}s, fit {t['fit']:.1f}s, save {t['save']:.2f}s"
          + (f", evaluate {t['evaluate']:.1f}s" if "evaluate" in t else "") + f", total {t['total']:.1f}s")
    return 0


def cmd_evaluate(args) -> int:
    import json

    from .evaluation import evaluate_store, format_evaluation
    from .jobs import atomic_write_text

    result = evaluate_store(args.model, args.store, ks=tuple(args.ks), max_rows=args.max_rows,
                            block_rows=args.block_rows, seed=args.seed)
    result["model_file"] = str(args.model)
    print(format_evaluation(result))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"\nmetrics written to {args.json}")
    return 0


# ---------------------------------------------------------------------------- resolve
def cmd_resolve(args) -> int:
    import time

    from ..solver.estimator import UniCon

    model = UniCon.load(args.model)
    version = (model.lineage_[-1]["version"] if model.lineage_ else 1) + 1
    out = args.out if args.out is not None else args.model.with_name(f"{_stem(args.model)}.v{version}.npz")
    if out.exists():
        raise FileExistsError(f"{out} already exists; model versions are never overwritten (pass another --out)")
    t0 = time.perf_counter()
    new = model.refit(args.store, mode=args.mode, warm_start=not args.cold, refresh_maps=args.refresh_maps)
    path = new.save(out)
    last = new.lineage_[-1]
    print(f"version {last['version']} (parent {last['parent']}): rows {last['rows'][0]}-{last['rows'][1] - 1}, "
          f"{last['rows'][1] - model.data_['n_rows']:,} new; {last['start']} start, {new.n_iter_} iterations "
          f"(stopped: {new.stop_reason_}) in {time.perf_counter() - t0:.1f}s -> {path}")
    return 0


def _stem(path: Path) -> str:
    """model.v3.npz -> model: versions sit next to the first one."""
    stem = path.stem
    head, _, tail = stem.rpartition(".v")
    return head if head and tail.isdigit() else stem


# ---------------------------------------------------------------------------- study
def cmd_study(args) -> int:
    from .study import load_study, run_study

    study = load_study(args.grid)
    print(study.describe())
    if args.dry_run:
        finished = study.finished() if study.output.is_dir() else set()
        print("\npoints (id  varying values):")
        for k, p in enumerate(study.points, 1):
            print(f"  {k:>4}  {p.id}  {p.label}{'  [finished]' if p.id in finished else ''}")
        print("\ndry run: the grid is valid; nothing was solved or written")
        return 0
    print()
    rows = run_study(study)
    ids = {p.id for p in study.points}
    return 1 if any(r["status"] != "ok" for r in rows if r["id"] in ids) else 0


# ---------------------------------------------------------------------------- check-store
def cmd_check_store(args) -> int:
    import json

    from ..data.store_check import check_store

    report = check_store(args.path)  # not a pair store: ValueError / FileNotFoundError -> exit 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def _add_check_store_parser(sub) -> None:
    chk = sub.add_parser(
        "check-store", help="check a pair store on disk (schema, arrays, every chunk, strays), like fsck",
        description="Read the pair store PATH chunk by chunk (O(chunk) memory) and report every problem: schema "
                    "attributes, n_rows against the arrays' shapes, every chunk below n_rows present and decodable "
                    "(zstd checksums), float rows finite, labels within label_names, the auxiliary arrays, and "
                    "stray files (*.partial temporaries, unregistered auxiliary arrays, unknown files). Takes no "
                    "lock and writes nothing. Exit status: 0 sound, 1 problems found, 2 PATH is not a pair store.")
    chk.add_argument("path", type=Path, help="the pair store directory")
    chk.add_argument("--json", action="store_true", help="print the report as JSON")
    chk.set_defaults(func=cmd_check_store)


# ---------------------------------------------------------------------------- ingest
def _label_names_arg(args):
    if args.label_names_file is not None:
        lines = Path(args.label_names_file).read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip()]
    if args.label_names is not None:
        return [name.strip() for name in args.label_names.split(",")]
    return None


def cmd_ingest(args) -> int:
    import time

    from ..data.ingest import ingest

    t0 = time.perf_counter()
    store = ingest(args.x_source, args.y_source, args.out, groups=args.groups, labels=args.labels,
                   dtype=args.dtype, chunk_rows=args.chunk_rows, block_rows=args.block_rows,
                   start_row=args.start_row, overwrite=args.overwrite, append=args.append,
                   label_names=_label_names_arg(args), progress=not args.no_progress,
                   command=["unicon-dist", *args.argv])
    entry = store.history[-1] if store.history else {}
    last = entry.get("rows", [len(store), len(store)])
    blocks = f" in blocks of {entry['block_rows']:,} rows" if "block_rows" in entry else ""
    print(f"{store.path}: wrote rows {last[0]}-{last[1] - 1} ({last[1] - last[0]:,} rows){blocks} in "
          f"{time.perf_counter() - t0:.1f}s; the store holds {len(store):,} rows "
          f"(x {store.dim_x}, y {store.dim_y}, {store.dtype}, chunk_rows {store.chunk_rows})")
    return 0


def _add_ingest_parser(sub) -> None:
    ing = sub.add_parser(
        "ingest", help="stream paired feature files (npy, npz, parquet, zarr) into a pair store",
        description="Check the sources, then stream them block by block (O(block) memory) into the pair "
                    "store OUT. Sources: a.npy, a.npz[:key], a.parquet:col (list column) or "
                    "a.parquet:c1,c2,... (numeric columns; :* for all), a.zarr[:array]. A bad row stops the "
                    "ingest with an error naming the file and row; the rows before it stay committed and "
                    "--append --start-row ROW resumes.")
    ing.add_argument("x_source", help="x features, 2-D (rows, dim_x)")
    ing.add_argument("y_source", help="y features, 2-D (rows, dim_y)")
    ing.add_argument("--out", required=True, type=Path, help="the pair store directory")
    ing.add_argument("--groups", default=None, help="1-D integer source: positive-pair group per row")
    ing.add_argument("--labels", default=None, help="1-D integer source: class label per row")
    names = ing.add_mutually_exclusive_group()
    names.add_argument("--label-names", default=None, help="comma-separated class names (label k = k-th name)")
    names.add_argument("--label-names-file", type=Path, default=None, help="text file, one class name per line")
    ing.add_argument("--dtype", choices=("float32", "float16", "float64", "bfloat16"), default=None,
                     help="storage dtype of a new store (default float32; appending keeps the store's)")
    ing.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk of a new store")
    ing.add_argument("--block-rows", type=int, default=None,
                     help="rows read, checked and committed at once, used exactly as given (it bounds memory); "
                          "best a multiple of the store's chunk_rows, else each block boundary rewrites a chunk "
                          "and a warning names a multiple to use (default: a multiple of chunk_rows of about "
                          "128 MiB); the value used is printed")
    ing.add_argument("--start-row", type=int, default=0, help="first source row (to resume a failed ingest)")
    mode = ing.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true", help="append to OUT (created if missing)")
    mode.add_argument("--overwrite", action="store_true", help="replace the pair store OUT")
    ing.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    ing.set_defaults(func=cmd_ingest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unicon-dist", description="Closed-form contrastive alignment (UniCon).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit on Fashion-MNIST (or digits) image halves and print retrieval metrics",
                          description="Fit UniCon on the left vs right halves of images (training split), then "
                                      "evaluate retrieval and classification on the test split next to the "
                                      "unaligned baseline, and write the model.")
    demo.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist",
                      help="fashion-mnist (Debian package dataset-fashion-mnist; default) or scikit-learn digits")
    demo.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist",
                      help="folder of the Fashion-MNIST .gz files (default: the Debian package's)")
    demo.add_argument("--n-train", type=int, default=None,
                      help="training pairs (fashion-mnist: seeded sample, default 20000 of 60000; digits: all)")
    demo.add_argument("--rank", type=int, default=None, help="default 64 (fashion-mnist), 16 (digits)")
    demo.add_argument("--temperature", type=float, default=None, help="default 0.1 (fashion-mnist), 0.5 (digits)")
    demo.add_argument("--kernel", default="linear")
    demo.add_argument("--max-iter", type=int, default=None, help="default: the model's (30)")
    demo.add_argument("--tol", type=float, default=None, help="default: the model's (1e-4)")
    demo.add_argument("--test-fraction", type=float, default=0.25, help="digits only: held-out fraction")
    demo.add_argument("--max-rows", type=int, default=10_000, help="evaluate on at most this many test pairs")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", type=Path, default=None, help="model file (default runs/demo/DATASET-unicon.npz)")
    demo.set_defaults(func=cmd_demo)

    solve = sub.add_parser("solve", help="validate and run a TOML job file (fit a store, save, evaluate)",
                           description="Validate JOB completely (tables, keys, model options, stores, outputs), "
                                       "print the plan, fit the training store, write the model atomically and "
                                       "the metrics JSON, and evaluate on [data] eval_store when given.")
    solve.add_argument("job", type=Path, help="the job file (see examples/fashion_mnist.toml)")
    solve.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    solve.add_argument("--resume", action="store_true",
                       help="continue the fit from its checkpoint ([output] checkpoint, default MODEL-STEM.ckpt.npz "
                            "next to the model) when it exists, else start from scratch; either way a checkpoint is "
                            "written after every iteration, so pass --resume on every submission of a job that "
                            "may be killed")
    solve.add_argument("-q", "--quiet", action="store_true", help="no progress logging during the fit")
    solve.set_defaults(func=cmd_solve)

    evaluate = sub.add_parser("evaluate", help="evaluate a saved model on a pair store",
                              description="Instance (and group/class) retrieval and zero-shot or prototype "
                                          "accuracy of MODEL on the rows of STORE, next to the unaligned baseline.")
    evaluate.add_argument("model", type=Path, help="model file written by solve, demo or UniCon.save")
    evaluate.add_argument("store", type=Path, help="pair store with the model's input dims")
    evaluate.add_argument("--max-rows", type=int, default=10_000,
                          help="evaluate on a seeded random subset of this many rows when the store is larger")
    evaluate.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="recall cut-offs")
    evaluate.add_argument("--block-rows", type=int, default=None, help="rows read and encoded at once")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the subset")
    evaluate.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    evaluate.set_defaults(func=cmd_evaluate)

    res = sub.add_parser("resolve", help="re-solve a saved model on the rows appended to its store since",
                         description="Load MODEL, re-solve on every row of its pair store (warm start from the "
                                     "model's encoders, its Nyström maps kept) and write the result as a new "
                                     "version next to it (MODEL.vK.npz); the old file is never changed.")
    res.add_argument("--model", type=Path, required=True, help="a model written by solve, demo or resolve")
    res.add_argument("--store", type=Path, default=None, help="the grown store (default: the one the model records)")
    res.add_argument("--out", type=Path, default=None, help="file of the new version (default MODEL.vK.npz)")
    res.add_argument("--mode", choices=("exact", "fast"), default="exact",
                     help="exact: the fixed point over all rows (default); fast: fold the new rows into the "
                          "model's C at its encoders and take one SVD (an approximation, see UniCon.refit)")
    res.add_argument("--cold", action="store_true", help="exact mode: start from s = 0 instead of the model's encoders")
    res.add_argument("--refresh-maps", action="store_true",
                     help="exact mode: re-estimate each view's centring/whitening on all rows (Nyström landmarks kept)")
    res.set_defaults(func=cmd_resolve)

    study = sub.add_parser("study", help="run a resumable parameter grid of solves from a TOML grid file",
                           description="Validate GRID completely, then solve every grid point that has no finished "
                                       "result in the output folder (locally or as Ray tasks): one JSON per point, "
                                       "results.csv / results.parquet rewritten after each, plots at the end. "
                                       "Exit status 1 when some point failed (re-run to retry it).")
    study.add_argument("grid", type=Path, help="the grid file ([data], [study], [model], [grid])")
    study.add_argument("--dry-run", action="store_true", help="validate and print the points and their ids only")
    study.set_defaults(func=cmd_study)

    _add_ingest_parser(sub)
    _add_check_store_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded as provenance
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            TypeError, PermissionError) as exc:
        print(f"unicon-dist: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
