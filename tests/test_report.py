"""Reports: exact table values from hand-written records, CSV, Welch's t-test, Pareto front,
valid PNG plots, the CLI without torch, and the W&B table."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftbench.sweep.report import (load_records, markdown_table, pareto_front, report, summarise, t_sf2,
                                  welch_t_test)

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
MB = 2**20


def _record(run_id, method, seed, *, status="completed", sub="fit", lr=1e-3, r=16, acc=None, mem_mb=None,
            tps=None, fit_s=None, test_s=None, val_loss=None, tasks=None, general=None, curve=None, n=0,
            total=1000, trainable=1000):
    model = {"class_path": f"ftbench.methods.{method.capitalize()}", "init_args": {}}
    if method == "lora":
        model["init_args"] = {"r": r, "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}}}
    elif method == "full":
        model["init_args"] = {"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}}}
    config = {"seed_everything": seed, "out": "somewhere", "run_id": run_id, "model": model,
              "trainer": {"max_steps": 60, "logger": False, "__path__": f"/x/{run_id}.yaml"}}
    final = {}
    if acc is not None:
        final["test/accuracy"] = acc
    if val_loss is not None:
        final["val/loss"] = val_loss
    for task, a in (tasks or {}).items():
        final[f"test/{task}/accuracy"] = a
    info = {"status": status, "method": method, "final": final, "metrics": curve or [],
            "params": {"trainable": trainable, "total": total, "trainable_pct": 100 * trainable / total}}
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


def _curve(v0, v1):
    return [{"step": 30, "epoch": 0, "val/loss": v0, "train/loss": v0 + 0.1},
            {"step": 60, "epoch": 0, "val/loss": v1, "train/loss": v1 + 0.1}]


def write_records(d: Path) -> None:
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
    d.mkdir(parents=True, exist_ok=True)
    for rec in recs:
        (d / f"{rec['run_info']['run_id']}.json").write_text(json.dumps(rec))
    (d / "sweep.json").write_text(json.dumps({"name": "paper", "runs": []}))  # not a record: ignored
    (d / "broken.json").write_text('{"run_info": {')  # not a record: ignored


# Worked by hand from the records above:
#  full: acc 0.5/0.6/0.7 -> 60.0 ± 10.0%; tok/s 100/110/120 -> 110 ± 10; val loss 1.0/1.2/1.4 -> 1.200 ± 0.200;
#        ppl exp(1.0), exp(1.2), exp(1.4) -> mean 3.3645, sd 0.6696; wall 10 + 2 = 12; forgetting 0.5/0.6/0.7
#  lora r=16: acc 30.0 ± 10.0%; tok/s 220 ± 20 -> 2.00x; mem 400/1000 -> 0.40x; val loss 1.600 ± 0.100;
#        ppl of 1.5/1.6/1.7 -> 4.9695 ± 0.4963; Welch: t = -0.3 / sqrt(0.01/3 + 0.01/3) = -3.674, df = 4 -> p = 0.0213
#  lora r=8: one seed (no std, no test); lora lr=1e30: nan, nothing averaged; baseline: a test run, no relative columns
EXPECTED = """\
| method | setting | n | status | trainable params | trainable % | peak mem (MB) | mem vs full | trained tok/s | speed vs full | wall (s) | val loss | val ppl | test loss | exact match | EM add | EM copy | forgetting (Δ general loss) | p vs full (Welch) |
|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| full | – | 3 | completed | 1,000 | 100.00 | 1,000 ± 0 | 1.00× (ref) | 110 ± 10 | 1.00× (ref) | 12 ± 0 | 1.200 ± 0.200 | 3.36 ± 0.67 | – | 60.0 ± 10.0% | 60.0 ± 20.0% | 50.0 ± 0.0% | +0.600 ± 0.100 | – |
| lora | lr=0.001, r=16 | 3 | completed | 50 | 5.00 | 400 ± 0 | 0.40× | 220 ± 20 | 2.00× | 8 ± 0 | 1.600 ± 0.100 | 4.97 ± 0.50 | – | 30.0 ± 10.0% | 10.0 ± 0.0% | 30.0 ± 10.0% | +0.100 ± 0.000 | 0.021 * |
| lora | lr=0.001, r=8 | 1 | completed | 25 | 2.50 | 380 | 0.38× | 230 | 2.09× | 6 | 1.650 | 5.21 | – | 25.0% | – | – | – | – |
| lora | lr=1e+30, r=16 | 0/1 | nan | – | – | – | – | – | – | – | – | – | – | – | – | – | – | – |
| baseline | – | 1 | completed | 0 | 0.00 | 300 | – | – | – | 3 | – | – | – | 10.0% | – | – | – | – |"""


def test_table_exact_values(tmp_path):
    write_records(tmp_path)
    table = report(tmp_path, plots=False)
    assert table == EXPECTED
    text = (tmp_path / "report.md").read_text()
    assert text.startswith(table)
    assert "Welch's two-sided t-test" in text and "Forgetting:" in text


def test_csv_has_raw_numbers(tmp_path):
    write_records(tmp_path)
    report(tmp_path, plots=False)
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [(r["method"], r["setting"], r["n"], r["status"]) for r in rows] == [
        ("full", "", "3", "completed"), ("lora", "lr=0.001, r=16", "3", "completed"),
        ("lora", "lr=0.001, r=8", "1", "completed"), ("lora", "lr=1e+30, r=16", "0", "nan"),
        ("baseline", "", "1", "completed")]
    full, lora = rows[0], rows[1]
    assert float(full["accuracy"]) == pytest.approx(0.6) and float(full["accuracy_std"]) == pytest.approx(0.1)
    assert float(full["peak_mem_mb"]) == 1000 and float(lora["mem_rel"]) == pytest.approx(0.4)
    assert float(lora["speed_rel"]) == pytest.approx(2.0) and float(lora["tokens_per_s_std"]) == pytest.approx(20)
    assert float(lora["p"]) == pytest.approx(0.021311641128756, abs=1e-9)
    assert float(lora["t"]) == pytest.approx(-3.6742346141747673)
    assert float(full["forgetting"]) == pytest.approx(0.6) and full["seeds"] == "1;2;3"
    assert full["run_ids"] == "full-1;full-2;full-3" and float(full["accuracy_add"]) == pytest.approx(0.6)
    assert full["trainable"] == "1000" and lora["trainable"] == "50"


def test_reference_is_a_choice(tmp_path):
    write_records(tmp_path)
    rows = summarise(load_records(tmp_path), reference="lora")
    # the first lora point is the reference; full is 2.5x its memory and half its speed
    assert [r.get("is_reference") for r in rows] == [False, True, False, False, False]
    assert rows[0]["mem_rel"] == pytest.approx(2.5) and rows[0]["speed_rel"] == pytest.approx(0.5)
    assert rows[0]["p"] == pytest.approx(0.021311641128756, abs=1e-9)
    none = summarise(load_records(tmp_path), reference="qlora")
    assert all(r["mem_rel"] is None and r["p"] is None for r in none)
    table = markdown_table(none, reference="qlora")
    assert "mem vs qlora" in table and "p vs qlora" not in table


def test_welch_t_test_matches_scipy_and_plain_math():
    samples = [([0.5, 0.6, 0.7], [0.2, 0.3, 0.4]), ([1.0, 2.0, 4.0, 8.0], [1.5, 1.7]), ([3.1, 2.9], [3.0, 3.2, 2.8, 3.05])]
    for a, b in samples:
        t_math, p_math = welch_t_test(a, b, use_scipy=False)
        t_sp, p_sp = welch_t_test(a, b)
        assert t_math == pytest.approx(t_sp, rel=1e-12) and p_math == pytest.approx(p_sp, abs=1e-10)
    # textbook values: t = 2.0 with 10 df -> two-sided p = 0.07339; with 1 df, p = 1 - 2 atan(t)/pi
    assert t_sf2(2.0, 10) == pytest.approx(0.073388, abs=1e-6)
    assert t_sf2(3.0, 1) == pytest.approx(1 - 2 * math.atan(3.0) / math.pi, abs=1e-12)
    assert welch_t_test([0.5], [0.1, 0.2]) is None  # one seed: no test
    assert welch_t_test([0.5, 0.5], [0.5, 0.5]) == (0.0, 1.0)  # no variance, same mean
    assert welch_t_test([0.6, 0.6], [0.5, 0.5])[1] == 0.0  # no variance, different means


def test_pareto_front():
    pts = [(1000, 60), (400, 30), (500, 25), (400, 20), (380, 25), (1200, 60)]
    # (500, 25) loses to (400, 30) and (380, 25) in nothing; (400, 20) to (400, 30); (1200, 60) to (1000, 60)
    assert pareto_front(pts) == [4, 1, 0]


def test_plots_are_valid_pngs(tmp_path):
    import matplotlib.image

    write_records(tmp_path)
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
    code = ("import sys\nfrom ftbench.cli import main\ntry:\n    main(['report', sys.argv[1], '--no-plots'])\n"
            "except SystemExit as e:\n    print('exit', e.code)\n"
            "print('heavy:', sorted(m for m in ('torch', 'lightning', 'transformers', 'matplotlib') if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "exit 0" in res.stdout and "heavy: []" in res.stdout, res.stdout + res.stderr
    assert "| lora | lr=0.001, r=16 | 3 | completed |" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "ftbench.cli", "report", str(tmp_path / "missing")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and "is not a directory" in bad.stderr


def test_report_logs_a_wandb_table_offline(tmp_path, monkeypatch):
    from test_sweep import _wandb_records

    for k in list(os.environ):
        if k.startswith("WANDB_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("WANDB_MODE", "offline")
    write_records(tmp_path)
    table = report(tmp_path, wandb=True)
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
