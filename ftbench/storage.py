"""What a tensor stands for and what it takes in memory, counted one way for every reader: the
parameter count (:func:`numel`), the storage's identity and bytes (:func:`storage_key`), and a
weight's storage format with its quantization state (:func:`storage_of`). The memory breakdown
(:mod:`ftbench.bench.memory`), the backbone's footprint (:mod:`ftbench.quantization`) and the tuners'
parameter counts read them from here.

bitsandbytes keeps a 4-bit weight as packed bytes (two parameters a byte) plus a quantization state
(block absmax, the code, and with double quantization the 8-bit absmax's offset and a second state of
its own), and an 8-bit weight as int8 bytes plus float32 row scales (``SCB``, moved to the layer's
``state`` at its first forward).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

#: storage format of a quantized linear layer's weight, by quantization kind
STORAGE = {"nf4": "bnb-nf4", "fp4": "bnb-fp4", "int8": "bnb-int8"}


def numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a bitsandbytes 4-bit weight packs two into each byte and keeps
    its real shape in ``quant_state``."""
    quant_state = getattr(p, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return int(math.prod(shape)) if shape is not None else p.numel()


def dtype_name(dtype: torch.dtype) -> str:
    """``float32``, ``bfloat16``, ... (the dtype without ``torch.``)."""
    return str(dtype).replace("torch.", "")


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    """(identity of the tensor's storage, its bytes). Works on meta tensors (no data pointer there).
    A sharded tensor (a ``DTensor``: FSDP2's parameters, their gradients and optimizer state) counts
    the shard this process holds: the memory it takes here, about 1/N of the whole."""
    local = getattr(t, "_local_tensor", None)  # DTensor.to_local() without autograd
    if isinstance(local, torch.Tensor):
        t = local
    try:
        st = t.untyped_storage()
        return st._cdata, st.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested or other storage-less tensors
        return id(t), t.numel() * t.element_size()


def quant_state_tensors(param: torch.Tensor, owner: Optional[torch.nn.Module] = None) -> list[torch.Tensor]:
    """The tensors a bitsandbytes 4-bit weight keeps besides its packed bytes (absmax, code, offset,
    and the nested state of double quantisation), or an 8-bit weight's row scales (``owner``: the
    layer holding it, which takes the scales at its first forward)."""
    out: list[torch.Tensor] = []
    state = getattr(param, "quant_state", None)
    while state is not None:
        for attr in ("absmax", "code", "offset"):
            t = getattr(state, attr, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
        state = getattr(state, "state2", None)
    scb = getattr(param, "SCB", None)
    if scb is None and owner is not None and (type(param).__name__ == "Int8Params" or param.dtype == torch.int8):
        scb = getattr(getattr(owner, "state", None), "SCB", None)
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    return out


def storage_of(param: torch.Tensor, owner: Optional[torch.nn.Module] = None) -> tuple[str, int]:
    """Storage format (``bnb-nf4``, ``bnb-int8``, ``float32``, ...) and in-memory bytes of one weight,
    its quantization state included (``owner``: as for :func:`quant_state_tensors`)."""
    nbytes = param.numel() * param.element_size()
    nbytes += sum(t.numel() * t.element_size() for t in quant_state_tensors(param, owner))
    if type(param).__name__ == "Params4bit":
        state = getattr(param, "quant_state", None)
        kind = getattr(state, "quant_type", None) or getattr(param, "quant_type", "nf4")
        return STORAGE.get(kind, f"bnb-{kind}"), nbytes
    if type(param).__name__ == "Int8Params" or param.dtype == torch.int8:
        return STORAGE["int8"], nbytes
    return dtype_name(param.dtype), nbytes
