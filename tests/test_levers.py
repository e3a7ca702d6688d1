"""The speed levers (ftbench.levers): precision on CPU through the real step (pinned 4-step losses), the
refusals (Liger off CUDA or without its package; compile with the fused loss), Liger's fused linear
cross-entropy (the plain-torch stand-in against hand arithmetic and F.cross_entropy; its memory in
``ftbench estimate``), compile's wiring and its batches left out of the throughput, the record's fields,
the report's speed-levers table.

torch.compile itself is not run here: Inductor takes ~50 s for the tiny Llama on a 2-core CPU (its C++
code generation), ``aot_eager`` still 10-40 s with the recompile for a second shape; the tuner families
were tried by hand (scripts/bench_levers.py records the compile seconds of real runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ftbench import levers
from ftbench.errors import ConfigError
from helpers import LossRecorder, lora, tiny_data
from pinning import load_pins
from test_hardening import fit_argv, last_line, run_main

PIN_NAME = "levers"
PRECISIONS = ("bf16-mixed", "bf16-true")


def precision_losses(backbone, dm, precision: str, steps: int = 4) -> list[float]:
    """The loss of each of ``steps`` real training steps of SFT+LoRA (r 8, lr 1e-3) on CPU at ``precision``
    (Lightning's plugin: autocast for ``bf16-mixed``, the model converted for ``bf16-true``)."""
    from ftbench.objectives.sft import SFT

    torch.manual_seed(0)
    objective = SFT(backbone=backbone, tuner=lora(lr=1e-3))
    recorder = LossRecorder()
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision=precision, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder]).fit(objective, datamodule=dm)
    return recorder.losses


def compute_pins(tmp_dir: Path) -> dict:
    from ftbench.backbone import Backbone
    from ftbench.testing import build_tiny_llama

    bb = Backbone(model=str(build_tiny_llama(tmp_dir / "tiny")))
    dm = tiny_data(bb)
    return {p: {"losses": precision_losses(bb, dm, p)} for p in PRECISIONS}


# ---------------------------------------------------------------------- precision on CPU
def test_bf16_runs_on_cpu_pinned(backbone):
    """bf16-mixed and bf16-true train on a CPU; their losses are pinned and fall. The two differ from each
    other by ~6e-5 relative at step 4 (6.12700 vs 6.12738), so the pins hold to 1e-5: a CPU whose bfloat16
    kernels round otherwise (no AVX512-BF16/AMX: train_info.kernels) may need its own pins."""
    pins = load_pins(PIN_NAME)
    dm = tiny_data(backbone)
    got = {p: precision_losses(backbone, dm, p) for p in PRECISIONS}
    for p in PRECISIONS:
        assert got[p] == pytest.approx(pins[p]["losses"], rel=1e-5)
        assert got[p][-1] < got[p][0]
    assert got["bf16-mixed"] != pytest.approx(got["bf16-true"], rel=1e-6)


def test_precision_kernels_say_what_the_cpu_offers():
    k = levers.precision_kernels(torch.device("cpu"))
    assert k["device"] == "cpu"
    assert k["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert k["mkldnn"] == torch.backends.mkldnn.is_available()
    assert set(k) >= {"mkldnn_bf16", "avx512_bf16", "amx_tile"}


# ---------------------------------------------------------------------- refusals
def test_liger_refused_on_cpu():
    with pytest.raises(ConfigError) as e:
        levers.check_liger("cpu")
    assert str(e.value) == ("backbone.liger_kernel: Liger's fused kernels are Triton kernels and need a CUDA GPU; "
                            "this run is on cpu (set backbone.liger_kernel false)")


def test_liger_without_the_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(ConfigError) as e:
        levers.check_liger("cuda")
    assert str(e.value) == ("backbone.liger_kernel: the liger-kernel package is not installed "
                            "(pip install 'ftbench[liger]')")


def test_liger_on_cpu_is_one_line_from_the_cli(tiny_model_dir, tmp_path, capsys):
    code, err = run_main(fit_argv(tiny_model_dir, tmp_path / "out", "--backbone.liger_kernel", "true"), capsys)
    assert code == 2
    assert last_line(err) == ("ftbench: error: backbone.liger_kernel: Liger's fused kernels are Triton kernels "
                              "and need a CUDA GPU; this run is on cpu (set backbone.liger_kernel false)")


def test_compile_with_the_fused_loss_refused():
    with pytest.raises(ConfigError) as e:
        levers.check_compile("lora", "none", liger=True)
    assert str(e.value) == ("backbone.compile: not with backbone.liger_kernel: the fused loss swaps the output "
                            "layer's forward at every step, which would recompile the model each time (set one "
                            "of them false)")
    levers.check_compile("lora", "nf4", liger=False)  # every tuner family compiled on the tiny model


# ---------------------------------------------------------------------- the fused loss
def test_chunked_cross_entropy_by_hand():
    """One token, H = V = 2, weight = I: logits (0, ln 3), softmax (1/4, 3/4); target 1: loss -ln(3/4) =
    0.2876820724517809; d loss / d logits = (1/4, -1/4) = d loss / d hidden (weight = I); the padded
    token (-100) counts nowhere."""
    hidden = torch.tensor([[0.0, math.log(3.0)], [5.0, -5.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.eye(2, dtype=torch.float64, requires_grad=True)
    loss = levers.fused_linear_cross_entropy(hidden, weight, torch.tensor([1, -100]))
    assert loss.item() == pytest.approx(0.2876820724517809, abs=1e-7)  # the loss sums in float32, as Liger's
    loss.backward()
    torch.testing.assert_close(hidden.grad, torch.tensor([[0.25, -0.25], [0.0, 0.0]], dtype=torch.float64),
                               atol=1e-12, rtol=0)
    # d loss / d W[v, h] = sum over tokens of (p_v - y_v) x_h: row 0 = 1/4 (0, ln 3), row 1 = -1/4 (0, ln 3)
    ln3 = math.log(3.0)
    torch.testing.assert_close(weight.grad, torch.tensor([[0.0, ln3 / 4], [0.0, -ln3 / 4]], dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_chunked_cross_entropy_equals_the_plain_loss():
    """Several chunks (BT = 37, H = 4, V = 50: ceil(50/4) = 13, ceil(37/13) = 3 -> chunks of 4 rows): the
    loss and both gradients equal F.cross_entropy's through the whole logits, to 1e-6 in float32."""
    assert levers.liger_chunk_size(37, 4, 50) == 4
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 4, generator=g, requires_grad=True)
    weight = torch.randn(50, 4, generator=g, requires_grad=True)
    target = torch.randint(0, 50, (37,), generator=g)
    target[::5] = -100
    fused = levers.fused_linear_cross_entropy(hidden, weight, target)
    gh, gw = torch.autograd.grad(fused * 3.0, (hidden, weight))
    plain = F.cross_entropy(hidden @ weight.t(), target, ignore_index=-100)
    ph, pw = torch.autograd.grad(plain * 3.0, (hidden, weight))
    assert fused.item() == pytest.approx(plain.item(), abs=1e-6)
    torch.testing.assert_close(gh, ph, atol=1e-6, rtol=0)
    torch.testing.assert_close(gw, pw, atol=1e-6, rtol=0)


def test_sft_fused_loss_equals_its_plain_loss(backbone):
    """SFT's fused path (the model up to its hidden states, the head's weight to the fused loss) gives the
    plain step's mean token loss and gradients, on the tiny Llama with LoRA (run without a trainer: on CPU a
    run refuses Liger, the fused loss itself is device-free)."""
    import copy

    from ftbench.objectives.sft import SFT

    fused_bb = copy.copy(backbone)
    fused_bb.liger_kernel = True
    batch = next(iter(tiny_data(backbone).train_dataloader()))
    out = {}
    for name, bb in (("plain", backbone), ("fused", fused_bb)):
        torch.manual_seed(0)
        objective = SFT(backbone=bb, tuner=lora(lr=1e-3))
        objective.configure_model()
        step = objective.training_loss(batch)
        grads = torch.autograd.grad(step.loss, [p for p in objective.model.parameters() if p.requires_grad])
        out[name] = (step.loss.item(), int(step.trained_tokens), grads)
    assert out["fused"][0] == pytest.approx(out["plain"][0], abs=1e-6)
    assert out["fused"][1] == out["plain"][1]
    for a, b in zip(out["fused"][2], out["plain"][2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert "forward" not in vars(objective.model.get_output_embeddings())  # the head computes logits again


def test_liger_chunk_size_is_liger_rule():
    # BT 384 (4 x 96), H 64, V 512: ceil(512/64) = 8, ceil(384/8) = 48 -> 64 rows
    assert levers.liger_chunk_size(384, 64, 512) == 64
    # BT 5, H 64, V 512: ceil(5/8) = 1 -> 1 row; BT 3000, H 576, V 49152 (SmolLM2): 86, 35 -> 64 rows
    assert levers.liger_chunk_size(5, 64, 512) == 1
    assert levers.liger_chunk_size(3000, 576, 49152) == 64
    assert levers.liger_chunk_size(4, 8, 8) == 4  # one chunk covers all: never more rows than tokens


def test_estimate_models_the_fused_loss(backbone):
    """ftbench estimate, SFT, full fine-tuning of the tiny Llama (H 64, V 512), batch 4 x 96 tokens, fp32.
    Plain: the largest transient is the whole logits, 384 x 512 x 4 B = 786,432 B. Fused: one chunk of
    64 rows (test_liger_chunk_size_is_liger_rule), 64 x 512 x 4 B = 131,072 B; the log-probabilities the
    plain loss saves (384 x 512 x 4 B) are gone and the gradients the fused loss makes in its forward are
    kept instead: d hidden 384 x 64 x 4 = 98,304 B and d head 512 x 64 x 4 = 131,072 B."""
    import copy

    from ftbench.estimate.options import instantiate_config
    from ftbench.estimate.run import estimate
    from ftbench.tuners.base import Tuner

    fused_bb = copy.copy(backbone)
    fused_bb.liger_kernel = True
    runs = {name: estimate(bb, instantiate_config("tuner", "full", Tuner), batch_size=4, seq_len=96,
                           precision="32-true") for name, bb in (("plain", backbone), ("fused", fused_bb))}
    assert runs["plain"]["largest_transient"]["bytes"] == 384 * 512 * 4 == 786_432
    assert runs["plain"]["largest_transient"]["shape"] == [384, 512]
    assert runs["fused"]["largest_transient"]["bytes"] == 64 * 512 * 4 == 131_072
    assert runs["fused"]["largest_transient"]["shape"] == [64, 512]
    assert runs["fused"]["settings"]["liger_kernel"] is True
    saved = runs["plain"]["activations"]["bytes"] - runs["fused"]["activations"]["bytes"]
    # at least the log-probs less the kept gradients; the plain head's own saved input (384 x 64 x 4) goes too
    assert saved >= 384 * 512 * 4 - 98_304 - 131_072
    assert runs["fused"]["predicted_peak_bytes"] < runs["plain"]["predicted_peak_bytes"]


# ---------------------------------------------------------------------- compile: wiring and measurement
def test_compile_setting_compiles_in_place_and_changes_the_run_id(tiny_model_dir, tmp_path):
    from ftbench.runcli import read_run

    model = torch.nn.Linear(2, 2)
    same = levers.compile_model(model, None, "eager")
    assert same is model and model._compiled_call_impl is not None  # nn.Module.compile: the module stays itself
    base = fit_argv(tiny_model_dir, tmp_path)
    plain, compiled = read_run(base), read_run(base + ["--backbone.compile", "true"])
    assert plain.run_id != compiled.run_id
    assert compiled.settings["backbone"]["compile"] is True and "compile" not in plain.settings.get("backbone", {})


def test_throughput_leaves_compiling_batches_out(monkeypatch):
    """A batch in which torch's compile seconds grew (:func:`ftbench.levers.compile_seconds`) is left out of
    the figures, wherever it falls, and counted apart."""
    from types import SimpleNamespace

    from ftbench.bench import measure

    clock = {"compile": 0.0}
    monkeypatch.setattr(measure, "compile_seconds", lambda: clock["compile"])
    tp = measure.Throughput(warmup_steps=1)
    module = SimpleNamespace(device=torch.device("cpu"))
    tp.on_train_start(None, module)
    for i, compiles in enumerate([3.0, 0.0, 2.0, 0.0, 0.0]):  # batch 0 (warm-up) and batch 2 compile
        tp.on_train_batch_start(None, module, None, i)
        clock["compile"] += compiles
        tp.on_train_batch_end(None, module, {"trained_tokens": 10, "padded_tokens": 20, "real_tokens": 15}, None, i)
    s = tp.summary()
    assert s["timed_batches"] == 3  # batches 1, 3, 4
    assert s["compile_batches"] == 2
    assert s["compile_seconds"] == 5.0
    assert s["trained_tokens"] == 50
    assert len(tp.step_times) == 3


# ---------------------------------------------------------------------- the record
def test_record_says_precision_kernels_and_levers(tiny_model_dir, tmp_path):
    from ftbench.cli import main

    out = tmp_path / "out"

    main(fit_argv(tiny_model_dir, out, "--trainer.precision", "bf16-true"))
    (record,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    info = record["train_info"]
    assert info["status"] == "completed"
    assert info["precision"] == "bf16-true"
    assert info["kernels"]["device"] == "cpu"
    assert info["kernels"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["backbone"]["compile"] is False and info["backbone"]["liger_kernel"] is False
    assert info["throughput"]["compile_batches"] == 0 and info["throughput"]["compile_seconds"] == 0.0
    assert record["run_info"]["settings"]["trainer"]["precision"] == "bf16-true"


# ---------------------------------------------------------------------- the report
def test_report_speed_levers_table():
    from ftbench.sweep.report.levers import lever_name, levers_table, lever_rows

    def point(method, precision="32-true", compile_=False, backend="inductor", tok=100.0, peak=10.0):
        return {"method": method, "subcommand": "fit", "tokens_per_s": tok, "pred_peak_mb": peak,
                "config": {"trainer.precision": precision, "backbone.compile": compile_,
                           "backbone.compile_backend": backend, "backbone.liger_kernel": False, "data.x": 1}}

    points = pd.DataFrame([point("sft+full", tok=100.0, peak=20.0), point("sft+lora", tok=200.0, peak=8.0),
                           point("sft+full", "bf16-mixed", tok=140.0, peak=22.0),
                           point("sft+lora", compile_=True, backend="aot_eager", tok=250.0, peak=8.0)])
    rows = lever_rows(points)
    assert rows["lever"].tolist() == ["fp32", "fp32", "bf16-mixed", "compile (aot_eager)"]
    assert rows["speed_vs_plain"].tolist() == pytest.approx([1.0, 1.0, 1.4, 1.25])
    assert rows["peak_vs_plain"].tolist() == pytest.approx([1.0, 1.0, 1.1, 1.0])
    table = levers_table(points)
    assert "| sft+full | bf16-mixed | 140 | 1.40x | 22.0 | 1.10x |" in table
    assert lever_name({"trainer.precision": "32-true"}) == "fp32"
    assert lever_name({"trainer.precision": "bf16-true", "backbone.liger_kernel": True}) == "bf16-true + liger"
    assert lever_name({"data.packing": True}) == "packing" and lever_name({"data.packing": False}) == "fp32"
    assert levers_table(points.iloc[:2]) is None  # no lever varies: no table
