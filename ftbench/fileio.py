"""Files as ftbench writes them: atomically (nothing already written is lost or left half-written), and
paths as a record keeps them (no folder of the machine it ran on)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, fsync it, then rename it over ``path``.
    The file gets the usual permissions (0666 less the umask), not ``mkstemp``'s 0600, so a results
    directory shared by several users stays readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """:func:`write_bytes_atomic` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def check_file_name(value: str, option: str) -> str:
    """``value`` as one file name inside the results folder (a run id, a sweep run's name): no path
    separator, no ``.``/``..``, not absolute, no control character, else a
    :class:`~ftbench.errors.ConfigError` naming ``option``. A run id names ``{out}/{run_id}.json``; one
    with ``../`` would write above ``--out``."""
    from ftbench.errors import ConfigError

    problem = None
    if not value:
        problem = "is empty"
    elif os.path.isabs(value) or value.startswith("~"):
        problem = "is an absolute path"
    elif any(sep in value for sep in ("/", "\\", os.sep)):
        problem = "contains a path separator"
    elif value in (".", "..") or value.startswith(".."):
        problem = "is '.' or starts with '..'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        problem = "contains a control character"
    if problem:
        raise ConfigError(f"{option}: {value!r} {problem}; it is a file name inside --out (letters, digits, _ . -)")
    return value


def portable_path(path: str) -> str:
    """A path as a record keeps it: relative to the working directory when below it, ``~/...`` when
    below the home folder (the model cache), else as given. A committed record names no folder of the
    machine it ran on."""
    if not os.path.isabs(path):
        return path
    cwd, home = os.getcwd(), os.path.expanduser("~")
    if path == cwd or path.startswith(cwd + os.sep):
        return os.path.relpath(path, cwd)
    if home not in ("", "/") and path.startswith(home + os.sep):
        return "~" + path[len(home):]
    return path
