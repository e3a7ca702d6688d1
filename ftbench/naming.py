"""One definition of "the same run" and of a run's method label, torch-free.

``ftbench fit``, ``ftbench sweep`` and ``ftbench report`` all call these, so a standalone fit and the
same sweep point get the same run id and the same label.

* The **method label** names a run by what is optimised, what trains and how the backbone is stored:
  ``objective+tuner[+quantization]``, e.g. ``sft+lora``, ``sft+lora+nf4``, ``dpo+full``.
* The **run id** is ``{label}-{digest}``: the digest is a hash of the subcommand and the run's *given*
  configuration (config files and YAML values parsed and deep-merged, dotted keys applied in sorted
  order, see :func:`ftbench.sweep.grid.normalised_config`), less the keys in :data:`NOT_IN_ID` that do
  not change what a run computes. The same point maps to the same id whatever the key order, and a
  change in any referenced file's content makes a new run.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Optional

#: keys that do not change what a run computes: turning W&B on for a finished sweep does not rerun it
NOT_IN_ID = ("out", "run_id", "config", "save_weights", "print_config", "trainer.logger",
             "trainer.enable_progress_bar", "trainer.default_root_dir", "overwrite", "traceback")

#: tuner classes whose label is not their lower-cased class name
_TUNER_LABELS = {"NoTuning": "none"}
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


def tuner_label(class_path: Optional[str], init_args: Optional[dict[str, Any]] = None) -> str:
    """The tuner part of a label from its ``class_path`` and ``init_args`` (a config mapping)."""
    if not class_path:
        return "run"
    cls = str(class_path).rsplit(".", 1)[-1]
    if cls == "Peft":
        peft_config = (init_args or {}).get("peft_config") or {}
        inner = peft_config.get("class_path") if isinstance(peft_config, dict) else None
        inner_args = (peft_config.get("init_args") or {}) if isinstance(peft_config, dict) else {}
        return peft_label(str(inner), bool(inner_args.get("use_dora"))) if inner else "peft"
    return _TUNER_LABELS.get(cls, cls.lower())


def objective_label(class_path: Optional[str]) -> str:
    """``ftbench.objectives.SFT`` -> ``sft``."""
    return str(class_path).rsplit(".", 1)[-1].lower() if class_path else "run"


def method_label(objective: str, tuner: str, quantization: Optional[str] = None) -> str:
    """``sft+lora``; with a quantized backbone ``sft+lora+nf4`` (LoRA on nf4 is QLoRA: its own row)."""
    label = f"{objective}+{tuner}"
    return label if quantization in (None, "", "none") else f"{label}+{quantization}"


def _class_of(node: Any) -> tuple[Optional[str], dict[str, Any]]:
    if isinstance(node, dict):
        return node.get("class_path"), node.get("init_args") or {}
    if isinstance(node, str):
        return node, {}
    return None, {}


def label_from_config(config: dict[str, Any]) -> str:
    """The method label of a run from its configuration mapping (given or resolved)."""
    objective, _ = _class_of(config.get("model"))
    tuner, tuner_args = _class_of(config.get("tuner"))
    backbone = config.get("backbone") if isinstance(config.get("backbone"), dict) else {}
    if objective is None and tuner is None:
        return "run"
    return method_label(objective_label(objective or "sft"), tuner_label(tuner, tuner_args),
                        backbone.get("quantization"))


def drop_keys(config: dict[str, Any], keys: tuple[str, ...] = NOT_IN_ID) -> dict[str, Any]:
    """A copy of ``config`` without the dotted ``keys``."""
    out = json.loads(json.dumps(config, default=str))
    for key in keys:
        parts, d = key.split("."), out
        for p in parts[:-1]:
            d = d.get(p) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.pop(parts[-1], None)
    return out


def run_id(subcommand: str, config: dict[str, Any]) -> str:
    """``{label}-{10 hex digits}`` for a run's normalised given configuration."""
    payload = json.dumps({"cmd": subcommand, "config": drop_keys(config)}, sort_keys=True, default=str)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
    return f"{label_from_config(config)}-{digest}"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: d}
