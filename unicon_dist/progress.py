"""Progress reporting for long passes: a callable the passes invoke per row block."""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

__all__ = ["Progress", "LogProgress"]


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int) -> None: ...


class LogProgress:
    """Log "stage: done/total" at INFO, at most every ``interval`` seconds and at the end."""

    def __init__(self, logger: logging.Logger | None = None, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger or logging.getLogger("unicon_dist")
        self.interval = interval
        self.clock = clock
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
        self.logger.info("%s: %d/%d blocks, %.1fs elapsed, ~%.1fs left", stage, done, total, elapsed, eta)
        if done >= total:
            self._start.pop(stage, None)
            self._last.pop(stage, None)
