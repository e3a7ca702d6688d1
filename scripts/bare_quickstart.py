"""The quickstart LoRA run as a bare script: torch, transformers and peft only, the way a user writes it.

    python scripts/bare_quickstart.py BATCHES.pt

``BATCHES.pt`` (written by ``scripts/bench_quickstart.py``) holds the model folder, the LoRA settings and
the collated batches of ``ftbench fit`` with configs/backbone/embedded.yaml, configs/tuner/lora.yaml,
configs/objective/sft.yaml, configs/data/instruction.yaml and configs/trainer/quickstart.yaml: 40 AdamW
steps (lr 1e-3, weight decay 0, 5 warm-up steps) of 8 rows; validation after steps 20 and 40 on the
validation batch; test on the test batches. Evaluation as a user writes it: ``model(..., labels=...).loss``
on each batch, then ``model.generate`` of its prompts (greedy, the run's budget) and exact match
(white space folded). Prints ``bare: {...}`` with the seconds of each part and the exact match.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler  # noqa: E402


def evaluate(model, tok, batches, budget: int) -> tuple[float, float]:
    """(token-weighted mean loss, exact match) over ``batches``."""
    model.eval()
    loss_sum = tokens = right = rows = 0.0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            loss_sum, tokens = loss_sum + float(loss) * n, tokens + n
            out = model.generate(input_ids=b["gen_input_ids"], attention_mask=b["gen_attention_mask"],
                                 max_new_tokens=budget, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(out[:, b["gen_input_ids"].shape[1]:], skip_special_tokens=True)
            right += sum(" ".join(t.split()) == " ".join(a.split()) for t, a in zip(texts, b["answers"]))
            rows += len(texts)
    model.train()
    return loss_sum / tokens, right / rows


def main(path: str) -> int:
    spec = torch.load(path, weights_only=False)
    torch.manual_seed(spec["seed"])
    times = {"import_s": time.perf_counter() - START}
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**spec["lora"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"], weight_decay=0.0)
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=spec["warmup_steps"])
    times["setup_s"] = time.perf_counter() - t0
    times["train_s"] = times["val_s"] = 0.0
    model.train()
    for step, b in enumerate(spec["train"], 1):
        t0 = time.perf_counter()
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        times["train_s"] += time.perf_counter() - t0
        if step % spec["val_every"] == 0:
            t0 = time.perf_counter()
            evaluate(model, tok, spec["val"], spec["budget"])
            times["val_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    test_loss, exact = evaluate(model, tok, spec["test"], spec["budget"])
    times["test_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - START
    print("bare: " + json.dumps({**{k: round(v, 2) for k, v in times.items()}, "test_loss": round(test_loss, 4),
                                 "test_accuracy": exact}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
