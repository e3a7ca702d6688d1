"""Data regimes: one LightningDataModule per regime, sharing :mod:`ftbench.data.base`."""

from ftbench.data.base import DataFormatError
from ftbench.data.domain import DomainData
from ftbench.data.instruction import InstructionData
from ftbench.data.multitask import MultiTaskData, TaskSpec
from ftbench.data.preference import PreferenceData
from ftbench.data.unpaired import UnpairedData

__all__ = ["DataFormatError", "DomainData", "InstructionData", "MultiTaskData", "PreferenceData", "TaskSpec", "UnpairedData"]
