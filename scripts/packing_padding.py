"""The padding fraction of a data config's training batches without and with ``data.packing`` (no
training): the record's ``data.packing.padding`` for the first epoch, printed as a small table.

    python scripts/packing_padding.py                                   # the quickstart's data and backbone
    python scripts/packing_padding.py configs/data/preference.yaml --backbone configs/backbone/embedded.yaml
"""

from __future__ import annotations

import argparse
import importlib
import json

import yaml

from ftbench.backbone import Backbone


def data_module(data_config: str, backbone: Backbone):
    """The data module a ``--data`` YAML names, with packing on (the record gives both paddings)."""
    spec = yaml.safe_load(open(data_config))
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(backbone=backbone, **{**spec.get("init_args", {}), "packing": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default="configs/data/instruction.yaml")
    parser.add_argument("--backbone", default="configs/backbone/embedded.yaml")
    parser.add_argument("--json", action="store_true", help="print the record's packing entry as JSON")
    args = parser.parse_args()
    backbone = Backbone(**yaml.safe_load(open(args.backbone)))
    dm = data_module(args.data, backbone)
    dm.setup("fit")
    record = dm.packing_record()
    if args.json:
        print(json.dumps(record, indent=1))
        return
    print(f"{args.data} (batch_size {dm.batch_size}, max_length {dm.max_length}, "
          f"{len(dm.splits['train'])} training items, first epoch)")
    for name, pad in record["padding"].items():
        print(f"  {name:9s} real tokens {pad['tokens']:7d}  padded slots {pad['padded']:7d}  padding fraction {pad['fraction']:.4f}")


if __name__ == "__main__":
    main()
