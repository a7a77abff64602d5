"""Job files: one TOML file describes a fit, validated completely before any work.

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
of valid ones), builds the :class:`~unicon_dist.UniCon` and runs its own parameter
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

import difflib
import inspect
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from ..solver.diagnostics import format_diagnostics
from ..io.artifacts import atomic_write
from ..solver.planning import format_bytes, parse_bytes

__all__ = [
    "Job",
    "JobError",
    "DataSpec",
    "StoreInfo",
    "ExecutorSpec",
    "EvaluateSpec",
    "OutputSpec",
    "load_job",
    "parse_bytes",
    "atomic_write_text",
    "run_job",
]

_TABLES = ("data", "model", "executor", "evaluate", "output")
_DATA_KEYS = ("store", "eval_store", "groups")
_EXECUTOR_KINDS = ("local", "ray")
_RAY_KEYS = ("address", "num_workers", "num_gpus_per_worker")
_EXECUTOR_KEYS = ("kind",) + _RAY_KEYS
_EVALUATE_KEYS = ("ks", "max_rows", "seed", "block_rows")
_OUTPUT_KEYS = ("model", "metrics", "checkpoint", "overwrite")
DEFAULT_MAX_ROWS = 10_000
# the number of landmarks UniCon takes by default for a nonlinear kernel (capped by n)
_DEFAULT_LANDMARKS = 1000


class JobError(ValueError):
    """A job file that cannot be run; ``errors`` lists every problem, one line each."""

    def __init__(self, path, errors: list[str]):
        self.path = str(path)
        self.errors = list(errors)
        super().__init__("\n".join(f"{self.path}: {e}" for e in self.errors))


# --------------------------------------------------------------------------- helpers
def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, through :func:`unicon_dist.io.artifacts.atomic_write`."""
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return Path(path)


def _num(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def split_tables(raw: dict, valid, errors: list[str]) -> dict:
    """The tables ``valid`` of a parsed TOML file ({} for an absent or malformed one),
    appending to ``errors`` a line per unknown top-level key and per key that is no table."""
    for key, value in raw.items():
        if key not in valid:
            errors.append(f"unknown table [{key}]; valid tables: {', '.join('[' + t + ']' for t in valid)}")
        elif not isinstance(value, dict):
            errors.append(f"{key} must be a table [{key}], got {_type_name(value)}")
    return {t: raw.get(t, {}) if isinstance(raw.get(t, {}), dict) else {} for t in valid}


def _type_name(v) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(v), type(v).__name__
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _unknown(table: str, keys, valid) -> list[str]:
    out = []
    for k in keys:
        if k not in valid:
            close = difflib.get_close_matches(k, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append(f"[{table}] unknown key {k!r}{hint}; valid keys: {', '.join(valid)}")
    return out


# --------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class StoreInfo:
    """Schema of a pair store as read from its attributes (no rows are read)."""

    path: Path
    n_rows: int
    dim_x: int
    dim_y: int
    dtype: str
    chunk_rows: int
    has_groups: bool
    has_labels: bool

    @classmethod
    def from_store(cls, store) -> "StoreInfo":
        return cls(
            path=Path(store.path), n_rows=len(store), dim_x=store.dim_x, dim_y=store.dim_y, dtype=store.dtype,
            chunk_rows=store.chunk_rows, has_groups=store.has_groups,
            has_labels=bool(getattr(store, "has_labels", False)),
        )

    def describe(self) -> str:
        extras = [name for name, on in (("groups", self.has_groups), ("labels", self.has_labels)) if on]
        return (f"{self.path} ({self.n_rows:,} rows, x {self.dim_x} + y {self.dim_y} {self.dtype}"
                f"{', with ' + ' and '.join(extras) if extras else ''})")


@dataclass(frozen=True)
class DataSpec:
    """``[data]``: the training store, an optional evaluation store, and the use of groups.

    ``groups`` is None (use the store's groups when it has them), True (the store must
    have groups) or False (ignore them: one-to-one positives).
    """

    store: StoreInfo
    eval_store: StoreInfo | None = None
    groups: bool | None = None

    @property
    def use_groups(self) -> bool:
        return self.store.has_groups if self.groups is None else self.groups


@dataclass(frozen=True)
class ExecutorSpec:
    """``[executor]``: where the passes run."""

    kind: str = "local"
    address: str | None = None
    num_workers: int | None = None
    num_gpus_per_worker: float = 0

    def make(self):
        """The executor object (``ud.LocalExecutor()`` or ``ud.RayExecutor(...)``)."""
        import unicon_dist as ud

        if self.kind == "ray":
            cls = getattr(ud, "RayExecutor", None)
            if cls is None:
                raise ValueError('[executor] kind = "ray" is not available yet in this unicon_dist '
                                 '(no ud.RayExecutor); use kind = "local"')
            kwargs = {"address": self.address, "num_gpus_per_worker": self.num_gpus_per_worker}
            if self.num_workers is not None:
                kwargs["num_workers"] = self.num_workers
            return cls(**kwargs)
        cls = getattr(ud, "LocalExecutor", None)
        if cls is None:
            raise ValueError("out-of-core fitting is not available in this unicon_dist (no ud.LocalExecutor)")
        return cls()

    def describe(self) -> str:
        if self.kind == "local":
            return "local (in-process)"
        return (f"ray (address {self.address or 'local embedded cluster'}, "
                f"workers {self.num_workers if self.num_workers is not None else 'default'}, "
                f"{self.num_gpus_per_worker:g} GPU per worker)")


@dataclass(frozen=True)
class EvaluateSpec:
    """``[evaluate]``: options of :func:`unicon_dist.apps.evaluation.evaluate_store`."""

    ks: tuple[int, ...] = (1, 5, 10)
    max_rows: int = DEFAULT_MAX_ROWS
    seed: int = 0
    block_rows: int | None = None


@dataclass(frozen=True)
class OutputSpec:
    """``[output]``: the model file, the optional metrics JSON, and whether to replace them.

    ``checkpoint`` is the fit's checkpoint file (None: no checkpoints); it is replaced or
    continued freely, whatever ``overwrite`` says.
    """

    model: Path
    metrics: Path | None = None
    overwrite: bool = False
    checkpoint: Path | None = None

    def check_writable(self) -> None:
        """Raise if an output exists and ``overwrite`` is false (called again just before writing)."""
        for key, p in (("model", self.model), ("metrics", self.metrics)):
            if p is not None and p.exists() and not self.overwrite:
                raise FileExistsError(f"[output] {key}: {p} already exists; set overwrite = true to replace it")


@dataclass(frozen=True)
class Job:
    """A validated job file (see :func:`load_job`)."""

    path: Path
    data: DataSpec
    model_options: Mapping[str, Any] = field(hash=False)
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    output: OutputSpec | None = None
    raw: Mapping[str, Any] = field(repr=False, compare=False, hash=False, default_factory=dict)
    resume: bool = False

    def make_model(self, **overrides):
        """A fresh, unfitted :class:`~unicon_dist.UniCon` with the job's options."""
        from ..solver.estimator import UniCon

        return UniCon(**{**_model_kwargs(dict(self.model_options))[0], **overrides})

    def fit_kwargs(self) -> dict:
        """Keyword arguments of ``model.fit(store, ...)`` besides the executor."""
        kwargs = {"groups": False} if self.data.groups is False else {}
        if self.output is not None and self.output.checkpoint is not None:
            kwargs.update(checkpoint=str(self.output.checkpoint), resume=self.resume)
        return kwargs

    def checkpoint_state(self) -> str | None:
        """What the fit will do with the checkpoint, in words (None without one)."""
        p = None if self.output is None else self.output.checkpoint
        if p is None:
            return None
        if not p.exists():
            return "new file, written after every iteration" + ("; no checkpoint to resume from" if self.resume else "")
        if not self.resume:
            return "exists and will be replaced after the first iteration; pass --resume to continue from it"
        from ..io.checkpoints import read_checkpoint_header

        try:
            header = read_checkpoint_header(p)
        except (ValueError, FileNotFoundError) as exc:
            return f"unreadable: {exc}"
        if header["finished"]:
            return f"resumes a finished fit ({header['iteration']} iterations): restored, nothing refitted"
        return f"resumes after iteration {header['iteration']}"

    def describe(self) -> str:
        """The plan, as printed by ``unicon-dist solve``."""
        model = self.make_model()
        lines = [f"job {self.path}"]
        lines.append(f"  train store   {self.data.store.describe()}")
        groups = ("one-to-one pairs" if not self.data.use_groups else "many-to-many positives from the store's groups")
        lines.append(f"  positives     {groups}")
        if self.data.eval_store is not None:
            lines.append(f"  eval store    {self.data.eval_store.describe()}")
        lines.append(f"  model         {model!r}")
        budget = self.model_options.get("memory_budget")
        if budget is not None:
            lines.append(f"  memory budget {format_bytes(parse_bytes(budget))}")
        n = self.data.store.n_rows
        lines.append(f"  work          2 streamed passes over {n:,}² = {float(n) ** 2:.3g} similarities per "
                     f"iteration, at most {model.max_iter} iterations")
        lines.append(f"  executor      {self.executor.describe()}")
        if self.data.eval_store is not None:
            e = self.evaluate
            lines.append(f"  evaluate      R@{', R@'.join(map(str, e.ks))} on at most {e.max_rows:,} rows "
                         f"(seed {e.seed})")
        for key, p in (("model", self.output.model), ("metrics", self.output.metrics)):
            if p is not None:
                state = "replaces the existing file" if p.exists() else "new file"
                lines.append(f"  output {key:<8}{p} ({state})")
        if self.output.checkpoint is not None:
            lines.append(f"  checkpoint    {self.output.checkpoint} ({self.checkpoint_state()})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-serialisable summary (resolved paths, options as written)."""
        def store(info):
            return None if info is None else {
                "path": str(info.path), "n_rows": info.n_rows, "dim_x": info.dim_x, "dim_y": info.dim_y,
                "dtype": info.dtype, "has_groups": info.has_groups, "has_labels": info.has_labels,
            }
        return {
            "path": str(self.path),
            "data": {"store": store(self.data.store), "eval_store": store(self.data.eval_store),
                     "groups": self.data.groups},
            "model": json.loads(json.dumps(dict(self.model_options), default=str)),
            "executor": {"kind": self.executor.kind, "address": self.executor.address,
                         "num_workers": self.executor.num_workers,
                         "num_gpus_per_worker": self.executor.num_gpus_per_worker},
            "evaluate": {"ks": list(self.evaluate.ks), "max_rows": self.evaluate.max_rows,
                         "seed": self.evaluate.seed, "block_rows": self.evaluate.block_rows},
            "output": {"model": str(self.output.model),
                       "metrics": None if self.output.metrics is None else str(self.output.metrics),
                       "checkpoint": None if self.output.checkpoint is None else str(self.output.checkpoint),
                       "overwrite": self.output.overwrite},
            "resume": self.resume,
        }


# --------------------------------------------------------------------------- [model]
def _model_param_names() -> tuple[str, ...]:
    from ..solver.estimator import UniCon

    sig = inspect.signature(UniCon.__init__)
    return tuple(p for p in sig.parameters if p != "self")


# expected TOML types per UniCon option; options not listed here (added to UniCon later)
# go straight to UniCon's own validation
_STR, _INT, _NUM, _BOOL, _TABLE = "string", "integer", "number", "boolean", "table"
_MODEL_TYPES = {
    "rank": (_INT,), "kernel": (_STR, _TABLE), "kernel_x": (_STR, _TABLE), "kernel_y": (_STR, _TABLE),
    "n_landmarks": (_INT,), "landmarks": (_STR,), "eig_floor": (_NUM,), "loss": (_STR, _TABLE),
    "temperature": (_NUM,), "nu": (_NUM,), "rho": (_NUM,), "negatives": (_STR, _INT), "similarity": (_STR,),
    "factorization": (_STR,), "ridge": (_NUM,), "max_iter": (_INT,), "tol": (_NUM,), "svd": (_STR,),
    "center": (_BOOL,), "whiten": (_NUM, _BOOL), "loss_tol": (_NUM,), "damping": (_NUM,),
    "svd_oversampling": (_INT,), "svd_power_iter": (_INT,), "seed": (_INT,), "device": (_STR,),
    "dtype": (_STR,), "verify": (_STR, _INT), "memory_budget": (_INT, _STR), "verbose": (_BOOL,),
}
_CHECK = {
    _STR: lambda v: isinstance(v, str), _INT: _is_int, _NUM: _is_number,
    _BOOL: lambda v: isinstance(v, bool), _TABLE: lambda v: isinstance(v, dict),
}


def _model_kwargs(table: dict) -> tuple[dict, list[str]]:
    """UniCon keyword arguments from the ``[model]`` table, and the problems found."""
    from ..math.kernels import get_kernel
    from ..math.losses import get_loss
    from ..solver.estimator import UniCon

    errors = []
    valid = _model_param_names()
    errors += _unknown("model", table, valid)
    kwargs = {}
    for key, value in table.items():
        if key not in valid:
            continue
        types = _MODEL_TYPES.get(key)
        if types is not None and not any(_CHECK[t](value) for t in types):
            errors.append(f"[model] {key} must be {' or '.join(('a ' if t != _INT else 'an ') + t for t in types)}, "
                          f"got {value!r} ({_type_name(value)})")
            continue
        try:
            if key in ("kernel", "kernel_x", "kernel_y") and isinstance(value, dict):
                spec = dict(value)
                if not isinstance(spec.get("name"), str):
                    raise ValueError('needs a string key "name", e.g. {name = "rbf", bandwidth = 2.0}')
                value = get_kernel(spec.pop("name"), **spec)
            elif key in ("kernel", "kernel_x", "kernel_y"):
                get_kernel(value)
            elif key == "loss" and isinstance(value, dict):
                spec = dict(value)
                if not isinstance(spec.get("name"), str):
                    raise ValueError('needs a string key "name", e.g. {name = "sigmoid", bias = -10.0}')
                # the loss object carries τ and ν; a bad one is reported under its own key, so
                # the table is checked with the default instead of failing a second time here
                shared = {k: table[k] if k in table and _option_error(k, table[k]) is None else getattr(UniCon(), k)
                          for k in ("temperature", "nu")}
                value = get_loss(spec.pop("name"), **shared, **spec)
            elif key == "memory_budget":
                value = parse_bytes(value)
            elif key == "whiten" and isinstance(value, bool):
                if value:
                    raise ValueError("is a ridge > 0 (e.g. 1e-3), or false for no whitening")
                value = None  # TOML has no null
        except (ValueError, TypeError) as exc:
            errors.append(f"[model] {key}: {exc}")
            continue
        kwargs[key] = value
    return kwargs, errors


def _option_error(key: str, value) -> str | None:
    """UniCon's own validation of the one option ``key``, the others at their defaults."""
    from ..solver.estimator import UniCon

    try:
        UniCon(**{key: value}).validate_params()
    except (ValueError, TypeError) as exc:
        return f"[model] {exc}"
    return None


def _check_model(kwargs: dict) -> list[str]:
    """Construct UniCon and run its own parameter validation (no data involved).

    ``validate_params`` stops at its first problem, so when it fails each option is
    validated on its own (the others at their defaults, which are valid) to report every
    bad one.  An error that no option shows alone is a constraint between options (e.g. a
    temperature the chosen loss refuses) and is reported as the joint check gave it.
    """
    from ..solver.estimator import UniCon

    try:
        model = UniCon(**kwargs)
        _, kernels, _, _ = model.validate_params()
    except (ValueError, TypeError) as exc:
        alone = [e for e in (_option_error(k, v) for k, v in kwargs.items()) if e is not None]
        return alone or [f"[model] {exc}"]
    nystroem = model.n_landmarks is not None or any(k.name != "linear" for k in kernels)
    if nystroem and model.landmarks != "uniform":
        return [f"[model] landmarks = {model.landmarks!r} needs every row in memory; a job fits from a pair "
                "store, which supports landmarks = 'uniform'"]
    return []


def _feature_bound(kernel, n_landmarks, dim: int, n: int) -> tuple[int, str]:
    """An upper bound of one view's feature count m, and why."""
    from ..math.kernels import Linear, get_kernel

    k = get_kernel(kernel)
    if isinstance(k, Linear):
        if n_landmarks is None:
            return dim, f"the store's dimension {dim} (linear kernel)"
        return min(dim, n_landmarks), f"min(dimension {dim}, n_landmarks {n_landmarks})"
    if n_landmarks is None:
        m = min(n, _DEFAULT_LANDMARKS)
        return m, f"the default {m} Nyström landmarks"
    return n_landmarks, f"n_landmarks {n_landmarks}"


# --------------------------------------------------------------------------- loading
def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return Path(os.path.abspath(p if p.is_absolute() else base / p))  # normalises "..", keeps symlinks


def _open_store(table: str, key: str, path: Path, errors: list[str]) -> StoreInfo | None:
    from ..data.store import PairStore

    if not path.exists():
        errors.append(f"[{table}] {key}: no pair store at {path}")
        return None
    try:
        store = PairStore.open(path, mode="r")
    except (ValueError, FileNotFoundError, OSError) as exc:
        errors.append(f"[{table}] {key}: {exc}")
        return None
    info = StoreInfo.from_store(store)
    if info.n_rows < 2:
        errors.append(f"[{table}] {key}: pair store {path} has {info.n_rows} rows; at least 2 pairs are needed")
    return info


def _check_output_path(key: str, path: Path, suffix: str, overwrite: bool, errors: list[str]) -> None:
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
    if not path.is_file():
        raise FileNotFoundError(f"no such job file: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise JobError(path, [f"invalid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise JobError(path, [f"not UTF-8 text: {exc}"]) from None
    base = path.resolve().parent
    errors: list[str] = []

    tables = split_tables(raw, _TABLES, errors)
    for required in ("data", "output"):
        if required not in raw:
            errors.append(f"missing table [{required}]")

    # [data], paths only
    data = tables["data"]
    errors += _unknown("data", data, _DATA_KEYS)
    store_path = eval_path = None
    for key in ("store", "eval_store"):
        if key in data:
            if isinstance(data[key], str) and data[key]:
                p = _resolve(base, data[key])
                store_path, eval_path = (p, eval_path) if key == "store" else (store_path, p)
            else:
                errors.append(f"[data] {key} must be a path string, got {data[key]!r} ({_type_name(data[key])})")
    if "store" not in data and "data" in raw:
        errors.append('[data] store is required (the path of the training pair store, e.g. store = "train.zarr")')
    groups = data.get("groups")
    if groups is not None and not isinstance(groups, bool):
        errors.append(f"[data] groups must be true or false, got {groups!r} ({_type_name(groups)})")
        groups = None

    # [model]
    kwargs, model_errors = _model_kwargs(tables["model"])
    model_errors += _check_model(kwargs)  # the well-typed options, even when others are not
    errors += model_errors
    model_ok = not model_errors

    # [executor]
    ex = tables["executor"]
    errors += _unknown("executor", ex, _EXECUTOR_KEYS)
    kind = ex.get("kind", "local")
    executor = None
    if kind not in _EXECUTOR_KINDS:
        errors.append(f"[executor] kind must be one of {', '.join(map(repr, _EXECUTOR_KINDS))}, got {kind!r}")
    elif kind == "local":
        extra = [k for k in _RAY_KEYS if k in ex]
        errors += [f'[executor] {k} applies to kind = "ray" only' for k in extra]
        executor = ExecutorSpec()
    else:
        import unicon_dist as ud

        ex_errors = []
        if getattr(ud, "RayExecutor", None) is None:
            ex_errors.append('[executor] kind = "ray" is not available yet in this unicon_dist (no ud.RayExecutor); '
                             'use kind = "local"')
        address = ex.get("address")
        if address is not None and not (isinstance(address, str) and address):
            ex_errors.append('[executor] address must be a string such as "ray://head:10001" or "auto", '
                             f"got {address!r}")
        workers = ex.get("num_workers")
        if workers is not None and not (_is_int(workers) and workers >= 1):
            ex_errors.append(f"[executor] num_workers must be an integer >= 1, got {workers!r}")
        gpus = ex.get("num_gpus_per_worker", 0)
        if not (_is_number(gpus) and math.isfinite(gpus) and gpus >= 0):
            ex_errors.append(f"[executor] num_gpus_per_worker must be a number >= 0, got {gpus!r}")
        errors += ex_errors
        if not ex_errors:
            executor = ExecutorSpec("ray", address, workers, gpus)

    device = kwargs.get("device")
    if model_ok and kind == "local" and isinstance(device, str) and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            errors.append(f"[model] device = {device!r} but no CUDA device is visible to this process "
                          '(the local executor runs here); use device = "cpu"')

    # [evaluate]
    ev = tables["evaluate"]
    errors += _unknown("evaluate", ev, _EVALUATE_KEYS)
    ks = ev.get("ks", [1, 5, 10])
    if not (isinstance(ks, list) and ks and all(_is_int(k) and k >= 1 for k in ks)):
        errors.append(f"[evaluate] ks must be a non-empty array of integers >= 1, got {ks!r}")
        ks = [1, 5, 10]
    max_rows = ev.get("max_rows", DEFAULT_MAX_ROWS)
    if not (_is_int(max_rows) and max_rows >= 2):
        errors.append(f"[evaluate] max_rows must be an integer >= 2, got {max_rows!r}")
        max_rows = DEFAULT_MAX_ROWS
    seed = ev.get("seed", 0)
    if not (_is_int(seed) and seed >= 0):
        errors.append(f"[evaluate] seed must be an integer >= 0, got {seed!r}")
        seed = 0
    block_rows = ev.get("block_rows")
    if block_rows is not None and not (_is_int(block_rows) and block_rows >= 1):
        errors.append(f"[evaluate] block_rows must be an integer >= 1, got {block_rows!r}")
        block_rows = None
    evaluate = EvaluateSpec(tuple(sorted(set(ks))), max_rows, seed, block_rows)

    # [output], static part
    out = tables["output"]
    errors += _unknown("output", out, _OUTPUT_KEYS)
    overwrite = out.get("overwrite", False)
    if not isinstance(overwrite, bool):
        errors.append(f"[output] overwrite must be true or false, got {overwrite!r} ({_type_name(overwrite)})")
        overwrite = False
    out_paths = {}
    for key in ("model", "metrics", "checkpoint"):
        if key in out:
            if isinstance(out[key], str) and out[key]:
                out_paths[key] = _resolve(base, out[key])
            else:
                errors.append(f"[output] {key} must be a path string, got {out[key]!r} ({_type_name(out[key])})")
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
    train = _open_store("data", "store", store_path, errors) if store_path is not None else None
    test = _open_store("data", "eval_store", eval_path, errors) if eval_path is not None else None
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
            errors += _check_model_against_store(kwargs, train)
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
    from ..io.checkpoints import check_fingerprint, read_checkpoint_header, store_fingerprint
    from ..solver.estimator import UniCon

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
    try:
        p.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _check_model_against_store(kwargs: dict, info: StoreInfo) -> list[str]:
    """The bounds that need both the options and the store's schema."""
    from ..solver.estimator import UniCon

    defaults = UniCon()
    opt = {k: kwargs.get(k, getattr(defaults, k)) for k in ("rank", "kernel", "kernel_x", "kernel_y", "n_landmarks")}
    errors = []
    n_landmarks = opt["n_landmarks"]
    if n_landmarks is not None and n_landmarks > info.n_rows:
        errors.append(f"[model] n_landmarks = {n_landmarks} exceeds the {info.n_rows} rows of the store {info.path}")
        return errors
    bounds = []
    for side, dim in (("x", info.dim_x), ("y", info.dim_y)):
        kernel = opt[f"kernel_{side}"] if opt[f"kernel_{side}"] is not None else opt["kernel"]
        m, why = _feature_bound(kernel, n_landmarks, dim, info.n_rows)
        bounds.append((m, side, why))
    m, side, why = min(bounds)
    if opt["rank"] > m:
        errors.append(f"[model] rank = {opt['rank']} exceeds the {m} features of view {side}: {why}")
    return errors


# --------------------------------------------------------------------------- running
METRICS_FORMAT = "unicon_dist.metrics/1"


def run_job(job: Job, *, echo=print, validate_seconds: float | None = None) -> dict:
    """Fit, save and evaluate a validated job; returns the metrics record.

    Steps: build the model and the executor; ``model.fit(store, executor=...)`` (the
    store's groups unless ``[data] groups = false``; with a checkpoint, written after
    every iteration and, for a job loaded with ``resume=True``, continued from when it
    exists); write the model atomically with
    ``model.save``; evaluate it on ``[data] eval_store`` when given; write the metrics
    JSON (atomically) when ``[output] metrics`` is given.  The model is written before
    the evaluation starts, so a failing evaluation loses nothing.

    Parameters
    ----------
    job : Job
        From :func:`load_job`.
    echo : callable
        Receives one human-readable line per step (``print`` by default).
    validate_seconds : float, optional
        Time spent in :func:`load_job`, recorded in the timings.

    Returns
    -------
    dict
        ``format``, ``version``, ``job`` (:meth:`Job.to_dict`), ``started``/``finished``
        (UTC ISO times), ``fit`` (n_iter, converged, best_iteration, loss,
        initial_loss, svd_solver, feature counts), ``history`` (``model.history_``),
        ``diagnostics`` (``model.diagnostics_``),
        ``timings`` (seconds: validate, fit, save, evaluate, total), ``evaluation``
        (:func:`unicon_dist.apps.evaluation.evaluate_store` output or None), ``model_file``,
        ``checkpoint`` (None, or its ``path`` and ``resumed_after_iteration``: the
        checkpoint's iteration when the fit resumed from one, else None).
    """
    import time
    from datetime import datetime, timezone

    from ..version import __version__

    t_start = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat()
    timings = {"validate": validate_seconds}
    verbose = {} if "verbose" in job.model_options else {"verbose": True}
    model = job.make_model(**verbose)
    executor = job.executor.make()
    checkpoint = None
    if job.output.checkpoint is not None:
        checkpoint = {"path": str(job.output.checkpoint), "resumed_after_iteration": None}
        if job.resume and job.output.checkpoint.exists():
            from ..io.checkpoints import read_checkpoint_header

            header = read_checkpoint_header(job.output.checkpoint)
            checkpoint["resumed_after_iteration"] = header["iteration"]
            state = "a finished fit" if header["finished"] else f"after iteration {header['iteration']}"
            echo(f"resuming from checkpoint {job.output.checkpoint} ({state})")
        elif job.resume:
            echo(f"no checkpoint at {job.output.checkpoint}; fitting from scratch")
    echo(f"fitting on {job.data.store.path} ({job.data.store.n_rows:,} pairs) ...")
    if checkpoint is not None:
        echo(f"  checkpoint after every iteration: {job.output.checkpoint}")
    t0 = time.perf_counter()
    try:
        model.fit(str(job.data.store.path), executor=executor, **job.fit_kwargs())
    finally:
        shutdown = getattr(executor, "shutdown", None)
        if shutdown is not None:  # Ray actors (and an embedded Ray) end with the fit
            shutdown()
    timings["fit"] = time.perf_counter() - t0
    for h in model.history_:
        echo(f"  iteration {h['iteration']:>3}  loss {h['loss']:.5f}  objective {h['objective']:.5f}  "
             f"delta_w {h['delta_w']:.2e}  gap {_num(h.get('spectral_gap'))}  "
             f"residual {_num(h.get('input_residual'))}  {h['seconds']:.2f}s")
    kept = "the fixed point" if model.converged_ else (
        "lowest loss" if model.similarity == "cosine" else "lowest objective")
    echo(f"  stopped ({model.stop_reason_}) after {model.n_iter_} iterations in {timings['fit']:.1f}s; "
         f"kept iteration {model.best_iteration_} ({kept})")
    for line in format_diagnostics(model.diagnostics_):
        echo(f"  {line}")

    job.output.check_writable()
    t0 = time.perf_counter()
    model.save(job.output.model)
    timings["save"] = time.perf_counter() - t0
    echo(f"model written to {job.output.model}")

    evaluation = None
    if job.data.eval_store is not None:
        from .evaluation import evaluate_store

        echo(f"evaluating on {job.data.eval_store.path} ...")
        t0 = time.perf_counter()
        e = job.evaluate
        evaluation = evaluate_store(model, job.data.eval_store.path, ks=e.ks, block_rows=e.block_rows,
                                    max_rows=e.max_rows, seed=e.seed)
        timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start + (validate_seconds or 0.0)
    record = {
        "format": METRICS_FORMAT,
        "version": __version__,
        "job": job.to_dict(),
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(),
        "fit": {
            "n_iter": model.n_iter_, "converged": model.converged_, "best_iteration": model.best_iteration_,
            "loss": model.loss_, "initial_loss": model.initial_loss_, "svd_solver": model.svd_solver_,
            "n_features_x": model.n_features_x_, "n_features_y": model.n_features_y_,
        },
        "history": model.history_,
        "diagnostics": model.diagnostics_,
        "timings": timings,
        "evaluation": evaluation,
        "model_file": str(job.output.model),
        "checkpoint": checkpoint,
    }
    if job.output.metrics is not None:
        atomic_write_text(job.output.metrics, json.dumps(record, indent=2) + "\n")
        echo(f"metrics written to {job.output.metrics}")
    return record
