"""Reference log-probabilities computed once and kept on disk (DPO's ``precompute_reference``).

Each preference pair is known by a **row key**: a hash of its token ids and labels (chosen and
rejected, real tokens only), so that a training step finds its rows' reference log-probs whatever
the shuffling, batch size or padding; rows with the same tokens share a key and a value.

A cache file holds, for every row of a data module's splits, the summed reference log-probs of the
chosen and the rejected completion (float32, as :func:`~ftbench.objectives.losses.sequence_logps`
returns them). Its name is a hash of everything the numbers depend on (:func:`cache_meta`):

* the backbone (its description: model, resolved folder, dtype, quantization, attention
  implementation, revision, ``init_from``; and for local folders, the model's and ``init_from``'s,
  the names, sizes and modification times of their weight files),
* the tuner (its class and label) and the hash of the initial trainable weights
  (:func:`weights_hash`; for full tuning that is every weight of the backbone, for LoRA the adapter's
  initial weights, which differ with the seed, so each seed computes its own file),
* the trainer's precision (autocast changes the numbers),
* the data fingerprint (:func:`data_fingerprint`: a hash of the sorted row keys).

The file is written atomically (:func:`ftbench.fileio.write_bytes_atomic`), and its ``meta`` is
checked on load, so a half-written, foreign or stale file is never read as a hit.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from ftbench.fileio import write_bytes_atomic

FORMAT = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def default_cache_dir() -> Path:
    """``$FTBENCH_CACHE/reference_logps`` (``~/.cache/ftbench/reference_logps``)."""
    from ftbench import gguf_cache

    return gguf_cache.default_cache_dir() / "reference_logps"


# ---------------------------------------------------------------------- keys
def _update(h, t: torch.Tensor) -> None:
    h.update(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())


def row_keys(batch: dict[str, Any]) -> list[str]:
    """One key per pair of a preference batch: a hash of the chosen and rejected token ids and labels
    at their real positions (the attention mask), so that padding and batch order do not change it."""
    keys = []
    for i in range(batch["chosen_input_ids"].shape[0]):
        h = hashlib.blake2b(digest_size=16)
        for side in ("chosen", "rejected"):
            real = batch[f"{side}_attention_mask"][i].bool()
            ids, labels = batch[f"{side}_input_ids"][i][real], batch[f"{side}_labels"][i][real]
            h.update(side.encode())
            h.update(len(ids).to_bytes(8, "little"))
            _update(h, ids)
            _update(h, labels)
        keys.append(h.hexdigest())
    return keys


def data_fingerprint(keys: Iterable[str]) -> str:
    """A hash of the set of row keys (order-free)."""
    h = hashlib.sha256()
    for k in sorted(set(keys)):
        h.update(k.encode())
    return h.hexdigest()


def weights_hash(model: torch.nn.Module, trainable_only: bool = True) -> str:
    """A hash of the (trainable) parameters' names, dtypes, shapes and bytes. On SmolLM2-135M in
    float32, all weights (full tuning): about 1.2 s on one CPU core."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if trainable_only and not p.requires_grad:
            continue
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)}|".encode())
        h.update(p.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weight_files(folder: Optional[str]) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of the weight files under a local folder; [] for a hub id or None."""
    path = Path(folder) if folder else None
    if path is None or not path.is_dir():
        return []
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")
                  if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def cache_meta(backbone, tuner, initial_weights: str, precision: str, fingerprint: str) -> dict[str, Any]:
    """Everything the reference log-probs depend on (the cache file's name is its hash)."""
    described = backbone.describe()
    return {
        "format": FORMAT,
        "backbone": {**described, "revision": getattr(backbone, "revision", None),
                     "files": weight_files(described.get("resolved")),
                     # an earlier run's saved weights applied on load (a pipeline's stage): rerunning it changes them
                     "init_from_files": weight_files(getattr(backbone, "init_from", None))},
        # not its learning rate: a learning-rate sweep shares one file
        "tuner": {"class": f"{type(tuner).__module__}.{type(tuner).__qualname__}", "name": tuner.name,
                  "initial_trainable_weights": initial_weights},
        "precision": precision,
        "data": fingerprint,
    }


def cache_path(cache_dir: str | Path, meta: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return Path(cache_dir) / f"{digest}.pt"


# ---------------------------------------------------------------------- the table
class ReferenceTable:
    """Row key -> (reference chosen, reference rejected) summed log-probs."""

    def __init__(self, keys: Sequence[str], chosen: torch.Tensor, rejected: torch.Tensor,
                 meta: Optional[dict[str, Any]] = None, seconds: Optional[float] = None):
        if not (len(keys) == chosen.numel() == rejected.numel()):
            raise ValueError(f"reference table: {len(keys)} keys for {chosen.numel()}/{rejected.numel()} values")
        self.keys = list(keys)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.chosen = chosen.detach().to("cpu", torch.float32).reshape(-1)
        self.rejected = rejected.detach().to("cpu", torch.float32).reshape(-1)
        self.meta = meta or {}
        self.seconds = seconds

    def __len__(self) -> int:
        return len(self.keys)

    def covers(self, keys: Iterable[str]) -> bool:
        return all(k in self.index for k in keys)

    def lookup(self, keys: Sequence[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise KeyError(f"precompute_reference: {len(missing)} of {len(keys)} pairs of this batch have no reference "
                           "log-probs (their tokens differ from every pair of the pass made before training: the "
                           "data changed after it?)")
        idx = torch.tensor([self.index[k] for k in keys], dtype=torch.long)
        return self.chosen[idx].to(device), self.rejected[idx].to(device)

    # -- disk
    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "meta": self.meta, "seconds": self.seconds, "keys": self.keys,
                    "chosen": self.chosen, "rejected": self.rejected}, buf)
        write_bytes_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, meta: dict[str, Any]) -> Optional["ReferenceTable"]:
        """The table in ``path`` if it exists and was made for exactly ``meta``, else None."""
        path = Path(path)
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a foreign or damaged file: recompute (and overwrite it atomically)
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return None
        if json.dumps(data.get("meta"), sort_keys=True, default=str) != json.dumps(meta, sort_keys=True, default=str):
            return None
        return cls(data["keys"], data["chosen"], data["rejected"], data["meta"], data.get("seconds"))
