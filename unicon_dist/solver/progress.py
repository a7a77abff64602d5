"""Progress reporting for long passes: a callable the passes invoke per row block."""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

__all__ = ["FIT_LOGGER", "Progress", "LogProgress"]

# the one logger of a fit's progress (``UniCon(verbose=True)``) and outcome, whichever
# module of the solver reports it: users and tests select it by this name
FIT_LOGGER = "unicon_dist.solver.estimator"


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int) -> None: ...


class LogProgress:
    """Log "stage: done/total" at INFO, at most every ``interval`` seconds and at the end."""

    def __init__(self, logger: logging.Logger | None = None, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, rows: int | None = None, unit: str = "blocks"):
        self.logger = logger or logging.getLogger("unicon_dist")
        self.interval = interval
        self.clock = clock
        self.rows = rows  # anchors a pass covers: turns the fraction done into rows/s
        self.unit = unit
        self._last: dict[str, float] = {}
        self._start: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        start = self._start.setdefault(stage, now)
        if done < total and now - self._last.get(stage, start) < self.interval:
            return
        self._last[stage] = now
        elapsed = now - start
        eta = elapsed / done * (total - done) if done else float("nan")
        rate = f", {self.rows * done / total / elapsed:,.0f} rows/s" if self.rows and total and elapsed > 0 else ""
        self.logger.info("%s: %d/%d %s%s, %.1fs elapsed, ~%.1fs left", stage, done, total, self.unit, rate,
                         elapsed, eta)
        if done >= total:
            self._start.pop(stage, None)
            self._last.pop(stage, None)
