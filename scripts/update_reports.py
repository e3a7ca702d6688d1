"""Remake every study's report from its committed run records, and put the tables into the READMEs.

    python scripts/update_reports.py            # every study in STUDIES
    python scripts/update_reports.py params     # one study

Each study's report (``experiments/<study>/results/report.md``, ``.csv`` and plots) is what
``ftbench report`` makes with the options in :data:`STUDIES`; the table then goes between the
study's markers in its README (and the top-level README's, for the studies it shows). A study whose
claims compare points the table does not test against its reference (runs of one tuner, stages of a
pipeline) names those pairs in ``compare``: ``ftbench report --compare A B ...`` (paired tests on the
test rows, Holm-adjusted over the pairs) goes between its ``<!-- NAME-compare:start/end -->`` markers.
No figure in a README is typed by hand; ``tests/test_studies.py`` checks that every committed report
is what the records make, ``tests/test_report.py`` the comparison blocks.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Study:
    results: str                                   # the committed records (relative to the repository)
    readmes: tuple[str, ...]                       # files with <!-- NAME-table:start/end --> markers
    columns: Optional[list[str]] = None            # ftbench report --columns (None: the default set)
    select: Optional[str] = None                   # --select
    select_over: list[str] = field(default_factory=list)  # --select-over
    compare: tuple[tuple[str, str], ...] = ()      # --compare A B, one pair each (the README's compare block)
    reference: Optional[str] = None                # --reference (None: the report's default, full)

    def report_options(self) -> dict:
        """The keyword arguments of :func:`ftbench.sweep.report.report` that make this study's table."""
        return {"columns": self.columns, "select": self.select, "select_over": self.select_over,
                **({"reference": self.reference} if self.reference else {})}

    def compare_command(self) -> str:
        """The ``ftbench report --compare`` command line of the study's comparison block."""
        return " ".join([f"ftbench report {self.results}",
                         *(f"--compare {shlex.quote(a)} {shlex.quote(b)}" for a, b in self.compare)])

    def command(self) -> str:
        """The ``ftbench report`` command line that makes this report."""
        args = [f"ftbench report {self.results}"]
        if self.select:
            args.append(f"--select {self.select}")
        if self.select_over:
            args.append(f"--select-over {','.join(self.select_over)}")
        if self.reference:
            args.append(f"--reference {self.reference}")
        if self.columns:
            args.append(f"--columns '{','.join(self.columns)}'")
        return " ".join(args)


STUDIES = {
    "quickstart": Study("experiments/quickstart/results", ("README.md",)),
    "efficiency": Study("experiments/efficiency/results", ("README.md", "experiments/efficiency/README.md"),
                        columns=["run", "method", "trainable", "trainable_pct", "weights_mb", "grads_mb", "optimizer_mb",
                                 "activations_mb", "pred_peak_mb", "peak_mem_mb", "mem_rel", "tokens_per_s",
                                 "speed_rel", "wall_s", "val_loss", "val_ppl"]),
    "params": Study("experiments/params/results", ("experiments/params/README.md",),
                    columns=["method", "setting", "n", "trainable", "trainable_pct", "val_loss", "accuracy", "score_ci",
                             "p", "diff", "p_paired", "p_holm", "verdict", "test/*/accuracy"],
                    select="val/loss", select_over=["lr"]),
    "regimes": Study("experiments/regimes/results", ("experiments/regimes/README.md",),
                     columns=["run", "method", "test/*/accuracy", "accuracy", "score_ci", "val/loss", "val/domain/loss",
                              "val/general/loss"],
                     compare=(("lora_instruction.tasks", "full_instruction.tasks"),
                              ("lora_multitask.tasks", "full_multitask.tasks"),
                              ("lora_multitask.tasks", "lora_instruction.tasks"),
                              ("full_multitask.tasks", "full_instruction.tasks"),
                              ("full_multitask.tasks", "base.tasks"))),
    "rlhf": Study("experiments/rlhf/results", ("experiments/rlhf/README.md",),
                  columns=["run", "method", "trainable", "accuracy", "score_ci", "test/pairwise_accuracy", "test/reward",
                           "train/reward", "train/kl", "train/entropy", "step_time_split.*", "pred_peak_mb", "peak_mem_mb",
                           "wall_s"],
                  compare=(("sft", "baseline"), ("dpo", "sft"), ("dpo.lr1e-4", "sft"), ("grpo_rule", "sft"),
                           ("grpo_rm", "sft"), ("grpo_rule.lr1e-4", "sft"), ("grpo_rm.lr1e-4", "sft"))),
    "rlhf_family": Study("experiments/rlhf/family", ("experiments/rlhf/README.md",),
                         columns=["method", "setting", "n", "accuracy", "score_ci", "test/reward", "train/reward",
                                  "train/kl", "train/objective/kl", "train/clip_ratio/region_mean",
                                  "train/clip_ratio/high_mean", "train/policy/clipfrac_avg", "train/entropy",
                                  "step_time_split.*", "pred_peak_mb", "wall_s"]),
    # each method's rate chosen by its own validation loss (the losses' scales differ between methods);
    # the reference is DPO (sigmoid): the first dpo+lora fit point, the one a DPO-objective point prefers
    "preference": Study("experiments/preference/results", ("experiments/preference/README.md",),
                        columns=["run", "method", "setting", "n", "val_loss", "accuracy", "score_ci",
                                 "test/rewards/accuracies", "test/logps/chosen", "test/logps/rejected",
                                 "pred_peak_mb", "throughput.step_time_mean_s", "wall_s", "p", "diff", "p_holm",
                                 "verdict"],
                        select="val/loss", select_over=["lr"], reference="dpo+lora"),
}


#: the paper's measured peaks on an A100 (Zheng et al. 2024, Table 4), by model folder and row. Its "GB" are
#: GiB (2**30 bytes): its Llama2-7B full row, 38.72, is below what bf16 weights and gradients and 8-bit Adam
#: alone take in 10**9 bytes (6 B x 6.74e9 = 40.4e9), and LLaMA-Factory's own memory log (RECORD_VRAM in
#: src/llamafactory/train/callbacks.py) divides torch.cuda.max_memory_allocated() by 1024**3
PAPER_PEAK_GIB = {
    ("gemma-2b", "sft+full"): 17.06, ("gemma-2b", "sft+freeze"): 8.10, ("gemma-2b", "sft+full, GaLore"): 10.16,
    ("gemma-2b", "sft+lora"): 7.91, ("gemma-2b", "sft+lora+nf4"): 5.21,
    ("llama2-7b", "sft+full"): 38.72, ("llama2-7b", "sft+freeze"): 15.69, ("llama2-7b", "sft+lora"): 16.32,
    ("llama2-7b", "sft+lora+nf4"): 7.52,
}
GIB = 2**30
#: ``ftbench estimate --json`` outputs at the paper's settings (commands in experiments/efficiency/README.md):
#: every row in bf16 (bf16-true: what LLaMA-Factory's ``pure_bf16`` runs), the GaLore row (galore8bit_r16.yaml:
#: LLaMA-Factory's GaLore defaults), and the LoRA rows in bf16-mixed (LLaMA-Factory's default without
#: ``pure_bf16``: trainable parameters upcast to float32, src/llamafactory/model/adapter.py init_adapter)
ESTIMATES = ("experiments/efficiency/estimate_gemma-2b.json", "experiments/efficiency/estimate_gemma-2b_galore.json",
             "experiments/efficiency/estimate_gemma-2b_mixed.json", "experiments/efficiency/estimate_llama2-7b.json",
             "experiments/efficiency/estimate_llama2-7b_mixed.json")


def estimate_label(row: dict) -> str:
    """The method label, with the optimizer where it is not the study's 8-bit AdamW (the GaLore row)."""
    return row["method"] + (", GaLore" if "GaLore" in str(row["settings"]["optimizer"]) else "")


def estimate_table(paths: tuple[Path, ...] = tuple(ROOT / p for p in ESTIMATES)) -> str:
    """``ftbench estimate``'s rows at the paper's settings next to the paper's figures."""
    import json

    rows = [r for path in paths for r in json.loads(path.read_text())["rows"]]
    head = ("| model | method | precision | weights (GiB) | grads (GiB) | optimizer (GiB) | activations (GiB) "
            "| largest transient (GiB) | predicted peak (GiB) | paper, measured (GiB) | predicted / measured "
            "| + HF loss's 2 logits copies (GiB) | that / measured |")
    lines = [head, "|---|---|---|" + "---:|" * 10]
    for r in rows:
        model = Path(r["settings"]["model"]).name
        gb = {k: r[k]["bytes"] / GIB for k in ("weights", "gradients", "optimizer", "activations", "largest_transient")}
        peak = r["predicted_peak_bytes"] / GIB
        paper = PAPER_PEAK_GIB.get((model, estimate_label(r)))
        # the largest transient is the float32 logits (batch x seq x vocab); the causal-LM loss of the
        # transformers the paper ran (GemmaForCausalLM/LlamaForCausalLM, early 2024) also kept the float32
        # logits in its output and made a contiguous shifted copy, and its backward a full-size gradient:
        # two more float32 logits than ftbench's step holds (README, "What the estimate leaves out")
        with_hf_loss = peak + 2 * r["largest_transient"]["bytes"] / GIB
        lines.append(f"| {model} | {estimate_label(r)} | {r['settings']['precision']} | "
                     + " | ".join(f"{v:.2f}" for v in gb.values()) + f" | {peak:.2f} | "
                     + (f"{paper:.2f} | {peak / paper:.2f} | {with_hf_loss:.2f} | {with_hf_loss / paper:.2f} |"
                        if paper else f"– | – | {with_hf_loss:.2f} | – |"))
    return "\n".join(lines)


def make_report(study: Study, root: Path = ROOT) -> str:
    """Write the study's report next to its records; return the markdown table."""
    from ftbench.sweep.report import report

    return report(root / study.results, **study.report_options())


def make_comparison(study: Study, root: Path = ROOT) -> str:
    """The study's ``--compare`` output (writes nothing)."""
    from ftbench.sweep.report import compare_report

    return compare_report(root / study.results, study.compare).rstrip("\n")


def put_table(readme: Path, name: str, made_by: str, table: str, block: str = "table") -> bool:
    """Replace the text between ``<!-- NAME-table:start -->`` and ``<!-- NAME-table:end -->`` (``block``:
    another marker kind, ``compare``)."""
    from ftbench.fileio import write_text_atomic

    start, end = f"<!-- {name}-{block}:start -->", f"<!-- {name}-{block}:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        print(f"{readme}: markers {start} / {end} not found", file=sys.stderr)
        return False
    block = f"{start}\n{made_by}\n\n{table}\n{end}"
    write_text_atomic(readme, re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S))
    return True


def main(argv: list[str]) -> int:
    names = argv or [n for n, s in STUDIES.items() if (ROOT / s.results).is_dir()]
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        print(f"unknown study {', '.join(unknown)} (studies: {', '.join(STUDIES)})", file=sys.stderr)
        return 2
    ok = True
    for name in names:
        study = STUDIES[name]
        table = make_report(study)
        for readme in study.readmes:
            ok &= put_table(ROOT / readme, name, f"Made by `{study.command()}` from the run records committed there:",
                            table)
        if study.compare:
            ok &= put_table(ROOT / study.readmes[0], name, f"Made by `{study.compare_command()}` from the same records:",
                            make_comparison(study), block="compare")
        if name == "efficiency":
            ok &= put_table(ROOT / "experiments/efficiency/README.md", "efficiency-estimate",
                            "Made by `scripts/update_reports.py` from "
                            + ", ".join(f"`{Path(p).name}`" for p in ESTIMATES) + " and the paper's Table 4:",
                            estimate_table())
        print(f"{name}: {study.results}/report.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
