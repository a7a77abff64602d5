"""A validated job: one frozen dataclass per table of the job file, and :class:`Job`.

These are what :func:`unicon_dist.apps.job_config.load_job` returns once every check has
passed; :func:`unicon_dist.apps.jobs.run_job` runs them.  A :class:`Job` builds its model
and executor, says what the fit will do with its checkpoint, and prints its plan (the
dry run of ``unicon-dist solve``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..execution.ray import RayExecutor
from ..io.checkpoints import read_checkpoint_header
from ..solver.estimator import UniCon
from ..solver.executor import LocalExecutor
from ..solver.planning import format_bytes, parse_bytes
from .config_checks import StoreInfo
from .evaluation import DEFAULT_MAX_ROWS
from .model_options import model_kwargs

__all__ = [
    "JobError", "DataSpec", "ExecutorSpec", "EvaluateSpec", "OutputSpec", "Job", "executor_class",
]


class JobError(ValueError):
    """A job file that cannot be run; ``errors`` lists every problem, one line each."""

    def __init__(self, path, errors: list[str]):
        self.path = str(path)
        self.errors = list(errors)
        super().__init__("\n".join(f"{self.path}: {e}" for e in self.errors))


def executor_class(kind: str):
    """The executor class of ``[executor] kind`` ("local" or "ray"), or None when unavailable.

    Looked up when called, from this module's names, so a test can stand in a fake class
    (or None) for one without starting Ray.
    """
    return {"local": LocalExecutor, "ray": RayExecutor}.get(kind)


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
        """The executor object (``LocalExecutor()`` or ``RayExecutor(...)``)."""
        cls = executor_class(self.kind)
        if self.kind == "ray":
            if cls is None:
                raise ValueError('[executor] kind = "ray" is not available yet in this unicon_dist '
                                 '(no ud.RayExecutor); use kind = "local"')
            kwargs = {"address": self.address, "num_gpus_per_worker": self.num_gpus_per_worker}
            if self.num_workers is not None:
                kwargs["num_workers"] = self.num_workers
            return cls(**kwargs)
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
    """A validated job file (see :func:`unicon_dist.apps.job_config.load_job`)."""

    path: Path
    data: DataSpec
    model_options: Mapping[str, Any] = field(hash=False)
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    output: OutputSpec | None = None
    raw: Mapping[str, Any] = field(repr=False, compare=False, hash=False, default_factory=dict)
    resume: bool = False

    def make_model(self, **overrides) -> UniCon:
        """A fresh, unfitted :class:`~unicon_dist.solver.estimator.UniCon` with the job's options."""
        return UniCon(**{**model_kwargs(dict(self.model_options))[0], **overrides})

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
