"""Sweeps (grids of runs, each in its own process) and reports (tables and plots from records)."""
