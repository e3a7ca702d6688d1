"""Padding-free packing of training rows (``data.packing``, :mod:`ftbench.data.packing`): the layout by hand
(blocks, positions, labels, segments), the padding fraction before and after (by hand, and against the
real loader's batches), no attention across the rows of a block, packed losses equal to the unpacked
ones through the real objectives (one batch, and four seeded steps against the existing pins of SFT, DPO,
CPO and ORPO, which packing must not move), and the refusals' exact messages."""

from __future__ import annotations

import pytest
import torch

from ftbench.backbone import Backbone
from ftbench.data.base import IGNORE_INDEX, Example, PackedCollator, padding_stats
from ftbench.data.packing import (RowPackingCollator, balanced_bins, first_epoch_batches, first_fit_decreasing, pack_rows,
                                  packed_padding_stats, segment_positions, training_padding)
from ftbench.errors import ConfigError
from ftbench.objectives import DPO, SFT
from ftbench.objectives.pair_forward import unpack_tokens
from helpers import instruction_data, lora, preference_data
from pinning import four_step_losses, load_pins

P = IGNORE_INDEX


def row(ids, trained_from: int, pos=None) -> Example:
    """A row whose tokens before ``trained_from`` are prompt (-100)."""
    return Example(input_ids=list(ids), labels=[P] * trained_from + list(ids[trained_from:]),
                   meta={} if pos is None else {"position_ids": pos})


# ---------------------------------------------------------------------------- the layout, by hand
def test_bins_by_hand():
    # first fit, longest first: 5 -> bin 0 (room 3), 4 -> bin 1 (room 4), 3 -> bin 0 (room 0), 2 -> bin 1
    assert first_fit_decreasing([3, 5, 2, 4], 8) == [[0, 1], [2, 3]]
    assert first_fit_decreasing([3, 3, 3], 6) == [[0, 1], [2]]  # ties by index
    assert first_fit_decreasing([9, 2], 8) == [[0], [1]]  # a row over capacity: a block of its own
    # balanced: as many bins (2), each row onto the least-filled one with room: 5 -> b0 (5), 4 -> b1 (4),
    # 3 -> b1 (7), 2 -> b0 (7): blocks of 7 and 7 where first fit gives 8 and 6
    assert balanced_bins([3, 5, 2, 4], 8) == [[1, 2], [0, 3]]
    # 8 rows of 34 in 256: first fit 7 + 1 rows (238 and 34 tokens), balanced 4 + 4 (136 and 136)
    assert [len(b) for b in first_fit_decreasing([34] * 8, 256)] == [7, 1]
    assert balanced_bins([34] * 8, 256) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert balanced_bins([9, 2], 8) == [[1], [0]]  # the row over capacity opens a bin after the others
    assert balanced_bins([], 8) == []
    assert segment_positions([3, 2]) == [0, 1, 2, 0, 1]


def test_pack_rows_by_hand():
    a = row([11, 12, 13, 14], 2)  # prompt 11 12, answer 13 14
    b = row([21, 22, 23], 1)
    c = row([31, 32, 33, 34, 35], 3)
    packed = pack_rows([a, b, c], 8)
    # c (5) -> block 0, a (4) -> block 1, b (3) -> the less filled block 1; rows keep their batch order
    assert [blk.input_ids for blk in packed.blocks] == [[31, 32, 33, 34, 35], [11, 12, 13, 14, 21, 22, 23]]
    assert [blk.labels for blk in packed.blocks] == [[P, P, P, 34, 35], [P, P, 13, 14, P, 22, 23]]
    assert [blk.meta["position_ids"] for blk in packed.blocks] == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0, 1, 2]]
    assert packed.segments == [(1, 0, 4), (1, 4, 3), (0, 0, 5)]  # (block, start, length) of a, b, c


def test_first_label_of_a_row_is_masked_and_a_domain_block_keeps_its_restarts():
    # a domain block trains every token (its first label too, which nothing predicts unpacked) and carries
    # its own restarting positions: packed, the first label is -100 and the restarts stay inside its segment
    doc = row([41, 42, 43, 44], 0, pos=[0, 1, 0, 1])
    ans = row([51, 52, 53], 1)
    packed = pack_rows([ans, doc], 16)
    assert packed.blocks[0].input_ids == [51, 52, 53, 41, 42, 43, 44]
    assert packed.blocks[0].labels == [P, 52, 53, P, 42, 43, 44]
    assert packed.blocks[0].meta["position_ids"] == [0, 1, 2, 0, 1, 0, 1]


def test_collated_blocks_pad_with_positions_of_their_own():
    pad = 0
    batch = RowPackingCollator(pad, 8)([row([11, 12, 13, 14], 2), row([21, 22, 23], 1), row([31, 32, 33, 34, 35], 3)])
    assert batch["input_ids"].tolist() == [[31, 32, 33, 34, 35, 0, 0], [11, 12, 13, 14, 21, 22, 23]]
    assert batch["labels"].tolist() == [[P, P, P, 34, 35, P, P], [P, P, 13, 14, P, 22, 23]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]
    # padding restarts at 0: it never continues a row (the domain regime's PackedCollator)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    assert batch["segments"].tolist() == [[1, 0, 4], [1, 4, 3], [0, 0, 5]]
    assert isinstance(RowPackingCollator(pad, 8).blocks, PackedCollator)


def test_unpack_tokens_by_hand():
    # blocks of width 6 -> 5 shifted positions; row 0 at (block 1, start 0, length 3), row 1 at (0, 2, 4)
    values = torch.arange(10, dtype=torch.float32).reshape(2, 5) + 1
    mask = torch.ones(2, 5, dtype=torch.bool)
    out, m = unpack_tokens(values, mask, torch.tensor([[1, 0, 3], [0, 2, 4]]), width=5)
    # row 0: block 1 positions 0, 1 (= 6, 7); row 1: block 0 positions 2, 3, 4 (= 3, 4, 5); 0 beyond
    assert out.tolist() == [[6, 7, 0, 0], [3, 4, 5, 0]]
    assert m.tolist() == [[True, True, False, False], [True, True, True, False]]


# ---------------------------------------------------------------------------- the padding fraction
def test_padding_fraction_by_hand():
    lengths, batches = [5, 3, 4, 2], [[0, 1], [2, 3]]
    # unpacked: widths 5 and 4 -> padded (5-3) + (4-2) = 4 of 18 slots
    assert padding_stats(lengths, batches) == {"tokens": 14, "padded": 4, "fraction": 4 / 18}
    # packed into 8: each batch a single block (8 and 6) -> no padding
    assert packed_padding_stats(lengths, batches, 8) == {"tokens": 14, "padded": 0, "fraction": 0.0}
    # packed into 6: 5 and 3 do not fit together (blocks 5 and 3: 2 padded), 4 + 2 = one block of 6
    assert packed_padding_stats(lengths, batches, 6) == {"tokens": 14, "padded": 2, "fraction": 2 / 16}
    # a preference pair is two sequences: [[5, 3], [4, 2]] in one batch = 4 sequences of width 5 unpacked
    two = training_padding([[5, 3], [4, 2]], [[0, 1]], 8)
    assert two["unpacked"] == {"tokens": 14, "padded": 6, "fraction": 6 / 20}
    assert two["packed"] == {"tokens": 14, "padded": 0, "fraction": 0.0}  # blocks 5+2, 4+3


def _loader_padding(dm) -> dict:
    """The padding of the training loader's real first-epoch batches (what the model sees)."""
    real = padded = 0
    for batch in dm.train_dataloader():
        mask = batch.get("packed_attention_mask", batch.get("chosen_attention_mask", batch["attention_mask"]))
        if "chosen_attention_mask" in batch and "packed_attention_mask" not in batch:
            mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        real += int(mask.sum())
        padded += mask.numel() - int(mask.sum())
    return {"tokens": real, "padded": padded, "fraction": padded / (real + padded)}


@pytest.mark.parametrize("regime", ["instruction", "preference"])
def test_recorded_padding_is_the_loaders(backbone, regime):
    """The record's numbers are those of the training loader's own batches, unpacked and packed."""
    make = instruction_data if regime == "instruction" else preference_data
    packed = make(backbone, packing=True)
    packed.setup("fit")
    plain = make(backbone)
    plain.setup("fit")
    record = packed.describe()["packing"]
    assert record["enabled"] is True and plain.describe()["packing"]["enabled"] is False
    assert record["padding"] == plain.describe()["packing"]["padding"]  # either way, both numbers
    assert record["padding"]["unpacked"] == _loader_padding(plain)
    assert record["padding"]["packed"] == _loader_padding(packed)


def test_padding_numbers_of_the_test_data(backbone):
    """The tests' data (the tiny tokenizer, max_length 96): 51 instruction rows in 13 batches of 4, padding
    13.1 % -> 3.0 %; 48 capitals pairs in 12 batches of 4 pairs (8 sequences), 26.5 % -> 13.7 %."""
    dm = instruction_data(backbone, packing=True)
    dm.setup("fit")
    pad = dm.describe()["packing"]["padding"]
    assert pad == {"unpacked": {"tokens": 1786, "padded": 270, "fraction": 270 / 2056},
                   "packed": {"tokens": 1786, "padded": 56, "fraction": 56 / 1842}}
    pairs = preference_data(backbone, packing=True)
    pairs.setup("fit")
    pad = pairs.describe()["packing"]["padding"]
    assert pad == {"unpacked": {"tokens": 4565, "padded": 1643, "fraction": 1643 / 6208},
                   "packed": {"tokens": 4565, "padded": 726, "fraction": 726 / 5291}}


def test_first_epoch_batches_are_the_loaders(backbone):
    """The batches the padding is measured over are the training loader's, row for row."""
    dm = instruction_data(backbone, setup=True)
    order = [i for b in first_epoch_batches(len(dm.splits["train"]), dm.batch_size, dm.order_seed) for i in b]
    seen = [[t for t, real in zip(ids, mask) if real] for batch in dm.train_dataloader()
            for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())]
    assert seen == [dm.splits["train"][i].input_ids for i in order]


# ---------------------------------------------------------------------------- no attention across rows
def test_a_rows_logits_do_not_see_its_neighbours(backbone):
    """A row's logits in a packed block equal its logits alone (1e-5) and do not move when the other
    rows of its block change."""
    tok = backbone.tokenizer
    method = SFT(backbone=backbone, tuner=lora())
    method.configure_model()
    method.eval()
    target = row(tok("the quick brown fox")["input_ids"], 1)
    others = [row(tok("jumps over the lazy dog again")["input_ids"], 1), row(tok("hello world")["input_ids"], 1)]
    changed = [row(tok("an entirely different sentence here")["input_ids"], 1), row(tok("bye")["input_ids"], 1)]
    collate = RowPackingCollator(tok.pad_token_id, 64)

    def logits_of_target(rows):
        batch = collate(rows)
        b, s, n = batch["segments"][rows.index(target)].tolist()
        with torch.no_grad():
            return method(batch["input_ids"], batch["attention_mask"], batch["position_ids"])[b, s:s + n]

    with torch.no_grad():
        alone = method(torch.tensor([target.input_ids]))[0]
    packed = logits_of_target([others[0], target, others[1]])
    assert collate([others[0], target, others[1]])["input_ids"].shape[0] == 1  # one block: all three together
    assert torch.allclose(packed, alone, atol=1e-5)
    assert torch.allclose(logits_of_target([changed[0], target, changed[1]]), packed, atol=1e-5)


# ---------------------------------------------------------------------------- packed loss = unpacked loss
def _moved_lora(method) -> None:
    """LoRA B away from 0 (seeded), so that the policy differs from the reference."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in method.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_sft_packed_batch_loss_equals_unpacked(backbone):
    plain = next(iter(instruction_data(backbone, setup=True).train_dataloader()))
    packed = next(iter(instruction_data(backbone, setup=True, packing=True).train_dataloader()))
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]  # 4 rows in 2 blocks
    assert packed["segments"].shape[0] == 4
    method = SFT(backbone=backbone, tuner=lora())
    method.configure_model()
    _moved_lora(method)
    with torch.no_grad():
        loss, sums, counts = method.loss(plain)
        loss_p, sums_p, counts_p = method.loss(packed)
    assert int(counts_p.sum()) == int(counts.sum())  # the same trained tokens (first labels were prompt)
    assert float(loss_p) == pytest.approx(float(loss), abs=1e-6)
    assert float(sums_p.sum()) == pytest.approx(float(sums.sum()), rel=1e-6)
    out = method.training_loss(packed)
    assert out.rows == 4 and out.input_ids is packed["input_ids"]


def test_evaluation_batches_are_not_packed(backbone):
    dm = instruction_data(backbone, setup=True, packing=True)
    for batch in (next(iter(dm.val_dataloader())), next(iter(dm.test_dataloader()))):
        assert "segments" not in batch and "position_ids" not in batch and "gen_input_ids" in batch
    pairs = preference_data(backbone, packing=True)
    pairs.setup("fit")
    assert not any(k.startswith("packed_") for k in next(iter(pairs.val_dataloader())))


def test_dpo_packed_batch_equals_unpacked(backbone):
    data_plain, data_packed = preference_data(backbone), preference_data(backbone, packing=True)
    data_plain.setup("fit")
    data_packed.setup("fit")
    plain, packed = next(iter(data_plain.train_dataloader())), next(iter(data_packed.train_dataloader()))
    assert packed["packed_segments"].shape == (8, 3) and packed["packed_input_ids"].shape[0] < 8
    method = DPO(backbone=backbone, tuner=lora())
    method.configure_model()
    _moved_lora(method)
    with torch.no_grad():
        a, b = method.compute(plain), method.compute(packed)
    for key in ("policy_chosen", "policy_rejected", "chosen_rewards", "rejected_rewards"):
        assert torch.allclose(b[key], a[key], atol=1e-5), key
    assert torch.equal(b["lengths"], a["lengths"])
    assert float(b["loss"]) == pytest.approx(float(a["loss"]), abs=1e-6)
    assert abs(float(a["loss"]) - 0.6931) > 1e-3  # the policy is not the reference: a real comparison
    out = method.training_loss(packed)
    assert out.input_ids is packed["packed_input_ids"] and out.rows == 4
    # a precomputed reference table matches the rows of a packed batch by the same keys
    from ftbench.objectives.reference_cache import row_keys

    assert row_keys(packed) == row_keys(plain)


def test_reward_packed_scores_equal_unpacked(backbone):
    """The score of each sequence, read at its segment's last token, equals the unpacked last-token score."""
    from ftbench.objectives import Reward

    data_plain, data_packed = preference_data(backbone), preference_data(backbone, packing=True)
    data_plain.setup("fit")
    data_packed.setup("fit")
    plain, packed = next(iter(data_plain.train_dataloader())), next(iter(data_packed.train_dataloader()))
    method = Reward(backbone=backbone, tuner=lora())
    method.configure_model()
    with torch.no_grad():
        (c, r, _), (cp, rp, _) = method.scores(plain), method.scores(packed)
        loss, loss_p = method.training_loss(plain).loss, method.training_loss(packed).loss
    assert torch.allclose(cp, c, atol=1e-5) and torch.allclose(rp, r, atol=1e-5)
    assert float(c.std()) > 1e-3  # the random score head tells the sequences apart: a real comparison
    assert float(loss_p) == pytest.approx(float(loss), abs=1e-6)


def test_multitask_packed_batch_loss_equals_unpacked(backbone):
    """A mixture of instruction rows and domain blocks (whose own restarts stay inside their segment)."""
    from ftbench.data.multitask import MultiTaskData, TaskSpec

    def mixture(**kw):
        tasks = [TaskSpec(name="sums", source="builtin:arithmetic", options={"builtin_size": 24}),
                 TaskSpec(name="code", source="builtin:humaneval", regime="domain", options={"max_train_rows": 4})]
        dm = MultiTaskData(backbone=backbone, tasks=tasks, max_length=96, batch_size=6, seed=0, **kw)
        dm.setup("fit")
        return dm

    plain, packed = next(iter(mixture().train_dataloader())), next(iter(mixture(packing=True).train_dataloader()))
    assert packed["segments"].shape[0] == 6 and packed["input_ids"].shape[0] < 6
    method = SFT(backbone=backbone, tuner=lora())
    method.configure_model()
    _moved_lora(method)
    with torch.no_grad():
        loss, _, counts = method.loss(plain)
        loss_p, _, counts_p = method.loss(packed)
    # a domain block's first label is trained but predicted by nothing, unpacked or packed
    assert bool((plain["labels"][:, 0] != P).any()) and int(counts_p.sum()) == int(counts.sum())
    assert float(loss_p) == pytest.approx(float(loss), abs=1e-5)


# four seeded fp32 steps through the real training step: packed runs reproduce the unpacked pins
def test_sft_packed_four_steps_equal_the_unpacked_pins(tiny_model_dir):
    import lightning as L

    L.seed_everything(0, verbose=False)
    method = SFT(backbone=Backbone(model=str(tiny_model_dir)), tuner=lora(alpha=16))
    losses = four_step_losses(method, instruction_data(method.backbone, packing=True))
    assert losses == pytest.approx(load_pins("foundation")["lora"]["losses"], abs=1e-5)


def test_dpo_packed_four_steps_equal_the_unpacked_pins(tiny_model_dir):
    from ftbench.tuners import Full

    method = DPO(backbone=Backbone(model=str(tiny_model_dir)), tuner=Full(lr=1e-3), warmup_steps=0,
                 lr_scheduler="constant")
    losses = four_step_losses(method, preference_data(method.backbone, packing=True))
    assert losses == pytest.approx(load_pins("dpo")["full"], abs=1e-5)


@pytest.mark.parametrize("name", ["cpo", "orpo"])
def test_cpo_orpo_packed_four_steps_equal_the_unpacked_pins(tiny_model_dir, name):
    from test_cpo_orpo import SETTINGS, make

    cls, kw = SETTINGS[name]
    method = make(cls, tiny_model_dir, **kw)
    losses = four_step_losses(method, preference_data(method.backbone, packing=True))
    assert losses == pytest.approx(load_pins("cpo_orpo")[name], abs=1e-5)


# ---------------------------------------------------------------------------- refusals
def _fit_check(objective, dm):
    from ftbench.objectives.data_needs import check_data

    check_data(objective, dm, "fit")


def test_sft_refuses_packed_pairs(backbone):
    with pytest.raises(ConfigError) as err:
        _fit_check(SFT(backbone=backbone, tuner=lora()), preference_data(backbone, packing=True))
    assert str(err.value) == ("objective sft: data.packing: packed batches of preference pairs are refused: a packed "
                              "pair batch holds chosen and rejected sequences together, and SFT trains on the chosen "
                              "ones alone (pack instruction rows instead)")
    assert err.value.hint == "set data.init_args.packing: false"
    _fit_check(SFT(backbone=backbone, tuner=lora()), instruction_data(backbone, packing=True))  # accepted
    _fit_check(DPO(backbone=backbone, tuner=lora()), preference_data(backbone, packing=True))


def test_packing_with_prompt_batches_is_refused(backbone):
    with pytest.raises(ConfigError) as err:
        instruction_data(backbone, packing=True, prompt_batches=True)
    assert str(err.value) == ("data.packing: prompt batches (online RL) hold prompts to generate from, not rows to "
                              "pack; set data.packing or data.prompt_batches to false")


def test_kto_data_refuses_packing(backbone):
    from ftbench.data.unpaired import UnpairedData

    with pytest.raises(ConfigError) as err:
        UnpairedData(backbone=backbone, source="builtin:capitals", packing=True)
    assert str(err.value) == ("data.packing: KTO's batches are not packed (each row's KL term is scored with another "
                              "row's completion, a pairing built per padded batch)")


def test_online_rl_refuses_packed_rows(backbone):
    from ftbench.objectives import GRPO

    with pytest.raises(ConfigError) as err:
        _fit_check(GRPO(backbone=backbone, tuner=lora(), num_generations=2, max_completion_length=2),
                   instruction_data(backbone, packing=True))
    assert str(err.value) == ("objective grpo: data.packing: packed batches of instruction rows are refused: it "
                              "samples completions from prompts (data.prompt_batches: true), which are not packed")


def test_packed_config_is_the_quickstart_data_with_packing():
    """configs/data/instruction_packed.yaml differs from instruction.yaml by packing alone (no drift)."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent / "configs" / "data"
    plain, packed = (yaml.safe_load((root / f).read_text()) for f in ("instruction.yaml", "instruction_packed.yaml"))
    assert packed["init_args"].pop("packing") is True
    assert packed == plain


def test_packed_config_runs_through_the_cli_and_the_record_says_so(tiny_model_dir, tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from ftbench.cli import cli_main

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    cli_main(["fit", "--backbone.model", str(tiny_model_dir), "--tuner", "configs/tuner/lora.yaml",
              "--model", "configs/objective/sft.yaml", "--data", "configs/data/instruction_packed.yaml",
              "--trainer", "configs/trainer/cpu.yaml", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
              "--data.init_args.builtin_size", "64", "--data.init_args.eval_batch_size", "8",
              "--evaluate.max_new_tokens", "4", "--test_after_fit", "false", "--trainer.enable_progress_bar", "false",
              "--out", str(tmp_path)])
    [path] = [p for p in tmp_path.glob("*.json") if p.stem.startswith("sft+lora-")]
    info = json.loads(path.read_text())["train_info"]
    assert info["status"] == "completed" and info["global_steps"] == 2
    packing = info["data"]["packing"]
    assert packing["enabled"] is True
    assert packing["padding"]["packed"]["fraction"] < packing["padding"]["unpacked"]["fraction"]
    assert packing["padding"]["packed"]["tokens"] == packing["padding"]["unpacked"]["tokens"]
