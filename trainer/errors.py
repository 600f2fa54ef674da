"""Errors a user can act on. The CLI prints them as one message, without a traceback."""


class ConfigError(ValueError):
    """A config file, flag, override or input path is wrong (exit code 2)."""


class StageError(RuntimeError):
    """A stage could not complete for a reason outside the code: bad data, missing inputs (exit code 1)."""
