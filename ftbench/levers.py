"""The speed levers a run sets besides its method: fused kernels (Liger), ``torch.compile``, and what the
record says about the kernels its precision ran on.

The settings are the backbone's (how the model computes, beside ``gradient_checkpointing`` and
``attn_implementation``): ``backbone.compile`` / ``compile_mode`` / ``compile_backend`` and
``backbone.liger_kernel``; they are settings, so they change the run id. The precision is Lightning's
``trainer.precision`` (``32-true``, ``bf16-mixed``, ``bf16-true``, ``16-mixed``): :func:`precision_kernels`
says what the device offers for it.

* **Liger** (``liger-kernel``, the optional extra ``ftbench[liger]``): RMSNorm, RoPE and SwiGLU are
  patched on the loaded model (Liger's ``_apply_liger_kernel_to_instance`` for its model type) before the
  tuner wraps it; SFT's loss becomes Liger's fused linear cross-entropy (:func:`fused_linear_cross_entropy`:
  the logits are never made whole, only one chunk at a time). Liger's kernels are Triton kernels: CUDA only.
* **torch.compile**: ``nn.Module.compile`` of the prepared model (after the tuner, after a frozen reference
  copy is made), in place, so the tuner, the saver and the reference switch see the same module. The
  compile time is kept apart from the step time by :class:`ftbench.bench.measure.Throughput`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch

from ftbench.errors import ConfigError

LIGER_EXTRA = "pip install 'ftbench[liger]'"


# ---------------------------------------------------------------------- Liger
def check_liger(device_type: Optional[str]) -> None:
    """Refuse ``backbone.liger_kernel`` where it cannot run: off CUDA, or without the package."""
    if device_type != "cuda":
        raise ConfigError(f"backbone.liger_kernel: Liger's fused kernels are Triton kernels and need a CUDA GPU; "
                          f"this run is on {device_type or 'no device'} (set backbone.liger_kernel false)")
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        raise ConfigError(f"backbone.liger_kernel: the liger-kernel package is not installed ({LIGER_EXTRA})") from None


def apply_liger(model: torch.nn.Module, device_type: Optional[str]) -> torch.nn.Module:
    """Patch the loaded transformers model with Liger's RMSNorm, RoPE and SwiGLU kernels (its apply function
    for the model type). Its fused loss is not patched into the model's forward: ftbench computes the loss
    itself (SFT calls :func:`fused_linear_cross_entropy`)."""
    check_liger(device_type)
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"backbone.liger_kernel: Liger has no kernels for model type {model_type!r} "
                          f"(it has: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))})")
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    model.ftbench_liger = True
    return model


@contextlib.contextmanager
def head_bypassed(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Within it the model's output layer returns its input: the forward gives the final hidden states
    (B x T x H) instead of the logits, and the context gives the head's weight (V x H) for a fused loss."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head) is not torch.nn.Linear or head.bias is not None:
        raise ConfigError(f"backbone.liger_kernel: the fused loss needs a plain, bias-free output layer; this model's "
                          f"is {type(head).__name__} (a tuner that wraps the head cannot use it)")
    head.forward = _identity
    try:
        yield head.weight
    finally:
        del head.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def liger_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Rows of logits Liger's fused linear cross-entropy makes at a time (its own rule): the transient logits
    are bounded by about ``tokens x hidden`` elements: ``inc = ceil(V / H)``, chunk = the next power of two of
    ``ceil(BT / inc)``, at most ``BT``. E.g. BT = 4 x 96 = 384 tokens, H = 64, V = 512: inc = 8,
    ceil(384 / 8) = 48 -> 64 rows, so 64 x 512 logits at a time instead of 384 x 512."""
    inc = -(-vocab // hidden)
    rows = -(-tokens // inc)
    return min(1 << max(0, (rows - 1).bit_length()), tokens)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Liger's fused linear cross-entropy in plain torch, with its allocations: the mean cross-entropy of
    ``hidden @ weight.T`` (ignore index -100) computed one chunk of rows at a time; each chunk's logits
    (``chunk x V`` in the input's dtype) become its gradient in place, and the gradients with respect to the
    input (``BT x H``) and to the weight (``V x H``, when it trains) are made in the forward and kept for the
    backward (which only scales them). It stands for Liger's Triton kernel where that cannot run: on the meta
    device (``ftbench estimate``) and in tests (checked against ``F.cross_entropy``)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tokens, width = hidden.shape
        chunk = liger_chunk_size(tokens, width, weight.shape[0])
        grad_input = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        valid = target != -100
        count = valid.sum().clamp(min=1).to(torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens, chunk):
            x, t, ok = hidden[start:start + chunk], target[start:start + chunk], valid[start:start + chunk]
            logits = x @ weight.t()  # the one chunk x V transient
            safe = torch.where(ok, t, torch.zeros_like(t))
            picked = logits.gather(1, safe[:, None])[:, 0].float()
            top = logits.amax(1, keepdim=True)
            logits.sub_(top).exp_()
            total = logits.sum(1, keepdim=True)
            loss = loss + ((top[:, 0].float() + total[:, 0].float().log() - picked) * ok).sum()
            logits.div_(total)  # softmax
            logits.scatter_add_(1, safe[:, None], -torch.ones_like(picked[:, None], dtype=logits.dtype))
            logits.mul_((ok.to(logits.dtype) / count.to(logits.dtype))[:, None])  # d(mean loss)/d(logits)
            grad_input[start:start + chunk] = logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(logits.t(), x)
            del logits
        ctx.save_for_backward(grad_input, grad_weight)
        return loss / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_input, grad_weight = ctx.saved_tensors
        scale = grad_output.to(grad_input.dtype)
        return grad_input * scale, (grad_weight * scale if grad_weight is not None else None), None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``target`` (ignore index -100) without the whole
    logits: Liger's kernel on CUDA, :class:`ChunkedLinearCrossEntropy` elsewhere (meta, tests)."""
    if hidden.device.type == "cuda":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden, weight, target, ignore_index=-100, reduction="mean")
    return ChunkedLinearCrossEntropy.apply(hidden, weight, target)


# ---------------------------------------------------------------------- torch.compile
def check_compile(tuner_name: str, quantization: str, liger: bool) -> None:
    """Refuse ``backbone.compile`` where it breaks. No tuner family does on torch 2.13 / peft 0.22: full,
    LoRA, prompt tuning, prefix tuning, Houlsby adapters and QLoRA (nf4) each trained 4 steps compiled
    (``aot_eager``, the tiny Llama on CPU; full also with Inductor), graph breaks included (prefix tuning's
    cache, bitsandbytes' 4-bit matmul). What breaks is the fused loss's per-step swap of the output layer."""
    if liger:
        raise ConfigError("backbone.compile: not with backbone.liger_kernel: the fused loss swaps the output layer's "
                          "forward at every step, which would recompile the model each time (set one of them false)")


def compile_model(model: torch.nn.Module, mode: Optional[str], backend: str) -> torch.nn.Module:
    """``model.compile(...)`` in place: the module keeps its type (peft's wrapper, the tuner's hooks, the
    saver see the same object); its forward is compiled on the first call."""
    kwargs: dict[str, Any] = {"backend": backend}
    if mode is not None:
        kwargs["mode"] = mode
    model.compile(**kwargs)
    return model


def compile_seconds() -> float:
    """Seconds torch has spent compiling in this process so far: Dynamo's frame compiles (the forward's
    graph, Inductor's code generation for it included) and the backward graphs compiled on their first
    call (``torch._dynamo.utils.compilation_time_metrics``; 0 before anything was compiled)."""
    import sys

    utils = sys.modules.get("torch._dynamo.utils")
    metrics = getattr(utils, "compilation_time_metrics", None) or {}
    return float(sum(sum(v) for k, v in list(metrics.items())
                     if k == "_compile.compile_inner" or k.endswith("bw_compiler")))


# ---------------------------------------------------------------------- what ran
def precision_kernels(device: torch.device) -> dict[str, Any]:
    """What the device offers for low precision, for the record: on CPU torch's vector capability, oneDNN's
    bf16/fp16 support and the AVX512-BF16 / AMX instructions; on CUDA the compute capability and whether
    bf16 is native (sm_80 and later; an older GPU emulates it)."""
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return {"device": "cuda", "capability": f"{major}.{minor}", "bf16_native": major >= 8,
                "bf16_supported": torch.cuda.is_bf16_supported(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    out: dict[str, Any] = {"device": device.type, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "mkldnn": torch.backends.mkldnn.is_available()}
    checks = {"mkldnn_bf16": lambda: torch.ops.mkldnn._is_mkldnn_bf16_supported(),
              "mkldnn_fp16": lambda: torch.ops.mkldnn._is_mkldnn_fp16_supported(),
              "avx512_bf16": lambda: torch.cpu._is_avx512_bf16_supported(),
              "amx_tile": lambda: torch.cpu._is_amx_tile_supported(),
              "amx_fp16": lambda: torch.cpu._is_amx_fp16_supported()}
    for name, check in checks.items():
        try:
            out[name] = bool(check())
        except (AttributeError, RuntimeError):  # a torch without the probe: unknown
            out[name] = None
    return out
