"""``ftbench estimate ...``: the command line (options, the crossing of backbones, quantizations and
tuners, the printed table and the JSON file). Every setting that cannot work ends the command with
one line, ``ftbench: error: ...``, and exit status 2; a method that fails on a good setting leaves the
other rows and makes the status 1."""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ftbench.bench.memory import SHARDED_PARTS
from ftbench.errors import EstimateError, FTBenchError
from ftbench.estimate.meta import reward_runs_on_meta, sized_config
from ftbench.estimate.options import OPTIMIZERS, config_file, instantiate_config, load_yaml, optimizer_factory, parse_bytes
from ftbench.estimate.run import PRECISIONS, check_sharding, estimate
from ftbench.estimate.table import flat_settings, row_labels, table

#: the numeric options and the least value each takes
POSITIVE = {"batch_size": 1, "seq_len": 1, "gpu_memory": 1, "world_size": 1}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one :class:`EstimateError` line (argparse prints usage and exits)."""

    def error(self, message: str):
        raise EstimateError(f"estimate: {message}")


def _bool(text: str) -> bool:
    if str(text).lower() in ("1", "true", "yes", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="ftbench estimate",
        description="Memory of a training step (weights, gradients, optimizer state, activations) for any "
                    "model from its config alone: no weights read, no GPU.")
    ap.add_argument("--backbone", action="append", default=None, metavar="FILE.yaml",
                    help="backbone config as ftbench fit takes it (repeatable: one row set per backbone)")
    ap.add_argument("--model", help="shortcut for backbone.model: a folder with config.json, a cached hub id, "
                                    "a .gguf file, or 'embedded'")
    ap.add_argument("--tuner", action="append", default=None, metavar="FILE.yaml|NAME",
                    help="tuner config (class_path + init_args) or a shipped one's name (configs/tuner/NAME.yaml); "
                         "repeatable (default: full and lora)")
    ap.add_argument("--objective", default=None, metavar="FILE.yaml|NAME", help="objective config (default: sft)")
    ap.add_argument("--quantization", nargs="+", default=None, choices=["none", "nf4", "fp4", "int8"],
                    help="backbone quantization(s); several cross with the tuners (a tuner that trains the "
                         "backbone's own weights is skipped on a quantized one: it cannot train)")
    ap.add_argument("--double_quant", type=_bool, default=None)
    ap.add_argument("--prepare_kbit", type=_bool, default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--compute_dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--attn_implementation", default=None)
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--seq_len", type=int, default=512, help="tokens per row (every one real and trained)")
    ap.add_argument("--precision", default="bf16-mixed", choices=sorted(PRECISIONS),
                    help="trainer precision: 32-true (fp32), bf16-mixed (autocast), bf16-true")
    ap.add_argument("--optimizer", default="adamw",
                    help=f"{', '.join(OPTIMIZERS)}, or an optimizer YAML (configs/optim/*.yaml)")
    ap.add_argument("--gradient_checkpointing", type=_bool, default=None)
    ap.add_argument("--liger_kernel", type=_bool, default=None,
                    help="SFT's loss as Liger's fused linear cross-entropy: the logits a chunk of rows at a time")
    ap.add_argument("--gpu_memory", type=parse_bytes, default=None,
                    help="e.g. 24GiB: also print the largest batch size whose predicted peak fits")
    ap.add_argument("--strategy", default="ddp", choices=list(SHARDED_PARTS),
                    help="how --world_size processes hold the model: ddp (a full replica each), zero1 (optimizer "
                         "state split), zero2 (gradients too), zero3 and fsdp (FULL_SHARD: weights too)")
    ap.add_argument("--world_size", type=int, default=1,
                    help="processes training one model: the table is one rank's share (--batch_size per rank)")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the breakdowns as JSON")
    return ap


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option at least its least value (:data:`POSITIVE`)."""
    for name, least in POSITIVE.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise EstimateError(f"estimate: --{name} must be >= {least}, got {value}")


def _backbone(args, spec: Optional[str]):
    from ftbench.backbone import Backbone

    values: dict[str, Any] = load_yaml(spec, "--backbone") if spec else {}
    if "init_args" in values:  # a class_path form
        values = values["init_args"] or {}
    for key in ("model", "dtype", "double_quant", "prepare_kbit", "compute_dtype", "attn_implementation",
                "liger_kernel"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    try:
        return Backbone(**values)
    except TypeError as err:  # an unknown key in the YAML
        raise EstimateError(f"estimate: --backbone {spec}: {err}") from err


def _tuner(spec: str):
    """The tuner ``--tuner spec`` names, its settings (flattened ``init_args``) and the file's name."""
    from ftbench.tuners.base import Tuner

    path = config_file("tuner", spec)
    try:
        tuner = instantiate_config("tuner", spec, Tuner)
    except FTBenchError:
        raise
    except Exception as err:  # noqa: BLE001 - jsonargparse's errors: a config that does not parse
        raise EstimateError(f"estimate: --tuner {spec}: {str(err).splitlines()[0]}") from err
    return tuner, flat_settings(load_yaml(str(path), "--tuner").get("init_args") or {}), path.stem


def main(argv: Optional[list[str]] = None) -> int:
    """``ftbench estimate ...``; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait for the network: configs come from disk
    try:
        args = build_parser().parse_args(argv)
        check_numbers(args)
        optimizer_factory(args.optimizer)
        backbones = [_backbone(args, spec) for spec in (args.backbone or [None])]
        for backbone in backbones:
            sized_config(backbone)  # the fields that size it are there and the size is a real model's
        tuners = [_tuner(spec) for spec in (args.tuner or ["full", "lora"])]
        if args.objective:
            config_file("objective", args.objective)
        for backbone in backbones:
            for quant in args.quantization or [backbone.quantization]:
                check_sharding(args.strategy, args.world_size, quant)
    except FTBenchError as err:
        # the one line ftbench.cli.report_error prints for every known error
        print(f"ftbench: error: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = crossed_rows(args, backbones, tuners)
    first = next((r for r in rows if "settings" in r), None)
    if first:
        s = first["settings"]
        print(f"model {s['model']}: batch {s['batch_size']} x {s['seq_len']} tokens, precision {s['precision']}, "
              f"dtype {s['dtype']}, optimizer {s['optimizer']}, gradient checkpointing "
              f"{'on' if s['gradient_checkpointing'] else 'off'}"
              f"{', fused linear cross-entropy (Liger)' if s.get('liger_kernel') else ''}; GiB = 2^30 bytes; "
              "total = predicted peak")
        if args.world_size > 1:
            split = ", ".join(SHARDED_PARTS[args.strategy]) or "nothing"
            print(f"one rank of {args.world_size} under {args.strategy}: {split} split {args.world_size} ways "
                  f"(batch {s['batch_size']} per rank)")
    print(table(rows))
    if args.gpu_memory is not None:
        print(f"max batch: the largest batch size (x {args.seq_len} tokens) whose predicted peak fits in "
              f"{args.gpu_memory / 2**30:.2f} GiB (CUDA context and allocator slack not included)")
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.json:
        from ftbench.bench.record import write_json_atomic

        write_json_atomic(args.json, {"rows": rows})
    return 1 if any("error" in r for r in rows) else 0


def crossed_rows(args: argparse.Namespace, backbones: list, tuners: list[tuple]) -> list[dict[str, Any]]:
    """One row per backbone x quantization x tuner (a tuner that cannot train a quantized backbone
    is left out there), labelled apart (:func:`~ftbench.estimate.table.row_labels`)."""
    from ftbench.naming import method_label
    from ftbench.objectives.base import Objective

    objective_name = Path(args.objective).stem if args.objective else "sft"
    rows: list[dict[str, Any]] = []
    settings: list[dict[str, Any]] = []
    files: list[str] = []
    for backbone in backbones:
        for quant in args.quantization or [backbone.quantization]:
            bb = copy.copy(backbone)
            bb.quantization = quant
            if quant not in ("nf4", "fp4"):
                bb.double_quant = False  # a 4-bit setting: crossed with int8 or none it does not apply
            for tuner, tuner_settings, file in tuners:
                if quant != "none" and tuner.trains_backbone_weights:
                    continue  # quantized weights take no gradient: it cannot train there
                label = method_label(objective_name, getattr(tuner, "name", "tuner"), quant)
                tuner = copy.deepcopy(tuner)
                objective = None
                try:
                    if args.objective:
                        with reward_runs_on_meta(bb):  # PPO's reward run need not exist to be estimated
                            objective = instantiate_config("objective", args.objective, Objective)
                        objective.backbone, objective.tuner = bb, tuner
                        objective.optimizer_factory = optimizer_factory(args.optimizer)
                    r = estimate(bb, tuner, objective, batch_size=args.batch_size, seq_len=args.seq_len,
                                 precision=args.precision, optimizer=args.optimizer,
                                 gradient_checkpointing=args.gradient_checkpointing, gpu_memory=args.gpu_memory,
                                 strategy=args.strategy, world_size=args.world_size)
                except Exception as err:  # noqa: BLE001 - one method failing leaves the others' rows
                    r = {"method": label, "error": f"{type(err).__name__}: {err}"}
                rows.append(r)
                settings.append(tuner_settings)
                files.append(file)
    for r, label in zip(rows, row_labels([r["method"] for r in rows], settings, files)):
        r["label"] = label
    return rows
