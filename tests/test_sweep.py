"""Sweeps: grid expansion and run ids, shards, resume after kill -9, failure isolation, progress,
W&B grouping, and every shipped sweep/trainer YAML parses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from ftbench.sweep.cli import plan, wandb_sweep_config
from ftbench.sweep.runs import RunProgress, decide, record_status, run_summary
from ftbench.sweep.grid import RunSpec, SweepError, load_sweep, parse_overrides, parse_shard, shard
from ftbench.sweep.report import load_records

ROOT = Path(__file__).resolve().parent.parent
LORA = """\
class_path: ftbench.tuners.Peft
init_args:
  peft_config:
    class_path: peft.LoraConfig
    init_args: {r: 4, lora_alpha: 8, target_modules: all-linear}
  lr: 1.0e-3
"""
FULL = """\
class_path: ftbench.tuners.Full
init_args:
  lr: 1.0e-4
"""
SFT = """\
class_path: ftbench.objectives.SFT
init_args:
  optimizer:
    class_path: torch.optim.AdamW
    init_args: {lr: 1.0e-3, weight_decay: 0.0}
  lr_scheduler: constant
  warmup_steps: 0
"""
# the same LoRA config with its keys in another order
LORA_REORDERED = """\
init_args:
  lr: 1.0e-3
  peft_config:
    init_args: {target_modules: all-linear, lora_alpha: 8, r: 4}
    class_path: peft.LoraConfig
class_path: ftbench.tuners.Peft
"""
TRAINER = """\
accelerator: cpu
devices: 1
max_steps: 2
val_check_interval: 1
limit_val_batches: 1
num_sanity_val_steps: 0
enable_checkpointing: false
logger: false
"""
DATA = """\
class_path: ftbench.data.InstructionData
init_args:
  source: builtin:instruction
  builtin_size: 60
  val_fraction: 0.05
  test_fraction: 0.05
  max_length: 64
  batch_size: 4
  eval_batch_size: 8
"""


def _files(d: Path, lora: str = LORA) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "lora.yaml").write_text(lora)
    (d / "full.yaml").write_text(FULL)
    (d / "sft.yaml").write_text(SFT)
    (d / "trainer.yaml").write_text(TRAINER)
    (d / "data.yaml").write_text(DATA)
    return d


GRID_SWEEP = """\
name: grid-test
out: results/grid-test
base:
  backbone.model: /models/tiny
  objective: sft.yaml
  data: data.yaml
  trainer: trainer.yaml
  trainer.max_steps: 2
grid:
  tuner: [full.yaml, lora.yaml]
  lr: [1.0e-4, 1e-3]     # 1e-3 (a string to PyYAML) is the number 0.001
runs:
  - subcommand: test
    tuner: lora.yaml
"""
# the same sweep, every mapping in another order
GRID_SWEEP_REORDERED = """\
runs:
  - tuner: lora.yaml
    subcommand: test
grid:
  lr: [1.0e-4, 1.0e-3]
  tuner: [full.yaml, lora.yaml]
base:
  trainer.max_steps: 2
  model: sft.yaml
  trainer: trainer.yaml
  data: data.yaml
  backbone.model: /models/tiny
out: results/grid-test
name: grid-test
"""
# pinned: a change to the id scheme (or to the normalisation) makes every old record a new run (these
# moved when generate_in_validation left the objective's YAML above for --evaluate.*, and when the id
# came to read the parser's normal form: defaults dropped, ftbench.config_reading.identity)
GRID_IDS = ["sft+full-353bcfade0", "sft+full-abb65caf6d", "sft+lora-e687ee9e1b", "sft+lora-bb97dea035",
            "sft+lora-5aed2c653f"]


def test_grid_expansion_exact_runs_and_ids(tmp_path):
    d = _files(tmp_path / "a")
    (d / "sweep.yaml").write_text(GRID_SWEEP)
    sweep = load_sweep(d / "sweep.yaml")
    assert sweep.name == "grid-test" and sweep.out == "results/grid-test"
    lr = "tuner.init_args.lr"
    assert [(r.subcommand, r.method, r.label) for r in sweep.runs] == [
        ("fit", "sft+full", {"tuner": str(d / "full.yaml"), lr: 1e-4}),
        ("fit", "sft+full", {"tuner": str(d / "full.yaml"), lr: 1e-3}),
        ("fit", "sft+lora", {"tuner": str(d / "lora.yaml"), lr: 1e-4}),
        ("fit", "sft+lora", {"tuner": str(d / "lora.yaml"), lr: 1e-3}),
        ("test", "sft+lora", {"tuner": str(d / "lora.yaml")}),
    ]
    assert [r.run_id for r in sweep.runs] == GRID_IDS
    # the command line: parent keys before their children, values as the CLI parses them
    assert sweep.runs[2].argv("OUT") == [
        "fit", "--backbone.model", "/models/tiny", "--data", str(d / "data.yaml"), "--model", str(d / "sft.yaml"),
        "--trainer", str(d / "trainer.yaml"), "--trainer.max_steps", "2", "--tuner", str(d / "lora.yaml"),
        f"--{lr}", "0.0001", "--out", "OUT", "--run_id", GRID_IDS[2]]
    # lr 1e-3 on lora.yaml is lora.yaml itself (its lr is 1e-3); lora_alpha 8 is LoraConfig's default: no setting
    assert sweep.runs[3].identity.settings["tuner"] == {"class_path": "ftbench.tuners.Peft", "init_args": {
        "peft_config": {"class_path": "peft.LoraConfig", "init_args": {"r": 4, "target_modules": "all-linear"}},
        "lr": 0.001}}


def test_run_id_stable_across_key_order(tmp_path):
    a = _files(tmp_path / "a")
    b = _files(tmp_path / "b", lora=LORA_REORDERED)  # the referenced YAML reordered too, elsewhere on disk
    (a / "sweep.yaml").write_text(GRID_SWEEP)
    (b / "sweep.yaml").write_text(GRID_SWEEP_REORDERED)
    ids_a = [r.run_id for r in load_sweep(a / "sweep.yaml").runs]
    ids_b = [r.run_id for r in load_sweep(b / "sweep.yaml").runs]
    assert sorted(ids_a) == sorted(ids_b) == sorted(GRID_IDS)
    # ...and a change of any value is another run (on the next load: a loaded sweep keeps its ids,
    # so editing a config while a sweep runs never moves a run's record)
    loaded = load_sweep(b / "sweep.yaml")
    frozen = [r.run_id for r in loaded.runs]
    (b / "lora.yaml").write_text(LORA_REORDERED.replace("r: 4", "r: 5"))
    assert [r.run_id for r in loaded.runs] == frozen
    ids_c = [r.run_id for r in load_sweep(b / "sweep.yaml").runs]
    assert set(ids_c) & set(ids_b) == {i for i in ids_b if i.startswith("sft+full")}
    assert len(set(ids_c) - set(ids_b)) == 3  # the three LoRA points changed, the full ones did not


def test_grid_list_aliases_and_extra_overrides(tmp_path):
    d = _files(tmp_path)
    (d / "s.yaml").write_text(textwrap.dedent("""\
        base: {trainer: trainer.yaml, objective: sft.yaml}
        grid:
          - {tuner: full.yaml}
          - {tuner: lora.yaml, tuner.init_args.peft_config.init_args.r: [2, 4], seed: [1, 2]}
        """))
    sweep = load_sweep(d / "s.yaml", extra=parse_overrides(["--trainer.max_steps", "3"]))
    assert len(sweep.runs) == 5
    assert [r.overrides.get("tuner.init_args.peft_config.init_args.r") for r in sweep.runs] == [None, 2, 2, 4, 4]
    assert [r.overrides.get("seed_everything") for r in sweep.runs] == [None, 1, 2, 1, 2]
    assert [r.method for r in sweep.runs] == ["sft+full", "sft+lora", "sft+lora", "sft+lora", "sft+lora"]
    # extra settings from the command line override base and grid (read by each run's parser) ...
    assert all(r.overrides["trainer.max_steps"] == "3" and r.identity.settings["trainer"]["max_steps"] == 3
               for r in sweep.runs)
    # ... so a fixed seed makes the seed points the same run: an error that names them
    (d / "t.yaml").write_text("grid: {tuner: [lora.yaml], seed: [1, 2]}\n")
    with pytest.raises(SweepError, match="points 1 and 2 .* same run"):
        load_sweep(d / "t.yaml", extra={"seed": 7})
    assert parse_overrides(["--lr", "1e-3", "--data.init_args.source=builtin:x"]) == {
        "tuner.init_args.lr": "1e-3", "data.init_args.source": "builtin:x"}


@pytest.mark.parametrize("text, message", [
    ("grid: {tuner: [full.yaml]}\nbogus: 1\n", "unknown field.*bogus"),
    ("grid: {tuner: [missing.yaml]}\n", r"grid: tuner: no such file missing.yaml"),
    ("grid: {objective: []}\n", r"grid.model: empty list"),
    ("grid: [1, 2]\n", "field 'grid' must be a mapping"),
    ("subcommand: train\ngrid: {tuner: [full.yaml]}\n", "subcommand 'train' is not one of fit, validate, test"),
    ("grid: {'bad key': [1]}\n", "'bad key' is not a config key"),
    ("grid: {tuner: [full.yaml, full.yaml]}\n", "points 1 and 2 of the sweep are the same run"),
    # read by the run's own parser: every point it refuses, before anything runs
    ("grid: {tuner: [full.yaml, lora.yaml], trainer.max_step: [3]}\n",
     r"s.yaml: 2 point\(s\) do not parse; nothing was run:\n"
     r"  point 1 \(tuner=full, trainer.max_step=3\): unrecognized arguments: --trainer.max_step 3\n"
     r"  point 2 \(tuner=lora, trainer.max_step=3\): unrecognized arguments: --trainer.max_step 3$"),
])
def test_sweep_file_errors_name_the_field(tmp_path, text, message):
    d = _files(tmp_path)
    (d / "s.yaml").write_text(text)
    with pytest.raises(SweepError, match=message):
        load_sweep(d / "s.yaml")


def test_shards_are_disjoint_and_cover_the_grid(tmp_path, monkeypatch):
    runs = [RunSpec("fit", [], {"seed_everything": i}) for i in range(11)]
    for n in (1, 2, 3, 4, 11, 13):
        parts = [shard(runs, i, n) for i in range(n)]
        ids = [r.run_id for p in parts for r in p]
        assert sorted(ids) == sorted(r.run_id for r in runs) and len(set(ids)) == len(ids) == 11
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [r.overrides["seed_everything"] for r in shard(runs, 1, 4)] == [1, 5, 9]
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "1", "-1/2", "a/b"):
        with pytest.raises(SweepError):
            parse_shard(bad)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert parse_shard("auto") == (2, 4)


def test_every_shipped_sweep_file_loads():
    files = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert {f.name for f in files} >= {"quickstart.yaml", "methods_seeds.yaml", "lora_rank.yaml", "tuners_sft.yaml"}
    counts = {f.name: len(load_sweep(f).runs) for f in files}
    assert counts["methods_seeds.yaml"] == 7 and counts["lora_rank.yaml"] == 9 and counts["tuners_sft.yaml"] == 3
    quick = load_sweep(ROOT / "configs" / "sweeps" / "quickstart.yaml")  # the README's main job
    assert [(r.subcommand, r.method) for r in quick.runs] == [
        ("fit", "sft+full"), ("fit", "sft+lora"), ("fit", "sft+adapters"), ("fit", "sft+lora+nf4"), ("test", "sft+none")]
    assert all(Path(c).is_file() for r in quick.runs for c in r.argv("o") if c.endswith(".yaml"))


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "wandb.yaml"])
def test_shipped_trainer_configs_parse(name, capsys):
    from ftbench.cli import cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--trainer", str(ROOT / "configs" / "trainer" / name), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    mine = yaml.safe_load((ROOT / "configs" / "trainer" / name).read_text())
    for key, value in mine.items():
        got = printed["trainer"][key]
        if isinstance(value, dict):
            assert got["class_path"].endswith(value["class_path"].rsplit(".", 1)[-1])
        else:
            assert got == value


def test_resume_decisions():
    assert decide(None, False) == (True, "to run")
    assert decide("completed", True) == (False, "done")
    assert decide("running", False) == (True, "rerun (running)")
    assert decide("interrupted", False) == (True, "rerun (interrupted)")
    assert decide("nan", False)[0] is False and decide("nan", True) == (True, "rerun (nan)")
    assert decide("oom", False)[0] is False and decide("failed", True)[0] is True


def test_record_status_reads_interrupts_as_reruns(tmp_path):
    def rec(status, err=None):
        return json.dumps({"run_info": {}, "train_info": {"status": status, **({"error": {"type": err}} if err else {})}})

    (tmp_path / "a.json").write_text(rec("failed", "KeyboardInterrupt"))
    (tmp_path / "b.json").write_text(rec("failed", "ValueError"))
    (tmp_path / "c.json").write_text('{"run_info": {}, "train_in')  # a torn file (never written by us) reads as absent
    assert [record_status(tmp_path / f"{x}.json") for x in "abcd"] == ["interrupted", "failed", None, None]


def test_the_end_of_run_line_comes_from_the_record_not_the_log(tmp_path):
    """The sweep reads a run's progress from its progress file and its summary from its record: the
    log (whatever progress bar or prints it holds) is never parsed."""
    rec = {"run_info": {"run_id": "lora-x", "subcommand": "fit"},
           "train_info": {"status": "completed", "method": "sft+lora", "params": {"trainable": 1}}}
    (tmp_path / "lora-x.json").write_text(json.dumps(rec))
    (tmp_path / "lora-x.log").write_text("[ftbench] lora-x: something else entirely\n")
    assert run_summary(tmp_path / "lora-x.json") == "[ftbench] lora-x: sft+lora completed trainable params=1"
    assert run_summary(tmp_path / "absent.json") is None
    (tmp_path / "torn.json").write_text('{"run_info": {}, "train_in')
    assert run_summary(tmp_path / "torn.json") is None


def test_wandb_sweep_config_calls_ftbench(tmp_path):
    d = _files(tmp_path)
    (d / "s.yaml").write_text(GRID_SWEEP)
    sweep = load_sweep(d / "s.yaml")
    text = wandb_sweep_config(sweep, "s.yaml", ["--trainer.max_steps", "2"])
    cfg = yaml.safe_load(text)
    assert cfg["method"] == "grid" and cfg["program"] == "ftbench"
    assert cfg["parameters"] == {"run_index": {"values": [0, 1, 2, 3, 4]}}
    assert cfg["command"] == ["ftbench", "sweep", "s.yaml", "--out", "results/grid-test", "--trainer.max_steps", "2", "${args}"]
    assert f"run_index 2: {GRID_IDS[2]} (fit)" in text


# ---------------------------------------------------------------------------------- real sweeps
def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    return env


def _sweep_cmd(sweep_file: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ftbench.cli", "sweep", str(sweep_file), *args]


def _tiny_sweep(d: Path, tiny_model_dir: Path, grid: str, runs: str = "", base: str = "",
                trainer: str = "trainer.yaml", name: str = "tiny") -> Path:
    _files(d)
    (d / "sweep.yaml").write_text(
        f"name: {name}\nout: {d / 'results'}\nbase:\n  backbone.model: {tiny_model_dir}\n  objective: sft.yaml\n"
        f"  data: data.yaml\n"
        f"  trainer: {trainer}\n  test_after_fit: false\n{base}grid:\n{grid}{runs}")
    return d / "sweep.yaml"


def test_resume_after_kill_9(tmp_path, tiny_model_dir):
    sweep_file = _tiny_sweep(tmp_path, tiny_model_dir, "  tuner: [lora.yaml]\n  seed: [1, 2, 3]\n")
    out = tmp_path / "results"
    ids = [r.run_id for r in load_sweep(sweep_file).runs]
    proc = subprocess.Popen(_sweep_cmd(sweep_file), env=_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = out / f"{ids[0]}.json"
    deadline = time.monotonic() + 120
    while record_status(first) != "completed":
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "first run did not complete"
        time.sleep(0.1)
    while record_status(out / f"{ids[1]}.json") is None and time.monotonic() < deadline:
        time.sleep(0.1)  # kill while the second run is under way
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    before = first.read_bytes(), first.stat().st_mtime_ns
    time.sleep(1.0)  # the orphan (if any) would have time to write
    # nothing half-written: every JSON parses; the second run was killed with its parent (still 'running')
    for p in out.glob("*.json"):
        json.loads(p.read_text())
    assert record_status(out / f"{ids[1]}.json") == "running"
    assert record_status(out / f"{ids[2]}.json") is None
    dry = subprocess.run(_sweep_cmd(sweep_file, "--dry-run"), env=_env(), cwd=tmp_path, capture_output=True, text=True)
    assert dry.returncode == 0 and "2 of 3 runs to do" in dry.stdout
    assert f"{ids[0]}" in dry.stdout and "rerun (running)" in dry.stdout
    res = subprocess.run(_sweep_cmd(sweep_file), env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    records = load_records(out)
    assert sorted(r["run_info"]["run_id"] for r in records) == sorted(ids)
    assert sorted(p.name for p in out.glob("*.json")) == sorted([f"{i}.json" for i in ids] + ["sweep.json"])
    assert all(r["train_info"]["status"] == "completed" for r in records)
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before  # the finished run was not rerun
    assert f"[1/2] {ids[1]}: ftbench" in res.stdout and f"[2/2] {ids[2]}: ftbench" in res.stdout
    assert f"] {ids[0]}: ftbench" not in res.stdout
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".*.part"))
    assert sorted(p.name for p in out.glob("*.log")) == sorted(f"{i}.log" for i in ids)
    table = (out / "report.md").read_text().splitlines()  # one row per grid point: the 3 seeds in one row
    rows = [line for line in table if line.startswith("| sft+lora")]
    assert len(rows) == 1 and rows[0].startswith("| sft+lora | 3 | completed | ")
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["run_id"] for r in manifest["runs"]] == ids


def test_failures_are_isolated_and_reported(tmp_path, tiny_model_dir):
    # lr 1e30 with no warm-up: the second step's loss is not finite (status nan); max_steps 0 parses
    # but is refused before the run starts, so no record (status failed, from the exit code); the
    # third run completes
    sweep_file = _tiny_sweep(tmp_path, tiny_model_dir, "  tuner: [lora.yaml]\n  lr: [1.0e+30, 1.0e-3]\n",
                             runs="runs:\n  - {tuner: lora.yaml, trainer.max_steps: 0}\n")
    out = tmp_path / "results"
    ids = [r.run_id for r in load_sweep(sweep_file).runs]
    res = subprocess.run(_sweep_cmd(sweep_file), env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert [record_status(out / f"{i}.json") for i in ids] == ["nan", "completed", "failed"]
    nan = json.loads((out / f"{ids[0]}.json").read_text())["train_info"]
    assert nan["error"]["type"] == "NonFiniteLossError" and nan["global_steps"] == 1
    assert "train/loss" in nan["last_metrics"]
    bad = json.loads((out / f"{ids[2]}.json").read_text())["train_info"]
    assert bad["error"]["type"] == "ExitCode" and "trainer.max_steps: 0 trains nothing" in bad["error"]["log_tail"]
    assert f"2 run(s) did not complete: {ids[0]} (nan), {ids[2]} (failed)" in res.stderr
    # a second invocation skips the failed runs (and still says they failed)
    again = subprocess.run(_sweep_cmd(sweep_file), env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "0 run(s) in" in again.stdout
    assert [s for s, _, todo, _ in plan(load_sweep(sweep_file), load_sweep(sweep_file).runs, False) if todo] == []
    assert [s.run_id for s, _, todo, _ in plan(load_sweep(sweep_file), load_sweep(sweep_file).runs, True) if todo] == [ids[0], ids[2]]


def _wandb_records(path: Path):
    """The records of an offline W&B run file (LevelDB log format: 7-byte header, 32 KiB blocks)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def test_wandb_groups_and_tags_runs_and_keeps_the_key_out(tmp_path, tiny_model_dir):
    secret = "fake-api-key-0123456789abcdef"
    sweep_file = _tiny_sweep(tmp_path, tiny_model_dir, "  tuner: [lora.yaml]\n", name="wb-sweep",
                             trainer=f"[trainer.yaml, {ROOT / 'configs' / 'trainer' / 'wandb.yaml'}]",
                             base="  trainer.logger.init_args.save_dir: wb\n")
    (tmp_path / "trainer.yaml").write_text(TRAINER.replace("logger: false\n", ""))
    spec = load_sweep(sweep_file).runs[0]
    assert spec.argv("o")[1:7] == ["--backbone.model", str(tiny_model_dir), "--data", str(tmp_path / "data.yaml"),
                                   "--model", str(tmp_path / "sft.yaml")]
    assert spec.argv("o")[9:13] == ["--trainer", str(tmp_path / "trainer.yaml"), "--trainer", str(ROOT / "configs" / "trainer" / "wandb.yaml")]
    res = subprocess.run(_sweep_cmd(sweep_file), env=_env(WANDB_API_KEY=secret), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    files = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    for _ in range(100):  # the W&B service may finish the offline file just after the run's process
        if any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(files[0])):
            break
        time.sleep(0.2)
    runs = [r.run for r in _wandb_records(files[0]) if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for r in _wandb_records(files[0])
              if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert (runs[0].run_group, list(runs[0].tags), runs[0].display_name, runs[0].job_type) == (
        "wb-sweep", ["sft+lora", "fit", "wb-sweep"], spec.run_id, "fit")
    assert config["run_id"] == spec.run_id  # the full resolved config is in wandb.config
    assert config["config"]["trainer"]["max_steps"] == 2
    assert config["config"]["tuner"]["init_args"]["peft_config"]["init_args"]["r"] == 4
    record = json.loads((tmp_path / "results" / f"{spec.run_id}.json").read_text())
    assert record["train_info"]["status"] == "completed"
    # the API key is nowhere: not in the record, the log, the config dumps or W&B's files
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p


def test_sweep_reads_its_points_with_one_parser(tmp_path, monkeypatch, capsys):
    """The sweep reads every point with the run's own parser (ftbench.runcli.read_run), built once per
    process: a second sweep in the same process builds none."""
    from ftbench.runcli import run_parser
    from ftbench.sweep.cli import main

    d = _files(tmp_path)
    (d / "s.yaml").write_text(GRID_SWEEP)
    monkeypatch.chdir(d)
    run_parser()
    built = run_parser.cache_info().misses
    assert main(["sweep", "s.yaml", "--dry-run"]) == 0 and main(["sweep", "s.yaml", "--dry-run"]) == 0
    assert run_parser.cache_info().misses == built
    out = capsys.readouterr().out
    assert out.count("5 of 5 runs to do") == 2 and all(i in out for i in GRID_IDS)


def test_progress_file_and_estimate(tmp_path):
    from types import SimpleNamespace

    import torch

    from ftbench.sweep.runs import Progress
    from ftbench.sweep.progress import ProgressFile

    path = tmp_path / "p.json"
    cb = ProgressFile(path, every_s=0.0)
    trainer = SimpleNamespace(is_global_zero=True, max_steps=40, global_step=0, sanity_checking=False,
                              callback_metrics={}, state=SimpleNamespace(fn="fit"))
    cb.on_fit_start(trainer, None)
    trainer.global_step, trainer.callback_metrics = 7, {"train/loss": torch.tensor(2.5)}
    cb.on_train_batch_end(trainer, None, None, None, 6)
    p = RunProgress()
    assert p.read_file(path) == 40 and (p.phase, p.steps_done, p.loss) == ("train", 7, 2.5)
    cb.on_validation_start(trainer, None)
    assert json.loads(path.read_text())["phase"] == "validate"
    trainer.is_global_zero = False  # other ranks never write
    trainer.global_step = 9
    cb.on_train_batch_end(trainer, None, None, None, 8)
    assert json.loads(path.read_text())["step"] == 7
    # what is left: the mean of the finished runs for this one and each run after it ...
    prog = Progress(5, live=False)
    prog.durations = [10.0, 20.0]
    assert prog.eta(3, 5.0, None) == 10.0 + 2 * 15.0
    # ... and before any run finished, this run's pace
    first = Progress(4, live=False)
    assert first.eta(1, 30.0, 0.25) == 90.0 + 3 * 120.0 and first.eta(1, 1.0, None) is None
