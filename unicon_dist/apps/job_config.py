"""Job files: the schema of the TOML file that describes a fit, and its validation before any work.

A job names the training store, the UniCon options, the executor and the outputs::

    [data]
    store = "fashion-mnist-train.zarr"     # relative paths resolve against the job file's folder
    eval_store = "fashion-mnist-test.zarr" # optional: evaluated after the fit
    groups = true                          # optional: require (true) or ignore (false) the store's groups

    [model]                                # UniCon constructor options (DESIGN §5)
    rank = 64
    temperature = 0.1
    memory_budget = "2GiB"                 # bytes, or a size string

    [executor]
    kind = "local"                         # or "ray" (address, num_workers, num_gpus_per_worker)

    [evaluate]                             # optional
    ks = [1, 5, 10]
    max_rows = 10000
    seed = 0

    [output]
    model = "runs/fashion-mnist/model.npz"
    metrics = "runs/fashion-mnist/metrics.json"   # optional
    checkpoint = "runs/fashion-mnist/model.ckpt.npz"  # optional; the default with --resume
    overwrite = false

:func:`load_job` checks every table and key (types, ranges, unknown keys with the list
of valid ones), builds the :class:`~unicon_dist.solver.estimator.UniCon` and runs its own parameter
validation, then opens the stores read-only to check their schema (rows, dims, groups,
labels) against the options (rank ≤ features where the feature count is known) -- no
rows are read -- and checks that the outputs can be written.  Every problem found is
reported at once, one line each, naming the file, the table and the key.

Checkpoints: with ``[output] checkpoint`` (or ``load_job(path, resume=True)``, which
defaults it to ``<model stem>.ckpt.npz`` next to the model) the fit writes its state after
every iteration; with ``resume=True`` an existing checkpoint is checked against the job
(format, options, store path and committed rows) during validation and the fit continues
from it.  The checkpoint is working state, not an output: ``overwrite`` does not apply.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import MappingProxyType

import torch

from ..io.checkpoints import check_fingerprint, read_checkpoint_header, store_fingerprint
from ..solver.estimator import UniCon
from .config_checks import StoreInfo, is_int, is_number, open_store, read_toml, resolve_path, split_tables, \
    type_name, unknown_keys
from .evaluation import DEFAULT_MAX_ROWS
from .job_spec import DataSpec, EvaluateSpec, ExecutorSpec, Job, JobError, OutputSpec, executor_class
from .model_options import check_model, check_model_against_store, model_kwargs

__all__ = [
    "load_job", "TABLES", "DATA_KEYS", "EXECUTOR_KINDS", "RAY_KEYS", "EXECUTOR_KEYS", "EVALUATE_KEYS", "OUTPUT_KEYS",
]

# the schema: tables and their keys (the [model] keys are UniCon's, see model_options)
TABLES = ("data", "model", "executor", "evaluate", "output")
DATA_KEYS = ("store", "eval_store", "groups")
EXECUTOR_KINDS = ("local", "ray")
RAY_KEYS = ("address", "num_workers", "num_gpus_per_worker")
EXECUTOR_KEYS = ("kind",) + RAY_KEYS
EVALUATE_KEYS = ("ks", "max_rows", "seed", "block_rows")
OUTPUT_KEYS = ("model", "metrics", "checkpoint", "overwrite")


def _check_output_path(key: str, path: Path, suffix: str, overwrite: bool, errors: list[str]) -> None:
    """An output file: its suffix, not a folder, no clobbering, and a folder that can be made."""
    if path.suffix != suffix:
        errors.append(f"[output] {key} must be a {suffix} file, got {path}")
    if path.is_dir():
        errors.append(f"[output] {key}: {path} is a directory")
        return
    if path.exists() and not overwrite:
        errors.append(f"[output] {key}: {path} already exists; set overwrite = true to replace it")
    # the nearest existing ancestor must be a writable directory (the rest is created)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        errors.append(f"[output] {key}: cannot create folder {path.parent}: {parent} is not a directory")
    elif not os.access(parent, os.W_OK | os.X_OK):
        errors.append(f"[output] {key}: cannot create {path}: folder {parent} is not writable")


def load_job(path, *, resume: bool = False) -> Job:
    """Read and fully validate a TOML job file.

    Parameters
    ----------
    path : str or Path
        The job file.  Relative paths inside it resolve against its folder.
    resume : bool
        Continue the fit from its checkpoint (``unicon-dist solve --resume``):
        ``[output] checkpoint``, by default ``<model stem>.ckpt.npz`` next to the model.
        An existing checkpoint must belong to this job (same options and store rows).

    Returns
    -------
    Job

    Raises
    ------
    FileNotFoundError
        No such job file.
    JobError
        (a ValueError) Every problem found, one line each:
        ``"job.toml: [model] temperature must be a finite number > 0, got -1.0"``.

    Notes
    -----
    Order: TOML syntax; tables and keys (types, ranges, unknown keys); the UniCon
    options through ``UniCon(**options).validate_params()``; the stores, opened
    read-only for their schema only (no rows are read); the bounds that need both
    (rank ≤ features, n_landmarks ≤ rows, equal dims of the evaluation store); the
    outputs (suffix, no clobbering unless ``overwrite = true``, folder creatable); an
    existing checkpoint (a unicon_dist checkpoint, never another file; with ``resume``,
    written by this job's fit).
    """
    path = Path(path)
    raw = read_toml(path, "job", JobError)
    base = path.resolve().parent
    errors: list[str] = []

    tables = split_tables(raw, TABLES, errors)
    for required in ("data", "output"):
        if required not in raw:
            errors.append(f"missing table [{required}]")

    # [data], paths only
    data = tables["data"]
    errors += unknown_keys("data", data, DATA_KEYS)
    store_path = eval_path = None
    for key in ("store", "eval_store"):
        if key in data:
            if isinstance(data[key], str) and data[key]:
                p = resolve_path(base, data[key])
                store_path, eval_path = (p, eval_path) if key == "store" else (store_path, p)
            else:
                errors.append(f"[data] {key} must be a path string, got {data[key]!r} ({type_name(data[key])})")
    if "store" not in data and "data" in raw:
        errors.append('[data] store is required (the path of the training pair store, e.g. store = "train.zarr")')
    groups = data.get("groups")
    if groups is not None and not isinstance(groups, bool):
        errors.append(f"[data] groups must be true or false, got {groups!r} ({type_name(groups)})")
        groups = None

    # [model]
    kwargs, model_errors = model_kwargs(tables["model"])
    model_errors += check_model(kwargs)  # the well-typed options, even when others are not
    errors += model_errors
    model_ok = not model_errors

    # [executor]
    ex = tables["executor"]
    errors += unknown_keys("executor", ex, EXECUTOR_KEYS)
    kind = ex.get("kind", "local")
    executor = None
    if kind not in EXECUTOR_KINDS:
        errors.append(f"[executor] kind must be one of {', '.join(map(repr, EXECUTOR_KINDS))}, got {kind!r}")
    elif kind == "local":
        extra = [k for k in RAY_KEYS if k in ex]
        errors += [f'[executor] {k} applies to kind = "ray" only' for k in extra]
        executor = ExecutorSpec()
    else:
        ex_errors = []
        if executor_class("ray") is None:
            ex_errors.append('[executor] kind = "ray" is not available yet in this unicon_dist (no ud.RayExecutor); '
                             'use kind = "local"')
        address = ex.get("address")
        if address is not None and not (isinstance(address, str) and address):
            ex_errors.append('[executor] address must be a string such as "ray://head:10001" or "auto", '
                             f"got {address!r}")
        workers = ex.get("num_workers")
        if workers is not None and not (is_int(workers) and workers >= 1):
            ex_errors.append(f"[executor] num_workers must be an integer >= 1, got {workers!r}")
        gpus = ex.get("num_gpus_per_worker", 0)
        if not (is_number(gpus) and math.isfinite(gpus) and gpus >= 0):
            ex_errors.append(f"[executor] num_gpus_per_worker must be a number >= 0, got {gpus!r}")
        errors += ex_errors
        if not ex_errors:
            executor = ExecutorSpec("ray", address, workers, gpus)

    device = kwargs.get("device")
    if model_ok and kind == "local" and isinstance(device, str) and device.startswith("cuda"):
        if not torch.cuda.is_available():
            errors.append(f"[model] device = {device!r} but no CUDA device is visible to this process "
                          '(the local executor runs here); use device = "cpu"')

    # [evaluate]
    ev = tables["evaluate"]
    errors += unknown_keys("evaluate", ev, EVALUATE_KEYS)
    ks = ev.get("ks", [1, 5, 10])
    if not (isinstance(ks, list) and ks and all(is_int(k) and k >= 1 for k in ks)):
        errors.append(f"[evaluate] ks must be a non-empty array of integers >= 1, got {ks!r}")
        ks = [1, 5, 10]
    max_rows = ev.get("max_rows", DEFAULT_MAX_ROWS)
    if not (is_int(max_rows) and max_rows >= 2):
        errors.append(f"[evaluate] max_rows must be an integer >= 2, got {max_rows!r}")
        max_rows = DEFAULT_MAX_ROWS
    seed = ev.get("seed", 0)
    if not (is_int(seed) and seed >= 0):
        errors.append(f"[evaluate] seed must be an integer >= 0, got {seed!r}")
        seed = 0
    block_rows = ev.get("block_rows")
    if block_rows is not None and not (is_int(block_rows) and block_rows >= 1):
        errors.append(f"[evaluate] block_rows must be an integer >= 1, got {block_rows!r}")
        block_rows = None
    evaluate = EvaluateSpec(tuple(sorted(set(ks))), max_rows, seed, block_rows)

    # [output], static part
    out = tables["output"]
    errors += unknown_keys("output", out, OUTPUT_KEYS)
    overwrite = out.get("overwrite", False)
    if not isinstance(overwrite, bool):
        errors.append(f"[output] overwrite must be true or false, got {overwrite!r} ({type_name(overwrite)})")
        overwrite = False
    out_paths = {}
    for key in ("model", "metrics", "checkpoint"):
        if key in out:
            if isinstance(out[key], str) and out[key]:
                out_paths[key] = resolve_path(base, out[key])
            else:
                errors.append(f"[output] {key} must be a path string, got {out[key]!r} ({type_name(out[key])})")
    if "model" not in out and "output" in raw:
        errors.append('[output] model is required (where the fitted model is written, e.g. model = "model.npz")')
    if resume and "checkpoint" not in out and "model" in out_paths:
        model_path = out_paths["model"]
        out_paths["checkpoint"] = model_path.with_name(f"{model_path.stem}.ckpt.npz")
    if "model" in out_paths and out_paths["model"] == out_paths.get("metrics"):
        errors.append("[output] model and metrics must be different files")
    if "checkpoint" in out_paths and out_paths["checkpoint"] in (out_paths.get("model"), out_paths.get("metrics")):
        errors.append("[output] checkpoint must be a different file from model and metrics")
    for key, p in out_paths.items():
        # the checkpoint is the fit's working state: replacing or continuing it needs no overwrite
        _check_output_path(key, p, ".json" if key == "metrics" else ".npz",
                           overwrite or key == "checkpoint", errors)

    # the stores: schema only, opened read-only (no rows are read)
    train = open_store("data", "store", store_path, errors) if store_path is not None else None
    test = open_store("data", "eval_store", eval_path, errors) if eval_path is not None else None
    if train is not None:
        if groups is True and not train.has_groups:
            errors.append(f"[data] groups = true but the store {train.path} has no groups")
        if test is not None and (test.dim_x, test.dim_y) != (train.dim_x, train.dim_y):
            errors.append(f"[data] eval_store has dims (x {test.dim_x}, y {test.dim_y}) but store has "
                          f"(x {train.dim_x}, y {train.dim_y}); the model cannot encode it")
        for key, p in out_paths.items():
            for info in (train, test):
                if info is not None and _inside(p, info.path):
                    errors.append(f"[output] {key}: {p} lies inside the pair store {info.path}")
        if model_ok:
            errors += check_model_against_store(kwargs, train)
    ckpt = out_paths.get("checkpoint")
    if ckpt is not None and ckpt.is_file():
        use_groups = None if train is None else (train.has_groups if groups is None else groups)
        errors += _check_checkpoint(ckpt, resume, kwargs if model_ok else None, train, use_groups)

    if errors:
        raise JobError(path, errors)
    return Job(
        path=path,
        data=DataSpec(store=train, eval_store=test, groups=groups),
        model_options=MappingProxyType(dict(tables["model"])),
        executor=executor,
        evaluate=evaluate,
        output=OutputSpec(model=out_paths["model"], metrics=out_paths.get("metrics"), overwrite=overwrite,
                          checkpoint=out_paths.get("checkpoint")),
        raw=MappingProxyType(raw),
        resume=bool(resume),
    )


def _check_checkpoint(path: Path, resume: bool, kwargs: dict | None, train: StoreInfo | None,
                      use_groups: bool | None) -> list[str]:
    """An existing checkpoint file: a unicon_dist checkpoint and, to resume, one of this job's fit.

    ``kwargs`` is None when the model options have errors of their own (reported already).
    """
    try:
        header = read_checkpoint_header(path)
    except ValueError as exc:
        # never replace a file that is not a checkpoint, even without resume
        return [f"[output] checkpoint: {exc}; refusing to replace or resume it"]
    if not resume or kwargs is None or train is None:
        return []
    model = UniCon(**kwargs)
    loss_fn = model.validate_params()[0]
    data = store_fingerprint(train.path, train.n_rows, train.dim_x, train.dim_y, train.dtype, bool(use_groups))
    try:
        check_fingerprint(path, header, model.checkpoint_fingerprint(loss_fn, data))
    except ValueError as exc:
        return [f"[output] checkpoint: {exc}"]
    return []


def _inside(p: Path, folder: Path) -> bool:
    """Whether ``p`` lies inside ``folder`` (symlinks resolved)."""
    try:
        p.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True
