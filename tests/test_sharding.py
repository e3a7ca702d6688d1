"""Several processes, one model: FSDP2 (``configs/trainer/fsdp2.yaml``) run with 2 CPU processes
(gloo) for full fine-tuning and LoRA; FSDP1 (``fsdp.yaml``), which Lightning refuses on a CPU,
and DeepSpeed's ZeRO-2/3 (``deepspeed_zero*.yaml``) built from their YAML; ``ftbench estimate
--world_size 2 --strategy ...`` against hand arithmetic; QLoRA under FSDP2 refused.

The 2-process runs start ``python -m ftbench.cli fit`` in a subprocess (Lightning's launcher re-runs
the command line for rank 1), as tests/test_ddp.py does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from test_ddp import DATA, LORA, ROOT

TESTS = ROOT / "tests"

# the tiny Llama (tests/conftest.py): vocab 512, hidden 64, 2 layers, 4 heads of 16, 2 KV heads,
# MLP 128, untied head. Parameters: embeddings 512 x 64 = 32,768, head 32,768; per layer q 4,096,
# k 2,048, v 2,048, o 4,096, gate/up/down 8,192 each, two norms 128 = 36,992; final norm 64:
# 2 x 32,768 + 2 x 36,992 + 64 = 139,584 (float32: 558,336 bytes). Buffers: the rotary inv_freq,
# 8 float32 = 32 bytes, in the model and in its rotary module (64 counted: two storages).
FULL_PARAMS, FULL_BYTES, BUFFER_BYTES = 139_584, 558_336, 64
# LoRA r=4 on every linear but the head (tests/test_ddp.py): 8,192 parameters, 28 tensors (A and B of
# 7 linears x 2 layers)
LORA_PARAMS, LORA_TENSORS = 8_192, 28


def fit_two_processes(tmp_path, tiny_model_dir, tuner: str, trainer_args: list[str], run_id: str,
                      files: tuple[str, ...] = ()):
    """A 3-step, 2-process fit with the probe (tests/shard_probe.py) on; returns (record, log).
    ``files``: what the run writes beside its record in ``--out`` (by rank 0 alone)."""
    out = tmp_path / "runs"
    tuner_args = LORA if tuner == "lora" else ["--tuner", "ftbench.tuners.Full", *LORA[8:]]
    probe = json.dumps({"class_path": "shard_probe.ShardProbe", "init_args": {"out": str(tmp_path / "probe")}})
    cmd = [sys.executable, "-m", "ftbench.cli", "fit", "--backbone.model", str(tiny_model_dir), *tuner_args, *DATA,
           *trainer_args, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
           "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
           "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
           f"--trainer.callbacks+={probe}", "--test_after_fit", "false", "--warmup_batches", "1",
           "--out", str(out), "--run_id", run_id]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]),
               MASTER_PORT=str(27500 + os.getpid() % 2000))
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted([f"{run_id}.json", *files])  # rank 0's
    assert log.count(f"[ftbench] {run_id}:") == 1
    return json.loads((out / f"{run_id}.json").read_text()), log


def replay_in_one_process(tiny_model_dir, tuner: str, probes: list[dict]) -> list[list[float]]:
    """The same global batches in one process: from the same weights, each step's loss is the mean of
    the ranks' losses on their rows (data parallelism averages the ranks' gradients, so this is the
    gradient FSDP applies), AdamW as the run made it. Returns the losses per rank and step."""
    from helpers import lora

    from ftbench.backbone import Backbone
    from ftbench.objectives import SFT
    from ftbench.tuners import Full

    objective = SFT(backbone=Backbone(model=str(tiny_model_dir)), tuner=lora(r=4) if tuner == "lora" else Full())
    objective.configure_model()
    objective.log = lambda *a, **k: None  # no trainer to log to
    trainable = {n: p for n, p in objective.model.named_parameters() if p.requires_grad}
    assert trainable.keys() == probes[0]["initial"].keys()
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(probes[0]["initial"][name])
    opt = torch.optim.AdamW(list(trainable.values()), **probes[0]["optimizer"])
    losses: list[list[float]] = [[] for _ in probes]
    for step in range(len(probes[0]["batches"])):
        per_rank = [objective.training_step(p["batches"][step], step)["loss"] for p in probes]
        torch.stack(per_rank).mean().backward()
        opt.step()
        opt.zero_grad()
        for rank, loss in enumerate(per_rank):
            losses[rank].append(float(loss.detach()))
    return losses


FSDP2_CPU = ["--trainer", str(ROOT / "configs" / "trainer" / "fsdp2.yaml"), "--trainer.accelerator", "cpu",
             "--trainer.devices", "2", "--trainer.precision", "32-true"]


@pytest.mark.parametrize("tuner", ["full", "lora"])
def test_fsdp2_two_cpu_processes_train_as_one(tmp_path, tiny_model_dir, tuner):
    # LoRA's run also generates in its validation: every rank keeps stepping until all have stopped
    # (transformers' synced_gpus, which ftbench's FSDP2 set-up turns on), or a gather would wait forever
    generate = ["--evaluate.generate_in_validation", "true"] if tuner == "lora" else []
    rec, _ = fit_two_processes(tmp_path, tiny_model_dir, tuner, FSDP2_CPU + generate, f"fsdp2-{tuner}",
                               files=("fsdp2-lora.predictions.jsonl",) if generate else ())
    if generate:  # the generated answers of both ranks' validation rows, gathered and written once
        rows = [json.loads(line) for line in (tmp_path / "runs" / "fsdp2-lora.predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and len({r["reference"] for r in rows}) == 6 and all(r["prediction"] for r in rows)
        assert "val/accuracy" in rec["train_info"]["metrics"][0]
    info = rec["train_info"]
    assert info["status"] == "completed" and info["world_size"] == 2 and info["global_steps"] == 3
    assert rec["run_info"]["config"]["trainer"]["strategy"]["class_path"].endswith("ModelParallelStrategy")

    # the losses: each rank's, at each step, equal the one-process replay of the same global batches
    probes = [torch.load(tmp_path / "probe" / f"rank{r}.pt") for r in (0, 1)]
    assert [len(p["losses"]) for p in probes] == [3, 3]
    assert not torch.equal(probes[0]["batches"][0]["input_ids"], probes[1]["batches"][0]["input_ids"])  # own rows
    replayed = replay_in_one_process(tiny_model_dir, tuner, probes)
    for rank in (0, 1):
        assert probes[rank]["losses"] == pytest.approx(replayed[rank], abs=1e-5)
    assert probes[0]["losses"][2] < probes[0]["losses"][0] - 0.01 or tuner == "lora"  # full fine-tuning learns

    # the memory breakdown is rank 0's share: every dimension here is even, so exactly half of each
    # split part; the buffers and AdamW's per-tensor step counters (4 bytes each) stay whole
    mb = info["memory_breakdown"]
    assert mb["sharding"] == {"strategy": "fsdp", "world_size": 2, "sharded": ["weights", "gradients", "optimizer"]}
    trainable_bytes = FULL_BYTES if tuner == "full" else LORA_PARAMS * 4
    tensors = 21 if tuner == "full" else LORA_TENSORS
    assert info["params"]["trainable"] == (FULL_PARAMS if tuner == "full" else LORA_PARAMS)  # the whole model's
    assert mb["weights"]["trainable_bytes"] == trainable_bytes // 2  # 279,168 full; 16,384 LoRA
    assert mb["weights"]["frozen_bytes"] == (0 if tuner == "full" else FULL_BYTES // 2)
    assert mb["weights"]["buffer_bytes"] == BUFFER_BYTES
    assert mb["gradients"]["bytes"] == trainable_bytes // 2
    assert mb["optimizer"]["by_entry"] == {"exp_avg": trainable_bytes // 2, "exp_avg_sq": trainable_bytes // 2,
                                           "step": 4 * tensors}
    # and it is what `ftbench estimate --world_size 2 --strategy fsdp` predicts for the rank
    from helpers import lora

    from ftbench.backbone import Backbone
    from ftbench.estimate import estimate
    from ftbench.tuners import Full

    est = estimate(Backbone(model=str(tiny_model_dir)), lora(r=4) if tuner == "lora" else Full(),
                   batch_size=2, seq_len=16, precision="32-true", optimizer="adamw", strategy="fsdp", world_size=2)
    for part in ("weights", "gradients", "optimizer"):
        assert est[part]["bytes"] == mb[part]["bytes"], part
    # the saved weights were gathered from both ranks: the whole model (full) or the adapter (LoRA)
    assert info["saved"]["bytes"] > (FULL_BYTES if tuner == "full" else LORA_PARAMS * 4)


# ---------------------------------------------------------------------- the shipped strategy configs
def trainer_argv(tiny_model_dir, out, name: str, *extra: str) -> list[str]:
    return ["fit", "--backbone.model", str(tiny_model_dir), "--tuner", str(ROOT / "configs" / "tuner" / "lora.yaml"),
            "--model", str(ROOT / "configs" / "objective" / "sft.yaml"), "--data",
            str(ROOT / "configs" / "data" / "instruction.yaml"), "--trainer", str(ROOT / "configs" / "trainer" / name),
            "--out", str(out), *extra]


@pytest.mark.parametrize("name, cls, kind", [
    ("fsdp.yaml", "FSDPStrategy", "fsdp"), ("fsdp2.yaml", "ModelParallelStrategy", "fsdp"),
    ("deepspeed_zero2.yaml", "DeepSpeedStrategy", "zero2"), ("deepspeed_zero3.yaml", "DeepSpeedStrategy", "zero3")])
def test_shipped_strategy_is_built_from_its_yaml(tiny_model_dir, tmp_path, name, cls, kind):
    """The strategy object the CLI's own parser makes from the YAML (no trainer: these need GPUs), and
    what the memory breakdown reads from it (which parts each rank holds 1/N of)."""
    from ftbench.bench.memory import SHARDED_PARTS, strategy_kind
    from ftbench.runcli import parse_run, run_parser

    parser = run_parser().parser
    strategy = parser.instantiate(parse_run(trainer_argv(tiny_model_dir, tmp_path, name))).fit.trainer.strategy
    assert type(strategy).__name__ == cls and strategy_kind(strategy) == kind
    assert SHARDED_PARTS[kind] == {"fsdp": ("weights", "gradients", "optimizer"), "zero2": ("gradients", "optimizer"),
                                   "zero3": ("weights", "gradients", "optimizer")}[kind]
    if cls == "DeepSpeedStrategy":
        assert strategy.config["zero_optimization"]["stage"] == int(kind[-1])
    if cls == "FSDPStrategy":
        assert strategy.sharding_strategy.name == "FULL_SHARD"
    if cls == "ModelParallelStrategy":
        assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 1)


@pytest.mark.parametrize("name, extra, message", [
    ("deepspeed_zero2.yaml", ["--trainer.accelerator", "cpu"],
     "trainer.strategy: DeepSpeedStrategy does not run with trainer.accelerator cpu (Lightning runs DeepSpeed on "
     "CUDA GPUs only)"),
    ("fsdp.yaml", ["--trainer.accelerator", "cpu"],
     "trainer.strategy: FSDPStrategy (FSDP1) does not run with trainer.accelerator cpu (Lightning requires a GPU "
     "accelerator for it)"),
    ("fsdp2.yaml", ["--trainer.accelerator", "cpu", "--trainer.devices", "4"],
     "trainer.strategy.init_args.data_parallel_size: 2 x tensor_parallel_size 1 must equal the processes, "
     "trainer.devices 4 x num_nodes 1"),
])
def test_a_strategy_that_cannot_start_is_one_line(tiny_model_dir, tmp_path, capsys, name, extra, message):
    """Lightning's own refusals (``The DeepSpeed strategy is only supported on CUDA GPUs but
    `CPUAccelerator` is used.`` at the first fit; ``The strategy `fsdp` requires a GPU accelerator`` when
    the trainer is made) come as one line before anything is built."""
    from test_hardening import last_line, run_main

    code, err = run_main(trainer_argv(tiny_model_dir, tmp_path, name, *extra), capsys)
    assert code == 2 and last_line(err) == f"ftbench: error: {message}"
    assert "Traceback" not in err


def test_deepspeed_missing_names_the_extra(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from test_hardening import last_line, run_main

    import ftbench.runcli

    monkeypatch.setattr(ftbench.runcli, "installed", lambda package: package != "deepspeed")
    code, err = run_main(trainer_argv(tiny_model_dir, tmp_path, "deepspeed_zero3.yaml"), capsys)
    assert code == 2 and last_line(err) == ("ftbench: error: trainer.strategy: DeepSpeedStrategy needs the deepspeed "
                                            "package: pip install 'ftbench[deepspeed]'")


# ---------------------------------------------------------------------- QLoRA under FSDP2
QLORA_REFUSAL = ("backbone.quantization: nf4 weights cannot be sharded by trainer.strategy ModelParallelStrategy "
                 "(FSDP2 fully_shard): a bitsandbytes quantized weight is not a plain tensor fully_shard can split "
                 "(QLoRA under FSDP2: accelerate#3874)")


def test_qlora_under_fsdp2_is_refused_before_the_load(tiny_model_dir, monkeypatch):
    """A 4-bit backbone with the device mesh Lightning's ModelParallelStrategy hands the module: refused in
    ``configure_model`` before any weight is loaded (naming the quantization and the strategy)."""
    from helpers import lora

    import ftbench.objectives.base
    from ftbench.backbone import Backbone
    from ftbench.errors import ConfigError
    from ftbench.objectives import SFT

    objective = SFT(backbone=Backbone(model=str(tiny_model_dir), quantization="nf4"), tuner=lora(r=4))
    objective._device_mesh = {"data_parallel": object()}  # what ModelParallelStrategy sets before configure_model
    monkeypatch.setattr(ftbench.objectives.base, "load_backbone", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ConfigError) as err:
        objective.configure_model()
    assert str(err.value) == QLORA_REFUSAL
    assert objective.model is None


def test_qlora_under_fsdp_in_the_estimate_is_one_line(tiny_model_dir, capsys):
    from ftbench.estimate.cli import main

    assert main(["--model", str(tiny_model_dir), "--quantization", "nf4", "--tuner", "lora",
                 "--world_size", "2", "--strategy", "fsdp"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"ftbench: error: estimate: --strategy fsdp: {QLORA_REFUSAL}"


# ---------------------------------------------------------------------- the estimate, one rank of two
def test_estimate_for_two_ranks_by_hand(tiny_model_dir, capsys):
    """Full fine-tuning of the tiny Llama in float32 with AdamW, batch 2 x 16 per rank. One process holds
    weights 558,336 + 64 (buffers), gradients 558,336, AdamW's two moments 2 x 558,336 and 21 step
    counters of 4 bytes = 1,116,756. Over 2 ranks: ddp holds all of it; zero1 halves the moments;
    zero2 the gradients too; zero3 and fsdp the weights too (buffers and step counters stay whole);
    activations are the rank's own rows, the same under every strategy."""
    from ftbench.backbone import Backbone
    from ftbench.estimate import estimate
    from ftbench.tuners import Full

    def rank(strategy, world_size=2):
        return estimate(Backbone(model=str(tiny_model_dir)), Full(), batch_size=2, seq_len=16, precision="32-true",
                        optimizer="adamw", strategy=strategy, world_size=world_size)

    one = rank("ddp", 1)
    assert (one["weights"]["bytes"], one["gradients"]["bytes"], one["optimizer"]["bytes"]) == (
        FULL_BYTES + BUFFER_BYTES, FULL_BYTES, 2 * FULL_BYTES + 21 * 4)
    half = FULL_BYTES // 2  # 279,168
    expected = {"ddp": (558_400, 558_336, 1_116_756), "zero1": (558_400, 558_336, 2 * half + 84),
                "zero2": (558_400, half, 2 * half + 84), "zero3": (half + 64, half, 2 * half + 84),
                "fsdp": (half + 64, half, 558_420)}
    for strategy, (weights, grads, optimizer) in expected.items():
        r = rank(strategy)
        assert (r["weights"]["bytes"], r["gradients"]["bytes"], r["optimizer"]["bytes"]) == (weights, grads, optimizer)
        assert r["activations"] == one["activations"]
        assert r["predicted_peak_bytes"] == one["predicted_peak_bytes"] - (558_400 - weights) - (558_336 - grads) \
            - (1_116_756 - optimizer)
        assert r["sharding"]["world_size"] == 2 and r["sharding"]["strategy"] == strategy
    # the command line: one rank's table under zero3
    from ftbench.estimate.cli import main

    assert main(["--model", str(tiny_model_dir), "--tuner", "full", "--precision", "32-true", "--batch_size", "2",
                 "--seq_len", "16", "--world_size", "2", "--strategy", "zero3"]) == 0
    out = capsys.readouterr().out
    assert "one rank of 2 under zero3: weights, gradients, optimizer split 2 ways (batch 2 per rank)" in out


def test_estimate_refuses_a_bad_world_size(tiny_model_dir, capsys):
    from ftbench.estimate.cli import main

    assert main(["--model", str(tiny_model_dir), "--world_size", "0", "--strategy", "zero2"]) == 2
    assert capsys.readouterr().err.strip() == "ftbench: error: estimate: --world_size must be >= 1, got 0"
