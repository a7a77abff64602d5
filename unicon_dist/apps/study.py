"""Parameter studies: a resumable grid of independent UniCon solves, one TOML file.

A grid file names the data, the fixed UniCon options, the options to vary and where the
results go::

    [data]
    train = "train.zarr"     # a pair store; relative paths resolve against the grid file's folder
    test = "test.zarr"       # optional: retrieval metrics of every solve
    eval_rows = 2000         # optional: at most this many test rows (a seeded subset)

    [study]
    output = "study-out"     # runs/<id>.json, study.json, results.csv, results.parquet, plots/*.png
    executor = "local"       # or "ray": each grid point a Ray task
    ray_address = "auto"     # ray only, optional: an existing cluster (default: an embedded local Ray)
    cpus_per_task = 1        # ray only
    plots = true

    [model]                  # UniCon options shared by every solve
    rank = 16

    [grid]                   # each value a non-empty array; the points are the Cartesian product
    temperature = [0.05, 0.1]
    n = [1000, 2000]         # the first n rows of the train store, fitted in memory
    storage_dtype = ["float32", "bfloat16"]
    dtype = ["float32", "float64"]

``n`` and ``storage_dtype`` are the study's own keys (in ``[grid]`` only); every other key
of ``[model]`` and ``[grid]`` is a UniCon option, checked as in a job file
(:func:`unicon_dist.apps.jobs.load_job`).  Without ``n`` a point fits the whole store out of
core (``model.fit(store)``); ``storage_dtype`` (float64, float32, float16 or bfloat16)
rounds the rows read into memory, train and test, to that precision before the fit (it
needs ``n``).

:func:`load_study` validates everything before any solve and reports every problem at
once.  :func:`run_study` solves the points that have no finished result yet (locally one
after another, or as Ray tasks), writes each result to ``runs/<id>.json`` as it arrives
and rewrites the tidy table (``results.csv``, ``results.parquet``) after every point, and
draws the plots at the end.  A point's id is a hash of its options, so a re-run skips the
finished points whatever the order of the grid, and a grown grid only solves the new ones.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import socket
import time
import tomllib
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from .jobs import (
    JobError, StoreInfo, _check_model, _check_model_against_store, _is_int, _is_number, _model_kwargs,
    _model_param_names, _open_store, _resolve, _type_name, _unknown, atomic_write_text, split_tables,
)
from ..io.artifacts import atomic_write

__all__ = [
    "Study", "StudyError", "Point", "load_study", "run_study", "run_point", "round_to_storage", "flatten_record",
    "STORAGE_DTYPES",
]

FORMAT = "unicon_dist.study/1"
STORAGE_DTYPES = ("float64", "float32", "float16", "bfloat16")
_TABLES = ("data", "study", "model", "grid")
_DATA_KEYS = ("train", "test", "eval_rows")
_STUDY_KEYS = ("output", "executor", "ray_address", "cpus_per_task", "plots")
_EXECUTORS = ("local", "ray")
_STUDY_ONLY = ("n", "storage_dtype")  # grid keys that are not UniCon options
_RECORD_FILE = "study.json"
_INSTALL = "pip install unicon_dist[study]"
# leading columns of the tidy table; the rest follow in first-seen order
_LEAD = ("id", "status", "error")
_NOT_IN_TABLE = ("history", "traceback")


class StudyError(JobError):
    """A grid file that cannot be run; ``errors`` lists every problem, one line each."""


# --------------------------------------------------------------------------- points
def point_id(options: Mapping[str, Any]) -> str:
    """A point's id: the first 12 hex digits of the SHA-256 of its canonical JSON (sorted keys).

    ``options`` are the UniCon options as written (fixed and varied) plus ``n`` and
    ``storage_dtype`` where given; the order of keys, of grid values and of points does
    not change the id.
    """
    text = json.dumps(dict(options), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Point:
    """One grid point: the UniCon options (as written) and the study's own keys."""

    id: str
    options: Mapping[str, Any] = field(hash=False)
    n: int | None = None
    storage_dtype: str | None = None
    label: str = ""  # the varying grid values, "temperature=0.05 n=2000"

    def key(self) -> dict:
        """What the id hashes: the options plus ``n`` and ``storage_dtype`` where given."""
        extra = {k: v for k, v in (("n", self.n), ("storage_dtype", self.storage_dtype)) if v is not None}
        return {**self.options, **extra}


# --------------------------------------------------------------------------- the study
@dataclass(frozen=True)
class Study:
    """A validated grid file (see :func:`load_study`)."""

    path: Path
    train: StoreInfo
    test: StoreInfo | None
    eval_rows: int | None
    output: Path
    executor: str
    ray_address: str | None
    cpus_per_task: float
    plots: bool
    model: Mapping[str, Any] = field(hash=False)
    grid: Mapping[str, tuple] = field(hash=False)
    points: tuple[Point, ...] = ()

    @property
    def runs(self) -> Path:
        return self.output / "runs"

    def varying(self) -> list[str]:
        """The grid keys with more than one value, in file order."""
        return [k for k, values in self.grid.items() if len(values) > 1]

    def record(self) -> dict:
        """What ``study.json`` holds: the data and the fixed options a re-run must keep."""
        def store(info):
            return None if info is None else {"path": str(info.path), "n_rows": info.n_rows}
        return {"format": FORMAT, "data": {"train": store(self.train), "test": store(self.test),
                                           "eval_rows": self.eval_rows},
                "model": _jsonable(dict(self.model)), "grid": _jsonable({k: list(v) for k, v in self.grid.items()})}

    def columns(self) -> dict[str, str]:
        """Each grid key's column in the table (``options.<key>``, or ``n`` and ``storage_dtype``)."""
        return {k: k if k in _STUDY_ONLY else f"options.{k}" for k in self.grid}

    def finished(self) -> set[str]:
        """Ids of the points whose result file exists with status "ok"."""
        return {p.id for p in self.points if (_read_run(self.runs / f"{p.id}.json") or {}).get("status") == "ok"}

    def spec(self, point: Point) -> dict:
        """The plain dict :func:`run_point` takes (store paths, not handles: workers reopen them)."""
        return {"id": point.id, "label": point.label, "options": dict(point.options), "n": point.n,
                "storage_dtype": point.storage_dtype, "train": str(self.train.path),
                "test": None if self.test is None else str(self.test.path), "eval_rows": self.eval_rows}

    def describe(self) -> str:
        """The plan, as printed by ``unicon-dist study``."""
        lines = [f"study {self.path}", f"  train store   {self.train.describe()}"]
        if self.test is not None:
            cap = "" if self.eval_rows is None else f" (at most {self.eval_rows:,} rows evaluated)"
            lines.append(f"  test store    {self.test.describe()}{cap}")
        lines.append(f"  fixed         {', '.join(f'{k}={_show(v)}' for k, v in self.model.items()) or '(defaults)'}")
        sizes = " x ".join(f"{k} ({len(v)})" for k, v in self.grid.items()) or "(no [grid]: one point)"
        lines.append(f"  grid          {sizes} = {len(self.points)} points")
        where = "local (one after another)" if self.executor == "local" else (
            f"ray ({self.ray_address or 'embedded local Ray'}, {self.cpus_per_task:g} CPU per task)")
        lines.append(f"  executor      {where}")
        done = len(self.finished()) if self.output.is_dir() else 0
        state = f"{done} of {len(self.points)} points finished" if self.output.is_dir() else "new folder"
        lines.append(f"  output        {self.output} ({state})")
        return "\n".join(lines)


def _jsonable(obj):
    """``obj`` with numpy and torch values turned into JSON types (dicts and lists kept)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    tolist = getattr(obj, "tolist", None)  # a torch tensor
    return tolist() if callable(tolist) else str(obj)


def _read_run(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- loading
def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no such grid file: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(path, [f"invalid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise StudyError(path, [f"not UTF-8 text: {exc}"]) from None


def _check_data(data: dict, base: Path, errors: list[str]):
    errors += _unknown("data", data, _DATA_KEYS)
    infos = {}
    for key in ("train", "test"):
        if key not in data:
            continue
        if isinstance(data[key], str) and data[key]:
            infos[key] = _open_store("data", key, _resolve(base, data[key]), errors)
        else:
            errors.append(f"[data] {key} must be a path string, got {data[key]!r} ({_type_name(data[key])})")
    if "train" not in data:
        errors.append('[data] train is required (the training pair store, e.g. train = "train.zarr")')
    eval_rows = data.get("eval_rows")
    if eval_rows is not None and not (_is_int(eval_rows) and eval_rows >= 2):
        errors.append(f"[data] eval_rows must be an integer >= 2, got {eval_rows!r}")
        eval_rows = None
    if "eval_rows" in data and "test" not in data:
        errors.append("[data] eval_rows applies only with a test store ([data] test)")
    train, test = infos.get("train"), infos.get("test")
    if train is not None and test is not None and (test.dim_x, test.dim_y) != (train.dim_x, train.dim_y):
        errors.append(f"[data] test has dims (x {test.dim_x}, y {test.dim_y}) but train has "
                      f"(x {train.dim_x}, y {train.dim_y})")
    return train, test, eval_rows


def _check_study(table: dict, base: Path, errors: list[str]) -> dict:
    errors += _unknown("study", table, _STUDY_KEYS)
    out = {"output": None, "executor": table.get("executor", "local"), "ray_address": table.get("ray_address"),
           "cpus_per_task": table.get("cpus_per_task", 1), "plots": table.get("plots", True)}
    output = table.get("output")
    if isinstance(output, str) and output:
        out["output"] = _resolve(base, output)
    else:
        errors.append('[study] output is required: the results folder, e.g. output = "study-out"' if output is None
                      else f"[study] output must be a path string, got {output!r} ({_type_name(output)})")
    if out["executor"] not in _EXECUTORS:
        errors.append(f"[study] executor must be one of {', '.join(map(repr, _EXECUTORS))}, got {out['executor']!r}")
    if out["executor"] == "local":
        errors += [f'[study] {k} applies to executor = "ray" only' for k in ("ray_address", "cpus_per_task")
                   if k in table]
    address = out["ray_address"]
    if address is not None and not (isinstance(address, str) and address):
        errors.append(f'[study] ray_address must be a string such as "auto" or "ray://head:10001", got {address!r}')
    cpus = out["cpus_per_task"]
    if not (_is_number(cpus) and math.isfinite(cpus) and cpus > 0):
        errors.append(f"[study] cpus_per_task must be a number > 0, got {cpus!r}")
    if not isinstance(out["plots"], bool):
        errors.append(f"[study] plots must be true or false, got {out['plots']!r} ({_type_name(out['plots'])})")
    return out


def _check_grid(grid: dict, model: dict, train: StoreInfo | None, errors: list[str]) -> dict[str, tuple]:
    """Shape and per-value types of ``[grid]``; the well-formed keys with their values."""
    valid = _model_param_names() + _STUDY_ONLY
    errors += _unknown("grid", grid, valid)
    errors += [f"[model] {k} is a study key: give it in [grid] ({k} = [...], one value to fix it)"
               for k in _STUDY_ONLY if k in model]
    good = {}
    for key, values in grid.items():
        if key not in valid:
            continue
        if key in model:
            errors.append(f"[grid] {key} is also in [model]; give each option in one table only")
            continue
        if not isinstance(values, list) or not values:
            errors.append(f"[grid] {key} must be a non-empty array of values, e.g. {key} = [..., ...]; "
                          f"got {values!r} ({_type_name(values)})")
            continue
        shown = [_show(v) for v in values]
        twice = sorted({s for s in shown if shown.count(s) > 1})
        if twice:
            errors.append(f"[grid] {key} lists {', '.join(twice)} more than once")
            continue
        value_errors = []
        for v in values:
            if key == "n":
                if not (_is_int(v) and v >= 2):
                    value_errors.append(f"[grid] n must be integers >= 2 (rows of the train store), got {v!r}")
                elif train is not None and v > train.n_rows:
                    value_errors.append(f"[grid] n = {v} exceeds the {train.n_rows:,} rows of the train store "
                                        f"{train.path}")
            elif key == "storage_dtype":
                if v not in STORAGE_DTYPES:
                    value_errors.append(f"[grid] storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, "
                                        f"got {v!r}")
            else:  # the option's TOML type and form, as in a job file
                value_errors += [f"[grid]{e[len('[model]'):]}" for e in _model_kwargs({key: v})[1]]
        errors += value_errors
        if not value_errors:
            good[key] = tuple(values)
    if "storage_dtype" in grid and "n" not in grid:
        errors.append("[grid] storage_dtype rounds rows read into memory and needs n (the rows fitted); "
                      "without n the whole store is fitted out of core, as stored")
    return good


def _point_problems(kwargs: dict, n: int | None, train: StoreInfo | None) -> list[str]:
    """UniCon's own checks of one point's options, and the bounds that need the rows."""
    from ..solver.estimator import UniCon

    if n is None:  # fitted from the store: the job-file rules (landmarks = "uniform" only)
        problems = _check_model(kwargs)
    else:
        try:
            UniCon(**kwargs).validate_params()
            problems = []
        except (ValueError, TypeError) as exc:
            problems = [f"[model] {exc}"]
    if not problems and train is not None:
        problems = _check_model_against_store(kwargs, replace(train, n_rows=n or train.n_rows))
    device = kwargs.get("device")
    if not problems and isinstance(device, str) and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems = [f"[model] device = {device!r} but no CUDA device is visible to this process"]
    return [p.removeprefix("[model] ") for p in problems]


def _build_points(model: dict, grid: dict[str, tuple], train: StoreInfo | None, errors: list[str]) -> list[Point]:
    """The Cartesian product of ``grid`` over the fixed ``model``, each point validated."""
    varying = [k for k, v in grid.items() if len(v) > 1]
    points, problems = [], {}
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        options = {**{k: v for k, v in values.items() if k not in _STUDY_ONLY}, **model}
        n, storage = values.get("n"), values.get("storage_dtype")
        label = " ".join(f"{k}={_show(values[k])}" for k in varying) or "(single point)"
        point = Point("", MappingProxyType(options), n, storage, label)
        point = replace(point, id=point_id(point.key()))
        points.append(point)
        kwargs, kwarg_errors = _model_kwargs(dict(options))
        found = [e.removeprefix("[model] ") for e in kwarg_errors] or _point_problems(kwargs, n, train)
        for msg in found:
            problems.setdefault(msg, []).append(label)
    for msg, labels in problems.items():
        table = "[grid]" if any(re.search(rf"\b{re.escape(k)}\b", msg) for k in grid) else "[model]"
        where = "" if len(labels) == len(points) else f" (at {len(labels)} of {len(points)} points, e.g. {labels[0]})"
        errors.append(f"{table} {msg}{where}")
    return points


def _check_output(output: Path, record: dict | None, stores, errors: list[str]) -> None:
    """The output folder: creatable, not inside a store, and, when it holds a study, this one."""
    for info in stores:
        if info is not None and (output == info.path or info.path in output.parents):
            errors.append(f"[study] output: {output} lies inside the pair store {info.path}")
    if output.exists() and not output.is_dir():
        errors.append(f"[study] output: {output} exists and is not a folder")
        return
    if not output.exists():
        parent = output.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
            errors.append(f"[study] output: cannot create {output}: {parent} is not a writable folder")
        return
    saved_path = output / _RECORD_FILE
    if not saved_path.is_file():
        if any(output.iterdir()):
            errors.append(f"[study] output: {output} is a folder that holds no {_RECORD_FILE}; it is not a study's "
                          "output, so nothing is written there (name a new or empty folder)")
        return
    saved = _read_run(saved_path)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        errors.append(f"[study] output: {saved_path} is not a {FORMAT} record")
        return
    if record is None:
        return
    for table in ("data", "model"):
        if saved.get(table) != record[table]:
            old, new = saved.get(table) or {}, record[table]
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            changes = "; ".join(f"{k}: {_show(old.get(k))} -> {_show(new.get(k))}" for k in keys)
            errors.append(f"[{table}] differs from the study already in {output} ({changes}); its results would "
                          f"not be comparable: restore [{table}] or name another [study] output "
                          "(only [grid] may change between runs)")


def load_study(path) -> Study:
    """Read and fully validate a grid file; nothing is solved or written.

    Parameters
    ----------
    path : str or Path
        The grid file (TOML).  Relative paths inside it resolve against its folder.

    Returns
    -------
    Study

    Raises
    ------
    FileNotFoundError
        No such grid file.
    StudyError
        (a :class:`~unicon_dist.apps.jobs.JobError`, so a ValueError) Every problem found, one
        line each, naming the file, the table and the key:
        ``"grid.toml: [grid] n = 5000 exceeds the 1,000 rows of the train store ..."``.

    Notes
    -----
    Checked: the tables and keys (unknown keys with the valid ones, types); each
    ``[grid]`` value (a non-empty array without repeats; each element's type as an
    option in a job file); no key in both ``[model]`` and ``[grid]``; the stores (opened
    read-only, schema only); ``2 <= n <=`` the train store's rows; every point's UniCon
    options through ``UniCon(**options).validate_params()`` and rank against the
    feature count; the executor; and the output folder: when it already holds a study,
    its ``[data]`` and ``[model]`` must be this file's.
    """
    path = Path(path)
    raw = _read_toml(path)
    base = path.resolve().parent
    errors: list[str] = []
    tables = split_tables(raw, _TABLES, errors)
    errors += [f"missing table [{t}]" for t in ("data", "study") if t not in raw]

    train, test, eval_rows = _check_data(tables["data"], base, errors)
    settings = _check_study(tables["study"], base, errors)
    model = tables["model"]
    n_errors = len(errors)
    errors += _model_kwargs({k: v for k, v in model.items() if k not in _STUDY_ONLY})[1]
    grid = _check_grid(tables["grid"], model, train, errors)
    points = _build_points(model, grid, train, errors) if len(errors) == n_errors else []
    if settings["executor"] == "ray" and any(str(p.options.get("device", "cpu")).startswith("cuda") for p in points):
        errors.append('[study] executor = "ray" runs each point on CPUs only; device = "cuda" needs executor = "local"')
    study = None
    if not errors:
        study = Study(path=path, train=train, test=test, eval_rows=eval_rows, output=settings["output"],
                      executor=settings["executor"], ray_address=settings["ray_address"],
                      cpus_per_task=settings["cpus_per_task"], plots=settings["plots"],
                      model=MappingProxyType(dict(model)), grid=MappingProxyType(grid), points=tuple(points))
    if settings["output"] is not None:
        _check_output(settings["output"], None if study is None else study.record(), (train, test), errors)
    if errors:
        raise StudyError(path, errors)
    return study


# --------------------------------------------------------------------------- one point
def round_to_storage(a, storage_dtype: str | None) -> np.ndarray:
    """``a`` rounded to ``storage_dtype`` (what storing it in that precision keeps).

    float16 and bfloat16 values are returned as float32 (which holds them exactly),
    float32 as float32 and float64 as float64; None returns ``a`` unchanged.  The rounding
    is torch's cast (round to nearest even; values beyond float16's range become inf).
    """
    if storage_dtype is None:
        return a
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
    from ..data.store import cast_to_storage  # what a pair store of that dtype would return

    out = cast_to_storage(np.asarray(a), storage_dtype)
    return out.astype(np.float32) if out.dtype == np.float16 else out


def _peak_rss_mib(reset: bool = False) -> float | None:
    """This process's peak RSS since the last reset (Linux VmHWM), in MiB; ``reset`` starts it afresh."""
    if reset:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass
        return None
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _evaluate(model, spec: dict) -> dict:
    """Retrieval on the test store, its inputs rounded like the training rows; the model's numbers only."""
    from .evaluation import BASELINE, LABEL_EMBEDDINGS, _subset, evaluate_arrays, evaluate_store
    from ..data.store import PairStore

    storage = spec["storage_dtype"]
    if storage is None:
        ev = evaluate_store(model, spec["test"], max_rows=spec["eval_rows"], baseline=False)
    else:  # the rows evaluate_store would take, rounded
        store = PairStore.open(spec["test"], mode="r")
        subset = _subset(len(store), spec["eval_rows"] or len(store), 0)
        rows = slice(None) if subset is None else subset
        x, y, groups = store.read(rows)
        labels = store.read_labels(rows) if store.has_labels else None
        emb = store.get_array(LABEL_EMBEDDINGS) if labels is not None and LABEL_EMBEDDINGS in store.array_names() \
            else None
        ev = evaluate_arrays(model, round_to_storage(x, storage), round_to_storage(y, storage), labels=labels,
                             groups=groups, label_embeddings=None if emb is None else round_to_storage(emb, storage),
                             label_names=store.label_names if labels is not None else None, max_rows=len(x),
                             baseline=False)
    name = next(m for m in ev["methods"] if m != BASELINE)
    out = {"evaluated_rows": ev["evaluated_rows"]}
    out.update({kind: per_method[name] for kind, per_method in ev["retrieval"].items()})
    inst = out["instance"]
    out["R@1"] = (inst["x2y_R@1"] + inst["y2x_R@1"]) / 2
    if "classification" in ev:
        c = ev["classification"]
        out["classification"] = {"kind": c["kind"], **c["accuracy"][name]}
    return out


def run_point(spec: dict) -> dict:
    """Solve one grid point; never raises for a failing solve (its record says "error").

    Parameters
    ----------
    spec : dict
        From :meth:`Study.spec`: ``id``, ``options`` (UniCon options as written),
        ``n``, ``storage_dtype``, ``train`` and ``test`` (store paths), ``eval_rows``.

    Returns
    -------
    dict
        The run record: ``id``, ``status`` ("ok" or "error", then ``error`` =
        "ExceptionType: message" and ``traceback``), ``options``, ``n``,
        ``storage_dtype``, ``seconds`` (the fit's wall time), ``read_seconds``,
        ``n_iter``, ``stop_reason``, ``converged``, ``best_iteration``, ``loss``,
        ``initial_loss``, ``peak_rss_mib`` (the process's peak during the fit),
        ``retrieval`` (with a test store: R@k per kind of retrieval, mean ``R@1`` of
        both directions, ``classification`` accuracy where the store has labels) and
        ``eval_seconds``, ``diagnostics`` (``model.diagnostics_`` where the model has
        it, else None), ``history`` (``model.history_``), ``host``, ``pid``,
        ``finished`` (UTC ISO time), ``version``.
    """
    from ..version import __version__
    from ..solver.estimator import UniCon
    from ..data.store import PairStore

    record = {"id": spec["id"], "status": "error", "options": dict(spec["options"]), "n": spec["n"],
              "storage_dtype": spec["storage_dtype"]}
    try:
        kwargs, errors = _model_kwargs(dict(spec["options"]))
        if errors:
            raise ValueError("; ".join(errors))
        model = UniCon(**kwargs)
        t0 = time.perf_counter()
        store = PairStore.open(spec["train"], mode="r")
        if spec["n"] is None:
            data = (store,)
        else:
            x, y, groups = store.read(slice(0, spec["n"]))
            data = (round_to_storage(x, spec["storage_dtype"]), round_to_storage(y, spec["storage_dtype"]), groups)
        record["read_seconds"] = time.perf_counter() - t0
        _peak_rss_mib(reset=True)
        t0 = time.perf_counter()
        model.fit(*data)
        record["seconds"] = time.perf_counter() - t0
        record["peak_rss_mib"] = _peak_rss_mib()
        record.update(n_iter=model.n_iter_, stop_reason=model.stop_reason_, converged=bool(model.converged_),
                      best_iteration=model.best_iteration_, loss=model.loss_, initial_loss=model.initial_loss_)
        if spec["test"] is not None:
            t0 = time.perf_counter()
            record["retrieval"] = _evaluate(model, spec)
            record["eval_seconds"] = time.perf_counter() - t0
        record["diagnostics"] = getattr(model, "diagnostics_", None)
        record["history"] = model.history_
        record["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failing solve is recorded, and the study goes on
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
    record.update(host=socket.gethostname(), pid=os.getpid(), finished=datetime.now(timezone.utc).isoformat(),
                  version=__version__)
    return _jsonable(record)


# --------------------------------------------------------------------------- the table
def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (str, bool, int, float))


def flatten_record(record: dict) -> dict:
    """One table row from a run record.

    Nested dicts become dotted column names (``diagnostics.svd.spectral_gap``), lists of
    scalars JSON strings; lists holding dicts or lists (per-iteration histories), and
    ``history`` and ``traceback``, stay in the JSON only.
    """
    row = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list):
            if all(_is_scalar(v) for v in value):
                row[prefix] = json.dumps(value)
        else:
            row[prefix] = value

    walk("", {k: v for k, v in record.items() if k not in _NOT_IN_TABLE})
    return row


def _columns(rows: list[dict], first=()) -> list[str]:
    seen = dict.fromkeys(c for c in (*_LEAD, *first) if any(c in r for r in rows))
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)


def _arrow_column(values: list):
    import pyarrow as pa

    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(values, pa.bool_())
    if present and all(_is_int(v) for v in present):
        return pa.array(values, pa.int64())
    if present and all(_is_number(v) for v in present):
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def write_table(rows: list[dict], folder: Path, first=()) -> None:
    """``results.csv`` and ``results.parquet`` in ``folder``, each replaced atomically.

    Columns: ``id``, ``status``, ``error``, then ``first`` (the grid's columns), then the
    others in the order they first appear.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = _columns(rows, first)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else r[c] for c in columns])
    atomic_write_text(folder / "results.csv", text.getvalue())
    table = pa.table({c: _arrow_column([r.get(c) for r in rows]) for c in columns})
    with atomic_write(folder / "results.parquet", "wb") as fh:
        pq.write_table(table, fh)


def _table_rows(study: Study) -> list[dict]:
    """Rows of every run record in the folder: this grid's points in grid order, then the others by id."""
    order = {p.id: i for i, p in enumerate(study.points)}
    records = [r for r in map(_read_run, sorted(study.runs.glob("*.json"))) if isinstance(r, dict) and "id" in r]
    records.sort(key=lambda r: (order.get(r["id"], len(order)), r["id"]))
    return [flatten_record(r) for r in records]


# --------------------------------------------------------------------------- plots
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "", name)


def _finite(v) -> bool:
    return _is_number(v) and math.isfinite(v)


def _line_plot(path: Path, rows: list[dict], x: str, y: str, by: list[str], xlabel: str, *, log_y: bool,
               log_x: bool | None = None) -> None:
    """``y`` against ``x``, one line per combination of the ``by`` columns (log x when ``log_x``,
    or by default when x spans more than a decade)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = {}
    for r in rows:
        if _finite(r.get(x)) and _finite(r.get(y)):
            lines.setdefault(" ".join(f"{c.removeprefix('options.')}={r.get(c)}" for c in by), []).append(
                (r[x], r[y]))
    if not lines:
        return
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label or None)
    xs = [p[0] for pts in lines.values() for p in pts]
    if min(xs) > 0 and (max(xs) / min(xs) > 10 if log_x is None else log_x):
        ax.set_xscale("log")
    ys = [p[1] for pts in lines.values() for p in pts]
    if log_y and min(ys) > 0:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(y)
    ax.set_title(f"{y} vs {xlabel}", fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    if 1 < len(lines) <= 12:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def make_plots(study: Study, rows: list[dict]) -> list[Path]:
    """The study's plots from its table rows (see :func:`run_study`); returns the files written.

    Raises
    ------
    ImportError
        matplotlib is not installed.
    """
    import matplotlib  # noqa: F401 - the clear error first

    ids = {p.id for p in study.points}
    rows = [r for r in rows if r.get("status") == "ok" and r["id"] in ids]
    column = study.columns()
    varying = study.varying()
    folder = study.output / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    if "n" in varying:
        by = [column[k] for k in varying if k != "n"]
        _line_plot(folder / "time_vs_n.png", rows, "n", "seconds", by, "n (rows fitted)", log_y=True, log_x=True)
        written.append(folder / "time_vs_n.png")
    metrics = sorted({c for r in rows for c in r if ("rel_error" in c or "residual" in c) and _finite(r[c])})
    metrics += [m for m in ("loss", "retrieval.R@1") if any(_finite(r.get(m)) for r in rows)]
    for p in varying:
        if p == "n" or not all(_is_number(v) for v in study.grid[p]):
            continue
        by = [column[k] for k in varying if k != p]
        for m in metrics:
            path = folder / f"{_slug(m)}_vs_{p}.png"
            _line_plot(path, rows, column[p], m, by, p, log_y="rel_error" in m or "residual" in m)
            if path.exists():
                written.append(path)
    return [p for p in written if p.exists()]


# --------------------------------------------------------------------------- running
def _start_ray(study: Study) -> bool:
    """Connect to Ray unless it already is; True when this call started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    if study.ray_address is None:  # the embedded loopback-only Ray of RayExecutor
        from ..execution.ray.executor import RayExecutor

        RayExecutor(num_workers=1, num_cpus_per_worker=study.cpus_per_task)._init_local_ray()
    else:
        ray.init(address=study.ray_address, log_to_driver=False)
    return True


def _run_ray(study: Study, specs: list[dict], done) -> None:
    """Each spec a Ray task of :func:`run_point`, collected as they finish."""
    import ray

    started = _start_ray(study)
    try:
        task = ray.remote(run_point).options(num_cpus=study.cpus_per_task)
        pending = {task.remote(spec): spec for spec in specs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # the task's worker died (the solve's own errors are records)
                record = {"id": spec["id"], "status": "error", "options": spec["options"], "n": spec["n"],
                          "storage_dtype": spec["storage_dtype"], "error": f"{type(exc).__name__}: {exc}"}
            done(spec, record)
    finally:
        if started:
            ray.shutdown()


def run_study(study: Study, echo=print) -> list[dict]:
    """Solve the points of ``study`` that have no finished result; returns the table rows.

    Parameters
    ----------
    study : Study
        From :func:`load_study`.
    echo : callable
        Receives one line per point (``"[3/8] temperature=0.05 n=2000 ... ok 1.2 s"``,
        ``"... skipped (finished)"``) and a few summary lines.

    Returns
    -------
    list of dict
        The rows of ``results.csv``: one per run record in ``output/runs`` (this grid's
        points in grid order first, then points of earlier grids), flattened by
        :func:`flatten_record`.

    Notes
    -----
    ``output/study.json`` records ``[data]`` and ``[model]`` (:func:`load_study` refuses
    a changed one).  A point whose ``runs/<id>.json`` says "ok" is skipped; an errored
    or missing one is solved.  Each result is written atomically as it arrives, on this
    process (Ray tasks return theirs), and the table is rewritten after every point, so
    an interrupted study keeps what finished.  Plots are drawn at the end when
    ``plots = true`` and matplotlib is installed.
    """
    study.runs.mkdir(parents=True, exist_ok=True)
    atomic_write_text(study.output / _RECORD_FILE, json.dumps(study.record(), indent=2) + "\n")
    total = len(study.points)
    finished = study.finished()
    todo = [p for p in study.points if p.id not in finished]
    for k, p in enumerate((p for p in study.points if p.id in finished), 1):
        echo(f"[{k}/{total}] {p.label} ... skipped (finished)")
    if finished:
        echo(f"skipped {len(finished)} finished points")
    counter = itertools.count(len(finished) + 1)
    failed = []

    def done(spec: dict, record: dict) -> None:
        atomic_write_text(study.runs / f"{spec['id']}.json", json.dumps(record, indent=2) + "\n")
        write_table(_table_rows(study), study.output, study.columns().values())
        if record["status"] == "ok":
            extra = f"  loss {record['loss']:.4f}" + (
                f"  R@1 {record['retrieval']['R@1']:.3f}" if "retrieval" in record else "")
            state = f"ok {record['seconds']:.1f} s{extra}"
        else:
            failed.append(spec["id"])
            state = f"error: {record['error'].splitlines()[0]}"
        echo(f"[{next(counter)}/{total}] {spec['label']} ... {state}")

    specs = [study.spec(p) for p in todo]
    if specs and study.executor == "ray":
        _run_ray(study, specs, done)
    else:
        for spec in specs:
            done(spec, run_point(spec))
    rows = _table_rows(study)
    write_table(rows, study.output, study.columns().values())
    if study.plots:
        try:
            plots = make_plots(study, rows)
            if plots:
                echo(f"plots: {', '.join(str(p.relative_to(study.output)) for p in plots)}")
        except ImportError:
            echo(f"plots skipped: matplotlib is not installed ({_INSTALL})")
    echo(f"{total - len(failed)} of {total} points ok" + (f", {len(failed)} failed (re-run to retry them)"
                                                         if failed else "")
         + f"; results in {study.output / 'results.csv'}")
    return rows
