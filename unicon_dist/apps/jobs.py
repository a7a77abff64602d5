"""Running a job: fit the training store, write the model, evaluate it, write the metrics.

The job file itself -- its tables, keys and checks -- is :mod:`unicon_dist.apps.job_config`
(:func:`load_job`, re-exported here); the validated job is :class:`~unicon_dist.apps.job_spec.Job`.
``unicon-dist solve`` is ``run_job(load_job(path))``; with ``--dry-run`` it prints
:meth:`Job.describe` and stops.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from ..io.artifacts import atomic_write
from ..io.checkpoints import read_checkpoint_header
from ..solver.diagnostics import format_diagnostics, kept_as
from ..solver.planning import parse_bytes
from ..version import __version__
from .config_checks import StoreInfo
from .evaluation import evaluate_store
from .job_config import load_job
from .job_spec import DataSpec, EvaluateSpec, ExecutorSpec, Job, JobError, OutputSpec

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
    "METRICS_FORMAT",
]

METRICS_FORMAT = "unicon_dist.metrics/1"  # the "format" of every metrics record run_job writes

def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, through :func:`unicon_dist.io.artifacts.atomic_write`."""
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return Path(path)


def _num(v) -> str:
    """A history value for the progress lines: 3 significant digits, "-" when not measured."""
    return "-" if v is None else f"{v:.3g}"


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
        From :func:`~unicon_dist.apps.job_config.load_job`.
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
             f"residual {_num(h.get('residual'))}  delta_w {_num(h.get('delta_w'))}  "
             f"gap {_num(h.get('spectral_gap'))}  {h['seconds']:.2f}s  {h.get('step', '')}")
    kept = "the fixed point" if model.converged_ else kept_as(model)
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
