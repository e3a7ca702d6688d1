"""MemoryBreakdown: the bytes of each part of a training step, computed by hand on the tiny Llama.

The tiny Llama (tests/conftest.py): vocabulary V = 512, hidden H = 64, 2 blocks, 4 query heads and 2
key/value heads of dimension 16 (so K = 32 key/value features), MLP width I = 128, untied head. Every
run is one Lightning fit of SFT (``ftbench.objectives.SFT``) on one fixed full batch of B = 4 rows x
T = 32 tokens (no padding, every label trained), float32 on CPU; the breakdown is read on batch 1.

The activation formulas below are the tensors autograd saves, derived op by op from transformers'
Llama and SFT's loss and checked against an independent count: a walk of the autograd graph from the
loss that reads every node's saved tensors (``_saved_*`` attributes), a different mechanism than the
pack hook the callback uses.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

V, H, LAYERS, HEADS, KV_HEADS, HEAD_DIM, I = 512, 64, 2, 4, 2, 16, 128
K = KV_HEADS * HEAD_DIM  # 32 key/value features
B, T = 4, 32
N, N1 = B * T, B * (T - 1)  # tokens; positions with a next-token target
F32 = 4

# parameters of the tiny Llama
PER_BLOCK_LINEAR = H * H + K * H + K * H + H * H + 3 * I * H  # q, k, v, o, gate, up, down = 36,864
PER_BLOCK = PER_BLOCK_LINEAR + 2 * H  # two RMSNorm weights
PARAMS = V * H + LAYERS * PER_BLOCK + H + V * H  # embedding, blocks, final norm, untied head = 139,584
LINEARS = 7 * LAYERS  # quantized / LoRA-adapted linear layers (the head is neither)
BUFFERS = 2 * (HEAD_DIM // 2) * F32  # rotary inv_freq and original_inv_freq, 8 float32 each
LORA_R = 8
LORA_PARAMS = LAYERS * LORA_R * ((H + H) + (H + K) + (H + K) + (H + H) + 3 * (H + I))  # A: r x in, B: out x r


def loss_saved() -> int:
    """SFT's loss: log-softmax over all N positions (float32, saved by nll_loss: the labels are shifted
    left and the last position's is -100, so the logits are not sliced and copied), the int64 targets,
    the bool mask multiplied in, the int64 token count divided by, nll's total weight."""
    return N * V * F32 + N * 8 + N * 1 + 8 + F32


def full_activations() -> int:
    """Full fine-tuning, float32: per block the input x (pow), rsqrt(mean x^2) (N floats), x*rsqrt and
    its product with the norm weight (saved by the weight's mul and by q/k/v), the same four for the
    post-attention norm (its input is the residual h), rotated q (N*H) and k (N*K), v (N*K), the
    attention output (N*H; the CPU flash kernel lays it out so o_proj's input shares it) and its
    float32 log-sum-exp (HEADS per token), the MLP's gate, up, silu(gate) and their product (N*I
    each); after the blocks the final norm's four; the embedding's int64 ids; rotary cos and sin
    (T x HEAD_DIM, shared by the rows and blocks); and the loss."""
    per_block = (8 * N * H + 2 * N * K + 2 * N + HEADS * N + 4 * N * I) * F32
    final_norm = (3 * N * H + N) * F32
    return LAYERS * per_block + final_norm + loss_saved() + N * 8 + 2 * T * HEAD_DIM * F32


def lora_activations() -> int:
    """LoRA on every linear layer but the head, frozen backbone, float32. Nothing requires grad before
    the first LoRA layer, so the embedding and block 0's input norm save nothing; a frozen norm weight
    saves no x*rsqrt; each LoRA layer saves its input (lora_A: shared with the other adapters on the
    same input) and lora_A's output (N x r, for lora_B); the head is frozen and not adapted."""
    lora_mid = 7 * N * LORA_R
    block = 6 * N * H + 2 * N * K + 2 * N + HEADS * N + 4 * N * I + lora_mid
    block0 = block - N * H - N  # its input x and rsqrt are not saved (no grad yet)
    final_norm = N * H + N
    return (block0 + (LAYERS - 1) * block + final_norm) * F32 + loss_saved() + 2 * T * HEAD_DIM * F32


def checkpointed_activations() -> int:
    """With gradient checkpointing every block keeps only its input; the rest as without."""
    return LAYERS * N * H * F32 + (3 * N * H + N) * F32 + loss_saved() + N * 8


def nf4_bytes(n: int, double_quant: bool = False) -> int:
    """What bitsandbytes stores for an n-element 4-bit weight: n/2 packed bytes, one absmax per
    64-block (float32, or with double quantization uint8 plus a float32 offset and a second-level
    float32 absmax per 256 first-level blocks and its 256-entry float32 code), and the 16-entry float32
    NF4 code."""
    blocks = math.ceil(n / 64)
    if not double_quant:
        return n // 2 + blocks * F32 + 16 * F32
    return n // 2 + blocks + F32 + math.ceil(blocks / 256) * F32 + 256 * F32 + 16 * F32


LINEAR_SHAPES = [(H, H), (K, H), (K, H), (H, H), (I, H), (I, H), (H, I)] * LAYERS  # (out, in)
UNQUANTIZED = V * H + LAYERS * 2 * H + H + V * H  # embedding, norms, head


# ---------------------------------------------------------------------- running one fit
def adamw(lr: float = 1e-3):
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)


def lora_tuner():
    from peft import LoraConfig

    from ftbench.tuners import Peft

    return Peft(peft_config=LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, target_modules="all-linear"))


def tuner_for(name: str):
    from ftbench.tuners import Full

    return Full() if name == "full" else lora_tuner()


def full_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(4, V - 1, (B, T), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def measure(model_dir, tuner, *, quantization="none", double_quant=False, gradient_checkpointing=False,
            precision="32-true", optimizer=None, steps=3, batch_index=1, keep=None, objective_class=None) -> dict:
    """One fit of SFT (or ``objective_class``) with ``tuner`` and the callback; the callback's results."""
    import lightning as L

    from ftbench.backbone import Backbone
    from ftbench.bench.memory import MemoryBreakdown
    from ftbench.objectives import SFT

    bb = Backbone(model=str(model_dir), quantization=quantization, double_quant=double_quant,
                  gradient_checkpointing=gradient_checkpointing)
    objective = (objective_class or SFT)(backbone=bb, tuner=tuner, optimizer=optimizer or adamw())
    cb = MemoryBreakdown(batch_index=batch_index)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[cb])
    loader = torch.utils.data.DataLoader([full_batch()] * steps, batch_size=None)
    trainer.fit(objective, train_dataloaders=loader)
    if keep is not None:
        keep.append(objective)
    return cb.results


@pytest.fixture(scope="module")
def full(tiny_model_dir):
    objs: list = []
    return measure(tiny_model_dir, tuner_for("full"), keep=objs), objs[0]


@pytest.fixture(scope="module")
def lora(tiny_model_dir):
    return measure(tiny_model_dir, lora_tuner())


# ---------------------------------------------------------------------- full fine-tuning
def test_full_weights_gradients_adam_exact(full):
    r, objective = full
    assert r["complete"] and r["device"] == "cpu" and r["batch_shape"] == [B, T]
    w = r["weights"]
    assert PARAMS == 139_584
    assert w["trainable_params"] == PARAMS and w["frozen_params"] == 0
    assert w["by_format"] == {"float32": PARAMS * F32}
    assert w["buffer_bytes"] == BUFFERS
    assert w["bytes"] == PARAMS * F32 + BUFFERS
    assert r["gradients"] == {"bytes": PARAMS * F32, "tensors": 21, "by_dtype": {"float32": PARAMS * F32}}
    # AdamW: exp_avg and exp_avg_sq (float32, like the weights) for each of the 21 trained tensors, and
    # one float32 `step` scalar each (on the host: torch keeps them there unless capturable/fused)
    opt = r["optimizer"]
    assert opt["step_tensors"] == 21 and opt["step_bytes"] == 21 * F32
    assert opt["bytes"] == 2 * PARAMS * F32 + 21 * F32
    assert opt["tensors"] == 3 * 21


def test_full_activations_exact_and_independent(full, tiny_model_dir):
    r, objective = full
    assert full_activations() == 1_487_500
    assert r["activations"]["bytes"] == full_activations()
    # the largest transient: the head's float32 logits over the whole vocabulary (B*T x V)
    assert r["largest_transient"]["bytes"] == N * V * F32
    assert r["largest_transient"]["shape"] == [N, V]
    act = r["activations"]
    assert r["predicted_peak_bytes"] == (r["weights"]["bytes"] + r["gradients"]["bytes"] + r["optimizer"]["bytes"]
                                         + act["bytes"] + act["other_live_bytes"] + N * V * F32)
    # independent: the same forward, counted by walking the autograd graph instead of the pack hook
    assert graph_saved_bytes(objective) == full_activations()


def graph_saved_bytes(objective) -> int:
    """Bytes of the distinct storages the autograd graph of one SFT loss holds (``_saved_*`` of every
    node; ``saved_tensors`` of Python functions), parameters and buffers excluded."""
    from ftbench.bench.memory import storage_key

    exclude = {storage_key(t)[0] for t in list(objective.parameters()) + list(objective.buffers())}
    loss = objective.loss(full_batch())[0]
    seen: dict[int, int] = {}
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        values = [getattr(node, a) for a in dir(node) if a.startswith("_saved_")]
        if hasattr(node, "saved_tensors"):
            values.append(node.saved_tensors)
        for v in values:
            for t in (v if isinstance(v, (tuple, list)) else [v]):
                if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.dtype == torch.float64):
                    # (0-d float64: a Python number autograd wrapped, e.g. LoRA's scaling in `x * scaling`;
                    # 8 host bytes that saved-tensor hooks are not shown)
                    key, nbytes = storage_key(t)
                    if key not in exclude:
                        seen[key] = nbytes
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(seen.values())


# ---------------------------------------------------------------------- LoRA, nf4, checkpointing
def test_lora_exact(lora):
    r = lora
    assert LORA_PARAMS == 16_384
    w = r["weights"]
    assert w["trainable_params"] == LORA_PARAMS and w["frozen_params"] == PARAMS
    assert w["trainable_bytes"] == LORA_PARAMS * F32 and w["frozen_bytes"] == PARAMS * F32
    assert r["gradients"]["bytes"] == LORA_PARAMS * F32
    assert r["optimizer"]["bytes"] == 2 * LORA_PARAMS * F32 + 2 * LINEARS * F32  # + a step per A and B
    assert r["activations"]["bytes"] == lora_activations() == 1_313_932
    assert r["largest_transient"]["bytes"] == N * V * F32


def test_lora_activations_independent(tiny_model_dir):
    from ftbench.backbone import Backbone
    from ftbench.objectives import SFT

    objective = SFT(backbone=Backbone(model=str(tiny_model_dir)), tuner=lora_tuner())
    objective.configure_model()
    assert graph_saved_bytes(objective) == lora_activations()


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_backbone_exact(tiny_model_dir, double_quant):
    r = measure(tiny_model_dir, lora_tuner(), quantization="nf4", double_quant=double_quant, steps=2)
    w = r["weights"]
    nf4 = sum(nf4_bytes(o * i, double_quant) for o, i in LINEAR_SHAPES)
    assert nf4 == (42_368 if not double_quant else 53_360)
    assert w["by_format"] == {"bnb-nf4": nf4, "float32": UNQUANTIZED * F32 + LORA_PARAMS * F32}
    assert w["quant_state_bytes"] == nf4 - sum(o * i for o, i in LINEAR_SHAPES) // 2
    assert w["trainable_params"] == LORA_PARAMS and w["frozen_params"] == PARAMS  # 4-bit weights count as parameters
    assert w["bytes"] == nf4 + UNQUANTIZED * F32 + LORA_PARAMS * F32 + BUFFERS
    assert r["gradients"]["bytes"] == LORA_PARAMS * F32
    assert r["optimizer"]["bytes"] == 2 * LORA_PARAMS * F32 + 2 * LINEARS * F32
    # a 4-bit layer saves nothing for backward but its packed weight (a parameter): as LoRA on float32
    assert r["activations"]["bytes"] == lora_activations()


def test_gradient_checkpointing_lowers_activations(tiny_model_dir, full):
    r = measure(tiny_model_dir, tuner_for("full"), gradient_checkpointing=True, steps=2)
    assert r["activations"]["bytes"] == checkpointed_activations() == 428_684
    assert r["activations"]["bytes"] < full[0]["activations"]["bytes"] / 3
    assert r["gradients"]["bytes"] == full[0]["gradients"]["bytes"]


def test_eight_bit_adam_state(tiny_model_dir, full):
    import bitsandbytes as bnb

    opt = functools.partial(bnb.optim.AdamW8bit, lr=1e-3, weight_decay=0.0)
    r = measure(tiny_model_dir, tuner_for("full"), optimizer=opt, steps=2)
    # tensors with >= 4096 elements (min_8bit_size): two uint8 states and two float32 absmax per
    # 256-block; the smaller ones (k/v: 2048, norms: 64) keep two float32 states; the two 256-entry
    # float32 quantile maps are shared by all tensors (counted once); bitsandbytes' step is an int
    sizes = [V * H, V * H] + LAYERS * [H * H, K * H, K * H, H * H, I * H, I * H, H * I, H, H] + [H]
    eight = [n for n in sizes if n >= 4096]
    small = [n for n in sizes if n < 4096]
    expected = sum(2 * n + 2 * math.ceil(n / 256) * F32 for n in eight) + sum(2 * n * F32 for n in small) + 2 * 256 * F32
    assert expected == 336_384
    assert r["optimizer"]["bytes"] == expected and r["optimizer"]["step_tensors"] == 0
    ratio = r["optimizer"]["bytes"] / full[0]["optimizer"]["bytes"]
    assert ratio == pytest.approx(expected / (2 * PARAMS * F32 + 21 * F32))
    assert ratio < 0.31  # 2 + 1/32 bytes a parameter instead of 8 on the 8-bit tensors


def test_bf16_mixed_counts_autocast_copies(tiny_model_dir, full):
    """Under autocast the bfloat16 copies of inputs and weights that the matmuls save are activations."""
    r = measure(tiny_model_dir, tuner_for("full"), precision="bf16-mixed", steps=2)
    assert r["weights"] == full[0]["weights"] and r["gradients"] == full[0]["gradients"]
    assert r["activations"]["bytes"] == 1_356_428  # pinned; tests/test_estimate.py checks it against meta
    assert r["largest_transient"]["dtype"] == "float32"  # the logits upcast for the loss


def test_tied_embeddings_counted_once(tmp_path):
    from ftbench.testing import build_tiny_llama

    path = build_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    r = measure(path, tuner_for("full"), steps=2)
    assert r["weights"]["trainable_params"] == PARAMS - V * H
    assert r["weights"]["bytes"] == (PARAMS - V * H) * F32 + BUFFERS
    assert r["gradients"]["bytes"] == (PARAMS - V * H) * F32


def test_results_before_and_without_a_measured_batch(tiny_model_dir):
    from ftbench.bench.memory import MemoryBreakdown

    assert MemoryBreakdown().results == {"batch_index": 1, "complete": False, "predicted_peak_bytes": 0}
    r = measure(tiny_model_dir, tuner_for("full"), steps=1, batch_index=1)  # batch 1 never comes
    assert r["complete"] is False and "activations" not in r
    with pytest.raises(ValueError):
        MemoryBreakdown(batch_index=-1)


def test_meter_leaves_no_hooks_behind_on_error():
    from ftbench.bench.memory import ActivationMeter

    w = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(RuntimeError):
        with ActivationMeter([w]):
            (torch.randn(2, 3) @ w).sum()
            raise RuntimeError("boom")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        (torch.randn(2, 3, requires_grad=True) * 2.0).exp()
    assert saved  # the outer hooks work again: ours were popped
