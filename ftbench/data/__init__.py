"""Data regimes: one LightningDataModule per regime, sharing :mod:`ftbench.data.base`."""

from ftbench.data.base import DataFormatError
from ftbench.data.instruction import InstructionData

__all__ = ["DataFormatError", "InstructionData"]
