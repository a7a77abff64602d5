"""Running a study: each grid point an independent UniCon solve, locally or as Ray tasks.

The grid file and its validation are :mod:`unicon_dist.apps.study_config`
(:func:`load_study`, re-exported here); the table and plots it leaves are
:mod:`unicon_dist.apps.study_report`.  :func:`run_study` solves the points that have no
finished result yet, writes each result to ``runs/<id>.json`` as it arrives, rewrites the
tidy table after every point and draws the plots at the end; a point's id is a hash of
its options, so a re-run skips the finished points whatever the order of the grid, and a
grown grid only solves the new ones.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
import traceback
from datetime import datetime, timezone

import numpy as np

from ..data.store import PairStore, cast_to_storage
from ..execution.ray import cluster as ray_cluster
from ..solver.estimator import UniCon
from ..version import __version__
from .evaluation import BASELINE, LABEL_EMBEDDINGS, evaluate_arrays, evaluate_store, subset_rows
from .jobs import atomic_write_text
from .model_options import model_kwargs
from .study_config import (
    RECORD_FILE, STORAGE_DTYPES, Point, Study, StudyError, jsonable, load_study, point_id,
)
from .study_report import flatten_record, make_plots, table_rows, write_table

__all__ = [
    "Study", "StudyError", "Point", "load_study", "run_study", "run_point", "round_to_storage", "flatten_record",
    "STORAGE_DTYPES", "point_id", "write_table", "make_plots",
]

_INSTALL = "pip install unicon_dist[study]"


# --------------------------------------------------------------------------- one point
def round_to_storage(a, storage_dtype: str | None) -> np.ndarray:
    """``a`` rounded to ``storage_dtype`` (what storing it in that precision keeps).

    float16 and bfloat16 values are returned as float32 (which holds them exactly),
    float32 as float32 and float64 as float64; None returns ``a`` unchanged.  The rounding
    is torch's cast (round to nearest even; values beyond float16's range become inf), the
    one a pair store of that dtype applies on write.
    """
    if storage_dtype is None:
        return a
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
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
    storage = spec["storage_dtype"]
    if storage is None:
        ev = evaluate_store(model, spec["test"], max_rows=spec["eval_rows"], baseline=False)
    else:  # the rows evaluate_store would take, rounded
        store = PairStore.open(spec["test"], mode="r")
        subset = subset_rows(len(store), spec["eval_rows"] or len(store), 0)
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
    record = {"id": spec["id"], "status": "error", "options": dict(spec["options"]), "n": spec["n"],
              "storage_dtype": spec["storage_dtype"]}
    try:
        kwargs, errors = model_kwargs(dict(spec["options"]))
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
    return jsonable(record)


# --------------------------------------------------------------------------- running
def _start_ray(study: Study) -> bool:
    """Connect to Ray unless it already is; True when this call started it (and must stop it).

    Without an address this is the embedded loopback-only Ray that RayExecutor starts.
    """
    return ray_cluster.connect(study.ray_address, num_cpus=study.cpus_per_task)


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
    atomic_write_text(study.output / RECORD_FILE, json.dumps(study.record(), indent=2) + "\n")
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
        write_table(table_rows(study), study.output, study.columns().values())
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
    rows = table_rows(study)
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
