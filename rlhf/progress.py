"""One progress display per running stage: a live bar on a terminal, a line every 15 s otherwise.

Work reports its steps with `report(phase, done, total, **metrics)` wherever it
runs. In the process that runs the stage, that updates the stage's display.
On a Ray Train worker it prints a marked line, which Ray forwards to the
driver, where `rlhf.stage_log` hands it back to `report`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("rlhf")

MARK = "rlhf-progress "
LINE_SECONDS = 15.0
ON_RAY_WORKER = "RLHF_RAY_WORKER"  # set in the runtime env of the cluster's workers, and of an RL loop's own process


class _Phase:
    """One phase of a stage (sampling, training, ...): its bar or its periodic lines, and its ETA."""

    def __init__(self, stage: str, name: str, done: int, total: int, bar: bool, context: contextvars.Context):
        self.label, self.total = f"{stage} {name}", total
        self.first, self.first_at = done, time.monotonic()
        self.last_line = self.first_at
        self.context = context
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=self.label, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def update(self, done: int, metrics: dict[str, float]) -> None:
        shown = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
        if self.bar is not None:
            self.bar.set_postfix_str(shown, refresh=False)
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if done < self.total and now - self.last_line < LINE_SECONDS:
            return
        self.last_line = now
        elapsed = now - self.first_at
        rate = (done - self.first) / elapsed if elapsed > 0 else 0.0
        left = f", about {(self.total - done) / rate:.0f} s left" if rate > 0 and done < self.total else ""
        # Prefect's API handler finds the run it logs to in context variables
        self.context.copy().run(
            log.info, "%s %d/%d (%d%%)%s, %.0f s%s", self.label, done, self.total, 100 * done // max(self.total, 1),
            f": {shown}" if shown else "", elapsed, left,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Display:
    def __init__(self, stage: str):
        self.stage, self.bar = stage, sys.stderr.isatty()
        self.context = contextvars.copy_context()  # the stage's: reports may arrive on Ray's log thread
        self.phase, self.key, self.done = None, None, 0

    def update(self, phase: str, done: int, total: int, metrics: dict[str, float]) -> None:
        if (phase, total) != self.key or done < self.done:  # a new phase, or the same work again
            self.close()
            self.phase, self.key = _Phase(self.stage, phase, done, total, self.bar, self.context), (phase, total)
        self.done = done
        self.phase.update(done, metrics)

    def close(self) -> None:
        if self.phase is not None:
            self.phase.close()
        self.phase, self.key, self.done = None, None, 0


_display: _Display | None = None


@contextmanager
def stage_display(stage: str) -> Iterator[None]:
    global _display
    _display = _Display(stage)
    try:
        yield
    finally:
        _display.close()
        _display = None


def report(phase: str, done: int, total: int, **metrics: float) -> None:
    if _display is not None:
        _display.update(phase, done, total, metrics)
    elif os.environ.get(ON_RAY_WORKER):
        print(MARK + json.dumps([phase, done, total, metrics]), flush=True)


def relay(line: str) -> bool:
    """A line forwarded from a Ray worker: when it is a progress report, show it and return True."""
    if not line.startswith(MARK):
        return False
    phase, done, total, metrics = json.loads(line[len(MARK) :])
    report(phase, done, total, **metrics)
    return True
