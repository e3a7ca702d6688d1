"""``ftbench estimate``: the memory breakdown from a config alone, on the meta device.

* On the tiny Llama the estimate equals the breakdown MemoryBreakdown measures in a real CPU step of
  the same configuration (tests/test_memory.py's runs): exactly, activations included.
* A Llama ``config.json`` written here (no weights, no hub): LoRA r=8 on all linear layers trains as
  many parameters as peft counts on the meta model; 4-bit weights take what bitsandbytes stores;
  checkpointing lowers activations; 8-bit AdamW lowers the optimizer state by the expected factor;
  the largest batch for a memory budget is the largest that fits; the command line prints a table
  and writes JSON.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from test_memory import B, T, adamw, lora_tuner, measure

# a small Llama (GQA, untied head) whose config.json is written by the test
HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 256, 4, 8, 2, 688, 1000
HEAD_DIM = HIDDEN // HEADS
KV = KV_HEADS * HEAD_DIM
LINEARS = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
           (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]  # (out, in) per block


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-config")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "intermediate_size": INTER, "vocab_size": VOCAB, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu"}
    (path / "config.json").write_text(json.dumps(config))
    return path  # a config and nothing else: no weights, no tokenizer


def backbone(path, **kw):
    from ftbench.backbone import Backbone

    return Backbone(model=str(path), **kw)


def full_tuner():
    from ftbench.tuners import Full

    return Full()


# ---------------------------------------------------------------------- meta = measured
CASES = {
    "full": dict(tuner=full_tuner),
    "lora": dict(tuner=lora_tuner),
    "qlora-nf4": dict(tuner=lora_tuner, quantization="nf4", double_quant=True),
    "lora-int8": dict(tuner=lora_tuner, quantization="int8"),
    "full-bf16-mixed": dict(tuner=full_tuner, precision="bf16-mixed"),
    "lora-bf16-true": dict(tuner=lora_tuner, precision="bf16-true"),
    "full-checkpointing": dict(tuner=full_tuner, gradient_checkpointing=True),
    "full-adamw8bit": dict(tuner=full_tuner, optimizer="adamw8bit"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_equals_measured_step(tiny_model_dir, case):
    from ftbench.estimate import estimate, optimizer_factory

    spec = dict(CASES[case])
    make_tuner = spec.pop("tuner")
    precision = spec.pop("precision", "32-true")
    optimizer = spec.pop("optimizer", None)
    factory = optimizer_factory(optimizer) if optimizer else adamw()
    real = measure(tiny_model_dir, make_tuner(), precision=precision, optimizer=factory, steps=2, **spec)
    est = estimate(backbone(tiny_model_dir, **spec), make_tuner(), batch_size=B, seq_len=T,
                   precision=precision, optimizer=factory)
    assert est["weights"] == real["weights"]
    assert est["gradients"] == real["gradients"]
    for key in ("bytes", "tensors", "by_dtype", "step_tensors", "step_bytes"):
        assert est["optimizer"][key] == real["optimizer"][key], key
    # activations: exactly (the issue asks within 2%); the transient too
    assert est["activations"]["bytes"] == real["activations"]["bytes"]
    assert est["activations"]["storages"] == real["activations"]["storages"]
    assert est["largest_transient"]["bytes"] == real["largest_transient"]["bytes"]
    # what differs: the real run's logger keeps a few bytes alive (int8: bitsandbytes' outlier state)
    assert abs(est["predicted_peak_bytes"] - real["predicted_peak_bytes"]) <= 8192


# ---------------------------------------------------------------------- a config.json alone
def lora_config(r=8):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")


def peft_count_on_meta(path, r=8) -> int:
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return get_peft_model(model, lora_config(r)).get_nb_trainable_parameters()[0]


def test_lora_trainable_count_equals_peft_on_meta(llama_dir, tmp_path):
    from ftbench.estimate import main

    lora_yaml = tmp_path / "lora_r8.yaml"
    lora_yaml.write_text("class_path: ftbench.tuners.Peft\ninit_args:\n  peft_config:\n"
                         "    class_path: peft.LoraConfig\n    init_args: {r: 8, lora_alpha: 16, target_modules: all-linear}\n")
    out = tmp_path / "est.json"
    assert main(["--model", str(llama_dir), "--tuner", str(lora_yaml), "--batch_size", "2", "--seq_len", "64",
                 "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["method"] == "sft+lora"
    expected = LAYERS * 8 * sum(o + i for o, i in LINEARS)
    assert row["params"]["trainable"] == peft_count_on_meta(llama_dir) == expected


def test_weights_of_a_quantized_backbone_from_shapes(llama_dir):
    """nf4 (with and without double quantization) and int8: the bytes bitsandbytes stores,
    computed from the shapes alone."""
    from ftbench.estimate import estimate

    unquantized = (2 * VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN) * 4  # embedding, head, norms (float32)
    lora = LAYERS * 8 * sum(o + i for o, i in LINEARS) * 4
    for quant, dq in (("nf4", False), ("nf4", True), ("int8", False)):
        r = estimate(backbone(llama_dir, quantization=quant, double_quant=dq), lora_tuner(), batch_size=1,
                     seq_len=16, precision="32-true")
        total = 0
        for o, i in LINEARS * LAYERS:
            n = o * i
            if quant == "int8":
                total += n + o * 4  # int8 weight + float32 scale per output row
                continue
            blocks = math.ceil(n / 64)
            total += n // 2 + 16 * 4  # packed 4-bit pairs + the NF4 code
            total += blocks * 4 if not dq else blocks + 4 + math.ceil(blocks / 256) * 4 + 256 * 4
        fmt = "bnb-int8" if quant == "int8" else "bnb-nf4"
        assert r["weights"]["by_format"] == {fmt: total, "float32": unquantized + lora}, (quant, dq)


def test_estimate_leaves_no_meta_tensor_in_bitsandbytes_caches(llama_dir, tiny_model_dir):
    """Double quantization caches a quantile map for the process on its first input's device: after an
    estimate a real nf4 load still quantizes (the first call here may be the estimate's, on meta)."""
    import bitsandbytes.functional as bnb_functional

    from ftbench.estimate import MetaRun

    saved = bnb_functional.name2qmap.pop("dynamic", None)
    try:
        with torch.device("meta"):  # even under a meta default device
            MetaRun(backbone(llama_dir, quantization="nf4", double_quant=True), lora_tuner(), precision="32-true")
        assert bnb_functional.name2qmap["dynamic"].device.type == "cpu"
        model = backbone(tiny_model_dir, quantization="nf4", double_quant=True).load_model()
        assert model.model.layers[0].mlp.up_proj.weight.quant_state.state2.code.device.type == "cpu"
    finally:
        if saved is not None:
            bnb_functional.name2qmap["dynamic"] = saved


def test_gradient_checkpointing_lowers_activations(llama_dir):
    from ftbench.estimate import estimate

    plain = estimate(backbone(llama_dir), lora_tuner(), batch_size=2, seq_len=128, precision="bf16-mixed")
    ckpt = estimate(backbone(llama_dir), lora_tuner(), batch_size=2, seq_len=128, precision="bf16-mixed",
                    gradient_checkpointing=True)
    assert ckpt["activations"]["bytes"] < plain["activations"]["bytes"] / 3
    assert ckpt["weights"] == plain["weights"] and ckpt["gradients"] == plain["gradients"]


def test_eight_bit_adamw_lowers_optimizer_state_by_the_expected_factor(llama_dir):
    from ftbench.estimate import estimate

    adam = estimate(backbone(llama_dir), full_tuner(), batch_size=1, seq_len=16, precision="32-true")
    eight = estimate(backbone(llama_dir), full_tuner(), batch_size=1, seq_len=16, precision="32-true",
                     optimizer="adamw8bit")
    sizes = [VOCAB * HIDDEN] * 2 + [o * i for o, i in LINEARS] * LAYERS + [HIDDEN] * (2 * LAYERS + 1)
    assert adam["optimizer"]["bytes"] == 2 * 4 * sum(sizes) + 4 * len(sizes)  # two float32 moments + steps
    expected = (sum(2 * n + 2 * 4 * math.ceil(n / 256) for n in sizes if n >= 4096)  # uint8 states + absmax
                + sum(2 * 4 * n for n in sizes if n < 4096) + 2 * 256 * 4)  # float32 states; two quantile maps
    assert eight["optimizer"]["bytes"] == expected
    assert eight["optimizer"]["bytes"] / adam["optimizer"]["bytes"] == pytest.approx(0.254, abs=0.002)
    # paged states (CUDA unified memory, none on meta) have the same dtypes and shapes
    paged = estimate(backbone(llama_dir), full_tuner(), batch_size=1, seq_len=16, precision="32-true",
                     optimizer="paged_adamw8bit")
    assert paged["optimizer"]["bytes"] == expected


def test_largest_batch_for_a_budget(llama_dir):
    from ftbench.estimate import MetaRun

    run = MetaRun(backbone(llama_dir), lora_tuner(), precision="bf16-mixed")
    peak = lambda b: run.breakdown(b, 256)["predicted_peak_bytes"]  # noqa: E731
    budget = (peak(5) + peak(6)) // 2
    assert run.largest_batch(256, budget) == 5
    assert run.largest_batch(256, peak(1) - 1) == 0
    # the peak is affine in the batch size, nearly (what a row adds is the same, up to small tensors)
    assert peak(3) - peak(2) == pytest.approx(peak(2) - peak(1), rel=1e-3)


def test_cli_table_quantization_cross_and_json(llama_dir, tmp_path, capsys):
    from ftbench.estimate import main

    out = tmp_path / "rows.json"
    rc = main(["--model", str(llama_dir), "--dtype", "bfloat16", "--tuner", "full", "--tuner", "lora",
               "--quantization", "none", "nf4", "--batch_size", "2", "--seq_len", "128",
               "--gpu_memory", "1GiB", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for label in ("sft+full", "sft+lora", "sft+lora+nf4", "max batch", "activations"):
        assert label in text
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"sft+full", "sft+lora", "sft+lora+nf4"}  # full on nf4 cannot train: no row
    # (k-bit preparation upcasts this small model's embedding and head to float32: a saving, not a halving)
    assert rows["sft+lora+nf4"]["weights"]["bytes"] < rows["sft+lora"]["weights"]["bytes"]
    assert set(rows["sft+lora+nf4"]["weights"]["by_format"]) == {"bnb-nf4", "float32"}
    assert all(isinstance(r["max_batch_size"], int) and r["max_batch_size"] >= 1 for r in rows.values())
    assert all(r["settings"]["precision"] == "bf16-mixed" for r in rows.values())


def test_cli_errors(llama_dir, tmp_path, capsys):
    from ftbench.estimate import EstimateError, main, parse_bytes, read_config

    assert main(["--model", str(llama_dir), "--tuner", "no_such_tuner"]) == 2
    assert "no_such_tuner" in capsys.readouterr().err
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("80GB") == 80 * 10**9 and parse_bytes("1e3") == 1000
    with pytest.raises(EstimateError):
        read_config(backbone("nobody/not-in-the-cache"))  # a hub id is read from the local cache only
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        read_config(backbone(tmp_path / "empty"))


# ---------------------------------------------------------------------- settings that cannot work: one line, status 2
def one_line_error(capsys, argv) -> str:
    from ftbench.estimate import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_a_config_without_its_sizes_is_refused(tmp_path, capsys):
    """``{"model_type": "llama"}`` alone would describe LlamaConfig's default 7B model."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert one_line_error(capsys, ["--model", str(tmp_path), "--tuner", "lora"]) == (
        f"ftbench: error: estimate: the config of {str(tmp_path)!r} lacks hidden_size, num_hidden_layers, "
        "vocab_size, num_attention_heads, intermediate_size: without them it would describe LlamaConfig's "
        "default model, not yours")


def test_an_absurd_size_is_refused_before_anything_is_built(tmp_path, capsys):
    import time

    H, I, V, L = 4096, 11008, 32000, 1_000_000
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": 32,
        "intermediate_size": I, "vocab_size": V}))
    total = 2 * V * H + H + L * (4 * H * H + 3 * H * I + 2 * H)  # embedding, head, final norm; per block
    assert f"{total:.3g}" == "2.02e+14"
    t0 = time.perf_counter()
    assert one_line_error(capsys, ["--model", str(tmp_path), "--tuner", "lora"]) == (
        f"ftbench: error: estimate: the config of {str(tmp_path)!r} describes 2.02e+14 parameters "
        "(num_hidden_layers=1000000), over the bound of 2e+12: no such model exists (a mistyped size?)")
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize("option, value, message", [
    ("--batch_size", "0", "--batch_size must be >= 1, got 0"),
    ("--seq_len", "-3", "--seq_len must be >= 1, got -3"),
    ("--gpu_memory", "0GiB", "--gpu_memory must be >= 1, got 0"),
    ("--batch_size", "two", "argument --batch_size: invalid int value: 'two'"),
    ("--gpu_memory", "lots", "argument --gpu_memory: not a size: 'lots' (e.g. 24GiB, 80GB, 16e9)"),
])
def test_every_numeric_option_is_checked(llama_dir, capsys, option, value, message):
    assert one_line_error(capsys, ["--model", str(llama_dir), "--tuner", "lora", option, value]) == (
        f"ftbench: error: estimate: {message}")


def test_rows_of_one_tuner_with_two_settings_are_labelled_apart(llama_dir, tmp_path, capsys):
    from ftbench.estimate import main

    specs = []
    for r in (8, 16):
        spec = tmp_path / f"lora_r{r}.yaml"
        spec.write_text("class_path: ftbench.tuners.Peft\ninit_args:\n  peft_config:\n    class_path: peft.LoraConfig\n"
                        f"    init_args: {{r: {r}, lora_alpha: 16, target_modules: all-linear}}\n")
        specs += ["--tuner", str(spec)]
    out = tmp_path / "rows.json"
    assert main(["--model", str(llama_dir), *specs, "--batch_size", "1", "--seq_len", "16", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["label"]) for r in rows] == [("sft+lora", "sft+lora r8"), ("sft+lora", "sft+lora r16")]
    assert [r["params"]["trainable"] for r in rows] == [LAYERS * r * sum(o + i for o, i in LINEARS) for r in (8, 16)]
    table = capsys.readouterr().out
    assert "sft+lora r8 " in table and "sft+lora r16 " in table


# ---------------------------------------------------------------------- what an objective holds
def test_what_an_objective_declares_it_holds_is_measured_and_estimated(tiny_model_dir):
    """An objective that only declares ``needs_reference`` holds a frozen copy under full tuning: the
    run's breakdown and the estimate count it under ``weights.held``, equally. One that declares
    ``holds_reward_model`` and builds none before its first step gets a stand-in in the estimate: the
    backbone with a score head, frozen."""
    from ftbench.estimate import estimate
    from ftbench.objectives import SFT
    from test_memory import BUFFERS, F32, H, PARAMS, V

    class WithReference(SFT):
        needs_reference = True

    class WithRewardModel(SFT):
        holds_reward_model = True

    one = PARAMS * F32 + BUFFERS
    real = measure(tiny_model_dir, full_tuner(), objective_class=WithReference, steps=2)
    assert real["weights"]["held"] == {"reference": one} and real["weights"]["bytes"] == 2 * one
    bb, tuner = backbone(tiny_model_dir), full_tuner()
    est = estimate(bb, tuner, WithReference(backbone=bb, tuner=tuner, optimizer=adamw()), batch_size=B, seq_len=T,
                   precision="32-true", optimizer=adamw())
    assert est["weights"] == real["weights"]
    assert est["gradients"] == real["gradients"]  # the copy takes no gradient

    bb, tuner = backbone(tiny_model_dir), lora_tuner()
    est = estimate(bb, tuner, WithRewardModel(backbone=bb, tuner=tuner), batch_size=1, seq_len=8, precision="32-true")
    score = one - V * H * F32 + H * F32  # the LM head (V x H) replaced by a score head (1 x H)
    assert est["weights"]["held"] == {"reward_model": score}
    plain = estimate(backbone(tiny_model_dir), lora_tuner(), batch_size=1, seq_len=8, precision="32-true")
    assert "held" not in plain["weights"]
    assert est["weights"]["bytes"] == plain["weights"]["bytes"] + score


# ---------------------------------------------------------------------- online RL
RL_CONFIGS = ["grpo", "dapo", "gspo", "cispo", "rloo", "grpo_mu2", "grpo_reward_model", "ppo"]


def test_every_rl_objective_is_estimated(tiny_model_dir, tmp_path, capsys):
    """Online RL is stepped on one update's rollout, handed in as if sampled (every token real and
    trained: ``GRPO.memory_batch``/``PPO.memory_batch``); nothing is sampled on meta and no reward run
    is read. Full tuning holds the reference as a frozen copy (DAPO's beta 0 holds none); a reward
    model or critic is the backbone with a score head; the gradients are the trainable bytes. Every
    shipped RL config but grpo_reward_model's (beta 0.04) has beta 0: no reference; PPO's KL penalty
    always reads one."""
    from ftbench.estimate.cli import main
    from test_memory import BUFFERS, F32, H, PARAMS, V

    one = PARAMS * F32 + BUFFERS
    score = one - V * H * F32 + H * F32  # the LM head (V x H) replaced by a score head (1 x H)
    out = tmp_path / "rl.json"
    rows = []
    for name in RL_CONFIGS:
        assert main(["--model", str(tiny_model_dir), "--objective", name, "--tuner", "full", "--batch_size", "2",
                     "--seq_len", "16", "--precision", "32-true", "--json", str(out)]) == 0, capsys.readouterr().out
        rows.append(json.loads(out.read_text())["rows"][0])
    held = {name: r["weights"].get("held", {}) for name, r in zip(RL_CONFIGS, rows)}
    for name in ("grpo", "dapo", "gspo", "cispo", "rloo", "grpo_mu2"):
        assert held[name] == {}, name
    assert held["grpo_reward_model"] == {"reference": one, "reward_model": score}
    assert set(held["ppo"]) == {"reference", "critic", "reward_model"} and held["ppo"]["reward_model"] == score
    for name, r in zip(RL_CONFIGS, rows):
        assert r["gradients"]["bytes"] == r["weights"]["trainable_bytes"] > 0, name
        assert r["activations"]["bytes"] > 0, name
