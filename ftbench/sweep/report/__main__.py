import sys

from ftbench.sweep.report.cli import main

sys.exit(main())
