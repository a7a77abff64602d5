"""Study (grid) files: a resumable grid of independent UniCon solves in one TOML file, validated.

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
once.  :func:`unicon_dist.apps.study.run_study` solves the points that have no finished result yet (locally one
after another, or as Ray tasks), writes each result to ``runs/<id>.json`` as it arrives
and rewrites the tidy table (``results.csv``, ``results.parquet``) after every point, and
draws the plots at the end.  A point's id is a hash of its options, so a re-run skips the
finished points whatever the order of the grid, and a grown grid only solves the new ones.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import torch

from ..solver.estimator import UniCon
from .config_checks import StoreInfo, is_int, is_number, open_store, read_toml, resolve_path, split_tables, \
    type_name, unknown_keys
from .job_spec import JobError
from .model_options import check_model, check_model_against_store, model_kwargs, model_param_names

__all__ = [
    "Study", "StudyError", "Point", "load_study", "point_id", "jsonable", "read_record", "FORMAT", "STORAGE_DTYPES",
    "STUDY_ONLY", "RECORD_FILE",
]

FORMAT = "unicon_dist.study/1"
STORAGE_DTYPES = ("float64", "float32", "float16", "bfloat16")
STUDY_ONLY = ("n", "storage_dtype")  # grid keys that are not UniCon options
RECORD_FILE = "study.json"  # in the output folder: what a re-run must keep (Study.record)
_TABLES = ("data", "study", "model", "grid")
_DATA_KEYS = ("train", "test", "eval_rows")
_STUDY_KEYS = ("output", "executor", "ray_address", "cpus_per_task", "plots")
_EXECUTORS = ("local", "ray")


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
                "model": jsonable(dict(self.model)), "grid": jsonable({k: list(v) for k, v in self.grid.items()})}

    def columns(self) -> dict[str, str]:
        """Each grid key's column in the table (``options.<key>``, or ``n`` and ``storage_dtype``)."""
        return {k: k if k in STUDY_ONLY else f"options.{k}" for k in self.grid}

    def finished(self) -> set[str]:
        """Ids of the points whose result file exists with status "ok"."""
        return {p.id for p in self.points if (read_record(self.runs / f"{p.id}.json") or {}).get("status") == "ok"}

    def spec(self, point: Point) -> dict:
        """The plain dict :func:`~unicon_dist.apps.study.run_point` takes.

        Store paths, not handles: workers (Ray tasks) reopen them.
        """
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


def jsonable(obj):
    """``obj`` with numpy and torch values turned into JSON types (dicts and lists kept)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    tolist = getattr(obj, "tolist", None)  # a torch tensor
    return tolist() if callable(tolist) else str(obj)


def read_record(path: Path) -> dict | None:
    """The JSON record in ``path`` (a run's result or ``study.json``), or None when unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- loading
def _check_data(data: dict, base: Path, errors: list[str]):
    errors += unknown_keys("data", data, _DATA_KEYS)
    infos = {}
    for key in ("train", "test"):
        if key not in data:
            continue
        if isinstance(data[key], str) and data[key]:
            infos[key] = open_store("data", key, resolve_path(base, data[key]), errors)
        else:
            errors.append(f"[data] {key} must be a path string, got {data[key]!r} ({type_name(data[key])})")
    if "train" not in data:
        errors.append('[data] train is required (the training pair store, e.g. train = "train.zarr")')
    eval_rows = data.get("eval_rows")
    if eval_rows is not None and not (is_int(eval_rows) and eval_rows >= 2):
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
    errors += unknown_keys("study", table, _STUDY_KEYS)
    out = {"output": None, "executor": table.get("executor", "local"), "ray_address": table.get("ray_address"),
           "cpus_per_task": table.get("cpus_per_task", 1), "plots": table.get("plots", True)}
    output = table.get("output")
    if isinstance(output, str) and output:
        out["output"] = resolve_path(base, output)
    else:
        errors.append('[study] output is required: the results folder, e.g. output = "study-out"' if output is None
                      else f"[study] output must be a path string, got {output!r} ({type_name(output)})")
    if out["executor"] not in _EXECUTORS:
        errors.append(f"[study] executor must be one of {', '.join(map(repr, _EXECUTORS))}, got {out['executor']!r}")
    if out["executor"] == "local":
        errors += [f'[study] {k} applies to executor = "ray" only' for k in ("ray_address", "cpus_per_task")
                   if k in table]
    address = out["ray_address"]
    if address is not None and not (isinstance(address, str) and address):
        errors.append(f'[study] ray_address must be a string such as "auto" or "ray://head:10001", got {address!r}')
    cpus = out["cpus_per_task"]
    if not (is_number(cpus) and math.isfinite(cpus) and cpus > 0):
        errors.append(f"[study] cpus_per_task must be a number > 0, got {cpus!r}")
    if not isinstance(out["plots"], bool):
        errors.append(f"[study] plots must be true or false, got {out['plots']!r} ({type_name(out['plots'])})")
    return out


def _check_grid(grid: dict, model: dict, train: StoreInfo | None, errors: list[str]) -> dict[str, tuple]:
    """Shape and per-value types of ``[grid]``; the well-formed keys with their values."""
    valid = model_param_names() + STUDY_ONLY
    errors += unknown_keys("grid", grid, valid)
    errors += [f"[model] {k} is a study key: give it in [grid] ({k} = [...], one value to fix it)"
               for k in STUDY_ONLY if k in model]
    good = {}
    for key, values in grid.items():
        if key not in valid:
            continue
        if key in model:
            errors.append(f"[grid] {key} is also in [model]; give each option in one table only")
            continue
        if not isinstance(values, list) or not values:
            errors.append(f"[grid] {key} must be a non-empty array of values, e.g. {key} = [..., ...]; "
                          f"got {values!r} ({type_name(values)})")
            continue
        shown = [_show(v) for v in values]
        twice = sorted({s for s in shown if shown.count(s) > 1})
        if twice:
            errors.append(f"[grid] {key} lists {', '.join(twice)} more than once")
            continue
        value_errors = []
        for v in values:
            if key == "n":
                if not (is_int(v) and v >= 2):
                    value_errors.append(f"[grid] n must be integers >= 2 (rows of the train store), got {v!r}")
                elif train is not None and v > train.n_rows:
                    value_errors.append(f"[grid] n = {v} exceeds the {train.n_rows:,} rows of the train store "
                                        f"{train.path}")
            elif key == "storage_dtype":
                if v not in STORAGE_DTYPES:
                    value_errors.append(f"[grid] storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, "
                                        f"got {v!r}")
            else:  # the option's TOML type and form, as in a job file
                value_errors += [f"[grid]{e[len('[model]'):]}" for e in model_kwargs({key: v})[1]]
        errors += value_errors
        if not value_errors:
            good[key] = tuple(values)
    if "storage_dtype" in grid and "n" not in grid:
        errors.append("[grid] storage_dtype rounds rows read into memory and needs n (the rows fitted); "
                      "without n the whole store is fitted out of core, as stored")
    return good


def _point_problems(kwargs: dict, n: int | None, train: StoreInfo | None) -> list[str]:
    """UniCon's own checks of one point's options, and the bounds that need the rows."""
    if n is None:  # fitted from the store: the job-file rules (landmarks = "uniform" only)
        problems = check_model(kwargs)
    else:
        try:
            UniCon(**kwargs).validate_params()
            problems = []
        except (ValueError, TypeError) as exc:
            problems = [f"[model] {exc}"]
    if not problems and train is not None:
        problems = check_model_against_store(kwargs, replace(train, n_rows=n or train.n_rows))
    device = kwargs.get("device")
    if not problems and isinstance(device, str) and device.startswith("cuda"):
        if not torch.cuda.is_available():
            problems = [f"[model] device = {device!r} but no CUDA device is visible to this process"]
    return [p.removeprefix("[model] ") for p in problems]


def _build_points(model: dict, grid: dict[str, tuple], train: StoreInfo | None, errors: list[str]) -> list[Point]:
    """The Cartesian product of ``grid`` over the fixed ``model``, each point validated."""
    varying = [k for k, v in grid.items() if len(v) > 1]
    points, problems = [], {}
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        options = {**{k: v for k, v in values.items() if k not in STUDY_ONLY}, **model}
        n, storage = values.get("n"), values.get("storage_dtype")
        label = " ".join(f"{k}={_show(values[k])}" for k in varying) or "(single point)"
        point = Point("", MappingProxyType(options), n, storage, label)
        point = replace(point, id=point_id(point.key()))
        points.append(point)
        kwargs, kwarg_errors = model_kwargs(dict(options))
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
    saved_path = output / RECORD_FILE
    if not saved_path.is_file():
        if any(output.iterdir()):
            errors.append(f"[study] output: {output} is a folder that holds no {RECORD_FILE}; it is not a study's "
                          "output, so nothing is written there (name a new or empty folder)")
        return
    saved = read_record(saved_path)
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
    raw = read_toml(path, "grid", StudyError)
    base = path.resolve().parent
    errors: list[str] = []
    tables = split_tables(raw, _TABLES, errors)
    errors += [f"missing table [{t}]" for t in ("data", "study") if t not in raw]

    train, test, eval_rows = _check_data(tables["data"], base, errors)
    settings = _check_study(tables["study"], base, errors)
    model = tables["model"]
    n_errors = len(errors)
    errors += model_kwargs({k: v for k, v in model.items() if k not in STUDY_ONLY})[1]
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

