"""What Prefect's run loggers print when a stage raises.

Bad input is reported once, as one line: the CLI's `error:` line, or the flow
run's state message in the Prefect UI. Prefect's task and flow engines would
each log its traceback, and a "Finished in state Failed" line, on top.
A failed stage keeps the task engine's traceback, once.
"""

from __future__ import annotations

import logging

from rlhf.errors import InputError, StageFailed


class _ExpectedErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, InputError):
            return False
        if isinstance(error, StageFailed) and record.name == "prefect.flow_runs":
            return False  # the task run logged it
        message = record.getMessage()
        return not (message.startswith("Finished in state") and f"{InputError.__name__}:" in message)


def quiet_expected_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ExpectedErrors) for f in logger.filters):
            logger.addFilter(_ExpectedErrors())
