"""Objectives: what is optimised (the LightningModules). ``losses`` holds the pure loss functions.

Crossed freely with the tuners (``ftbench.tuners``): a run is backbone x tuner x objective x data x trainer.
"""

from ftbench.objectives.base import Objective
from ftbench.objectives.step import NonFiniteLossError
from ftbench.objectives.cpo import CPO
from ftbench.objectives.dpo import DPO
from ftbench.objectives.grpo import GRPO
from ftbench.objectives.kto import KTO
from ftbench.objectives.orpo import ORPO
from ftbench.objectives.ppo import PPO
from ftbench.objectives.reward import Reward
from ftbench.objectives.sft import SFT

__all__ = ["Objective", "NonFiniteLossError", "SFT", "Reward", "DPO", "GRPO", "PPO", "KTO", "CPO", "ORPO"]
