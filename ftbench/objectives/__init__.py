"""Objectives: what is optimised (the LightningModules). ``losses`` holds the pure loss functions."""
