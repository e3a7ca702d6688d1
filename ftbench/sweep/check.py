"""Every point of a sweep parsed by the CLI's own parser before the first run starts.

A misspelt key (``trainer.max_step``), a value of the wrong type or an unknown class then stops the
sweep at once, with every bad point listed, instead of each run failing after its start-up with the
cause in its log. Parsing needs the classes' signatures (torch, lightning, transformers), so it runs
in one child process (``python -m ftbench.sweep.check``): the sweep runner itself stays torch-free.
Nothing is instantiated: no weights, no data.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional


class _Parsed(Exception):
    """Raised where the CLI would start instantiating: the point parsed."""


def parse_points(argvs: list[list[str]]) -> list[Optional[str]]:
    """For each command line, None when the CLI parses it, else the parser's error (one line)."""
    from ftbench.runcli import PARSER_KWARGS, cli_class

    FTBenchCLI, Objective, DataModule, SaveConfig = cli_class()

    class ParseOnly(FTBenchCLI):
        def before_instantiate_classes(self) -> None:
            raise _Parsed

    results: list[Optional[str]] = []
    for argv in argvs:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                ParseOnly(Objective, DataModule, save_config_callback=SaveConfig, subclass_mode_model=True,
                          subclass_mode_data=True, seed_everything_default=42, args=argv,
                          auto_configure_optimizers=False, parser_kwargs=PARSER_KWARGS)
            results.append("the command did not parse to a run")
        except _Parsed:
            results.append(None)
        except SystemExit:
            lines = [line.strip() for line in err.getvalue().splitlines() if line.strip()]
            one = [line for line in lines if line.startswith("ftbench: error: ")]  # ftbench.argerrors
            if one:
                results.append(one[0][len("ftbench: error: "):])
                continue
            at = max((i for i, line in enumerate(lines) if line.startswith("error:")), default=len(lines) - 1)
            results.append(" ".join(lines[at:])[len("error:"):].strip() if lines else "the parser refused it")
        except Exception as exc:  # an error raised while parsing (e.g. a class that cannot be imported)
            results.append(f"{type(exc).__name__}: {exc}")
    return results


def with_this_package(env: "dict[str, str] | os._Environ[str]") -> dict[str, str]:
    """``env`` with the folder of the ftbench this process runs first on ``PYTHONPATH``: a sweep's
    children import the same package, not an ``ftbench`` folder in the working directory."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys([root, *paths]))}


def python_command(python: str = sys.executable) -> list[str]:
    """``python -m`` without the working directory at the front of the path (``-P``, Python 3.11+):
    ``-m`` would otherwise put it before ``PYTHONPATH``."""
    return [python, *(["-P"] if sys.version_info >= (3, 11) else []), "-m"]


def check_in_child(argvs: list[list[str]], python: str = sys.executable) -> list[Optional[str]]:
    """:func:`parse_points` in a child process (the caller need not import torch)."""
    proc = subprocess.run([*python_command(python), "ftbench.sweep.check"], input=json.dumps(argvs),
                          capture_output=True, text=True, env=with_this_package(os.environ))
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"the sweep's config check did not run: {proc.stderr[-2000:]}") from None


if __name__ == "__main__":
    from ftbench.runcli import quiet_environment

    quiet_environment()
    print(json.dumps(parse_points(json.loads(sys.stdin.read()))))
