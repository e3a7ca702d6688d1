"""Quantized backbones through bitsandbytes: 4-bit NF4/FP4 (QLoRA) and 8-bit (LLM.int8()).

QLoRA is not a tuner of its own: it is the LoRA tuner (:class:`~ftbench.tuners.Peft` with a
``LoraConfig``, or any adapter tuner) on a backbone loaded with ``quantization: nf4`` (a config, like
LitGPT's ``qlora.yaml``). This module builds the
transformers ``BitsAndBytesConfig``, repairs what a quantized load needs on CPU, and measures how
many bytes the backbone's weights take in memory and in which storage format.

Known trap (bitsandbytes 0.50, CPUs with AVX512-BF16): the first eval-mode, no-grad forward of a
``Linear4bit`` repacks its weights into a CPU inference layout, and the repacked path does not pass
gradients back to its input. LoRA layers below it then get no gradient at all and training silently
does nothing (Lightning's sanity check and every validation are such forwards).
:func:`after_quantized_load` turns the repacking off on every ``Linear4bit``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ftbench.errors import FTBenchError
from ftbench.storage import STORAGE, storage_of

KINDS = ("nf4", "fp4", "int8")


class QuantizationError(FTBenchError):
    """A quantization setting that cannot be honoured."""


def bnb_config(
    kind: str,
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = False,
    quant_storage: Optional[torch.dtype] = None,
    skip_modules: Optional[list[str]] = None,
):
    """The transformers ``BitsAndBytesConfig`` for ``kind`` (``nf4``, ``fp4`` or ``int8``).

    ``compute_dtype`` is the dtype of the 4-bit matmuls (the weights are dequantised to it block by
    block); ``double_quant`` also quantizes the per-block absmax constants (QLoRA's double
    quantization: about 0.37 bits per parameter saved). Both are 4-bit settings; for ``int8`` they are
    ignored, and asking for double quantization with it is an error. ``skip_modules`` are module
    names kept unquantized (transformers keeps the output head unquantized by default).
    """
    from transformers import BitsAndBytesConfig

    if kind not in KINDS:
        raise QuantizationError(f"quantization: {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "int8":
        if double_quant:
            raise QuantizationError("quantization: double_quant is a 4-bit setting (nf4/fp4), not int8")
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    kwargs: dict[str, Any] = {}
    if quant_storage is not None:
        kwargs["bnb_4bit_quant_storage"] = quant_storage
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        llm_int8_skip_modules=skip_modules,
        **kwargs,
    )


def linear4bit_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from bitsandbytes.nn import Linear4bit

    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def after_quantized_load(model: torch.nn.Module) -> torch.nn.Module:
    """Make a freshly loaded quantized model safe to train on (returns it).

    Turns off bitsandbytes' AVX512-BF16 weight repacking on every ``Linear4bit`` (see the module
    docstring): without it, LoRA on a 4-bit backbone stops receiving gradients after the first
    validation on such a CPU.
    """
    for module in linear4bit_modules(model):
        module.support_avx512bf16_for_cpu = False
    return model


def cpu_repacks_4bit() -> bool:
    """Whether this machine's bitsandbytes would repack 4-bit weights in eval forwards (the trap)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:  # other bitsandbytes versions
        return False
    return bool(has_avx512bf16())


# ---------------------------------------------------------------------- memory
def _is_added(name: str, added_markers: tuple[str, ...]) -> bool:
    parts = name.split(".")
    return any(m in parts for m in added_markers)


def _added_markers(model: torch.nn.Module) -> tuple[str, ...]:
    """Name parts that mark parameters a method added (peft adapter names, ftbench adapters)."""
    markers = ["bottleneck_adapter"]
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict):
        markers += list(peft_config)  # peft puts the adapter name ("default") in every added name
    return tuple(markers)


def weight_footprint(model: torch.nn.Module, quantization: str = "none") -> dict[str, Any]:
    """Bytes the backbone's weights take in memory, by storage format.

    Counts every parameter of ``model`` once (tied tensors once) except those a method added
    (peft adapters, bottleneck adapters), with 4-bit quantization constants (absmax, code, nested
    double-quant state) and 8-bit row scales included. ``storage_format`` names the format of the
    quantized linear layers (``bnb-nf4``, ``bnb-fp4``, ``bnb-int8``) or, unquantized, the dtype of
    the largest share of bytes; ``weight_bytes_by_storage`` gives the mix (embeddings, norms and
    the output head stay unquantized).
    """
    markers = _added_markers(model)
    seen: set[int] = set()
    by_storage: dict[str, int] = {}
    owners = {id(p): mod for mod in model.modules() for p in mod.parameters(recurse=False)}
    for name, param in model.named_parameters(remove_duplicate=False):
        if _is_added(name, markers) or id(param) in seen:
            continue
        seen.add(id(param))
        fmt, nbytes = storage_of(param, owners.get(id(param)))
        by_storage[fmt] = by_storage.get(fmt, 0) + nbytes
    total = sum(by_storage.values())
    if quantization in STORAGE and STORAGE[quantization] in by_storage:
        fmt = STORAGE[quantization]
    else:
        fmt = max(by_storage, key=by_storage.get) if by_storage else "none"
    return {
        "weight_bytes": total,
        "storage_format": fmt,
        "weight_bytes_by_storage": dict(sorted(by_storage.items())),
    }
