"""``ftbench fit|validate|test`` (a LightningCLI) and ``ftbench sweep|report``.

A run is ``--backbone`` x ``--tuner`` (what trains) x ``--model`` (the objective: what is optimised)
x ``--data`` x ``--trainer``. The backbone and the tuner are top-level keys given once; the CLI links
the *same* instantiated :class:`~ftbench.backbone.Backbone` into the objective and the data module,
and the tuner into the objective, so that tuners and objectives cross freely (a sweep's grid names
them as sibling axes). Every run gets the measurement callbacks and a
:class:`~ftbench.bench.record.RunRecorder`; the record goes to ``{out}/{run_id}.json`` where
``run_id`` is :func:`ftbench.naming.run_id` of the run's normal form (:func:`ftbench.config_reading.identity`)
unless given.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from ftbench.runcli import CLI_KWARGS, cli_class, die_with_parent, quiet_environment

SWEEP_COMMANDS = ("sweep", "report")


def on_terminal() -> bool:
    """Whether a person watches this run: stdout and stderr (where the progress bar draws) are both
    terminals. A run piped to a file or a sweep's child has no one to show a progress bar to, and
    Lightning's default (rich) bar redraws from a thread once a second, ~2 s of CPU in a quickstart run."""
    return all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr))


def cli_main(args: Optional[list[str]] = None, run: bool = True):
    """Run the LightningCLI part (``fit``/``validate``/``test``); the progress bar is on by default
    only on a terminal (``--trainer.enable_progress_bar`` says otherwise; the run id ignores it)."""
    quiet_environment()
    FTBenchCLI, Objective, DataModule, SaveConfig = cli_class()
    FTBenchCLI.argv = list(sys.argv[1:] if args is None else args)
    return FTBenchCLI(Objective, DataModule, save_config_callback=SaveConfig, args=args, run=run,
                      save_config_kwargs={"overwrite": True},
                      trainer_defaults={"enable_progress_bar": on_terminal()}, **CLI_KWARGS)


def known_error(err: BaseException):
    """The :class:`~ftbench.errors.FTBenchError` behind ``err``, if any: jsonargparse wraps an error
    raised while it instantiates a class (a tuner refusing its settings) in its own."""
    from ftbench.errors import FTBenchError

    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, FTBenchError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def report_error(err: BaseException) -> int:
    """One line for a known error (see :mod:`ftbench.errors`); exit status 2."""
    hint = getattr(err, "hint", None)
    print(f"ftbench: error: {err}" + (f"\nftbench: hint: {hint}" if hint else ""), file=sys.stderr)
    return 2


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--traceback" in argv:
        argv.remove("--traceback")
        os.environ["FTBENCH_TRACEBACK"] = "1"
    if argv and argv[0] in SWEEP_COMMANDS:
        from ftbench.sweep.cli import main as sweep_main

        sys.exit(sweep_main(argv))
    if argv and argv[0] == "estimate":
        from ftbench.estimate import main as estimate_main

        sys.exit(estimate_main(argv[1:]))
    if os.environ.get("LOCAL_RANK", "0") != "0":  # a DDP rank above 0: a child of rank 0
        die_with_parent()
    # LightningCLI reads sys.argv itself (given `args` too, it warns that both were given)
    sys.argv = [sys.argv[0], *argv]
    try:
        cli_main()
    except Exception as err:
        known = known_error(err)
        if known is None or os.environ.get("FTBENCH_TRACEBACK"):
            raise
        sys.exit(report_error(known))


if __name__ == "__main__":
    main()
