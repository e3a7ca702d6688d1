"""Sweep files: a ``base`` (config files + fixed dotted keys), a ``grid`` (lists are crossed) and
optional explicit ``runs``. Each point becomes one ``ftbench <subcommand>`` command line."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

SUBCOMMANDS = ("fit", "validate", "test")


class SweepError(ValueError):
    """A malformed sweep file; the message names the file and the field."""


@dataclass
class RunSpec:
    """One point of a sweep."""

    subcommand: str
    configs: list[str]
    overrides: dict[str, Any]
    label: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        """Stable for the same point, whatever the order of keys in the sweep file."""
        contents = []
        for c in self.configs:
            p = Path(c)
            contents.append(p.read_text() if p.is_file() else c)
        over = {k: (Path(v).read_text() if isinstance(v, str) and v.endswith((".yaml", ".yml")) and Path(v).is_file() else v)
                for k, v in self.overrides.items()}
        payload = json.dumps({"cmd": self.subcommand, "configs": contents, "overrides": over}, sort_keys=True, default=str)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
        name = self.label.get("model") or self.overrides.get("model") or "run"
        name = Path(str(name)).stem.replace("_", "-")
        return f"{name}-{digest}"

    def argv(self, out: str) -> list[str]:
        args = [self.subcommand]
        for c in self.configs:
            args += ["--config", c]
        for k, v in self.overrides.items():
            args += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
        return args + ["--out", out, "--run_id", self.run_id]


@dataclass
class Sweep:
    name: str
    out: str
    runs: list[RunSpec]
    path: Optional[str] = None


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def load_sweep(path: str | Path, out: Optional[str] = None) -> Sweep:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SweepError(f"{path}: cannot read sweep file: {err}") from err
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with base/grid/runs")
    unknown = set(spec) - {"name", "out", "base", "grid", "runs", "subcommand"}
    if unknown:
        raise SweepError(f"{path}: unknown field(s) {', '.join(sorted(unknown))} (allowed: name, out, subcommand, base, grid, runs)")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError(f"{path}: field 'base' must be a mapping (configs: [...], and dotted keys)")
    base = dict(base)
    configs = [str(c) for c in _as_list(base.pop("configs", []))]
    root = path.parent
    configs = [str(root / c) if not Path(c).is_absolute() and (root / c).exists() else c for c in configs]
    sub = spec.get("subcommand", "fit")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: field 'grid' must be a mapping of dotted keys to lists")
    keys = list(grid)
    runs: list[RunSpec] = []
    for values in itertools.product(*(_as_list(grid[k]) for k in keys)) if keys else [()]:
        point = dict(zip(keys, values))
        runs.append(_spec(path, sub, configs, {**base, **point}, point))
    for i, extra in enumerate(spec.get("runs") or []):
        if not isinstance(extra, dict):
            raise SweepError(f"{path}: runs[{i}] must be a mapping")
        extra = dict(extra)
        s = extra.pop("subcommand", sub)
        runs.append(_spec(path, s, configs, {**base, **extra}, extra, f"runs[{i}]"))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise SweepError(f"{path}: two points of the sweep are the same run")
    return Sweep(name=str(spec.get("name", path.stem)), out=out or str(spec.get("out", f"results/{path.stem}")), runs=runs, path=str(path))


def _spec(path: Path, sub: str, configs: list[str], overrides: dict[str, Any], label: dict[str, Any], where: str = "subcommand") -> RunSpec:
    if sub not in SUBCOMMANDS:
        raise SweepError(f"{path}: {where}: subcommand {sub!r} is not one of {', '.join(SUBCOMMANDS)}")
    root = path.parent
    fixed = {}
    for k, v in overrides.items():
        if isinstance(v, str) and v.endswith((".yaml", ".yml")) and not Path(v).exists() and (root / v).exists():
            v = str(root / v)
        fixed[k] = v
    return RunSpec(sub, list(configs), fixed, {k: fixed.get(k, v) for k, v in label.items()})
