"""User-facing errors: one clear line, a distinct exit code, no traceback."""


class LowRankError(Exception):
    """An error caused by the user's input; the CLI prints ``str(err)`` and exits with ``exit_code``."""

    exit_code = 2


class BudgetExceeded(LowRankError):
    """The compressed model broke the accuracy / agreement budget given for CI.

    ``result`` is the compressed model with its report (evaluation and budget), when there is
    one, so a caller can still show or keep it; ``written`` says whether it was written anyway.
    """

    exit_code = 3

    def __init__(self, message: str, result=None, written: bool = False):
        super().__init__(message)
        self.result = result
        self.written = written
