"""Evaluation at the cost of its generation (issue 22): SFT's evaluation loss from the answer tokens'
logits only, in one forward whose KV cache generation continues (ftbench/evaluation/answer_forward.py),
and peft adapters merged for evaluation where that is exact (ftbench/tuners/peft_tuner.py).

Tolerances: the answer forward's loss equals the right-padded full-logit forward's within 1e-10 in
float64 and 1e-5 (relative) in float32 (differently shaped products sum in another order); a merge and
unmerge gives every weight back within 1e-6 relative to the largest weight (float32: (W + dW) - dW
rounds twice, ~1 ulp); greedy answers are the same on these batches."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ftbench.backbone import Backbone
from ftbench.data.base import IGNORE_INDEX
from ftbench.evaluation import answer_forward as af
from ftbench.evaluation.evaluator import Evaluator
from ftbench.evaluation.options import EvaluationOptions
from ftbench.objectives import SFT
from ftbench.objectives.sft import target_losses
from helpers import LossRecorder, cpu_trainer, instruction_data, lora


def lora_method(tiny_model_dir, r: int = 8, max_new_tokens: int = 6, **tuner_kw) -> SFT:
    """SFT + LoRA on the tiny Llama, its B matrices drawn (seeded) so the adapter changes the answers."""
    torch.manual_seed(0)
    m = SFT(backbone=Backbone(model=str(tiny_model_dir)), tuner=lora(r, **tuner_kw),
            evaluator=Evaluator(EvaluationOptions(max_new_tokens=max_new_tokens)))
    m.configure_model()
    m.model.eval()
    for name, p in m.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return m


def test_ignore_index_is_the_data_one():
    assert af.IGNORE_INDEX == IGNORE_INDEX


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_answer_loss_equals_the_full_logit_loss(tiny_model_dir, dtype, tol):
    """The answer logits equal the full forward's at the label positions within ``tol``; the losses
    (computed in float32 by design, ``sequence_losses``) within 1e-6 relative: a row's sum runs over
    its A answer columns instead of all T columns, which reorders the float32 additions."""
    m = lora_method(tiny_model_dir)
    m.model.to(dtype)
    dm = instruction_data(m.backbone, eval_batch_size=7)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert sum(len(b["answers"]) for b in batches) == 6 and len({int(x) for x in batches[0]["gen_attention_mask"].sum(1)}) > 1
    with torch.no_grad():
        for batch in batches:
            _, full_sum, full_n = m.loss(batch)
            answer = m.evaluator.answer_forward(batch, "test")
            assert answer is not None and answer.logits.shape[1] == int(full_n.max())  # only the answer columns
            got_sum, got_n = target_losses(answer.logits, answer.targets)
            assert got_n.tolist() == full_n.tolist()
            assert full_sum.abs().min() > 1.0  # the adapter's logits: real losses, not ~0
            torch.testing.assert_close(got_sum, full_sum, rtol=1e-6, atol=0)
            # position t of the full forward predicts label t + 1: the answer logits, row by row
            full = m(batch["input_ids"], batch["attention_mask"])
            shifted = batch["labels"][:, 1:] != IGNORE_INDEX
            for i in range(len(full)):
                want = full[i, :-1][shifted[i]]
                torch.testing.assert_close(answer.logits[i, : len(want)], want, rtol=tol, atol=tol)
                assert answer.targets[i, : len(want)].tolist() == batch["labels"][i, 1:][shifted[i]].tolist()
            # the prompts' cache holds all but the last prompt token, which generate computes
            assert answer.prompt_cache.get_seq_length() == batch["gen_input_ids"].shape[1] - 1


def test_generation_from_the_cache_equals_plain_generation(tiny_model_dir):
    m = lora_method(tiny_model_dir)
    dm = instruction_data(m.backbone, builtin_size=80, test_fraction=0.2, eval_batch_size=8)
    dm.setup("test")
    with torch.no_grad():
        for batch in dm.test_dataloader():
            plain = m.evaluator.predict_answers(batch)
            cached = m.evaluator.predict_answers(batch, m.evaluator.answer_forward(batch, "test").prompt_cache)
            assert cached == plain and len(set(plain)) > 1


def test_batches_whose_labels_are_not_the_answers_take_the_full_forward(tiny_model_dir):
    m = lora_method(tiny_model_dir)
    dm = instruction_data(m.backbone, eval_batch_size=4)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert af.answer_layout(batch) is not None
    trained_prompt = {**batch, "labels": batch["labels"].clone()}
    trained_prompt["labels"][0, 1] = batch["input_ids"][0, 1]  # a prompt token trained
    assert af.answer_layout(trained_prompt) is None
    other_prompt = {**batch, "gen_input_ids": batch["gen_input_ids"].clone()}
    other_prompt["gen_input_ids"][1, -2] += 1  # the generation prompt is not the loss row's prompt
    assert af.answer_layout(other_prompt) is None
    packed = {**batch, "position_ids": torch.zeros_like(batch["input_ids"])}
    assert af.answer_layout(packed) is None
    # validation without generation: the answer logits still, no cache kept
    m.evaluator.options.generate_in_validation = False
    with torch.no_grad():
        assert m.evaluator.answer_forward(batch, "val").prompt_cache is None


def test_prompt_learning_keeps_its_own_forward(tiny_model_dir):
    import peft

    from ftbench.tuners import Peft

    m = SFT(backbone=Backbone(model=str(tiny_model_dir)),
            tuner=Peft(peft_config=peft.PromptTuningConfig(num_virtual_tokens=4)))
    m.configure_model()
    dm = instruction_data(m.backbone, eval_batch_size=4)
    dm.setup("test")
    assert not m.tuner.reuses_prompt_cache and m.evaluator.answer_forward(next(iter(dm.test_dataloader())), "test") is None


# ---------------------------------------------------------------------------- merged for evaluation
def backbone_weights(m: SFT) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.model.named_parameters() if "lora_" not in n}


def test_merge_and_unmerge_give_the_weights_back(tiny_model_dir):
    m = lora_method(tiny_model_dir)
    before = backbone_weights(m)
    dm = instruction_data(m.backbone, builtin_size=80, test_fraction=0.2, eval_batch_size=8)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    with torch.no_grad():
        unmerged = [m.evaluator.predict_answers(b) for b in batches]
        logits = m(batches[0]["input_ids"], batches[0]["attention_mask"])
        assert m.tuner.merge_for_evaluation(m.model, m.backbone)
        merged_w = backbone_weights(m)
        assert max(float((merged_w[n] - before[n]).abs().max()) for n in before) > 1e-3  # the update is in W
        merged = [m.evaluator.predict_answers(b) for b in batches]
        torch.testing.assert_close(m(batches[0]["input_ids"], batches[0]["attention_mask"]), logits, rtol=1e-5, atol=1e-5)
        m.tuner.unmerge_after_evaluation(m.model)
    assert merged == unmerged
    for n, w in backbone_weights(m).items():
        assert float((w - before[n]).abs().max()) <= 1e-6 * float(before[n].abs().max()), n


def test_unmerged_where_merging_is_not_exact(tiny_model_dir):
    import peft

    from ftbench.tuners import Peft

    bf16 = Backbone(model=str(tiny_model_dir), dtype="bfloat16")
    m = SFT(backbone=bf16, tuner=lora(4))
    m.configure_model()
    assert m.tuner.unmerged_evaluation_reason(m.model, bf16) == \
        "['torch.bfloat16'] weights: unmerging would not give the weights back"
    assert not m.tuner.merge_for_evaluation(m.model, bf16)
    fp32 = Backbone(model=str(tiny_model_dir))
    ia3 = SFT(backbone=fp32, tuner=Peft(peft_config=peft.IA3Config()))
    ia3.configure_model()
    assert ia3.tuner.unmerged_evaluation_reason(ia3.model, fp32) == "peft IA3: merging is not an exact add-and-subtract"
    nf4 = Backbone(model=str(tiny_model_dir), quantization="nf4")  # the reason reads the setting only
    assert m.tuner.unmerged_evaluation_reason(m.model, nf4) == \
        "a nf4 backbone: a merge rounds the update into its quantized weights"


def test_validation_in_a_fit_merges_and_leaves_training_as_it_was(tiny_model_dir):
    """4 LoRA steps with a validation after steps 2 and 4 (merged, then unmerged) train exactly as
    without validation, and the model is unmerged after fit and after test."""

    def fit(val_batches: int):
        L.seed_everything(0, verbose=False)
        m = SFT(backbone=Backbone(model=str(tiny_model_dir)), tuner=lora(8, lr=1e-2),
                evaluator=Evaluator(EvaluationOptions(max_new_tokens=3)))
        merged_in_val = []
        m.on_validation_batch_start = lambda *a: merged_in_val.append(m.model.base_model.model.model.layers[0].self_attn.q_proj.merged)
        rec = LossRecorder()
        trainer = cpu_trainer(4, [rec], limit_val_batches=val_batches, val_check_interval=2)
        dm = instruction_data(m.backbone)
        trainer.fit(m, datamodule=dm)
        return rec.losses, merged_in_val, m, trainer, dm

    plain, _, _, _, _ = fit(0)
    losses, merged_in_val, m, trainer, dm = fit(1)
    assert merged_in_val == [True, True]
    assert losses == pytest.approx(plain, abs=1e-6)
    q = m.model.base_model.model.model.layers[0].self_attn.q_proj
    assert not q.merged
    trainer.test(m, datamodule=dm, verbose=False)
    assert not q.merged and 0.0 <= float(trainer.callback_metrics["test/accuracy"]) <= 1.0


# ---------------------------------------------------------------------------- a lighter start
def test_progress_bar_only_on_a_terminal_and_outside_the_timed_batch(tiny_model_dir, tmp_path, monkeypatch):
    """No progress bar by default when the output is not a terminal (a sweep's child, a log file); on
    a terminal, or asked for, it is there, and the throughput callback comes first (its batch-end mark
    is taken before the bar redraws)."""
    from pathlib import Path

    from ftbench import cli
    from ftbench.bench import Throughput

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    argv = ["--backbone.model", str(tiny_model_dir), "--tuner", "configs/tuner/lora.yaml",
            "--model", "configs/objective/sft.yaml", "--data", "configs/data/instruction.yaml",
            "--trainer", "configs/trainer/cpu.yaml", "--trainer.logger", "false", "--out", str(tmp_path)]
    for terminal, extra, shown in ((False, [], False), (True, [], True), (False, ["--trainer.enable_progress_bar", "true"], True),
                                   (True, ["--trainer.enable_progress_bar", "false"], False)):
        monkeypatch.setattr(cli, "on_terminal", lambda: terminal)
        run = cli.cli_main([*argv, *extra], run=False)
        assert (run.trainer.progress_bar_callback is not None) == shown, (terminal, extra)
        assert isinstance(run.trainer.callbacks[0], Throughput)
