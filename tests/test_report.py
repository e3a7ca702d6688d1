"""Reports: exact tables from hand-written records, columns found in the records, the reference by
label or tuner part, Welch's t-test (scipy), --select on validation metrics only, several studies in
one file, empty and corrupt inputs, CSV, Pareto front, valid PNG plots, the CLI without torch, the
W&B table, and the committed quickstart report reproduced."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scipy import stats

from ftbench.sweep.report import (RecordWarning, ReportError, load_records, markdown_table, pareto_front, report,
                                  runs_frame, summarise, summary_line, welch_t_test)
from ftbench.sweep.report.cli import main as report_main
from ftbench.sweep.report.table import CONTENDED_NOTE

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
MB = 2**20


def _record(run_id, method, seed, *, status="completed", sub="fit", lr=1e-3, r=16, acc=None, mem_mb=None,
            tps=None, fit_s=None, test_s=None, val_loss=None, tasks=None, general=None, curve=None, n=0,
            total=1000, trainable=1000, final=None, info=None, config=None):
    model = {"class_path": f"ftbench.methods.{method.capitalize()}", "init_args": {}}
    if method == "lora":
        model["init_args"] = {"r": r, "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}}}
    elif method == "full":
        model["init_args"] = {"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}}}
    config = config or {"seed_everything": seed, "out": "somewhere", "run_id": run_id, "model": model,
                        "trainer": {"max_steps": 60, "logger": False, "__path__": f"/x/{run_id}.yaml"}}
    final = dict(final or {})
    if acc is not None:
        final["test/accuracy"] = acc
    if val_loss is not None:
        final["val/loss"] = val_loss
    for task, a in (tasks or {}).items():
        final[f"test/{task}/accuracy"] = a
    info = {"status": status, "method": method, "final": final, "metrics": curve or [],
            "params": {"trainable": trainable, "total": total, "trainable_pct": 100 * trainable / total}, **(info or {})}
    if general is not None:
        info["initial"] = {"val/general/loss": general[0]}
        final["val/general/loss"] = general[1]
    if mem_mb is not None:
        info["memory" if sub == "fit" else "test_memory"] = {"peak_bytes": int(mem_mb * MB)}
    if tps is not None:
        info["throughput"] = {"trained_tokens_per_s": tps}
    if fit_s is not None:
        info["fit_seconds"] = fit_s
    if test_s is not None:
        info["test_seconds"] = test_s
    if status == "nan":
        info["error"] = {"type": "NonFiniteLossError", "message": "loss nan at step 3"}
        info["last_metrics"] = {"train/loss": 9.1}
    return {"schema": 1, "run_info": {"run_id": run_id, "subcommand": sub, "seed": seed, "config": config,
                                      "created": f"2026-01-01T00:00:{n:02d}+00:00"},
            "train_info": info, "meta_info": {}}


def _write(d: Path, recs, name=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for rec in recs:
        (d / f"{rec['run_info']['run_id']}.json").write_text(json.dumps(rec))
    if name:
        (d / "sweep.json").write_text(json.dumps({"name": name, "runs": []}))  # not a record: passed over
    return d


def _curve(v0, v1):
    return [{"step": 30, "epoch": 0, "val/loss": v0, "train/loss": v0 + 0.1},
            {"step": 60, "epoch": 0, "val/loss": v1, "train/loss": v1 + 0.1}]


def write_records(d: Path, broken: bool = True) -> None:
    recs = []
    for i, (seed, acc, tps, vl, g1, add) in enumerate([(1, 0.5, 100, 1.0, 2.5, 0.4), (2, 0.6, 110, 1.2, 2.6, 0.6),
                                                       (3, 0.7, 120, 1.4, 2.7, 0.8)]):
        recs.append(_record(f"full-{seed}", "full", seed, lr=5e-5, acc=acc, mem_mb=1000, tps=tps, fit_s=10, test_s=2,
                            val_loss=vl, general=(2.0, g1), tasks={"add": add, "copy": 0.5}, curve=_curve(2.0, vl), n=i))
    for i, (seed, acc, tps, vl, g1) in enumerate([(1, 0.2, 200, 1.5, 2.1), (2, 0.3, 220, 1.6, 2.1), (3, 0.4, 240, 1.7, 2.1)]):
        recs.append(_record(f"lora-{seed}", "lora", seed, acc=acc, mem_mb=400, tps=tps, fit_s=6, test_s=2, val_loss=vl,
                            general=(2.0, g1), tasks={"add": 0.1, "copy": acc}, curve=_curve(2.2, vl), n=10 + i,
                            trainable=50))
    recs.append(_record("lora-r8", "lora", 1, r=8, acc=0.25, mem_mb=380, tps=230, fit_s=5, test_s=1, val_loss=1.65,
                        n=20, trainable=25))
    recs.append(_record("lora-huge-lr", "lora", 1, lr=1e30, status="nan", mem_mb=None, n=21, trainable=50))
    recs.append(_record("baseline", "baseline", 42, sub="test", acc=0.1, mem_mb=300, test_s=3, n=22, trainable=0))
    _write(d, recs, name="paper")
    if broken:
        (d / "broken.json").write_text('{"run_info": {')  # a corrupt record: skipped with a warning


# Worked by hand from the records above:
#  full: acc 0.5/0.6/0.7 -> 60.0 ± 10.0%; tok/s 100/110/120 -> 110 ± 10; val loss 1.0/1.2/1.4 -> 1.200 ± 0.200;
#        ppl exp(1.0), exp(1.2), exp(1.4) -> mean 3.3645, sd 0.6696; wall 10 + 2 = 12; forgetting 0.5/0.6/0.7
#  lora r=16: acc 30.0 ± 10.0%; tok/s 220 ± 20 -> 2.00x; mem 400/1000 -> 0.40x; val loss 1.600 ± 0.100;
#        ppl of 1.5/1.6/1.7 -> 4.9695 ± 0.4963; Welch: t = -0.3 / sqrt(0.01/3 + 0.01/3) = -3.674, df = 4 -> p = 0.0213
#  lora r=8: one seed (no std, no test); lora lr=1e30: nan, nothing averaged; baseline: a test run, no relative columns
EXPECTED = """\
| method | setting | n | status | trainable params | trainable % | peak mem (MiB) | mem vs full | trained tok/s | speed vs full | wall (s) | val loss | val ppl | test loss | exact match | EM add | EM copy | forgetting (Δ general loss) | p vs full (Welch) |
|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| full | – | 3 | completed | 1,000 | 100.00 | 1,000 ± 0 | 1.00× (ref) | 110 ± 10 | 1.00× (ref) | 12 ± 0 | 1.200 ± 0.200 | 3.36 ± 0.67 | – | 60.0 ± 10.0% | 60.0 ± 20.0% | 50.0 ± 0.0% | +0.600 ± 0.100 | – |
| lora | lr=0.001, r=16 | 3 | completed | 50 | 5.00 | 400 ± 0 | 0.40× | 220 ± 20 | 2.00× | 8 ± 0 | 1.600 ± 0.100 | 4.97 ± 0.50 | – | 30.0 ± 10.0% | 10.0 ± 0.0% | 30.0 ± 10.0% | +0.100 ± 0.000 | 0.021 * |
| lora | lr=0.001, r=8 | 1 | completed | 25 | 2.50 | 380 | 0.38× | 230 | 2.09× | 6 | 1.650 | 5.21 | – | 25.0% | – | – | – | – |
| lora | lr=1e+30, r=16 | 0/1 | nan | – | – | – | – | – | – | – | – | – | – | – | – | – | – | – |
| baseline | – | 1 | completed | 0 | 0.00 | 300 | – | – | – | 3 | – | – | – | 10.0% | – | – | – | – |"""


def test_table_exact_values(tmp_path):
    write_records(tmp_path)
    with pytest.warns(RecordWarning, match="broken.json: not valid JSON"):
        table = report(tmp_path, plots=False)
    assert table == EXPECTED
    text = (tmp_path / "report.md").read_text()
    assert text.startswith(table)
    assert "Welch's two-sided t-test" in text and "Forgetting:" in text
    assert "- Skipped broken.json: not valid JSON" in text  # said in the report, not silently dropped


def test_csv_has_raw_numbers(tmp_path):
    write_records(tmp_path, broken=False)
    report(tmp_path, plots=False)
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [(r["method"], r["setting"], r["n"], r["status"]) for r in rows] == [
        ("full", "", "3", "completed"), ("lora", "lr=0.001, r=16", "3", "completed"),
        ("lora", "lr=0.001, r=8", "1", "completed"), ("lora", "lr=1e+30, r=16", "0", "nan"),
        ("baseline", "", "1", "completed")]
    full, lora = rows[0], rows[1]
    assert float(full["accuracy"]) == pytest.approx(0.6) and float(full["accuracy_seed_std"]) == pytest.approx(0.1)
    assert float(full["peak_mem_mb"]) == 1000 and float(lora["mem_rel"]) == pytest.approx(0.4)
    assert float(lora["speed_rel"]) == pytest.approx(2.0) and float(lora["tokens_per_s_seed_std"]) == pytest.approx(20)
    assert float(lora["p"]) == pytest.approx(0.021311641128756, abs=1e-9)
    assert float(lora["t"]) == pytest.approx(-3.6742346141747673)
    assert float(full["forgetting"]) == pytest.approx(0.6) and full["seeds"] == "1;2;3"
    assert full["run_ids"] == "full-1;full-2;full-3" and float(full["test/add/accuracy"]) == pytest.approx(0.6)
    assert full["trainable"] == "1000" and lora["trainable"] == "50"
    # every number of the records, by its own name: the raw entries behind the derived columns too
    assert full["memory.peak_bytes"] == str(1000 * MB) and full["initial.val/general/loss"] == "2"
    assert float(full["throughput.trained_tokens_per_s"]) == 110 and full["fit_seconds"] == "10"


def test_speed_of_a_contended_run_is_marked(tmp_path):
    tp = lambda tps, contended: {"throughput": {"trained_tokens_per_s": tps, "contended": contended}}  # noqa: E731
    recs = [_record(f"full-{s}", "full", s, fit_s=10, n=s, info=tp(100, False)) for s in (1, 2)]
    recs += [_record("lora-1", "lora", 1, fit_s=5, n=3, info=tp(300, True)),  # one seed of two ran beside other work
             _record("lora-2", "lora", 2, fit_s=5, n=4, info=tp(100, False))]
    _write(tmp_path, recs)
    table = report(tmp_path, plots=False, columns=["tokens_per_s", "speed_rel", "wall_s", "throughput.contended"])
    rows = [line.split(" | ") for line in table.splitlines()[2:4]]
    assert rows[0][1:4] == ["100 ± 0", "1.00× (ref)", "10 ± 0"]  # full: clean
    assert rows[1][1:4] == ["200 ± 141 †", "2.00× †", "5 ± 0 †"]  # the speed and time cells
    assert table.endswith(CONTENDED_NOTE) and "did not get the CPU/GPU it asked for" in CONTENDED_NOTE
    assert "†" in summary_line(recs[2]) and "†" not in summary_line(recs[3])


def test_reference_is_a_choice(tmp_path):
    write_records(tmp_path, broken=False)
    runs = runs_frame(load_records(tmp_path))
    points, _ = summarise(runs, reference="lora")
    # the first lora point is the reference; full is 2.5x its memory and half its speed
    assert points["is_reference"].tolist() == [False, True, False, False, False]
    assert points.at[0, "mem_rel"] == pytest.approx(2.5) and points.at[0, "speed_rel"] == pytest.approx(0.5)
    assert points.at[0, "p"] == pytest.approx(0.021311641128756, abs=1e-9)
    none, _ = summarise(runs, reference="qlora")
    assert none["mem_rel"].isna().all() and none["p"].isna().all()
    table = markdown_table(none, reference="qlora")
    assert "mem vs qlora" in table and "p vs qlora" not in table


def _new_style(run_id, objective, tuner, seed, *, quant="none", lr=1e-3, n=0, **kw):
    """A record named the new way (objective+tuner[+quantization]) with its objective/tuner config."""
    label = f"{objective}+{tuner}" + ("" if quant == "none" else f"+{quant}")
    config = {"seed_everything": seed, "run_id": run_id,
              "model": {"class_path": f"ftbench.objectives.{objective.upper()}", "init_args": {"beta": 0.1}},
              "tuner": {"class_path": f"ftbench.tuners.{tuner.capitalize()}", "init_args": {"lr": lr}},
              "backbone": {"model": "tiny", "quantization": quant}}
    rec = _record(run_id, tuner, seed, n=n, config=config, **kw)
    rec["train_info"]["method"] = label
    return rec


def test_reference_matches_the_tuner_part(tmp_path):
    # new labels: --reference full means sft+full for the sft rows and dpo+full for the dpo rows
    _write(tmp_path, [
        _new_style("sft-full-1", "sft", "full", 1, acc=0.5, mem_mb=1000, tps=100, n=1),
        _new_style("sft-full-2", "sft", "full", 2, acc=0.7, mem_mb=1000, tps=100, n=2),
        _new_style("sft-lora-1", "sft", "lora", 1, acc=0.4, mem_mb=400, tps=200, n=3),
        _new_style("sft-lora-2", "sft", "lora", 2, acc=0.6, mem_mb=400, tps=200, n=4),
        _new_style("sft-qlora-1", "sft", "lora", 1, quant="nf4", acc=0.45, mem_mb=300, tps=150, n=5),
        _new_style("dpo-full-1", "dpo", "full", 1, mem_mb=2000, tps=50, n=6),
        _new_style("dpo-lora-1", "dpo", "lora", 1, mem_mb=800, tps=100, n=7),
    ])
    table = report(tmp_path, plots=False, columns=["n", "peak_mem_mb", "mem_rel", "speed_rel", "accuracy", "p"])
    # sft+lora against sft+full: a = 0.4/0.6, b = 0.5/0.7: t = -0.1 / sqrt(0.02/2 + 0.02/2) = -0.707, df = 2:
    # two-sided p = 1 - |t| / sqrt(2 + t^2) = 1 - 0.4472 = 0.553
    assert table == """\
| method | n | peak mem (MiB) | mem vs full | speed vs full | exact match | p vs full (Welch) |
|---|---:|---:|---:|---:|---:|---:|
| sft+full | 2 | 1,000 ± 0 | 1.00× (ref) | 1.00× (ref) | 60.0 ± 14.1% | – |
| sft+lora | 2 | 400 ± 0 | 0.40× | 2.00× | 50.0 ± 14.1% | 0.553 |
| sft+lora+nf4 | 1 | 300 | 0.30× | 1.50× | 45.0% | – |
| dpo+full | 1 | 2,000 | 1.00× (ref) | 1.00× (ref) | – | – |
| dpo+lora | 1 | 800 | 0.40× | 2.00× | – | – |"""
    assert "Reference 'full': sft+full, dpo+full" in (tmp_path / "report.md").read_text()
    exact = report(tmp_path, plots=False, reference="sft+full", columns=["mem_rel"])
    assert "| dpo+lora | 0.80× |" in exact  # an exact label: one reference for every row
    lora = report(tmp_path, plots=False, reference="lora", columns=["mem_rel"])
    assert "| sft+lora | 1.00× (ref) |" in lora and "| sft+lora+nf4 | 0.75× |" in lora  # sft+lora before +nf4


def test_a_new_column_appears_with_no_code_change(tmp_path):
    breakdown = {"weights": 100 * MB, "gradients": 50 * MB, "optimizer_state": 100 * MB, "activations": 25.5 * MB,
                 "transient": 0, "predicted_peak": 275.5 * MB, "source": "measured"}
    recs = [_new_style(f"dpo-lora-{s}", "dpo", "lora", s, n=s, final={
                "val/loss": 0.6 + s / 10, "val/rewards/accuracies": 0.5 + s / 4, "val/rewards/margins": 0.25 * s,
                "val/brand_new_metric": 12345.6 * s, "val/reward": "nan"},
                info={"memory_breakdown": {**breakdown, "activations": breakdown["activations"] * s}})
            for s in (1, 2)]
    _write(tmp_path, recs)
    table = report(tmp_path, plots=False, columns=["n", "memory_breakdown.*", "val/rewards/*", "val/brand_new_metric"])
    # activations 25.5 and 51 MB -> 38 ± 18; accuracies 75/100% -> 87.5 ± 17.7%; margins 0.25/0.5; 'nan': no number
    assert table == """\
| method | n | memory_breakdown.weights (MiB) | memory_breakdown.gradients (MiB) | memory_breakdown.optimizer_state (MiB) | memory_breakdown.activations (MiB) | memory_breakdown.transient (MiB) | memory_breakdown.predicted_peak (MiB) | val/rewards/accuracies | val/rewards/margins | val/brand_new_metric |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| dpo+lora | 2 | 100 ± 0 | 50 ± 0 | 100 ± 0 | 38 ± 18 | 0 ± 0 | 276 ± 0 | 87.5 ± 17.7% | 0.375 ± 0.1768 | 1.852e+04 ± 8730 |"""
    with open(tmp_path / "report.csv") as f:
        row = next(csv.DictReader(f))
    assert row["memory_breakdown.weights"] == str(100 * MB) and float(row["val/rewards/margins"]) == 0.375
    assert "memory_breakdown.source" not in row and "val/reward" not in row  # no number, no column
    with pytest.raises(ReportError, match="memory_breakdwn.weights match"):
        report(tmp_path, plots=False, columns=["memory_breakdwn.weights"])


def test_welch_p_value_is_scipys():
    samples = [([0.5, 0.6, 0.7], [0.2, 0.3, 0.4]), ([1.0, 2.0, 4.0, 8.0], [1.5, 1.7]), ([3.1, 2.9], [3.0, 3.2, 2.8, 3.05])]
    for a, b in samples:
        res = stats.ttest_ind(a, b, equal_var=False)
        assert welch_t_test(a, b) == (float(res.statistic), float(res.pvalue))
    t, p = welch_t_test([0.5, 0.6, 0.7], [0.2, 0.3, 0.4])
    assert t == pytest.approx(3.6742346141747673) and p == pytest.approx(0.021311641128756, abs=1e-12)  # df = 4
    assert welch_t_test([0.5], [0.1, 0.2]) is None  # one seed: no test
    assert welch_t_test([0.5, 0.5], [0.5, 0.5]) == (0.0, 1.0)  # no variance, same mean
    assert welch_t_test([0.6, 0.6], [0.5, 0.5])[1] == 0.0  # no variance, different means


def _select_records(d: Path) -> Path:
    # lora at lr 1e-3 has the better validation loss; lr 1e-4 the better test accuracy
    return _write(d, [
        _record("lora-a1", "lora", 1, lr=1e-3, val_loss=1.0, acc=0.3, final={"val/accuracy": 0.7}, mem_mb=400, n=1),
        _record("lora-a2", "lora", 2, lr=1e-3, val_loss=1.2, acc=0.4, final={"val/accuracy": 0.5}, mem_mb=400, n=2),
        _record("lora-b1", "lora", 1, lr=1e-4, val_loss=1.5, acc=0.8, final={"val/accuracy": 0.6}, mem_mb=400, n=3),
        _record("lora-b2", "lora", 2, lr=1e-4, val_loss=1.7, acc=0.9, final={"val/accuracy": 0.7}, mem_mb=400, n=4),
        _record("full-1", "full", 1, lr=5e-5, val_loss=1.3, acc=0.5, mem_mb=1000, tps=100, n=5),
        _record("baseline", "baseline", 1, sub="test", acc=0.1, n=6),
    ])


def test_select_picks_by_validation_never_by_test(tmp_path):
    _select_records(tmp_path)
    cols = ["setting", "n", "val_loss", "val/accuracy", "accuracy"]
    table = report(tmp_path, plots=False, select="val/loss", columns=cols)
    assert table == """\
| method | setting | n | val loss | val/accuracy | exact match |
|---|---|---:|---:|---:|---:|
| lora | lr=0.001 | 2 | 1.100 ± 0.141 | 60.0 ± 14.1% | 35.0 ± 7.1% |
| full | – | 1 | 1.300 | – | 50.0% |
| baseline | – | 1 | – | – | 10.0% |"""
    text = (tmp_path / "report.md").read_text()
    assert ("One grid point per method, chosen by the best mean val/loss over seeds (lower is better; test metrics "
            "never choose): lora: lr=0.001 (val/loss 1.1; best of 2 point(s) with it, 2 in all); full: its only "
            "setting (val/loss 1.3; best of 1 point(s) with it, 1 in all); baseline: no val/loss.") in text
    # accuracy-like: higher is better (lr 1e-4: 65% > 60%); max:/min: override the direction
    assert "| lora | lr=0.0001 | 2 |" in report(tmp_path, plots=False, select="val/accuracy", columns=cols)
    assert "| lora | lr=0.0001 | 2 |" in report(tmp_path, plots=False, select="max:val/loss", columns=cols)
    assert "| lora | lr=0.001 | 2 |" in report(tmp_path, plots=False, select="min:val/accuracy", columns=cols)
    # the choice does not move when the test numbers do
    for p in tmp_path.glob("lora-a*.json"):
        rec = json.loads(p.read_text())
        rec["train_info"]["final"]["test/accuracy"] = 0.0
        p.write_text(json.dumps(rec))
    assert "| lora | lr=0.001 | 2 |" in report(tmp_path, plots=False, select="val/loss", columns=cols)
    with pytest.raises(ReportError, match="selection never looks at test metrics"):
        report(tmp_path, plots=False, select="test/accuracy")
    with pytest.raises(ReportError, match="never looks at test"):
        report(tmp_path, plots=False, select="max:test/accuracy")
    with pytest.raises(ReportError, match=r"no record has val/bleu \(validation metrics: val/accuracy, val/loss\)"):
        report(tmp_path, plots=False, select="val/bleu")


def test_select_over_the_learning_rate_keeps_one_row_per_rank(tmp_path):
    # r 16: lr 1e-3 (val 1.1) beats 1e-4 (1.6); r 8: lr 1e-4 (val 0.9) beats 1e-3 (1.4)
    _write(tmp_path, [
        _record("a1", "lora", 1, r=16, lr=1e-3, val_loss=1.0, acc=0.3, n=1),
        _record("a2", "lora", 2, r=16, lr=1e-3, val_loss=1.2, acc=0.4, n=2),
        _record("b1", "lora", 1, r=16, lr=1e-4, val_loss=1.6, acc=0.9, n=3),
        _record("c1", "lora", 1, r=8, lr=1e-3, val_loss=1.4, acc=0.6, n=4),
        _record("d1", "lora", 1, r=8, lr=1e-4, val_loss=0.8, acc=0.2, n=5),
        _record("d2", "lora", 2, r=8, lr=1e-4, val_loss=1.0, acc=0.1, n=6),
    ])
    cols = ["setting", "n", "val_loss", "accuracy"]
    table = report(tmp_path, plots=False, select="val/loss", select_over=["lr"], columns=cols)
    assert table == """\
| method | setting | n | val loss | exact match |
|---|---|---:|---:|---:|
| lora | lr=0.001, r=16 | 2 | 1.100 ± 0.141 | 35.0 ± 7.1% |
| lora | lr=0.0001, r=8 | 2 | 0.900 ± 0.141 | 15.0 ± 7.1% |"""
    assert ("lora r=16: lr=0.001 (val/loss 1.1; best of 2 point(s) with it, 2 in all); lora r=8: lr=0.0001 "
            "(val/loss 0.9; best of 2 point(s) with it, 2 in all).") in (tmp_path / "report.md").read_text()
    # without --select-over one point is kept for the whole method
    assert report(tmp_path, plots=False, select="val/loss", columns=cols).count("| lora |") == 1
    with pytest.raises(ReportError, match=r"^--select-over rank: no setting of these records is named so"):
        report(tmp_path, plots=False, select="val/loss", select_over=["rank"])
    with pytest.raises(ReportError, match=r"^--select-over: say what chooses with --select"):
        report(tmp_path, plots=False, select_over=["lr"])


def test_a_reward_models_pairwise_accuracy_is_not_exact_match(tmp_path):
    _write(tmp_path, [_record("rm-1", "reward+lora", 1, acc=0.8, n=1), _record("sft-1", "sft+lora", 1, acc=0.5, n=2)])
    assert report(tmp_path, plots=False, columns=["accuracy", "test/accuracy"]) == """\
| method | exact match | test/accuracy |
|---|---:|---:|
| reward+lora | – | 80.0% |
| sft+lora | 50.0% | 50.0% |"""


def test_the_last_logged_training_metrics_and_the_step_split_are_columns(tmp_path):
    curve = [{"step": 5, "train/loss": 0.3, "train/kl": 0.5, "train/reward": 0.25},
             {"step": 10, "train/loss": 0.2, "train/kl": 0.0123, "train/reward": 0.75}]
    rec = _record("grpo-1", "grpo+lora", 1, curve=curve, final={"train/loss": 0.1},
                  info={"step_time_split": {"generation_s": 12.5, "optimisation_s": 20.0}})
    _write(tmp_path, [rec])
    assert report(tmp_path, plots=False, columns=["train/*", "step_time_split.*"]) == """\
| method | train/loss | train/kl | train/reward | step_time_split.generation_s | step_time_split.optimisation_s |
|---|---:|---:|---:|---:|---:|
| grpo+lora | 0.100 | 0.0123 | 0.75 | 12.5 | 20 |"""


def test_a_sweeps_run_names_lead_the_table(tmp_path):
    _write(tmp_path, [_record("lora-1", "lora", 1, acc=0.5, n=1), _record("full-1", "full", 1, acc=0.25, lr=5e-5, n=2)])
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "named", "runs": [
        {"run_id": "lora-1", "name": "sft"}, {"run_id": "full-1", "name": None}]}))
    assert report(tmp_path, plots=False, columns=["n", "accuracy"]) == """\
| method | n | exact match |
|---|---:|---:|
| lora | 1 | 50.0% |
| full | 1 | 25.0% |"""
    assert report(tmp_path, plots=False, columns=["run", "accuracy"]) == """\
| run | exact match |
|---|---:|
| sft | 50.0% |
| – | 25.0% |"""
    assert report(tmp_path, plots=False).startswith("| run | method | n |")
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [(r["run"], r["method"]) for r in rows] == [("sft", "lora"), ("", "full")]


def test_several_studies_in_one_file(tmp_path, capsys):
    write_records(tmp_path / "a", broken=False)
    _select_records(tmp_path / "b")
    out = tmp_path / "out" / "all.md"
    assert report_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--select", "val/loss"]) == 0
    text = out.read_text()
    assert text.startswith(f"## paper\n\nRecords: `{tmp_path / 'a'}` (9 runs).\n\n| method | setting |")
    assert f"\n## b\n\nRecords: `{tmp_path / 'b'}` (6 runs).\n\n| method | setting |" in text
    assert "| lora | lr=0.001, r=16 | 3 | completed |" in text  # study a: the best val/loss of its lora points
    assert "| lora | lr=0.001 | 2 | completed |" in text  # study b
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "all-b.csv", "all-paper.csv", "all.md", "b-accuracy_vs_memory.png", "b-throughput.png",
        "paper-accuracy_vs_memory.png", "paper-loss_curves.png", "paper-throughput.png"]
    assert "![paper-loss_curves](paper-loss_curves.png)" in text
    printed = capsys.readouterr().out
    assert printed.startswith("## paper\n\n| method |") and "\n## b\n\n| method |" in printed
    assert not (tmp_path / "a" / "report.md").exists()  # nothing written next to the records


def test_empty_folder_and_corrupt_record(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no run records"):
        report(tmp_path / "empty")
    assert report_main([str(tmp_path / "empty")]) == 2
    assert "error: " in capsys.readouterr().err
    write_records(tmp_path / "r")
    (tmp_path / "r" / "odd.json").write_text(json.dumps({"run_info": {"run_id": "x"}, "train_info": 3}))
    assert report_main([str(tmp_path / "r"), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'r' / 'broken.json'}: not valid JSON" in err
    assert f"warning: {tmp_path / 'r' / 'odd.json'}: run_info or train_info missing or not an object" in err
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert report_main([str(tmp_path / "r"), "--select", "test/accuracy"]) == 2
    assert "error: --select test/accuracy: selection never looks at test metrics" in capsys.readouterr().err


def test_summary_line(tmp_path):
    write_records(tmp_path, broken=False)
    rec = json.loads((tmp_path / "full-1.json").read_text())
    assert summary_line(rec) == ("[ftbench] full-1: full completed trainable params=1,000 trainable %=100.00 "
                                 "peak mem (MiB)=1,000 trained tok/s=100 wall (s)=12 val loss=1.000 exact match=50.0%")


def test_pareto_front():
    pts = [(1000, 60), (400, 30), (500, 25), (400, 20), (380, 25), (1200, 60)]
    # (500, 25) loses to (400, 30) and (380, 25) in nothing; (400, 20) to (400, 30); (1200, 60) to (1000, 60)
    assert pareto_front(pts) == [4, 1, 0]


def test_plots_are_valid_pngs(tmp_path):
    import matplotlib.image

    write_records(tmp_path, broken=False)
    report(tmp_path)
    for name in ("accuracy_vs_memory.png", "throughput.png", "loss_curves.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name
        img = matplotlib.image.imread(tmp_path / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, name
        assert img.std() > 0.01, name  # not a blank canvas
    assert "![loss_curves](loss_curves.png)" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_cli_without_torch(tmp_path):
    write_records(tmp_path)
    (tmp_path / "empty").mkdir()
    code = ("import sys\nfrom ftbench.cli import main\nfrom ftbench.sweep.report.cli import main as report\n"
            "try:\n    main(['report', sys.argv[1], '--no-plots'])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
            "print('select exit', report([sys.argv[1], '--no-plots', '--select', 'val/loss', '--columns', 'default,val/*']))\n"
            "print('heavy:', sorted(m for m in ('torch', 'lightning', 'transformers', 'matplotlib') if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env)
    assert "exit 0" in res.stdout and "select exit 0" in res.stdout and "heavy: []" in res.stdout, res.stdout + res.stderr
    assert "| lora | lr=0.001, r=16 | 3 | completed |" in res.stdout
    assert "| val/loss | val/general/loss |" in res.stdout  # the default columns, then val/*
    assert f"warning: {tmp_path / 'broken.json'}: not valid JSON" in res.stderr
    for args, rc, said in (([str(tmp_path / "missing")], 2, "is not a directory"),
                           ([str(tmp_path / "empty")], 2, "no run records")):
        bad = subprocess.run([sys.executable, "-m", "ftbench.cli", "report", *args], capture_output=True, text=True, env=env)
        assert bad.returncode == rc and said in bad.stderr, bad.stderr
    alone = subprocess.run([sys.executable, "-m", "ftbench.sweep.report", str(tmp_path), "--no-plots", "--columns", "n"],
                           capture_output=True, text=True, env=env)
    assert alone.returncode == 0 and alone.stdout.startswith("| method | setting | n |"), alone.stderr


def test_report_logs_a_wandb_table_offline(tmp_path, monkeypatch):
    from test_sweep import _wandb_records

    monkeypatch.setenv("WANDB_MODE", "unset")  # restored (absent) after the test, whatever report() sets
    for k in list(os.environ):
        if k.startswith("WANDB_"):
            monkeypatch.delenv(k)
    write_records(tmp_path, broken=False)
    table = report(tmp_path, wandb=True)
    assert os.environ["WANDB_MODE"] == "offline"  # no API key: offline (ftbench.wandb_mode)
    assert table.startswith(EXPECTED.splitlines()[0]) and "(W&B: logged the table and 3 plot(s)" in table
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    for _ in range(100):  # the W&B service finishes writing the offline file just after run.finish()
        recs = list(_wandb_records(files[0]))
        if any(r.WhichOneof("record_type") == "exit" for r in recs):
            break
        time.sleep(0.2)
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert (run.run_group, run.job_type, run.display_name) == ("paper", "report", "report-paper")
    logged = {item.key or item.nested_key[0] for r in recs if r.WhichOneof("record_type") == "history"
              for item in r.history.item}
    assert {"report/table", "report/numbers", "report/accuracy_vs_memory"} <= logged
    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/report/table_*.table.json"))
    assert len(tables) == 1
    t = json.loads(tables[0].read_text())
    assert t["columns"][:4] == ["method", "setting", "n", "status"] and len(t["data"]) == 5
    assert t["data"][1][:4] == ["lora", "lr=0.001, r=16", "3", "completed"]


def test_memory_breakdown_columns_and_the_memory_ratio_on_cpu(tmp_path):
    """Records with a memory breakdown show its parts and the predicted peak; on CPU runs the memory
    ratio and the plot use the predicted device peak, not the process's resident peak."""
    def breakdown(weights, grads, opt, act, transient):
        return {"memory_breakdown": {"weights": {"bytes": weights * MB}, "gradients": {"bytes": grads * MB},
                                     "optimizer": {"bytes": opt * MB},
                                     "activations": {"bytes": act * MB, "other_live_bytes": 0},
                                     "largest_transient": {"bytes": transient * MB},
                                     "predicted_peak_bytes": (weights + grads + opt + act + transient) * MB}}
    recs = [_record("f1", "full", 1, acc=0.5, mem_mb=4000, info=breakdown(500, 500, 1000, 100, 50), n=1),
            _record("l1", "lora", 1, acc=0.4, mem_mb=3500, info=breakdown(520, 20, 40, 80, 50), n=2),
            # a run without test rows: its validation accuracy is not shown as exact match
            _record("v1", "lora", 1, lr=3e-4, final={"val/accuracy": 0.9}, mem_mb=3500, n=3)]
    points, _ = summarise(runs_frame(recs))
    table = markdown_table(points).splitlines()
    assert table[0].startswith("| method | setting | n | status | trainable params | trainable % | weights (MiB) | "
                               "grads (MiB) | optimizer (MiB) | activations (MiB) | predicted peak (MiB) | peak mem (MiB) | "
                               "mem vs full |")
    full, lora, val_only = table[2:5]
    assert "| 500 | 500 | 1,000 | 100 | 2,150 | 4,000 | 1.00× (ref) |" in full
    # LoRA's predicted peak 710 MB against full's 2,150: 0.33×, where the resident peaks say 0.88×
    assert "| 520 | 20 | 40 | 80 | 710 | 3,500 | 0.33× |" in lora
    assert val_only.split(" | ")[-1].strip(" |") == "–"  # exact match: no test rows, no figure
    assert table[-1].startswith("Memory: weights, grads, optimizer and activations are the memory breakdown")


# ---------------------------------------------------------------------------------- paired comparisons
def _prediction(i, right, *, stage="test", metrics=None):
    return {"stage": stage, "step": 10, "task": "add", "prompt": f"<|im_start|>user\nWhat is {i} + {i}?<|im_end|>\n",
            "reference": str(2 * i), "prediction": str(2 * i) if right else "no idea",
            "metrics": metrics if metrics is not None else {"accuracy": float(right)}}


def _with_predictions(d: Path, rec, rows) -> None:
    from ftbench.evaluation.predictions import write_predictions

    name = f"{rec['run_info']['run_id']}.predictions.jsonl"
    rec["train_info"]["predictions"] = {"path": name, "rows": {"test": len(rows)}}
    _write(d, [rec])
    write_predictions(d / name, {"test": rows})


def _paired_study(d: Path) -> Path:
    """20 test rows. full (reference) right on rows 0-11 (60%); lora right on 0-1 and 12-13 (20%), its rows written
    in reverse order; adapters right on 0-10 and 12 (60%)."""
    _with_predictions(d, _record("full-1", "full", 1, lr=5e-5, acc=0.6, n=1), [_prediction(i, i < 12) for i in range(20)])
    _with_predictions(d, _record("lora-1", "lora", 1, acc=0.2, n=2),
                      [_prediction(i, i in (0, 1, 12, 13)) for i in reversed(range(20))])
    _with_predictions(d, _record("adapters-1", "adapters", 1, acc=0.6, n=3),
                      [_prediction(i, i <= 10 or i == 12) for i in range(20)])
    return d


def test_paired_comparison_against_the_reference(tmp_path):
    _paired_study(tmp_path)
    table = report(tmp_path, plots=False, columns=["n", "exact match", "95% CI", "diff", "p_paired", "p_holm", "verdict"])
    # lora vs full, rows matched by hash (lora's file is reversed): only lora right on 12, 13; only full on 2-11:
    #   McNemar p = 2 * P(Bin(12, 1/2) <= 2) = 158/4096 = 0.0386; Δ = (2 - 10)/20 = -40 points
    # adapters vs full: only adapters right on 12, only full on 11: p = 1; Δ = 0
    # Holm over the 2 tests: 0.0386 * 2 = 0.0771 (no longer < 0.05), 1.0 -> no evidence for either;
    # MDD at 0.05/2 = 0.025: (2.2414 + 0.8416) * sqrt(mean d²) / sqrt(20): lora sqrt(12/20) -> 53.4 points,
    # adapters sqrt(2/20) -> 21.8 points. Wilson 12/20: [38.7, 78.1]%, 4/20: [8.1, 41.6]%. The bootstrap
    # intervals (seed 0) are what the normal approximation gives to a row: lora -40 ± 1.96 * 14.8 = [-69, -11]
    assert table == """\
| method | n | exact match | 95% CI | Δ vs full [95% CI] | p vs full (paired) | Holm p | verdict |
|---|---:|---:|---:|---:|---:|---:|---|
| full | 1 | 60.0% | [38.7, 78.1]% | – | – | – | (ref) |
| lora | 1 | 20.0% | [8.1, 41.6]% | -40.0 [-70.0, -10.0] | 0.039 * | 0.077 | no evidence (MDD 53.4) |
| adapters | 1 | 60.0% | [38.7, 78.1]% | +0.0 [-15.0, +15.0] | 1.000 | 1.000 | no evidence (MDD 21.8) |

95% CI: Wilson's interval of each point's exact match over its test rows (the predictions files; per row the mean \
over seeds). Paired, against full on the test rows both answered (matched by task, prompt and reference): Δ, the mean \
difference with its 95% bootstrap interval (9,999 resamples of the rows, seed 0); p, McNemar's exact test on the rows \
only one of the two got right (0/1 scores); Holm p, adjusted by Holm's method over the 2 paired tests of this table \
(statsmodels multipletests). Verdict: better / worse where Holm p < 0.05, else no evidence, with MDD: the smallest \
difference the test detects with 80% power at level 0.05/2 on these rows."""
    assert (tmp_path / "report.md").read_text().startswith(table)
    # only the interval shown: only the interval said
    assert report(tmp_path, plots=False, columns=["score_ci"]).endswith("\n\n95% CI: Wilson's interval of each "
                                                                         "point's exact match over its test rows (the "
                                                                         "predictions files; per row the mean over seeds).")
    row = {r["method"]: r for r in csv.DictReader((tmp_path / "report.csv").open())}["lora"]
    assert float(row["p_paired"]) == pytest.approx(158 / 4096) and float(row["p_holm"]) == pytest.approx(316 / 4096)
    assert (row["paired_test"], row["paired_rows"], row["verdict"]) == ("McNemar", "20", "no evidence")
    # the reference's rows from another split: not compared, and said so under the table
    rec = json.loads((tmp_path / "adapters-1.json").read_text())
    _with_predictions(tmp_path, rec, [_prediction(i, True, stage="val") for i in range(20)])
    table = report(tmp_path, plots=False, columns=["diff", "verdict"])
    assert "| adapters | – | – |" in table
    assert ("- adapters vs full: not compared: adapters has validation rows and full test rows (different splits)."
            in (tmp_path / "report.md").read_text())


def test_several_seeds_are_averaged_per_row_and_permutation_tested(tmp_path):
    # full: 2 seeds right on rows 0-5 and 0-3; lora: 2 seeds right on 0-1 and nothing: per row means
    # full 1,1,1,1,.5,.5,0..., lora .5,.5,0...: differences -.5,-.5,-1,-1,-.5,-.5 on 6 of 12 rows, all one sign:
    # the sign-flip test is exact (2^12 = 4096 < 9999 resamples) -> p = 2/64 (the 6 zero rows flip nothing)
    for s, right in ((1, 6), (2, 4)):
        _with_predictions(tmp_path, _record(f"full-{s}", "full", s, lr=5e-5, acc=right / 12, n=s),
                          [_prediction(i, i < right) for i in range(12)])
    for s, right in ((1, 2), (2, 0)):
        _with_predictions(tmp_path, _record(f"lora-{s}", "lora", s, acc=right / 12, n=2 + s),
                          [_prediction(i, i < right) for i in range(12)])
    runs = runs_frame(load_records(tmp_path))
    points, _ = summarise(runs)
    lora = points.iloc[1]
    assert lora["paired_test"] == "permutation" and lora["p_paired"] == pytest.approx(2 / 64)
    assert lora["diff"] == pytest.approx(-4 / 12) and lora["verdict"] == "worse"  # one test: Holm = p
    # Wilson at the seed-mean count: full 5 of 12 rows
    from ftbench.sweep.report.paired import wilson_interval

    assert (points.at[0, "score_ci_low"], points.at[0, "score_ci_high"]) == pytest.approx(wilson_interval(5, 12))


def test_compare_two_points_with_the_rows_where_they_disagree(tmp_path, capsys):
    _paired_study(tmp_path)
    assert report_main([str(tmp_path), "--compare", "lora", "full", "--examples", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("""\
Paired comparison on the test rows both points answered (matched by task, prompt and reference), by exact match (points):

| A | B | rows | A's mean [95% CI] | B's mean [95% CI] | Δ A − B [95% CI] | test | p | Holm p | verdict |
|---|---|---:|---:|---:|---:|---|---:|---:|---|
| lora | full | 20 | 20.0 [8.1, 41.6]% | 60.0 [38.7, 78.1]% | -40.0 [-70.0, -10.0] | McNemar 2/10 | 0.0386 | 0.0386 | worse |
""")
    # one comparison: Holm changes nothing, and p = 0.0386 < 0.05 is "worse"; lora's losses first, in lora's file
    # order (reversed: rows 11, 10, 9)
    assert """\
### lora vs full: 12 of 20 rows scored differently (the first 3: lora's losses first)

| task | prompt | reference | lora | full |
|---|---|---|---|---|
| add | user ↵ What is 11 + 11? | 22 | no idea (✗) | 22 (✓) |
| add | user ↵ What is 10 + 10? | 20 | no idea (✗) | 20 (✓) |
| add | user ↵ What is 9 + 9? | 18 | no idea (✗) | 18 (✓) |
""" in out
    assert not (tmp_path / "report.md").exists()  # --compare writes nothing
    # two pairs: Holm over both
    assert report_main([str(tmp_path), "--compare", "lora", "full", "--compare", "adapters", "full"]) == 0
    out = capsys.readouterr().out
    assert "| McNemar 2/10 | 0.0386 | 0.0771 | no evidence (MDD 53.4) |" in out
    assert "Holm's adjustment over the 2 comparisons given" in out
    assert report_main([str(tmp_path), "--compare", "lora", "qlora"]) == 2
    assert "error: --compare qlora: no point of these records is named so (points: full; lora; adapters)" in \
        capsys.readouterr().err
    _with_predictions(tmp_path, _record("lora-r8", "lora", 1, r=8, acc=0.5, n=4), [_prediction(i, 1, stage="val")
                                                                                   for i in range(20)])
    assert report_main([str(tmp_path), "--compare", "lora", "full"]) == 2
    assert "error: --compare lora: names 2 points (lora (r=16); lora (r=8)); name one as 'method (setting)'" in \
        capsys.readouterr().err
    assert report_main([str(tmp_path), "--compare", "lora (r=8)", "full"]) == 2
    assert capsys.readouterr().err == ("error: lora (r=8) vs full: not compared: lora (r=8) has validation rows and "
                                       "full test rows (different splits)\n")


# ---------------------------------------------------------------------------------- issue 23: report inputs
def test_a_malformed_record_is_a_warning_naming_the_file(tmp_path, capsys):
    write_records(tmp_path, broken=False)
    (tmp_path / "config.json").write_text(json.dumps({"run_info": {"run_id": "x", "config": [1, 2]}, "train_info": {}}))
    (tmp_path / "curve.json").write_text(json.dumps({"run_info": {"run_id": "y"}, "train_info": {"metrics": 3}}))
    assert report_main([str(tmp_path), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'config.json'}: run_info.config is list, not an object; skipped" in err
    assert f"warning: {tmp_path / 'curve.json'}: train_info.metrics is int, not a list; skipped" in err
    assert "- Skipped config.json: run_info.config is list, not an object." in (tmp_path / "report.md").read_text()


def test_examples_rank_rows_by_the_primary_metric(tmp_path):
    # metrics: [rouge_l, exact_match]: every row is wrong by exact match, so exact match chose the first rows in file
    # order; ROUGE-L, the data set's first metric, puts the worst answers first
    rouge = [0.9, 0.2, 1.0, 0.05, 0.5]
    rows = [_prediction(i, False, metrics={"rouge_l": r, "accuracy": 0.0}) for i, r in enumerate(rouge)]
    _with_predictions(tmp_path, _record("lora-1", "lora", 1, acc=0.0, n=1), rows)
    text = report(tmp_path, plots=False, examples=2)
    section = text.split("## Examples", 1)[1]
    assert "### lora: 4 of 5 test rows below 1 (rouge_l; the lowest first)" in section
    lines = [line for line in section.splitlines() if line.startswith("| add |")]
    assert lines == ["| add | user ↵ What is 3 + 3? | 6 | no idea (0.05) |", "| add | user ↵ What is 1 + 1? | 2 | no idea (0.2) |"]


def test_columns_accept_the_titles_the_table_shows(tmp_path):
    write_records(tmp_path, broken=False)
    by_title = report(tmp_path, plots=False, columns=["exact match", "Mem vs full", "p vs full (Welch)"])
    assert by_title == report(tmp_path, plots=False, columns=["accuracy", "mem_rel", "p"])
    assert by_title.splitlines()[0] == "| method | setting | exact match | mem vs full | p vs full (Welch) |"
    assert report_main([str(tmp_path), "--no-plots", "--columns", "n, exact match, EM add"]) == 0
    with pytest.raises(ReportError, match="exact matches match"):
        report(tmp_path, plots=False, columns=["exact matches"])


def test_committed_comparison_blocks_are_what_the_records_make():
    """The studies' ``--compare`` blocks in their READMEs (scripts/update_reports.py), like the tables that
    tests/test_studies.py checks."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_reports_for_compare", ROOT / "scripts" / "update_reports.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    studies = {name: s for name, s in module.STUDIES.items() if s.compare}
    assert set(studies) == {"regimes", "rlhf"}
    for name, study in studies.items():
        text = (ROOT / study.readmes[0]).read_text()
        block = text.split(f"<!-- {name}-compare:start -->", 1)[1].split(f"<!-- {name}-compare:end -->", 1)[0]
        made = module.make_comparison(study)
        assert block == f"\nMade by `{study.compare_command()}` from the same records:\n\n{made}\n", name
