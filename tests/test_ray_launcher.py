"""``ftbench sweep --launcher ray``: the same points run as Ray tasks on a local Ray instance with 2
CPUs give the same records as the default launcher (ids, losses); a killed run is rerun on resume and
a finished one is not; a stage waits for its upstream task; without Ray, a one-line error naming the
extra.

Cost on the 2-core CI machine: starting the local Ray instance takes ~9 s (once, for the module);
each run is a child process importing Lightning (~10 s)."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftbench.sweep import cli as sweep_cli
from ftbench.sweep.cli import record_status
from ftbench.sweep.grid import load_sweep
from ftbench.sweep.launchers import RAY_EXTRA, LocalLauncher, RayLauncher, task_resources

from test_sweep import _env, _sweep_cmd, _tiny_sweep

ray = pytest.importorskip("ray")

# what a run computes and how it ended: the same whoever launched it (timings and hosts differ)
DETERMINISTIC = ("status", "global_steps", "final", "metrics")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with 2 CPUs for the module (RayLauncher uses it as it is)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def _records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "sweep.json"}


def _figures(rec: dict) -> dict:
    info = rec["train_info"]
    metrics = [{k: v for k, v in m.items() if "time" not in k and "per_s" not in k and "mem" not in k}
               for m in info.get("metrics", [])]
    return {"run_id": rec["run_info"]["run_id"], "method": info["method"], "status": info["status"],
            "global_steps": info.get("global_steps"), "metrics": metrics}


def _run_sweep(sweep_file: Path, launcher, capsys) -> tuple[int, str]:
    code = sweep_cli.run_sweep(load_sweep(sweep_file), launcher=launcher, live=False)
    return code, capsys.readouterr().out


def test_ray_records_equal_the_local_launchers_and_resume_reruns_only_the_killed(tmp_path, tiny_model_dir,
                                                                               local_ray, capsys):
    grid = "  tuner: [lora.yaml]\n  lr: [1.0e-3, 3.0e-3, 1.0e-2]\n"
    local = _tiny_sweep(tmp_path / "local", tiny_model_dir, grid)
    on_ray = _tiny_sweep(tmp_path / "ray", tiny_model_dir, grid)
    res = subprocess.run(_sweep_cmd(local), env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    code, printed = _run_sweep(on_ray, RayLauncher(), capsys)
    assert code == 0, printed
    ids = [s.run_id for s in load_sweep(on_ray).runs]
    by_local, by_ray = _records(tmp_path / "local" / "results"), _records(tmp_path / "ray" / "results")
    assert sorted(by_ray) == sorted(by_local) == sorted(ids)
    for run_id in ids:
        assert _figures(by_ray[run_id]) == _figures(by_local[run_id]), run_id
    print(json.dumps({k: _figures(v) for k, v in by_ray.items()}, indent=1), file=sys.stderr)
    for k, run_id in enumerate(ids, 1):  # a line when each task starts and when it has finished
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
