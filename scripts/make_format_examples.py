"""Writes the example data sets of configs/data/llamafactory/ and configs/data/trl/: the built-in
arithmetic rows (ftbench/data/tasks.py, seed 0) in LLaMA-Factory's and TRL's forms, read by
configs/data/{instruction,preference}_{llamafactory,trl}.yaml. Run from the repository root:
``python scripts/make_format_examples.py`` (the files are committed; this regenerates them)."""

from __future__ import annotations

import json
from pathlib import Path

from ftbench.data.preference import builtin_pairs

ROOT = Path(__file__).resolve().parent.parent
N = 60
SYSTEM = "Answer with the number only."


def main() -> None:
    pairs = builtin_pairs("arithmetic", N, seed=0)
    lf = ROOT / "configs/data/llamafactory"
    lf.mkdir(parents=True, exist_ok=True)
    # sharegpt SFT: a system turn, the question, the answer; exact answers kept for exact match
    sharegpt = [{"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": p["prompt"]},
                                   {"from": "gpt", "value": p["chosen"]}]} for p in pairs]
    # alpaca ranking under other column names (mapped in dataset_info.json)
    ranking = [{"question": p["prompt"], "sys": SYSTEM, "better": p["chosen"], "worse": p["rejected"]} for p in pairs]
    info = {
        "arith_sharegpt": {"file_name": "arith_sharegpt.json", "formatting": "sharegpt"},
        "arith_pairs": {"file_name": "arith_pairs.json", "ranking": True,
                        "columns": {"prompt": "question", "system": "sys", "chosen": "better", "rejected": "worse"}},
    }
    for name, rows in (("arith_sharegpt.json", sharegpt), ("arith_pairs.json", ranking), ("dataset_info.json", info)):
        (lf / name).write_text(json.dumps(rows, indent=1) + "\n")
    trl = ROOT / "configs/data/trl"
    trl.mkdir(parents=True, exist_ok=True)
    # TRL conversational prompt-completion, and preference with an implicit prompt
    completion = [{"prompt": [{"role": "user", "content": p["prompt"]}], "completion": [{"role": "assistant", "content": p["chosen"]}]}
                  for p in pairs]
    implicit = [{"chosen": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}],
                 "rejected": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["rejected"]}]}
                for p in pairs]
    for name, rows in (("arith_prompt_completion.jsonl", completion), ("arith_implicit_pairs.jsonl", implicit)):
        (trl / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
