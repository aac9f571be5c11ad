"""Errors the CLI maps to exit codes: bad input is 2, a failed stage is 1."""


class InputError(Exception):
    """Bad config or bad input data. The message names the key, file and row."""

    exit_code = 2


class StageFailed(Exception):
    """A stage raised; the message names the stage and its partial checkpoint."""

    exit_code = 1


class ServerLost(StageFailed):
    """The tracking or orchestration server stopped answering; what completed is kept for the rerun."""
