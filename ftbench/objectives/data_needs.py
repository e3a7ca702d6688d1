"""What an objective's batches must be, checked once before its model loads: a DPO run on instruction
rows stops with one line naming both instead of a ``KeyError: 'chosen_input_ids'`` after the load."""

from __future__ import annotations

from typing import Any

from ftbench.errors import ConfigError

#: how the refusal names what a regime's data module gives
GIVES = {"instruction": "instruction rows", "domain": "domain text", "multitask": "a task mixture",
         "preference": "preference pairs", "unpaired": "unpaired rows"}


def check_data(objective: Any, dm: Any, stage: str) -> None:
    """Refuse a data module whose regime (``SplitDataModule.regime``) is not among the objective's
    ``data_regimes`` (empty: any), and, for an objective that ``samples_from_prompts`` (online RL), a
    fit whose training batches are not prompts (``data.prompt_batches``), and a fit on packed training
    batches (``data.packing``) of a regime not among the objective's ``packed_regimes``. No data module:
    nothing to check."""
    regime = getattr(dm, "regime", None)
    if objective.data_regimes and isinstance(regime, str) and regime and regime not in objective.data_regimes:
        source = dm.source_name() if hasattr(dm, "source_name") else ""
        raise ConfigError(f"objective {objective.name} needs {objective.data_needs}; the data module "
                          f"({type(dm).__name__}" + (f", {source}" if source else "") + f") gives "
                          f"{GIVES.get(regime, f'{regime} data')}",
                          hint=f"give a data config of regime {' or '.join(objective.data_regimes)} (configs/data/*.yaml)")
    if stage == "fit" and getattr(dm, "row_packing", False) is True and regime not in objective.packed_regimes:
        raise ConfigError(f"objective {objective.name}: data.packing: packed batches of "
                          f"{GIVES.get(regime, f'{regime} data')} are refused: {objective.packing_refusal}",
                          hint="set data.init_args.packing: false")
    if objective.samples_from_prompts and stage == "fit" and getattr(dm, "prompt_batches", None) is False:
        raise ConfigError(f"objective {objective.name}: the data module gives supervised training batches; "
                          f"{objective.name.upper()} samples from prompts",
                          hint="set data.init_args.prompt_batches: true (e.g. configs/data/instruction_prompts.yaml)")
