"""Capped exponential back-off for the one retry loop of each concern, logging a failure
once (when it starts) and the recovery once, so that a long etcd outage does not flood the
log, and "log once per change" for conditions that persist (an invalid network config)."""

from __future__ import annotations

import logging
from typing import Optional


class Retry:
    def __init__(self, what: str, log: Optional[logging.Logger], initial: float = 1.0, cap: float = 10.0):
        self.what = what
        self.log = log
        self.initial = initial
        self.cap = cap
        self.delay = initial
        self.failing = False

    def failed(self, exc: BaseException) -> float:
        """Record a failure; returns how long to wait before the next try."""
        if self.log is None:
            pass  # the caller reports
        elif not self.failing:
            self.log.warning("%s failed: %s (retrying until it works)", self.what, exc)
            self.failing = True
        else:
            self.log.debug("%s failed again: %s", self.what, exc)
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        return delay

    def succeeded(self) -> None:
        if self.failing and self.log is not None:
            self.log.info("%s works again", self.what)
        self.failing = False
        self.delay = self.initial


class Onceper:
    """Logs a message only when it differs from the previous one."""

    def __init__(self, log: logging.Logger, level: int = logging.ERROR):
        self.log = log
        self.level = level
        self.last = None

    def __call__(self, message: str) -> None:
        if message != self.last:
            self.log.log(self.level, "%s", message)
            self.last = message

    def reset(self) -> None:
        self.last = None
