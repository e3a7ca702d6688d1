"""jsonargparse's refusals as one ``ftbench: error:`` line: the key, what is wrong, and the YAML file
that gave the value; the usage only on ``--help``.

jsonargparse reports a bad value as a tree, ~80 lines of usage first::

    Parser key "model":
      Does not validate against any of the Union subtypes
      ...
      Errors:
        - Problem with given class_path 'ftbench.objectives.DPO':
            Parser key "beta":
              Expected a <class 'float'>. Got value: abc

which says ``model.init_args.beta: Expected a <class 'float'>. Got value: abc``. jsonargparse has no
option for a shorter message (checked: ``exit_on_error``, ``error_handler`` are all or nothing), so
the tree is read here.
"""

from __future__ import annotations

import re
import sys
from typing import Optional, Sequence

_KEY = re.compile(r'^(\s*)(?:- )?Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"^\s*- Problem with given class_path '([^']+)':")


def condensed(message: str) -> str:
    """The deepest ``Parser key`` of jsonargparse's error tree, dotted from the top (``init_args``
    between a class and its argument), and the first line under it (under its class, when the class
    refused it: ``tuner (ftbench.tuners.NoTuning): Option 'r' is not accepted``); ``message`` itself
    when it has no tree (``unrecognized arguments: ...``)."""
    lines = message.splitlines()
    path: list[tuple[int, str]] = []  # (indent, dotted key) of the keys above the current line
    best: Optional[tuple[int, str, str]] = None  # (depth, where, what is wrong)
    for i, line in enumerate(lines):
        m, c = _KEY.match(line), _CLASS.match(line)
        if m is None and c is None:
            continue
        indent = len(line) - len(line.lstrip())
        path = [(d, k) for d, k in path if d < indent]
        after = next((x.strip() for x in lines[i + 1:] if x.strip()), "")
        if c is not None:  # the class under the current key refused what follows
            where, what, depth = f"{path[-1][1]} ({c.group(1)})" if path else c.group(1), after, len(path) + 0.5
            if _KEY.match(lines[i + 1] if i + 1 < len(lines) else ""):
                continue  # a key of the class follows: it is deeper
        else:
            key, rest = m.group(2), m.group(3)
            parent = path[-1][1] if path else ""
            # a key right under "Problem with given class_path" is one of the class's init_args
            under_class = bool(path) and i > 0 and _CLASS.match(lines[i - 1]) is not None
            where = ".".join(p for p in (parent, "init_args" if under_class else "", key) if p)
            path.append((indent, where))
            what, depth = rest or after, len(path)
            if what.startswith("Does not validate against any of"):
                continue  # a union's header: the reason is under one of its subtypes
        if best is None or depth > best[0]:
            best = (depth, where, what)
    if best is None:
        return " ".join(x.strip() for x in lines if x.strip())
    return f"{best[1]}: {best[2]}"


def yaml_source(key: str, argv: Sequence[str]) -> Optional[str]:
    """The YAML file of the command line that sets ``key`` (the last one: later files win; none when
    the command line gives the key itself after it), if any:
    ``-c/--config FILE`` (the key from the top) or ``--GROUP FILE`` (the key below ``GROUP``)."""
    import yaml

    found = None
    for i, arg in enumerate(argv[:-1]):
        value = argv[i + 1]
        if arg.lstrip("-").split("=", 1)[0] == key:
            found = None  # given on the command line after any file
            continue
        if not arg.startswith("-") or not value.endswith((".yaml", ".yml")):
            continue
        prefix = "" if arg in ("-c", "--config") else arg.lstrip("-")
        if prefix and not (key == prefix or key.startswith(prefix + ".")):
            continue
        try:
            with open(value) as f:
                node = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue
        rest = key[len(prefix) + 1:] if prefix else key
        for part in rest.split(".") if rest else []:
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None:
            found = value
    return found


def one_line(message: str, argv: Sequence[str]) -> str:
    """``KEY: WHAT (set in FILE)`` for jsonargparse's ``message`` (FILE: :func:`yaml_source`)."""
    line = condensed(message)
    key = line.split(":", 1)[0] if ":" in line and " " not in line.split(":", 1)[0] else None
    source = yaml_source(key, argv) if key else None
    return line + (f" (set in {source})" if source else "")


def install(parser, argv: Sequence[str]) -> None:
    """Make ``parser`` print one line (and a hint naming ``--help``) and exit 2 on an error; the CLI
    calls it for the main parser and each subcommand's (``LightningCLI.init_parser``)."""
    base_error = parser.error

    def error(message: str, ex: Optional[Exception] = None):
        from jsonargparse._common import debug_mode_active  # noqa: the one place jsonargparse says it

        if not parser.exit_on_error or debug_mode_active():
            return base_error(message, ex)
        command = " ".join(["ftbench", *argv[:1]]) if argv and not argv[0].startswith("-") else "ftbench"
        print(f"ftbench: error: {one_line(message, argv)}\nftbench: hint: `{command} --help` lists the options",
              file=sys.stderr)
        parser.exit(2)

    parser.error = error
