"""One reading of a run's configuration: for every point of every shipped sweep, the run id and the
method label computed by the sweep, by ``ftbench fit``'s reading of the same command line and by the
report's grouping of a record carrying that run's settings all agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftbench import naming
from ftbench.runcli import CLI_KWARGS, cli_class, read_run
from ftbench.sweep.grid import load_sweep
from ftbench.sweep.report import runs_frame

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = sorted([*ROOT.glob("configs/sweeps/*.yaml"), *ROOT.glob("experiments/*/*.yaml")])
#: the points of the shipped sweeps (a new or removed point changes it: say so in the commit)
POINTS = 375


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the sweeps' command lines name their YAML files from the repository root


def _record(spec, run_id: str, label: str, settings: dict) -> dict:
    """A record as a run writes it (run_info: id, subcommand, settings; train_info: the method)."""
    return {"run_info": {"run_id": run_id, "subcommand": spec.subcommand, "seed": settings.get(naming.SEED),
                         "config": {}, "settings": settings},
            "train_info": {"method": label, "status": "completed", "metrics": [], "final": {}}}


def test_every_shipped_sweep_point_has_one_id_and_label_everywhere():
    points, records, expected = 0, [], []
    for path in SWEEPS:
        sweep = load_sweep(path)
        for spec in sweep.runs:
            # `ftbench fit` as the sweep starts it, less the id the sweep hands it: results elsewhere, an
            # upstream stage's weights under that folder (the id reads them as run:<its id>)
            argv = spec.argv(f"results/elsewhere/{sweep.name}")
            argv = argv[:argv.index("--run_id")]
            run = read_run(argv)
            assert (run.run_id, run.label) == (spec.run_id, spec.method), f"{path} point {points + 1}"
            assert naming.run_id(spec.method, spec.subcommand, spec.identity.settings) == spec.run_id
            records.append(_record(spec, run.run_id, run.label, run.settings))
            expected.append((spec.method, spec.subcommand, naming.grid_point(spec.identity.settings)))
            points += 1
    print(f"{points} points in {len(SWEEPS)} sweep files")
    assert points == POINTS
    # the report groups the records by the same settings, less the seed, under the same label
    rows = runs_frame(records)
    assert list(rows["label"]) == [m for m, _, _ in expected]
    assert [json.loads(p)[2] for p in rows["point"]] == [g for _, _, g in expected]
    distinct = {json.dumps(e, sort_keys=True) for e in expected}
    assert rows["point"].nunique() == len(distinct) < POINTS  # the seeds of a point are one point


def test_the_run_cli_reads_a_pipeline_stage_as_the_sweep_does(tmp_path):
    """``ftbench fit`` itself (its ``before_instantiate_classes``) on a stage that starts from another
    run's weights and on a quantized point: the id the sweep gave each."""
    FTBenchCLI, Objective, DataModule, SaveConfig = cli_class()

    class Read(Exception):
        pass

    class ReadOnly(FTBenchCLI):
        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            raise Read(self.run_id, self.identity.label)

    rlhf = load_sweep(ROOT / "configs/sweeps/rlhf.yaml").runs
    quickstart = load_sweep(ROOT / "configs/sweeps/quickstart.yaml").runs
    for spec in (next(r for r in rlhf if r.name == "grpo_rm"), quickstart[3]):
        argv = spec.argv(str(tmp_path / "results"))
        with pytest.raises(Read) as read:
            ReadOnly(Objective, DataModule, save_config_callback=SaveConfig, args=argv[:argv.index("--run_id")],
                     **CLI_KWARGS)
        assert read.value.args == (spec.run_id, spec.method)
    assert (rlhf[4].method, quickstart[3].method) == ("grpo+lora", "sft+lora+nf4")
