"""Built-in tasks with exact answers, generated deterministically by code (no download, no licence
question). Each task is a function ``(rng) -> row``; ``generate(task, n, seed)`` returns ``n`` rows in
the Alpaca form (``instruction``, ``input``, ``output``) plus ``task``. ``instruction`` is the
uniform mixture of all tasks. The same ``(task, n, seed)`` always gives the same rows.

The tasks are chosen so that a 135M instruction-tuned model does not already answer them in the
exact form (its baseline exact-match is near zero: it answers in sentences) and learns them within
a few dozen steps (the answers are short and follow from the input), so a comparison table shows a
real before/after difference on a CPU budget.
"""

from __future__ import annotations

import random
from typing import Callable

from ftbench.errors import ConfigError

WORDS = (
    "apple river stone cloud garden window orange silver market planet candle forest pencil "
    "bridge summer winter rabbit castle ocean mirror ladder button island rocket violin "
    "basket tiger lemon shadow feather engine harbor jacket kitten meadow needle parrot "
    "pillow puzzle ribbon saddle tunnel valley wagon yellow zebra anchor blanket carpet "
    "dragon falcon glacier hammer lantern marble nectar oyster pepper quartz"
).split()


def _arithmetic(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return {"instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)}
    a, b = max(a, b), min(a, b)
    return {"instruction": f"What is {a} - {b}?", "input": "", "output": str(a - b)}


def _last_word(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 6))
    return {"instruction": "What is the last word of this list?", "input": " ".join(words), "output": words[-1]}


def _sort_numbers(rng: random.Random) -> dict[str, str]:
    nums = rng.sample(range(1, 50), rng.randint(3, 5))
    return {
        "instruction": "Sort these numbers from smallest to largest.",
        "input": " ".join(map(str, nums)),
        "output": " ".join(map(str, sorted(nums))),
    }


def _uppercase(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    return {"instruction": "Write this word in capital letters.", "input": word, "output": word.upper()}


def _count_words(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 7))
    return {"instruction": "How many words are in this list?", "input": " ".join(words), "output": str(len(words))}


TASKS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "arithmetic": _arithmetic,
    "last_word": _last_word,
    "sort_numbers": _sort_numbers,
    "uppercase": _uppercase,
    "count_words": _count_words,
}
MIXTURE = "instruction"


def task_names() -> list[str]:
    return [*TASKS, MIXTURE]


def generate(task: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows of ``task`` (``instruction`` = round-robin over all tasks), deterministic in ``seed``."""
    if task != MIXTURE and task not in TASKS:
        raise ConfigError(f"unknown built-in task {task!r}; choose from {', '.join(task_names())}")
    rng = random.Random(f"{task}:{seed}")
    names = list(TASKS) if task == MIXTURE else [task]
    rows = []
    for i in range(n):
        name = names[i % len(names)]
        rows.append({**TASKS[name](rng), "task": name})
    return rows
