"""One definition of "the same run" and of a run's method label, torch-free.

The normal form of a run's configuration is made by the parser the run itself uses
(:func:`ftbench.config_reading.identity`, :func:`ftbench.runcli.read_run`); this module says what of it
identifies the run and how a run is named, so that ``ftbench fit``, ``ftbench sweep`` and
``ftbench report`` agree:

* The **method label** names a run by what is optimised, what trains and how the backbone is stored:
  ``objective+tuner[+quantization]``, e.g. ``sft+lora``, ``sft+lora+nf4``, ``dpo+full``
  (:func:`method_label`; the parts are the objective's and the tuner's ``name``).
* A run's **settings** are its normal form less :data:`NOT_SETTINGS`; the **run id** is
  ``{label}-{digest}``, the digest a hash of the subcommand and the settings (:func:`run_id`).
  The report's grid point is the settings less the seed (:data:`SEED`): seeds of a point are averaged.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Optional

#: configuration keys that are not settings: they change neither what a run computes nor what it
#: measures, so they are left out of the run id and of the report's grid points
NOT_SETTINGS = (
    "out",                          # where the record goes (the same run in another folder is the same run)
    "run_id",                       # the record's name, derived from the settings
    "config",                       # the files that gave the values (their values are the settings)
    "save_weights",                 # keeping what trained afterwards (a sweep sets it on upstream stages)
    "print_config",                 # prints the config and exits
    "overwrite",                    # whether an existing record may be replaced
    "traceback",                    # how an error is printed
    "trainer.logger",               # where metrics are also sent (turning W&B on for a finished sweep reruns nothing)
    "trainer.enable_progress_bar",  # what the terminal shows
    "trainer.default_root_dir",     # where Lightning writes its logs ({out}/{run_id} unless given)
    "trainer.callbacks",            # watchers the config adds (the CLI adds the measuring ones itself)
    "model.init_args.backbone",     # link targets: the top-level backbone, a setting of its own
    "data.init_args.backbone",
)
#: the seed: part of a run's id, not of its grid point (the report averages over seeds)
SEED = "seed_everything"
#: keys whose value may be another run's saved weights (a pipeline stage: ``{out}/{run id}/weights``)
UPSTREAM_KEYS = ("backbone.init_from", "model.init_args.reward_model")
#: how the settings refer to another run's saved weights: by its run id, not a path (where the results
#: go is not part of a run's identity, and a changed upstream run is a changed downstream run)
RUN_REF = "run:"
_RUN_WEIGHTS = re.compile(r"(?:^|[/\\])([^/\\]+-[0-9a-f]{10})[/\\]weights[/\\]?$")

#: peft configs whose label is not their lower-cased name (peft's own names for them)
_PEFT_LABELS = {"PromptEncoder": "p_tuning", "AdaptionPrompt": "adaption_prompt", "TrainableTokens": "trainable_tokens"}


def peft_label(config_class: str, use_dora: bool = False) -> str:
    """``LoraConfig`` -> ``lora`` (``dora`` with ``use_dora``), ``IA3Config`` -> ``ia3``,
    ``PrefixTuningConfig`` -> ``prefix_tuning``, ``AdaLoraConfig`` -> ``adalora``."""
    name = config_class.rsplit(".", 1)[-1]
    name = name[: -len("Config")] if name.endswith("Config") else name
    if name in _PEFT_LABELS:
        return _PEFT_LABELS[name]
    name = re.sub(r"(?<=.)Tuning$", "_tuning", name).lower()
    return "dora" if name == "lora" and use_dora else name


def method_label(objective: str, tuner: str, quantization: Optional[str] = None) -> str:
    """``sft+lora``; with a quantized backbone ``sft+lora+nf4`` (LoRA on nf4 is QLoRA: its own row)."""
    label = f"{objective}+{tuner}"
    return label if quantization in (None, "", "none") else f"{label}+{quantization}"


def upstream_ref(value: Any) -> Any:
    """``{out}/{run id}/weights`` (what a sweep hands a pipeline stage) as ``run:{run id}``; else ``value``."""
    match = _RUN_WEIGHTS.search(value) if isinstance(value, str) else None
    return RUN_REF + match.group(1) if match else value


def drop_keys(config: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``config`` without the dotted ``keys``."""
    out = json.loads(json.dumps(config, default=str))
    for key in keys:
        parts, d = key.split("."), out
        for p in parts[:-1]:
            d = d.get(p) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.pop(parts[-1], None)
    return out


def run_id(label: str, subcommand: str, settings: dict[str, Any]) -> str:
    """``{label}-{10 hex digits}`` of a run's settings (its normal form less :data:`NOT_SETTINGS`)."""
    payload = json.dumps({"cmd": subcommand, "config": settings}, sort_keys=True, default=str)
    return f"{label}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def grid_point(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that make a report's grid point: all but the seed."""
    return drop_keys(settings, (SEED,))
