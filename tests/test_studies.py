"""The studies under ``experiments/``: each sweep file (CPU and GPU scale) dry-runs with every point
parsed, and each committed report — and the table in its README — is exactly what ``ftbench report``
makes from the committed records with the study's options (``scripts/update_reports.py``)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import shutil
import sys
from pathlib import Path

import pytest

from ftbench.sweep.cli import main as sweep_main
from ftbench.sweep.report import report

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("update_reports", ROOT / "scripts" / "update_reports.py")
update_reports = importlib.util.module_from_spec(_spec)
sys.modules["update_reports"] = update_reports  # dataclasses look their module up while the file runs
_spec.loader.exec_module(update_reports)
STUDIES = update_reports.STUDIES

#: every study's sweep files and how many runs each expands to
SWEEPS = {
    "configs/sweeps/quickstart.yaml": 5,
    "experiments/efficiency/sweep.yaml": 12,
    "experiments/efficiency/gpu.yaml": 12,
    "experiments/params/sweep.yaml": 60,
    "experiments/params/gpu.yaml": 60,
    "experiments/regimes/sweep.yaml": 20,
    "experiments/regimes/gpu.yaml": 20,
    "configs/sweeps/rlhf.yaml": 11,
    "experiments/rlhf/gpu.yaml": 7,
    "experiments/rlhf/family.yaml": 32,
    "experiments/preference/sweep.yaml": 50,
    "experiments/preference/gpu.yaml": 50,
}


def test_every_study_folder_has_its_files():
    for name in ("efficiency", "params", "regimes", "rlhf"):
        folder = ROOT / "experiments" / name
        assert (folder / "README.md").is_file() and (folder / "gpu.yaml").is_file(), name
    assert {str(p.relative_to(ROOT)) for p in ROOT.glob("experiments/*/*.yaml")} <= set(SWEEPS)


@pytest.mark.parametrize("path", list(SWEEPS))
def test_study_sweep_dry_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = sweep_main(["sweep", path, "--dry-run", "--out", str(tmp_path / "results")])
    text = out.getvalue()
    assert code == 0, text
    n = SWEEPS[path]
    assert f"{n} of {n} runs to do" in text
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def _committed(name: str) -> Path:
    results = ROOT / STUDIES[name].results
    if not (results / "report.md").is_file():
        pytest.fail(f"{results}: no committed report (run the study, then scripts/update_reports.py {name})")
    return results


@pytest.mark.parametrize("name", list(STUDIES))
def test_committed_report_and_readme_tables_are_what_the_records_make(name, tmp_path):
    results = _committed(name)
    copy = shutil.copytree(results, tmp_path / "results")
    for made in ("report.md", "report.csv"):
        (copy / made).unlink()
    study = STUDIES[name]
    table = report(copy, **study.report_options())
    for made in ("report.md", "report.csv"):
        assert (copy / made).read_bytes() == (results / made).read_bytes(), f"{results / made} is not what the records make"
    for readme in study.readmes:
        text = (ROOT / readme).read_text()
        start, end = f"<!-- {name}-table:start -->", f"<!-- {name}-table:end -->"
        assert start in text and end in text, readme
        block = text.split(start, 1)[1].split(end, 1)[0]
        assert block == f"\nMade by `{study.command()}` from the run records committed there:\n\n{table}\n", readme


def test_efficiency_estimate_table_is_the_estimate():
    text = (ROOT / "experiments/efficiency/README.md").read_text()
    block = text.split("<!-- efficiency-estimate-table:start -->", 1)[1].split("<!-- efficiency-estimate-table:end -->")[0]
    table = update_reports.estimate_table()
    assert block.endswith(f"\n\n{table}\n")
    # Gemma-2B at the paper's settings, full fine-tuning: 15.10 GiB predicted against the paper's 17.06,
    # which are GiB (its Llama2-7B full row, 38.72, is below bf16 weights + gradients + 8-bit Adam in 1e9 bytes);
    # with the two more float32 logits (2 x 512 x 256,000 x 4 B = 0.98 GiB) of the paper's HF loss, 16.08
    assert "| gemma-2b | sft+full | bf16-true | 4.67 | 4.67 | 4.74 |" in table
    assert "| 15.10 | 17.06 | 0.89 | 16.08 | 0.94 |" in table
    assert "| predicted peak (GiB) | paper, measured (GiB) |" in table
    # the GaLore row (galore-torch's 8-bit GaLore, rank 16), beside the paper's 10.16
    assert "| gemma-2b | sft+full, GaLore | bf16-true | 4.67 | 4.67 | 1.03 | 0.53 | 0.49 | 11.39 | 10.16 | 1.12 |" in table
    # Llama2-7B: full within 2 % of the paper; LoRA with LLaMA-Factory's float32 adapters (bf16-mixed) within 3 %
    assert "| llama2-7b | sft+full | bf16-true | 12.55 | 12.55 | 12.75 | 0.20 | 0.06 | 38.11 | 38.72 | 0.98 |" in table
    assert "| llama2-7b | sft+lora | bf16-mixed | 13.74 | 1.19 | 0.61 | 0.19 | 0.06 | 15.79 | 16.32 | 0.97 |" in table
