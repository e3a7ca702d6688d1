"""Random weights for a model folder that has only a ``config.json`` (``backbone.random_init: true``).

Memory and speed do not need pretrained weights: a model built from its config with transformers'
``from_config`` takes the same memory and the same time a step as the pretrained one. The weights
are drawn once per (config, dtype) with a fixed seed (:data:`SEED`, on the CPU's generator, so the
same on every machine), saved as safetensors into ftbench's cache
(``{cache}/random/{digest}``) and from then on loaded as any model folder is
(:meth:`ftbench.backbone.Backbone.load_model`): quantization, the score head, the attention
implementation and ``init_from`` take the one loading path a pretrained model takes. The global
random generator is left as it was (the run's seed still drives LoRA's initialisation, dropout and
the data order).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ftbench.errors import BackboneError

#: the seed of every random-initialised model's weights
SEED = 0
MANIFEST = "ftbench-random-init.json"
#: files a folder's tokenizer is read from (any one of them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_weights(folder: str | Path) -> bool:
    """Whether a model folder holds safetensors weights (one file, or shards with their index)."""
    return any(Path(folder).glob("*.safetensors"))


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def read_config(folder: str | Path, trust_remote_code: bool = False):
    """The folder's ``config.json`` as transformers reads it; a :class:`BackboneError` naming the folder."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise BackboneError(f"backbone.model: cannot read the config of {str(folder)!r}: {err}") from err


def folder_for(config_folder: str | Path, dtype: torch.dtype, cache_dir: Optional[str | Path] = None) -> Path:
    """Where the random weights of ``config_folder`` in ``dtype`` live (built or not): a digest of the
    config file's bytes, the dtype and the seed."""
    from ftbench.gguf_cache import default_cache_dir

    text = (Path(config_folder) / "config.json").read_bytes()
    digest = hashlib.sha256(text + f"|{dtype}|seed={SEED}".encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / "random" / f"{Path(config_folder).resolve().name}-{digest}"


def _valid(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return all((folder / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def random_weights(config_folder: str | Path, dtype: torch.dtype, cache_dir: Optional[str | Path] = None,
                   trust_remote_code: bool = False) -> Path:
    """A folder with ``config_folder``'s config and random weights in ``dtype`` (built once, atomically:
    a temporary folder renamed into place, manifest last, as :mod:`ftbench.gguf_cache` does)."""
    from transformers import AutoModelForCausalLM

    config = read_config(config_folder, trust_remote_code)
    final = folder_for(config_folder, dtype, cache_dir)
    if _valid(final):
        return final
    shutil.rmtree(final, ignore_errors=True)  # interrupted or corrupted: never half-use it
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        with torch.random.fork_rng(devices=[]):  # the run's own generator state is left alone
            torch.manual_seed(SEED)
            try:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as err:  # an architecture transformers does not know
                raise BackboneError(f"backbone.model: cannot build a model from the config of "
                                    f"{str(config_folder)!r}: {err}") from err
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"config": str(Path(config_folder).resolve().name), "seed": SEED,
                                                "dtype": str(dtype), "files": files}, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; use its copy
            if not _valid(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
