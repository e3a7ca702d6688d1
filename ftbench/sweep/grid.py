"""Sweep files: a ``base`` (config files + fixed dotted keys), a ``grid`` (lists are crossed) and
optional explicit ``runs``. Each point becomes one ``ftbench <subcommand>`` command line.

A sweep file::

    name: lora-rank                 # groups the W&B runs; default: the file's stem
    out: results/lora-rank          # the results directory (one JSON record per run)
    subcommand: fit                 # default fit; a run in ``runs`` may say test/validate
    base:                           # fixed for every run
      configs: [../trainer/cpu.yaml]        # whole-config files (``--config``), in order
      backbone: ../backbone/embedded.yaml   # a dotted key with a YAML file ...
      trainer.max_steps: 60                 # ... or a value
      objective: ../objective/sft.yaml      # what is optimised (the ``model`` key)
    grid:                           # crossed: 2 x 3 x 2 = 12 runs
      tuner: [../tuner/full.yaml, ../tuner/lora.yaml]
      lr: [1.0e-4, 3.0e-4, 1.0e-3]
      seed: [1, 2]
    runs:                           # extra single points (not crossed)
      - {subcommand: test, tuner: ../tuner/none.yaml}

``grid`` may also be a list of such mappings: each is crossed on its own and the runs are
concatenated (e.g. LoRA ranks only for LoRA). Short names: ``objective`` = ``model``, ``seed`` =
``seed_everything``, ``lr`` = ``tuner.init_args.lr``, ``optim`` = ``model.init_args.optimizer``.
Relative YAML paths are resolved against the sweep file's folder.

The run id is the one ``ftbench fit`` with the point's command line gets: the command line is parsed
by the run's own parser (:func:`ftbench.runcli.read_run`: YAML files read, defaults dropped), so the
same point maps to the same record whatever the key order in the sweep file (or in a referenced YAML),
a change in any referenced file's content makes a new run, and a value given equal to its default is
no change. Parsing needs the classes' signatures: ``ftbench sweep`` imports torch to read its points,
and a point the parser refuses stops the sweep before anything runs, every such point listed.

**Pipelines.** A run in ``runs`` may have a ``name``; another run may start from its trained weights
(``init_from: NAME``, i.e. ``backbone.init_from``) or use it as its reward model (``reward_model:
NAME``, i.e. ``model.init_args.reward_model``)::

    runs:
      - {name: sft, tuner: ../tuner/lora.yaml}
      - {name: rm, init_from: sft, objective: ../objective/reward.yaml, data: ../data/preference.yaml}
      - {init_from: sft, reward_model: rm, objective: ../objective/grpo.yaml}

The runs are ordered so that each comes after the runs it refers to (an unknown name or a cycle is
an error before anything runs); a referenced run saves what it trained (``--save_weights``) and its
dependants get ``{out}/{its run id}/weights``. The upstream run id is part of the dependant's
settings (``run:<id>``, :func:`ftbench.naming.upstream_ref`), so a changed upstream stage re-runs what
depends on it.

**Searches.** A ``search:`` block makes every grid point an Optuna study (``runs:`` entries still run
once): per point ``trials`` runs whose values of the space's keys are drawn by the sampler, the
target a validation metric (a test metric is refused), with an optional pruner on the validation
curve; the space is one mapping for every point or a list of ``{when: {KEY: VALUE}, space: {...}}``
entries (the first whose ``when`` matches the point gives its space: full fine-tuning has no rank)::

    grid:
      tuner: [../tuner/full.yaml, ../tuner/lora.yaml]
    search:
      trials: 8
      metric: val/loss                  # or max:val/accuracy; never test/...
      sampler: tpe                      # tpe (seeded: seed) | random | grid
      pruner: none                      # none | median | hyperband
      space:
        - when: {tuner: ../tuner/full.yaml}
          space: {lr: {log_uniform: [1.0e-6, 1.0e-4]}}
        - when: {tuner: ../tuner/lora.yaml}
          space:
            lr: {log_uniform: [1.0e-5, 1.0e-2]}
            tuner.init_args.peft_config.init_args.r: {choice: [4, 8, 16, 64]}

Ranges: ``uniform``/``log_uniform``/``int``/``log_int`` ``[LOW, HIGH]`` and ``choice [...]``. Each
trial is an ordinary run of the point with the drawn values (its own run id and record, the study
and trial number in ``run_info.search``); studies live in ``{out}/search.db`` or ``--storage URL``.
The whole of it (storage, resume, several machines): :mod:`ftbench.sweep.search`.
"""

from __future__ import annotations

import itertools
import math
import os
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml

if TYPE_CHECKING:
    from ftbench.config_reading import RunIdentity

from ftbench.errors import ConfigError, FTBenchError
from ftbench.naming import RUN_REF, UPSTREAM_KEYS

SUBCOMMANDS = ("fit", "validate", "test")
ALIASES = {"objective": "model", "seed": "seed_everything", "lr": "tuner.init_args.lr",
           "optim": "model.init_args.optimizer", "init_from": "backbone.init_from",
           "reward_model": "model.init_args.reward_model"}
_FIELDS = ("name", "out", "base", "grid", "runs", "subcommand", "search")
_YAML = (".yaml", ".yml")


class SweepError(FTBenchError):
    """A malformed sweep file; the message names the file and the field."""


def _is_yaml_path(v: Any) -> bool:
    return isinstance(v, str) and v.endswith(_YAML) and "\n" not in v


def _is_file_list(v: Any) -> bool:
    """Several YAML files for one key (``trainer: [cpu.yaml, wandb.yaml]``): given in order, each
    applied over the one before (``--trainer cpu.yaml --trainer wandb.yaml``)."""
    return isinstance(v, list) and len(v) > 0 and all(_is_yaml_path(x) for x in v)


@dataclass
class RunSpec:
    """One point of a sweep."""

    subcommand: str
    configs: list[str]
    overrides: dict[str, Any]
    label: dict[str, Any] = field(default_factory=dict)
    root: str = "."
    name: Optional[str] = None  # a name other runs refer to (``runs: - name: sft``)
    upstream: dict[str, "RunSpec"] = field(default_factory=dict)  # key -> the run whose weights it takes
    run_info: dict[str, Any] = field(default_factory=dict)  # extra record entries (a search trial's study and number)
    env: dict[str, str] = field(default_factory=dict)  # extra environment of its process (not part of its id)

    @cached_property
    def parsed(self):
        """The point's command line as ``ftbench`` parses it (:func:`ftbench.runcli.parse_run`)."""
        from ftbench.runcli import parse_run

        return parse_run(self.args(""))

    @cached_property
    def identity(self) -> RunIdentity:
        """The point's run identity (:func:`ftbench.config_reading.identity`), as ``ftbench fit`` reads it."""
        from ftbench.config_reading import identity
        from ftbench.runcli import run_parser

        return identity(run_parser(), self.parsed)

    @property
    def problem(self) -> Optional[str]:
        """What the run's parser refuses in the parsed point (a required key missing), else None."""
        from ftbench.runcli import validation_problem

        return validation_problem(self.parsed)

    @property
    def run_id(self) -> str:
        """Stable for the same point, whatever the order of keys in the sweep file."""
        return self.identity.run_id

    @property
    def method(self) -> str:
        """The method label (``sft+lora``), as the run's record will say it."""
        return self.identity.label

    def args(self, out: str) -> list[str]:
        """The subcommand and the point's settings as ``ftbench`` takes them. Dotted keys go in sorted
        order, so a parent key (``model``) always comes before its children (``model.init_args.r``)."""
        args = [self.subcommand]
        for c in self.configs:
            args += ["--config", c]
        for k in sorted(self.overrides):
            v = self.overrides[k]
            if isinstance(v, str) and v.startswith(RUN_REF):
                v = weights_dir(out, v[len(RUN_REF):])
            for x in (v if _is_file_list(v) else [v]):
                args += [f"--{k}", x if isinstance(x, str) else json.dumps(x)]
        return args

    def argv(self, out: str) -> list[str]:
        """The ``ftbench`` command line of the run (without the program name)."""
        return self.args(out) + ["--out", out, "--run_id", self.run_id]

    @property
    def display_name(self) -> str:
        return self.name or self.run_id

    def max_steps(self) -> Optional[int]:
        value = (self.identity.settings.get("trainer") or {}).get("max_steps")
        return value if isinstance(value, int) and value > 0 else None


@dataclass
class Sweep:
    name: str
    out: str
    runs: list[RunSpec]
    path: Optional[str] = None
    search: Optional[Any] = None  # the ``search:`` block (:class:`ftbench.sweep.search.Search`), if any

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, "sweep_file": self.path,
                "runs": [{"run_id": r.run_id, "subcommand": r.subcommand, "method": r.method, "name": r.name,
                          "upstream": {k: u.run_id for k, u in r.upstream.items()},
                          "point": r.label} for r in self.runs]}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _canon_key(k: Any, path: Path, where: str) -> str:
    if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w+]*)*", k):
        raise SweepError(f"{path}: {where}: {k!r} is not a config key (dotted names like model.init_args.r)")
    return ALIASES.get(k, k)


_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(v: Any) -> Any:
    """PyYAML reads ``1e-3`` (no dot) as a string; it is the number 0.001, as in ``1.0e-3``."""
    if isinstance(v, str) and _EXP_FLOAT.fullmatch(v.strip()):
        return float(v)
    if isinstance(v, list):
        return [_coerce(x) for x in v]
    if isinstance(v, dict):
        return {k: _coerce(x) for k, x in v.items()}
    return v


def _finite(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(_finite(x) for x in v)
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    return True


def _canon(mapping: dict[Any, Any], path: Path, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        key = _canon_key(k, path, where)
        if key in out:
            raise SweepError(f"{path}: {where}: {k!r} and another name both set {key}")
        out[key] = _coerce(v)
        if not _finite(out[key]):
            raise SweepError(f"{path}: {where}.{k}: {v!r} is not a finite number")
    return out


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs (extra command-line settings for every run of a sweep),
    the values as given: each run's parser reads them as it reads the rest of its command line."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) < 3:
            raise SweepError(f"unexpected argument {a!r} (extra settings are --dotted.key VALUE)")
        if "=" in a:
            key, value = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise SweepError(f"{a} needs a value")
            key, value = a[2:], args[i + 1]
            i += 2
        out[ALIASES.get(key, key)] = value
    return out


def weights_dir(out: str, run_id: str) -> str:
    """Where a run keeps what it trained (``--save_weights``), for the stages that start from it."""
    return os.path.join(out, run_id, "weights")


def _link_stages(path: Path, runs: list[RunSpec]) -> list[RunSpec]:
    """Resolve references to named runs (``init_from: sft``, ``reward_model: rm``) and order the runs
    so that every stage comes after the runs it takes weights from (the sweep's order otherwise).
    An unknown name or a cycle is an error before anything runs."""
    names: dict[str, RunSpec] = {}
    for r in runs:
        if r.name is not None:
            if r.name in names:
                raise SweepError(f"{path}: runs: the name {r.name!r} is given to two runs")
            names[r.name] = r
    for r in runs:
        for key in UPSTREAM_KEYS:
            value = r.overrides.get(key)
            if not isinstance(value, str) or value.startswith(RUN_REF):
                continue
            if value in names:
                if names[value] is r:
                    raise SweepError(f"{path}: run {r.name!r}: {key} names the run itself")
                r.upstream[key] = names[value]
            elif not Path(value).exists():
                known = ", ".join(sorted(names)) or "none"
                raise SweepError(f"{path}: {key}: {value!r} is neither a run name of this sweep (named runs: "
                                 f"{known}) nor an existing folder")
    ordered: list[RunSpec] = []
    state: dict[int, str] = {}

    def visit(r: RunSpec, trail: list[str]) -> None:
        # (names only: a run id is computed once the references are resolved; only named runs are upstream)
        if state.get(id(r)) == "done":
            return
        if state.get(id(r)) == "visiting":
            cycle = " -> ".join(trail[trail.index(str(r.name)):] + [str(r.name)])
            raise SweepError(f"{path}: the runs' references form a cycle: {cycle}")
        state[id(r)] = "visiting"
        for up in r.upstream.values():
            visit(up, trail + [str(r.name)])
        state[id(r)] = "done"
        ordered.append(r)

    for r in runs:
        visit(r, [])
    for r in ordered:
        for up in r.upstream.values():
            up.overrides["save_weights"] = True  # not part of its id
    return ordered


def _read_points(path: Path, runs: list[RunSpec]) -> None:
    """Read every point with the run's parser, in the order the stages need (an upstream run's id is
    part of its dependants' settings); every point the parser refuses is listed in one error."""
    problems, failed = [], set()
    for i, r in enumerate(runs):
        if any(id(up) in failed for up in r.upstream.values()):
            failed.add(id(r))
            problems.append(f"  point {i + 1} ({point_text(r)}): a run it starts from does not parse")
            continue
        for key, up in r.upstream.items():
            r.overrides[key] = RUN_REF + up.run_id
        try:
            r.identity
        except ConfigError as err:
            failed.add(id(r))
            problems.append(f"  point {i + 1} ({point_text(r)}): {err}")
    if problems:
        raise SweepError(f"{path}: {len(problems)} point(s) do not parse; nothing was run:\n" + "\n".join(problems))


def point_text(r: RunSpec) -> str:
    """What the sweep file sets for this point (``tuner=lora, lr=0.001``)."""
    return ", ".join(f"{k}={short_value(v)}" for k, v in r.label.items())


def short_value(v: Any) -> str:
    s = str(v)
    return Path(s).stem if s.endswith(_YAML) else s


def load_sweep(path: str | Path, out: Optional[str] = None, extra: Optional[dict[str, Any]] = None) -> Sweep:
    """Read a sweep file and expand it into its runs. ``extra`` (dotted keys) overrides base and grid."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SweepError(f"{path}: cannot read sweep file: {err}") from err
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with base/grid/runs")
    unknown = set(spec) - set(_FIELDS)
    if unknown:
        raise SweepError(f"{path}: unknown field(s) {', '.join(sorted(map(str, unknown)))} (allowed: {', '.join(_FIELDS)})")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError(f"{path}: field 'base' must be a mapping (configs: [...], and dotted keys)")
    base = dict(base)
    configs = [str(c) for c in _as_list(base.pop("configs", []))]
    root = path.parent
    configs = [os.path.normpath(root / c) if not Path(c).is_absolute() and (root / c).exists() else c for c in configs]
    for c in configs:
        if not Path(c).is_file():
            raise SweepError(f"{path}: base.configs: no such file {c}")
    base = _canon(base, path, "base")
    extra = {ALIASES.get(k, k): v for k, v in (extra or {}).items()}
    sub = spec.get("subcommand", "fit")
    grids = spec.get("grid")
    if grids is None:
        # no grid: the base alone is one point, unless explicit runs say which points there are
        grids = [] if spec.get("runs") else [{}]
    if isinstance(grids, dict):
        grids = [grids]
    if not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
        raise SweepError(f"{path}: field 'grid' must be a mapping of dotted keys to lists (or a list of such mappings)")
    runs: list[RunSpec] = []
    points: list[RunSpec] = []  # the grid's points (a search's points)
    for gi, grid in enumerate(grids):
        where = "grid" if len(grids) == 1 else f"grid[{gi}]"
        grid = _canon(grid, path, where)
        for k, v in grid.items():
            if isinstance(v, list) and not v:
                raise SweepError(f"{path}: {where}.{k}: empty list (a grid axis needs at least one value)")
        keys = list(grid)
        for values in itertools.product(*(_as_list(grid[k]) for k in keys)) if keys else [()]:
            point = dict(zip(keys, values))
            runs.append(_spec(path, sub, configs, {**base, **point, **extra}, point, where))
            points.append(runs[-1])
    extras = spec.get("runs") or []
    if not isinstance(extras, list):
        raise SweepError(f"{path}: field 'runs' must be a list of mappings")
    for i, run in enumerate(extras):
        if not isinstance(run, dict):
            raise SweepError(f"{path}: runs[{i}] must be a mapping")
        run = dict(run)
        s = run.pop("subcommand", sub)
        run_name = run.pop("name", None)
        if run_name is not None and (not isinstance(run_name, str) or not re.fullmatch(r"[\w.-]+", run_name)
                                     or run_name.startswith("..") or run_name == "."):
            raise SweepError(f"{path}: runs[{i}].name: {run_name!r} is not a name (letters, digits, _ . -)")
        run = _canon(run, path, f"runs[{i}]")
        runs.append(_spec(path, s, configs, {**base, **run, **extra}, run, f"runs[{i}]"))
        runs[-1].name = run_name
    runs = _link_stages(path, runs)
    _read_points(path, runs)
    seen: dict[str, int] = {}
    for i, r in enumerate(runs):
        if r.run_id in seen:
            raise SweepError(f"{path}: points {seen[r.run_id] + 1} and {i + 1} of the sweep are the same run ({r.label} / {runs[seen[r.run_id]].label})")
        seen[r.run_id] = i
    name = str(spec.get("name", path.stem))
    search = None
    if "search" in spec:
        from ftbench.sweep.search import parse_search

        search = parse_search(path, spec["search"], points, {id(r): i for i, r in enumerate(runs)})
    return Sweep(name=name, out=out or str(spec.get("out", f"results/{path.stem}")), runs=runs, path=str(path),
                 search=search)


def resolve_value(path: Path, v: Any) -> Any:
    """A value as a point holds it: a YAML path relative to the sweep file's folder made a path from
    here (as :func:`_spec` makes it); any other value coerced as the grid's are."""
    v = _coerce(v)
    if _is_yaml_path(v) and not Path(v).is_absolute() and (path.parent / v).exists():
        return os.path.normpath(path.parent / v)
    return v


def _spec(path: Path, sub: str, configs: list[str], overrides: dict[str, Any], label: dict[str, Any], where: str) -> RunSpec:
    if sub not in SUBCOMMANDS:
        raise SweepError(f"{path}: {where}: subcommand {sub!r} is not one of {', '.join(SUBCOMMANDS)}")
    root = path.parent
    fixed = {}
    for k, v in overrides.items():
        if _is_file_list(v):
            v = [os.path.normpath(root / x) if not Path(x).is_absolute() and (root / x).exists() else x for x in v]
            missing = [x for x in v if not Path(x).exists()]
            if missing:
                raise SweepError(f"{path}: {where}: {k}: no such file {missing[0]} (relative paths are from the sweep file's folder)")
        elif _is_yaml_path(v) and not Path(v).is_absolute() and (root / v).exists():
            v = os.path.normpath(root / v)
        elif _is_yaml_path(v) and not Path(v).exists():
            raise SweepError(f"{path}: {where}: {k}: no such file {v} (relative paths are from the sweep file's folder)")
        fixed[k] = v
    return RunSpec(sub, list(configs), fixed, {k: fixed.get(k, v) for k, v in label.items()}, str(root))


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (0 <= I < N) or ``auto`` (from a SLURM job array: ``SLURM_ARRAY_TASK_ID`` minus
    ``SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``)."""
    if text == "auto":
        try:
            task = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            return task, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError) as err:
            raise SweepError("--shard auto needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (a SLURM job array)") from err
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise SweepError(f"--shard {text!r}: expected I/N with 0 <= I < N (e.g. 0/4 .. 3/4) or auto")
    return int(m.group(1)), int(m.group(2))


def shard(runs: list[RunSpec], index: int, count: int) -> list[RunSpec]:
    """The ``index``-th of ``count`` disjoint parts: every ``count``-th run of the sweep's order,
    starting at ``index`` (deterministic, balanced to within one run; together the whole grid)."""
    return [r for i, r in enumerate(runs) if i % count == index]
