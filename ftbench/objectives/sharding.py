"""One run sharded over several processes with FSDP2 (``torch.distributed.fsdp.fully_shard``), as
Lightning's ``ModelParallelStrategy`` asks: the LightningModule applies the parallelism itself in
``configure_model``, on the device mesh the strategy hands it (``configs/trainer/fsdp2.yaml``).

Each decoder block is one FSDP unit (the classes transformers lists as ``_no_split_modules``: a
block is gathered whole for its forward and freed after it), then the root takes what is left
(embeddings, final norm, head). Under this FULL_SHARD layout every parameter is split on its first
dimension across the data-parallel ranks, so a rank holds about 1/N of the weights, of their
gradients and of the optimizer state (AdamW's moments are made like the sharded parameters).

Unlike Lightning's ``FSDPStrategy`` (FSDP1, which Lightning refuses on a CPU accelerator), FSDP2 runs
on CPU with the gloo backend, which is how the tests run it (tests/test_sharding.py).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from ftbench.errors import ConfigError

#: the trainer option that chose FSDP2, named in errors
STRATEGY = "trainer.strategy ModelParallelStrategy (FSDP2 fully_shard)"


def check_shardable(quantization: str) -> None:
    """Refuse what FSDP2 cannot shard. A bitsandbytes 4-/8-bit weight is a ``Params4bit``/``Int8Params``
    whose packed bytes and quantization state (absmax, code; the real shape in ``quant_state``) are
    not one tensor that ``fully_shard`` can split on its first dimension into DTensors: QLoRA under
    FSDP2 is the open request accelerate#3874 (FSDP1 with ``bnb_4bit_quant_storage`` is the route
    answer.ai's FSDP-QLoRA took; ftbench does not set it up)."""
    if quantization != "none":
        raise ConfigError(
            f"backbone.quantization: {quantization} weights cannot be sharded by {STRATEGY}: a bitsandbytes "
            "quantized weight is not a plain tensor fully_shard can split (QLoRA under FSDP2: accelerate#3874)",
            hint="train the quantized backbone with strategy ddp (one copy per device), or set "
                 "backbone.quantization: none")


def block_classes(model: torch.nn.Module) -> tuple[type, ...]:
    """The module classes of ``model``'s repeated blocks: transformers names them in
    ``_no_split_modules`` (``LlamaDecoderLayer`` ...); peft wraps the model but keeps its blocks."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def fully_shard_model(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """Shard ``model`` in place over ``mesh`` (1-D, the data-parallel ranks): each block, then the root.
    Returns the model (now an ``FSDPModule``)."""
    from torch.distributed.fsdp import fully_shard

    blocks = block_classes(model)
    if not blocks:
        raise ConfigError(f"{STRATEGY}: the model names no repeated block (_no_split_modules) to shard by")
    for module in list(model.modules()):
        if isinstance(module, blocks):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        # what transformers' own FSDP2 set-up marks: its generate() then keeps every rank stepping until
        # all are done (synced_gpus), since a rank that stopped early would leave the others' gathers waiting
        module._is_fsdp_managed_module = True
    return model


@contextlib.contextmanager
def unsharded(model: Optional[torch.nn.Module]) -> Iterator[None]:
    """Within it, ``model``'s sharded parameters are whole, plain tensors on every rank (each gathered
    with ``DTensor.full_tensor()``, a collective every rank enters in the same order), so that a tuner
    saves them as it saves an unsharded model; the shards are put back on leaving. A model that is not
    sharded is left as it is. (FSDP2's own ``unshard()`` is no help here: its state-dict hook puts the
    shards back before ``state_dict()`` reads them.)"""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for module in model.modules() if model is not None else ():
        if isinstance(module, FSDPModule):
            module.reshard()  # a unit left gathered (the root after an evaluation forward) holds its shards again
    swapped = []
    for module in model.modules() if model is not None else ():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                swapped.append((module, name, p))
                module._parameters[name] = torch.nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p
