"""Tuners: what trains (full, freeze, any peft config, bottleneck adapters, none)."""
