"""User-facing errors: one line that names the file, the row and what to do."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message is a single line meant for the user, not a stack trace."""

    def __init__(self, problem: str, *, path: str | None = None, row: int | None = None, hint: str | None = None):
        self.problem, self.path, self.row, self.hint = problem, path, row, hint
        where = []
        if path is not None:
            where.append(str(path))
        if row is not None:
            where.append(f"row {row}")
        msg = ": ".join([", ".join(where), problem]) if where else problem
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)

    def __reduce__(self):  # survive pickling across DataLoader worker processes
        return (_rebuild_data_error, (self.problem, self.path, self.row, self.hint))


def _rebuild_data_error(problem, path, row, hint):
    return DataError(problem, path=path, row=row, hint=hint)


class ConfigError(ValueError):
    """A setting that cannot work; the message says which flag to change."""


class LoaderFailure(RuntimeError):
    """The data loader's workers died or delivered nothing within `--loader_timeout`."""


class PeerFailure(RuntimeError):
    """Another rank failed; this rank saved with it and stops too."""


class RunLogError(OSError):
    """`metrics.jsonl` could not be written (disk full); the message says what is intact and what to do."""
