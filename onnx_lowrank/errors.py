"""User-facing errors: one clear line, a distinct exit code, no traceback."""


class LowRankError(Exception):
    """An error caused by the user's input; the CLI prints ``str(err)`` and exits with ``exit_code``."""

    exit_code = 2


class BudgetExceeded(LowRankError):
    """The compressed model broke the accuracy / agreement budget given for CI."""

    exit_code = 3
