"""Known errors: a user's input that cannot work, said in one line.

``ftbench`` prints a :class:`FTBenchError` as ``ftbench: error: <message>`` (plus a hint where one
helps) and exits with status 2, without a traceback; ``--traceback`` (or ``FTBENCH_TRACEBACK=1``)
shows the full trace, and a run's record keeps it either way. Any other exception is unexpected and
keeps its traceback. Each module's own error (bad data, a backbone that cannot load, a malformed
sweep, ...) subclasses :class:`FTBenchError`; :class:`ConfigError` is a setting that cannot work,
named by its option.
"""

from __future__ import annotations

from typing import Optional


class FTBenchError(ValueError):
    """A known error whose message says what is wrong and where (file, line, field or option)."""

    hint: Optional[str] = None


class ConfigError(FTBenchError):
    """A configuration value that cannot work; the message names the option."""

    def __init__(self, message: str, hint: Optional[str] = None):
        super().__init__(message)
        self.hint = hint


class BackboneError(FTBenchError):
    """A backbone that cannot be loaded as configured."""


class OutputError(FTBenchError):
    """``--out`` cannot hold the run's records (not a folder, not writable), or holding them would
    replace a completed record."""


class EstimateError(FTBenchError):
    """An estimate (``ftbench estimate``) that cannot be made as asked; the message names the option
    or the config field."""
