"""What ``ftbench estimate`` is given, made into objects: optimizer names and YAMLs, tuner and
objective configs (as ``ftbench fit`` takes them, or a shipped config's name), memory sizes."""

from __future__ import annotations

import argparse
import functools
import importlib
import re
from pathlib import Path
from typing import Any, Callable

from ftbench.errors import EstimateError

ROOT = Path(__file__).resolve().parent.parent.parent
OPTIMIZERS = {
    "adamw": ("torch.optim.AdamW", {"lr": 1e-3, "weight_decay": 0.0}),
    "adamw8bit": ("bitsandbytes.optim.AdamW8bit", {"lr": 1e-3, "weight_decay": 0.0}),
    "paged_adamw8bit": ("bitsandbytes.optim.PagedAdamW8bit", {"lr": 1e-3, "weight_decay": 0.0}),
    "sgd": ("torch.optim.SGD", {"lr": 1e-3}),
    "sgd_momentum": ("torch.optim.SGD", {"lr": 1e-3, "momentum": 0.9}),
}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def optimizer_factory(name_or_factory: Any) -> Callable:
    """An optimizer factory from a short name (``adamw``, ``adamw8bit``, ``paged_adamw8bit``, ``sgd``,
    ``sgd_momentum``, or a shipped config's: ``galore``, ``badam``, ``muon``, ...), a ``class_path`` YAML
    (``configs/optim/*.yaml``), or a callable."""
    if callable(name_or_factory):
        return name_or_factory
    spec = str(name_or_factory)
    shipped = ROOT / "configs" / "optim" / f"{spec}.yaml"
    if spec in OPTIMIZERS:
        class_path, init_args = OPTIMIZERS[spec]
    else:
        cfg = load_yaml(str(shipped) if shipped.is_file() and not Path(spec).is_file() else spec, "--optimizer")
        if "class_path" not in cfg:
            raise EstimateError(f"estimate: --optimizer {spec}: no class_path in it (or a name: {', '.join(OPTIMIZERS)})")
        class_path, init_args = cfg["class_path"], cfg.get("init_args") or {}
    module, _, cls = class_path.rpartition(".")
    return functools.partial(getattr(importlib.import_module(module), cls), **init_args)


def load_yaml(path: str, option: str = "estimate") -> dict[str, Any]:
    """A YAML mapping from ``path`` (``option`` names where it was given, for the error)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise EstimateError(f"estimate: {option}: no such file {path!r}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise EstimateError(f"estimate: {option}: {path} is not a YAML mapping")
    return data


def config_file(kind: str, spec: str) -> Path:
    """The YAML ``--{kind} spec`` names: a file, or a shipped config's name (``lora`` ->
    ``configs/<kind>/lora.yaml``)."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = ROOT / "configs" / kind / f"{spec}.yaml"
    if not shipped.is_file():
        names = sorted(p.stem for p in (ROOT / "configs" / kind).glob("*.yaml"))
        raise EstimateError(f"estimate: --{kind} {spec!r} is neither a file nor a shipped config ({', '.join(names)})")
    return shipped


def instantiate_config(kind: str, spec: str, base: type):
    """A tuner or objective from a config YAML (``class_path`` + ``init_args``, as ``ftbench fit``
    takes it) or a shipped config's name (see :func:`config_file`)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument(f"--{kind}", type=base)
    cfg = parser.parse_object({kind: load_yaml(str(config_file(kind, spec)), f"--{kind}")})
    return getattr(parser.instantiate_classes(cfg), kind)


def parse_bytes(text: str) -> int:
    """``24GiB``, ``24 GB``, ``80e9``, ``1024`` -> bytes (GiB = 2**30, GB = 10**9)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 24GiB, 80GB, 16e9)")
    try:
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    except ValueError:  # "1e", "1.2.3"
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 24GiB, 80GB, 16e9)") from None
