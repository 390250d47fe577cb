"""A budget for log lines a peer can cause: a few a second, then one summary of what was
left out, so a hostile peer cannot flood the log (or the disk) by repeating a failure.

Pure: time is an input.
"""

from __future__ import annotations

import logging

# Lines per key per window, and the window: as Envoy's rate-limited connection logs
# (`ENVOY_LOG_PERIODIC`, once a second) but keeping the first few in full.
LINES_PER_WINDOW = 10
WINDOW_SECONDS = 1.0


class LogBudget:
    """Lets through at most `lines` records per `window` seconds; counts the rest and
    logs how many were left out when the next window opens."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        lines: int = LINES_PER_WINDOW,
        window: float = WINDOW_SECONDS,
    ) -> None:
        self.logger = logger
        self.what = what
        self.lines = lines
        self.window = window
        self._window_start = float("-inf")
        self._used = 0
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        if now - self._window_start >= self.window:
            if self.suppressed:
                self.logger.info("%d more %s left out of the log", self.suppressed, self.what)
            self._window_start = now
            self._used = 0
            self.suppressed = 0
        if self._used < self.lines:
            self._used += 1
            return True
        self.suppressed += 1
        return False
