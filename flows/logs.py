"""What Prefect's run loggers print when a stage raises.

Bad input and a lost server are reported once, as one line: the CLI's
`error:` line, or the flow run's state message in the Prefect UI. Prefect's
task and flow engines would each log its traceback, and a "Finished in
state Failed" line, on top. A failed stage keeps the task engine's
traceback, once.
"""

from __future__ import annotations

import logging

import httpx

from rlhf.errors import InputError, ServerLost, StageFailed


class _ExpectedErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (InputError, ServerLost, httpx.TransportError)):  # the last: the Prefect API itself is gone
            return False
        if isinstance(error, StageFailed) and record.name == "prefect.flow_runs":
            return False  # the task run logged it
        message = record.getMessage()
        return not (message.startswith("Finished in state") and any(f"{e.__name__}:" in message for e in (InputError, ServerLost)))


def quiet_expected_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ExpectedErrors) for f in logger.filters):
            logger.addFilter(_ExpectedErrors())
