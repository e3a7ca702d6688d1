"""``ftbench sweep --launcher ray``: the same points run as Ray tasks on a local Ray instance with 2
CPUs give the same records as the default launcher (ids, losses); a killed run is rerun on resume and
a finished one is not; a stage waits for its upstream task; without Ray, a one-line error naming the
extra.

Cost: the Ray start-up (~9 s on an idle 2-core machine, once for the module) and 7 run processes
(3 local, 3 on Ray, 1 rerun), each importing Lightning: ~120 CPU-seconds in all, so about a minute
of wall time on an idle 2-core machine (8 minutes under a load average of 15). The scheduling tests
use a fake Ray and take about a second."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from ftbench.sweep import cli as sweep_cli
from ftbench.sweep import launchers
from ftbench.sweep.runs import Progress, record_status
from ftbench.sweep.grid import load_sweep, weights_dir
from ftbench.sweep.launchers import RAY_EXTRA, LocalLauncher, RayLauncher, task_resources

from test_sweep import _tiny_sweep


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with 2 CPUs for the module (RayLauncher uses it as it is)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def _records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "sweep.json"}


def _figures(rec: dict) -> dict:
    """What a run computed (its settings, losses and steps), without what the machine measured."""
    info = rec["train_info"]

    def computed(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if not any(w in k for w in ("time", "per_s", "second", "mem"))}

    figures = {"run_id": rec["run_info"]["run_id"], "settings": rec["run_info"]["settings"], "method": info["method"],
               "status": info["status"], "global_steps": info.get("global_steps"), "final": computed(info["final"]),
               "metrics": [computed(m) for m in info["metrics"]]}
    assert isinstance(figures["final"]["val/loss"], float) and figures["metrics"][-1]["train/loss"] > 0  # not vacuous
    return figures


def _run_sweep(sweep_file: Path, launcher, capsys) -> tuple[int, str]:
    code = sweep_cli.run_sweep(load_sweep(sweep_file), launcher=launcher, live=False)
    return code, capsys.readouterr().out


def test_ray_records_equal_the_local_launchers_and_resume_reruns_only_the_killed(tmp_path, tiny_model_dir,
                                                                               local_ray, capsys):
    grid = "  tuner: [lora.yaml]\n  lr: [1.0e-3, 3.0e-3, 1.0e-2]\n"
    local = _tiny_sweep(tmp_path / "local", tiny_model_dir, grid)
    on_ray = _tiny_sweep(tmp_path / "ray", tiny_model_dir, grid)
    code, printed = _run_sweep(local, LocalLauncher(), capsys)
    assert code == 0, printed
    code, printed = _run_sweep(on_ray, RayLauncher(), capsys)
    assert code == 0, printed
    ids = [s.run_id for s in load_sweep(on_ray).runs]
    by_local, by_ray = _records(tmp_path / "local" / "results"), _records(tmp_path / "ray" / "results")
    assert sorted(by_ray) == sorted(by_local) == sorted(ids)
    for run_id in ids:
        assert _figures(by_ray[run_id]) == _figures(by_local[run_id]), run_id
    for run_id in ids:  # a line when each task starts, and its lines when it has finished
        assert f"] {run_id}: started as a Ray task (1 CPU, 0 GPU)" in printed
        assert f"] {run_id}: ftbench fit " in printed
    assert printed.count("      completed in ") == 3

    # a run killed under way leaves its record 'running' (tests/test_sweep.py's kill -9 test): rerun;
    # the completed ones are not
    out = tmp_path / "ray" / "results"
    killed = out / f"{ids[1]}.json"
    rec = json.loads(killed.read_text())
    rec["train_info"]["status"] = "running"
    killed.write_text(json.dumps(rec))
    kept = {i: (out / f"{i}.json").stat().st_mtime_ns for i in (ids[0], ids[2])}
    code, printed = _run_sweep(on_ray, RayLauncher(), capsys)
    assert code == 0, printed
    assert f"[1/1] {ids[1]}: started as a Ray task" in printed and printed.count("started as a Ray task") == 1
    assert record_status(killed) == "completed"
    assert {i: (out / f"{i}.json").stat().st_mtime_ns for i in kept} == kept
    assert _figures(_records(out)[ids[1]]) == _figures(by_local[ids[1]])


class Ref:
    """A fake ObjectRef: hashable, it says which task it is."""

    def __init__(self, sweep, spec):
        self.sweep, self.spec = sweep, spec


class FakeRay:
    """The Ray calls RayLauncher makes, answered in this process: tasks finish in the order they were
    submitted, each writing the record its outcome says (no processes, no Ray start-up), so that the
    scheduling (stages after their upstream runs, failures isolated) is checked in milliseconds."""

    class exceptions:
        class RayError(Exception):
            pass

    def __init__(self, outcomes: dict[str, str]):
        self.outcomes, self.events, self.options_given = outcomes, [], {}

    def is_initialized(self) -> bool:
        return True

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 2.0}

    def remote(self, body):
        fake = self

        class Task:
            def options(self, **options):
                self.given = options
                return self

            def remote(self, sweep, spec, i, total):
                fake.events.append(("submit", spec.run_id))
                fake.options_given[spec.run_id] = self.given
                return Ref(sweep, spec)

        return Task()

    def wait(self, refs, num_returns=1):
        return refs[:1], refs[1:]

    def get(self, ref):
        sweep, spec = ref.sweep, ref.spec
        self.events.append(("finish", spec.run_id))
        outcome = self.outcomes.get(spec.run_id, "completed")
        if outcome == "lost":
            raise self.exceptions.RayError("the worker died\n(traceback)")
        (Path(sweep.out) / f"{spec.run_id}.json").write_text(json.dumps(
            {"run_info": {"run_id": spec.run_id}, "train_info": {"status": outcome}}))
        if outcome == "completed" and spec.overrides.get("save_weights"):
            Path(weights_dir(sweep.out, spec.run_id)).mkdir(parents=True)
        return outcome, [f"      {outcome}"]

    def cancel(self, ref, force=False):
        self.events.append(("cancel", ref.spec.run_id))


def _pipeline(tmp_path: Path, tiny_model_dir: Path):
    path = _tiny_sweep(tmp_path, tiny_model_dir, "  tuner: [lora.yaml]\n  lr: [3.0e-3]\n",
                       runs="runs:\n  - {init_from: sft, tuner: full.yaml}\n  - {name: sft, tuner: lora.yaml}\n")
    sweep = load_sweep(path)
    (tmp_path / "results").mkdir()
    other, sft, full = sweep.runs  # the stage that starts from sft is ordered after it
    assert full.upstream == {"backbone.init_from": sft}
    return sweep, other, sft, full


def test_a_stage_is_submitted_once_its_upstream_task_has_finished(tmp_path, tiny_model_dir, monkeypatch, capsys):
    sweep, other, sft, full = _pipeline(tmp_path, tiny_model_dir)
    fake = FakeRay({})
    monkeypatch.setattr(launchers, "_import_ray", lambda: fake)
    with RayLauncher() as launcher:
        statuses = launcher.run(sweep, sweep.runs, Progress(3, live=False))
    assert statuses == {other.run_id: "completed", sft.run_id: "completed", full.run_id: "completed"}
    # the two independent runs at once; the stage after sft has finished
    assert fake.events == [("submit", other.run_id), ("submit", sft.run_id), ("finish", other.run_id),
                           ("finish", sft.run_id), ("submit", full.run_id), ("finish", full.run_id)]
    assert fake.options_given[full.run_id] == {"num_cpus": 1, "num_gpus": 0, "max_retries": 0, "name": full.run_id}
    assert f"[3/3] {full.run_id}: started as a Ray task (1 CPU, 0 GPU)" in capsys.readouterr().out


def test_a_failed_or_lost_task_marks_its_run_and_the_others_go_on(tmp_path, tiny_model_dir, monkeypatch, capsys):
    sweep, other, sft, full = _pipeline(tmp_path, tiny_model_dir)
    fake = FakeRay({sft.run_id: "failed", other.run_id: "lost"})
    monkeypatch.setattr(launchers, "_import_ray", lambda: fake)
    with RayLauncher() as launcher:
        statuses = launcher.run(sweep, sweep.runs, Progress(3, live=False), start=4)
    assert statuses == {other.run_id: "failed", sft.run_id: "failed", full.run_id: "skipped"}
    out = Path(sweep.out)
    lost = json.loads((out / f"{other.run_id}.json").read_text())
    assert lost["train_info"]["status"] == "failed"
    assert lost["train_info"]["error"] == {"type": "RayError", "message": "the Ray task was lost: the worker died"}
    assert lost["run_info"]["run_id"] == other.run_id
    skipped = json.loads((out / f"{full.run_id}.json").read_text())["train_info"]
    assert skipped["error"]["message"] == f"upstream run sft ({sft.run_id}, backbone.init_from) is failed"
    printed = capsys.readouterr().out
    assert f"      {other.run_id}: the Ray task was lost (RayError: the worker died)" in printed
    assert f"[6/3] {full.run_id}: skipped: upstream run sft ({sft.run_id}" in printed
    assert ("submit", full.run_id) not in fake.events


def test_task_resources_follow_the_trainer_config(tmp_path, tiny_model_dir):
    sweep = load_sweep(_tiny_sweep(tmp_path, tiny_model_dir, "  tuner: [lora.yaml]\n",
                                   runs="runs:\n  - {tuner: lora.yaml, trainer.devices: 2}\n"
                                        "  - {tuner: lora.yaml, trainer.accelerator: gpu, trainer.devices: 2}\n"
                                        "  - {tuner: lora.yaml, trainer.accelerator: auto, trainer.devices: auto}\n"))
    one, two_cpus, two_gpus, auto = sweep.runs
    assert task_resources(one, cluster_gpus=0) == {"num_cpus": 1, "num_gpus": 0}
    assert task_resources(two_cpus, cluster_gpus=8) == {"num_cpus": 2, "num_gpus": 0}
    assert task_resources(two_gpus, cluster_gpus=8) == {"num_cpus": 1, "num_gpus": 2}
    # Lightning's auto takes a GPU when there is one: so does the task
    assert task_resources(auto, cluster_gpus=8) == {"num_cpus": 1, "num_gpus": 1}
    assert task_resources(auto, cluster_gpus=0) == {"num_cpus": 1, "num_gpus": 0}


def test_without_ray_the_launcher_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError("No module named 'ray'", name="ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    (tmp_path / "s.yaml").write_text("grid: {seed: [1, 2]}\n")
    assert sweep_cli.main(["sweep", str(tmp_path / "s.yaml"), "--launcher", "ray"]) == 2
    assert capsys.readouterr().err == f"error: --launcher ray needs Ray, an optional extra: {RAY_EXTRA}\n"
    assert RAY_EXTRA == "pip install 'ftbench[ray]'"


def test_ray_options_are_refused_where_they_do_not_apply(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("grid: {seed: [1, 2]}\n")
    assert sweep_cli.main(["sweep", str(tmp_path / "s.yaml"), "--ray-cpus", "2"]) == 2
    assert capsys.readouterr().err == "error: --ray-address/--ray-cpus apply to --launcher ray (the launcher is 'local')\n"
    pytest.importorskip("ray")
    argv = ["sweep", str(tmp_path / "s.yaml"), "--launcher", "ray", "--ray-address", "auto", "--ray-cpus", "2"]
    assert sweep_cli.main(argv) == 2
    assert capsys.readouterr().err == ("error: --ray-cpus sizes a local Ray instance; with --ray-address the "
                                       "cluster's own CPUs are used\n")
