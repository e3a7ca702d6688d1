"""Put the quickstart's report table into README.md, between its markers.

    python scripts/update_readme.py [RESULTS_DIR]   (default: experiments/quickstart/results)

The table is made by ``ftbench report`` from the committed run records, never typed by hand.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- quickstart-table:start -->", "<!-- quickstart-table:end -->"


def main(argv: list[str]) -> int:
    from ftbench.fileio import write_text_atomic
    from ftbench.sweep.report import report

    results = Path(argv[0]) if argv else ROOT / "experiments" / "quickstart" / "results"
    table = report(results)
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"{readme}: markers {START} / {END} not found", file=sys.stderr)
        return 1
    rel = results.resolve().relative_to(ROOT) if results.resolve().is_relative_to(ROOT) else results
    block = f"{START}\nMade by `ftbench report {rel}` from the run records committed there:\n\n{table}\n{END}"
    text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    write_text_atomic(readme, text)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
