"""What each data source was when a run read it: a fingerprint per file (its size and SHA-256) or
``datasets`` dataset (its ``_fingerprint``), kept in the record (``train_info.data_fingerprints``).

Two runs of one grid point trained on different data are not seeds of one point: the report refuses
to group them, and a resumed sweep warns when a source changed since its completed runs read it.
Every data file is read through :func:`ftbench.data.base.read_rows`/``read_text_file``, which call
:func:`note_file` (a run is one process, and :func:`reset` starts its list afresh).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

_SEEN: dict[str, str] = {}


def file_fingerprint(data: bytes) -> str:
    """``{size in bytes}:{first 16 hex digits of the SHA-256}``."""
    return f"{len(data)}:{hashlib.sha256(data).hexdigest()[:16]}"


def path_fingerprint(path: str) -> Optional[str]:
    """The fingerprint of the file at ``path`` now; None when it cannot be read (gone, a folder)."""
    try:
        with open(path, "rb") as f:
            return file_fingerprint(f.read())
    except OSError:
        return None


def _key(path: str) -> str:
    from ftbench.fileio import portable_path  # a record names no folder of this machine

    return portable_path(os.path.abspath(path))


def note_file(path: str, data: bytes) -> None:
    _SEEN[_key(path)] = file_fingerprint(data)


def note_dataset(name: str, dataset: Any) -> None:
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is not None:
        _SEEN[name if name.startswith("hf:") else _key(name)] = f"datasets:{fingerprint}"


def seen() -> dict[str, str]:
    """Source -> fingerprint of what this process has read since :func:`reset`."""
    return dict(sorted(_SEEN.items()))


def reset() -> None:
    _SEEN.clear()
