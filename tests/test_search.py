"""Searches in a sweep (``search:``, ftbench.sweep.search): the space and its checks, a seeded search
end to end through the sweep's runner, resume, a killed trial rerun with its values, a pruned trial,
and the report's section."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from ftbench.sweep.grid import SweepError, load_sweep  # noqa: E402
from ftbench.sweep.report.search import search_section, study_table  # noqa: E402
from ftbench.sweep.search import counts, make_storage, open_study, run_search, suggest  # noqa: E402
from test_sweep import _env, _files, _sweep_cmd  # noqa: E402

SPACES = """\
search:
  trials: 3
  space:
    - when: {tuner: full.yaml}
      space: {lr: {log_uniform: [1.0e-5, 1.0e-2]}}
    - when: {tuner: lora.yaml}
      space:
        lr: {log_uniform: [1.0e-5, 1.0e-2]}
        tuner.init_args.peft_config.init_args.r: {choice: [2, 4, 8]}
"""


def _sweep(d: Path, search: str, model: str = "/models/tiny", tuners: str = "[full.yaml, lora.yaml]",
           base: str = "") -> Path:
    _files(d)
    (d / "sweep.yaml").write_text(
        f"name: tiny\nout: {d / 'results'}\nbase:\n  backbone.model: {model}\n  objective: sft.yaml\n"
        f"  data: data.yaml\n  trainer: trainer.yaml\n  test_after_fit: false\n{base}grid:\n  tuner: {tuners}\n{search}")
    return d / "sweep.yaml"


# ---------------------------------------------------------------------------------- the block
def test_space_per_point_and_study_names(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, SPACES))
    s = sweep.search
    assert (s.trials, s.metric, s.direction, s.sampler, s.seed, s.pruner, s.heartbeat_s) == \
        (3, "val/loss", "minimize", "tpe", 0, "none", 60)
    full, lora = s.points
    assert [p.point.method for p in s.points] == ["sft+full", "sft+lora"]
    assert full.keys == {"lr": "tuner.init_args.lr"}
    assert lora.keys == {"lr": "tuner.init_args.lr",
                         "tuner.init_args.peft_config.init_args.r": "tuner.init_args.peft_config.init_args.r"}
    assert full.distributions["lr"] == optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)
    assert lora.distributions["tuner.init_args.peft_config.init_args.r"] == \
        optuna.distributions.CategoricalDistribution([2, 4, 8])
    # the study: the sweep, the point's run id, the digest of the space/metric/sampler/seed/pruner
    assert s.study_name("tiny", full) == f"tiny:{full.point.run_id}:{s.study_name('tiny', full)[-8:]}"
    assert s.study_name("tiny", full).startswith("tiny:sft+full-")
    # a trial is the point with its values set: an ordinary run id, the values in its label
    trial = lora.trial_spec({"lr": 2e-3, "tuner.init_args.peft_config.init_args.r": 8}, {"search": {}}, {})
    assert trial.overrides["tuner.init_args.lr"] == 2e-3 and trial.overrides["tuner.init_args.peft_config.init_args.r"] == 8
    assert trial.run_id != lora.point.run_id and trial.run_id.startswith("sft+lora-")
    # the same values given to `ftbench fit` by hand: the same run id (trial identity is not a setting)
    plain = lora.trial_spec({"lr": 2e-3, "tuner.init_args.peft_config.init_args.r": 8}, {}, {})
    assert plain.run_id == trial.run_id
    # more trials continue the same study; another range is another study
    more = load_sweep(_sweep(tmp_path / "b", SPACES.replace("trials: 3", "trials: 5")))
    assert more.search.study_name("tiny", more.search.points[0]) == s.study_name("tiny", full)
    other = load_sweep(_sweep(tmp_path / "c", SPACES.replace("[1.0e-5, 1.0e-2]}}\n    - when", "[1.0e-6, 1.0e-2]}}\n    - when")))
    assert other.search.study_name("tiny", other.search.points[0]) != s.study_name("tiny", full)
    assert other.search.study_name("tiny", other.search.points[1]) == s.study_name("tiny", lora)


ONE = "search:\n  trials: 2\n  space: {lr: {log_uniform: [1.0e-5, 1.0e-2]}}\n"
BAD = [
    (ONE.replace("log_uniform: [1.0e-5, 1.0e-2]", "uniform: [0.5, 0.05]"),
     "search.space.lr: uniform [0.5, 0.05] is empty (LOW must be below HIGH)"),
    (ONE.replace("log_uniform: [1.0e-5, 1.0e-2]", "log_uniform: [0, 1.0e-2]"),
     "search.space.lr: log_uniform [0, 0.01] reaches 0 or below (a log range needs LOW > 0)"),
    (ONE.replace("log_uniform: [1.0e-5, 1.0e-2]", "choice: []"),
     "search.space.lr: choice [] is empty (give a list of values)"),
    (ONE.replace("log_uniform: [1.0e-5, 1.0e-2]", "int: [1, 2.5]"),
     "search.space.lr: int takes [LOW, HIGH] (integers), not [1, 2.5]"),
    (ONE.replace("{log_uniform: [1.0e-5, 1.0e-2]}", "{normal: [0, 1]}"),
     "search.space.lr: {'normal': [0, 1]} is not a range: give one of uniform, log_uniform, int, log_int, choice "
     "with its values (e.g. {log_uniform: [1.0e-5, 1.0e-2]} or {choice: [4, 8, 16]})"),
    (ONE + "  metric: test/loss\n",
     "search.metric: selection never looks at test metrics (choosing the setting on the test set overstates its "
     "test score); select on a validation metric, e.g. val/loss"),
    (ONE + "  metric: train/loss\n",
     "search.metric: choose a validation metric (val/...), e.g. val/loss or max:val/accuracy"),
    (ONE + "  sampler: cmaes\n", "search.sampler: 'cmaes' is not one of tpe, random, grid"),
    (ONE + "  pruner: percentile\n", "search.pruner: 'percentile' is not one of none, median, hyperband"),
    (ONE + "  sampler: grid\n", "search.space.lr: the grid sampler takes choice lists only"),
    (ONE.replace("trials: 2", "trials: 0"), "search.trials: 0 is not a number of trials per point (an integer >= 1)"),
    (ONE + "  budget: 3\n",
     "search: unknown field(s) budget (allowed: trials, metric, sampler, seed, pruner, heartbeat_s, space)"),
    (ONE.replace("lr:", "tuner.init_args.peft_config.init_args.r:").replace("log_uniform: [1.0e-5, 1.0e-2]", "choice: [2, 4]"),
     "search.space.tuner.init_args.peft_config.init_args.r: not an option of the run at point 1 (tuner=full): "
     "unrecognized arguments: --peft_config.init_args.r=2"),
    (SPACES.replace("when: {tuner: full.yaml}", "when: {tuner: lora.yaml}"),
     "search.space: point 1 (tuner=full) matches no entry's `when` (every grid point is searched)"),
]


@pytest.mark.parametrize("search,message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_search_checks_say_the_file_and_the_key(tmp_path, search, message):
    path = _sweep(tmp_path, search)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(err.value) == f"{path}: {message}"


def test_without_the_extra_one_line_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    path = _sweep(tmp_path, ONE)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(err.value) == f"{path}: search: needs the search extra: pip install 'ftbench[search]' (optuna, optuna-integration)"


# ---------------------------------------------------------------------------------- runs
def _fake_record(out: Path, spec, status: str = "completed", value: float = 1.0, curve=()) -> str:
    """What a run writes, for the search's bookkeeping tests (the real runs are in the end-to-end test)."""
    rec = {"schema": 1, "run_info": {"run_id": spec.run_id, "subcommand": "fit", "created": "t", **spec.run_info},
           "train_info": {"method": spec.method, "status": status, "final": {"val/loss": value} if status == "completed" else {},
                          "metrics": [{"step": s, "val/loss": v} for s, v in curve]}}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{spec.run_id}.json").write_text(json.dumps(rec))
    return status


def test_a_killed_trial_is_rerun_with_its_values_and_a_finished_one_never(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, ONE.replace("trials: 2", "trials: 2\n  heartbeat_s: 1"), tuners="[lora.yaml]"))
    search, out = sweep.search, tmp_path / "results"
    point = search.points[0]
    url = f"sqlite:///{tmp_path / 'search.db'}"
    name = search.study_name(sweep.name, point)
    # a process that took trial 0, beat once and was killed: the trial stays RUNNING, its heartbeat goes stale
    storage = make_storage(url, 1)
    killed = open_study(search, point, name, storage).ask()
    lr = suggest(killed, "lr", point.distributions["lr"])
    storage.record_heartbeat(killed._trial_id)
    time.sleep(3.5)  # > grace period (2 x heartbeat_s) + 1 s: SQLite keeps the heartbeat to the whole second
    ran = []

    def runner(spec):
        ran.append((spec.run_info["search"]["trial"], spec.overrides["tuner.init_args.lr"]))
        return _fake_record(out, spec, value=0.5 + len(ran))

    said = []
    run_search(search, sweep.name, out, url, runner, say=said.append)
    # trial 0 failed as stale, queued again as trial 1 with the same lr, run first; then trial 2 (a new draw)
    assert ran[0] == (1, lr) and len(ran) == 2 and ran[1][0] == 2 and ran[1][1] != lr
    study = optuna.load_study(study_name=name, storage=url)
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[1].system_attrs["failed_trial"] == 0
    assert counts(study.trials) == {"completed": 2, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}
    # the same command again: the study has its 2 trials, nothing runs
    run_search(search, sweep.name, out, url, runner, say=said.append)
    assert len(ran) == 2
    # Ctrl-C in a trial: queued again with the same values (the next invocation reruns it)
    more = load_sweep(_sweep(tmp_path, ONE.replace("trials: 2", "trials: 3\n  heartbeat_s: 1"), tuners="[lora.yaml]"))

    def interrupted(spec):
        ran.append((spec.run_info["search"]["trial"], spec.overrides["tuner.init_args.lr"]))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(more.search, sweep.name, out, url, interrupted, say=said.append)
    run_search(more.search, sweep.name, out, url, runner, say=said.append)
    assert ran[3] == (4, ran[2][1]) and len(ran) == 4
    assert [t.state.name for t in optuna.load_study(study_name=name, storage=url).trials] == \
        ["FAIL", "COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]


def test_a_pruned_trial_is_recorded_pruned_with_its_curve(tmp_path, tiny_model_dir, monkeypatch):
    """The real run (the CLI in this process, with the environment the sweep gives it): the median
    pruner, with five earlier trials at val/loss 0.0, stops it at its first validation."""
    from ftbench.cli import main as ftbench_main
    from ftbench.sweep.runs import child_env

    sweep = load_sweep(_sweep(tmp_path, ONE.replace("trials: 2", "trials: 6\n  pruner: median"), model=str(tiny_model_dir),
                              tuners="[lora.yaml]"))
    search, out = sweep.search, tmp_path / "results"
    point = search.points[0]
    url = f"sqlite:///{tmp_path / 'search.db'}"
    name = search.study_name(sweep.name, point)
    study = open_study(search, point, name, make_storage(url, 60))
    for k in range(5):
        study.add_trial(optuna.trial.create_trial(params={"lr": 1e-3 * (k + 1)}, distributions=point.distributions,
                                                  value=0.0, intermediate_values={1: 0.0, 2: 0.0}))

    def runner(spec):
        for key, value in child_env(sweep, spec).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(sys, "argv", ["ftbench"])
        ftbench_main(spec.argv(str(out)))
        return json.loads((out / f"{spec.run_id}.json").read_text())["train_info"]["status"]

    run_search(search, sweep.name, out, url, runner, say=lambda _: None)
    rec = next(json.loads(p.read_text()) for p in out.glob("sft+lora-*.json"))
    assert rec["train_info"]["status"] == "pruned"
    assert [m["step"] for m in rec["train_info"]["metrics"]] == [1]  # stopped after its first validation
    assert "test/loss" not in rec["train_info"]["final"]
    assert rec["run_info"]["search"]["trial"] == 5 and rec["run_info"]["search"]["study"] == name
    trial = optuna.load_study(study_name=name, storage=url).trials[5]
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]
    row = study_table([rec])[0]
    assert (row["trials"], row["completed"], row["pruned"], row["best"]) == (1, 0, 1, None)


# ---------------------------------------------------------------------------------- end to end
#: TPE seeded 0, trial k drawn with seed k (ftbench.sweep.search.make_sampler), the first at random (half of
#: 3 trials, at least one), then from TPE's model of the earlier trials' final val/loss: the values each
#: trial of a fresh study gets, and the study's best val/loss (the tiny model, 2 steps a run)
PINNED = {"sft+full": {"lr": [0.00044303752452182633, 0.0003940191007894674, 0.007680768933978507],
                       "best": 5.65382719039917},
          "sft+lora": {"lr": [0.00044303752452182633, 0.0003369353502528065, 0.006861103785525502], "r": [2, 2, 2],
                       "best": 6.0188775062561035}}


def test_search_end_to_end_resume_and_report(tmp_path, tiny_model_dir):
    sweep_file = _sweep(tmp_path, SPACES, model=str(tiny_model_dir))
    out = tmp_path / "results"
    res = subprocess.run(_sweep_cmd(sweep_file), env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout + res.stderr
    records = [json.loads(p.read_text()) for p in sorted(out.glob("sft+*.json"))]
    assert len(records) == 6 and all(r["train_info"]["status"] == "completed" for r in records)
    by_study: dict[str, list] = {}
    for r in records:
        by_study.setdefault(r["run_info"]["search"]["study"], []).append(r)
    assert sorted(by_study) == sorted(load_sweep(sweep_file).search.study_name("tiny", p)
                                      for p in load_sweep(sweep_file).search.points)
    for study, recs in by_study.items():
        method = recs[0]["train_info"]["method"]
        recs.sort(key=lambda r: r["run_info"]["search"]["trial"])
        assert [r["run_info"]["search"]["trial"] for r in recs] == [0, 1, 2]
        assert [r["run_info"]["search"]["params"]["lr"] for r in recs] == PINNED[method]["lr"]
        # the record's settings are the trial's values
        assert [r["run_info"]["settings"]["tuner"]["init_args"]["lr"] for r in recs] == PINNED[method]["lr"]
        if method == "sft+lora":
            assert [r["run_info"]["search"]["params"]["tuner.init_args.peft_config.init_args.r"] for r in recs] == \
                PINNED[method]["r"]
        # the study was told each trial's final val/loss; its best is the best record's
        s = optuna.load_study(study_name=study, storage=f"sqlite:///{out / 'search.db'}")
        assert [t.state.name for t in s.trials] == ["COMPLETE"] * 3
        assert [t.value for t in s.trials] == [r["train_info"]["final"]["val/loss"] for r in recs]
        assert s.best_value == pytest.approx(PINNED[method]["best"], abs=1e-6)
    # the report: the searches' table and Optuna's PNGs
    report = (out / "report.md").read_text()
    assert "### Searches" in report
    rows = [line for line in report.splitlines() if line.startswith("| sft+") and "| 3 | 3 | 0 | 0 |" in line]
    assert len(rows) == 2 and f"val/loss {PINNED['sft+full']['best']:.4g}" in rows[0]
    assert sorted(p.name for p in out.glob("search*.png")) == [
        "search1-sft_full-history.png", "search1-sft_full-importances.png",
        "search2-sft_lora-history.png", "search2-sft_lora-importances.png"]
    # the same command again: every study has its trials, nothing is rerun
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("sft+*.json")}
    again = subprocess.run(_sweep_cmd(sweep_file), env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "ftbench fit" not in again.stdout and "0 run(s)" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("sft+*.json")} == before
    dry = subprocess.run(_sweep_cmd(sweep_file, "--dry-run"), env=_env(), cwd=tmp_path, capture_output=True, text=True)
    assert dry.stdout.count("3 completed, 0 pruned, 0 failed, 0 running; 0 to do (of 3)") == 2


def test_report_section_from_records(tmp_path):
    """The best trial by the study's direction, its test figures, the counts; PNGs written."""
    space = {"lr": optuna.distributions.distribution_to_json(optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True))}

    def rec(trial, lr, status, val=None, test=None):
        final = {} if val is None else {"val/loss": val, **({"test/loss": test, "test/last_word/loss": 9.0} if test else {})}
        return {"run_info": {"run_id": f"sft+lora-{trial:010d}", "search": {
                    "study": "s:p:d", "trial": trial, "metric": "val/loss", "direction": "minimize",
                    "params": {"lr": lr}, "space": space}},
                "train_info": {"method": "sft+lora", "status": status, "final": final,
                               "metrics": [{"step": 1, "val/loss": val or 3.0}]}}

    records = [rec(0, 1e-4, "completed", 2.5, 2.6), rec(1, 1e-3, "completed", 2.25, 2.375), rec(2, 3e-5, "pruned"),
               rec(3, 5e-3, "failed"), rec(4, 2e-3, "completed", 2.25, 2.5)]
    (row,) = study_table(records)
    assert (row["trials"], row["completed"], row["pruned"], row["failed"]) == (5, 3, 1, 1)
    assert (row["best"], row["value"], row["values"], row["test"]) == (1, 2.25, {"lr": 1e-3}, {"test/loss": 2.375})
    text, pngs = search_section(records, tmp_path)
    assert "| sft+lora | 5 | 3 | 1 | 1 | 1 (sft+lora-0000000001) | lr=0.001 | val/loss 2.25 | test/loss 2.375 |" in text
    assert [p.name for p in pngs] == ["search1-sft_lora-history.png", "search1-sft_lora-importances.png"]
    assert all(p.stat().st_size > 1000 for p in pngs)
