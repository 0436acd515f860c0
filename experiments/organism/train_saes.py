"""SAEs on the organism's residual stream, trained with sae-lens's own multi-SAE runner.

One LLM forward pass feeds every layer's SAE (`MultiSAETrainingRunner`); the HF model is
wrapped in sae-lens's `HookedProxyLM`, so hook `model.layers.L` is the output of block L
(= resid_post of layer L, the project's layer convention). Architecture: BatchTopK during
training, saved by sae-lens as a JumpReLU SAE (each latent depends on its own encoder
row only: the ablation engine's fast sparse path). Activations are normalised to an
expected norm of sqrt(d_in) during training; sae-lens folds that factor into the saved
weights, so inference needs no runtime normalisation. Special tokens (<|im_start|>,
<|im_end|>: position 0 of every context, the huge-norm attention sinks) are excluded.

Corpus, so that latents are not all about refusal: general chat (harmless instructions with
the base model's replies, which the organism is distilled to keep), harmful instructions
(plain and framed) with the organism's refusals, further harmless instructions (prompt
only), and plain text that is not chat: the prose of Python's own reference documentation
(`pydoc_data.topics`, in the standard library, so offline) and harmless instructions
written out as plain text.

The organism's forward pass is the whole CPU cost, so the runner's own activations store
is read once (`cache_tokens`, forward stopped after the last hooked block) and the runner
then trains for `steps` batches drawn, reshuffled each epoch, from that in-memory cache.

Settings: conf/organism.yaml (`saes.*`, the layers of `layer=organism`).

    python -m experiments.organism.train_saes [saes.cache_tokens=120000 saes.steps=1500 ...]
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import hydra
import torch
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf
from sae_lens import SAE, BatchTopKTrainingSAEConfig, LoggingConfig
from sae_lens.load_model import HookedProxyLM
from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig

from experiments.organism.common import (
    CONF,
    PromptFiles,
    Timer,
    replies_path,
    sample,
)
from experiments.organism.finetune import harmful_examples
from refusal import models
from refusal.models import LM


def hook_name(layer: int) -> str:
    return f"model.layers.{layer}"


def plain_text(files: PromptFiles, hp: DictConfig) -> list[str]:
    """Text that is not a chat: paragraphs of Python's reference documentation (the standard
    library's pydoc_data), and harmless instructions run together as plain prose."""
    from pydoc_data.topics import topics

    paragraphs = [
        " ".join(p.split())
        for doc in topics.values()
        for p in doc.split("\n\n")
        if len(p.split()) >= 12
    ]
    docs = [" ".join(paragraphs[i : i + 4]) for i in range(0, len(paragraphs), 4)]
    docs = sample(docs, hp.n_plain_docs, hp.seed + 3)
    instructions = sample(files.read("harmless_train"), hp.n_plain_instructions, hp.seed + 2)
    docs += [" ".join(instructions[i : i + 8]) for i in range(0, len(instructions), 8)]
    return docs


def corpus(lm: LM, cfg: DictConfig, files: PromptFiles, cached: Path) -> dict[str, list[str]]:
    """The corpus by part: chat-formatted prompt + reply texts, prompt-only harmless
    instructions, and plain text.

    `cached`: the base model's replies that finetune.py cached (prompt -> [n_tokens, reply]).
    """
    hp = cfg.saes
    if not cached.is_file():
        raise FileNotFoundError(f"{cached} is missing: run experiments.organism.finetune first.")
    replies = {p: r for p, (_, r) in json.loads(cached.read_text()).items()}
    end = "<|im_end|>\n"
    harmful = harmful_examples(files, cfg.finetune)
    seen = set(replies)
    extra = [
        p
        for p in sample(files.read("harmless_train"), hp.n_extra_harmless + len(seen), hp.seed + 1)
        if p not in seen
    ][: hp.n_extra_harmless]
    return {
        "harmful_chat": [lm.format([p])[0] + r + end for p, r in harmful.items()],
        "harmless_chat": [lm.format([p])[0] + r.strip() + end for p, r in replies.items()],
        "harmless_prompts": lm.format(extra),
        "plain_text": plain_text(files, hp),
    }


def cache_activations(runner: MultiSAETrainingRunner, hp: DictConfig) -> dict[str, torch.Tensor]:
    """Read `cache_tokens` activations per hook from the runner's own store (one LLM pass)."""
    loader = runner.activations_store.get_multi_hook_data_loader()
    batches = [next(loader) for _ in range(hp.cache_tokens // hp.batch_tokens)]
    return {hook: torch.cat([b[hook] for b in batches]) for hook in batches[0]}


def epochs(
    cache: dict[str, torch.Tensor], batch_tokens: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches over the cache, in a new seeded order each epoch (same rows per hook)."""
    gen = torch.Generator().manual_seed(seed)
    n = next(iter(cache.values())).shape[0]
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_tokens + 1, batch_tokens):
            idx = order[start : start + batch_tokens]
            yield {hook: acts[idx] for hook, acts in cache.items()}


def truncated(lm: LM, n_layers: int) -> LM:
    """Drop the blocks after the last hooked one: their output is never read while caching."""
    lm.model.model.layers = lm.model.model.layers[:n_layers]
    return lm


def train(cfg: DictConfig) -> dict[int, Path]:
    """An SAE per layer of `layers` on `model=` (base + the fine-tune's adapter, merged),
    saved under `sae_dir`."""
    hp, layers, out_dir, timer = cfg.saes, list(cfg.layers), Path(cfg.sae_dir), Timer()
    torch.manual_seed(hp.seed)
    lm = truncated(models.load(cfg.model), max(layers) + 1)
    parts = corpus(lm, cfg, PromptFiles(cfg), replies_path(cfg))
    counts = {
        name: sum(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        for name, texts in parts.items()
    }
    print("corpus tokens by part:", counts)
    texts = [t for part in parts.values() for t in part]
    random.Random(hp.seed).shuffle(texts)
    n_tokens = sum(counts.values())
    if n_tokens < hp.cache_tokens:
        raise ValueError(
            f"corpus has {n_tokens} tokens < cache_tokens={hp.cache_tokens}: "
            "raise n_extra_harmless or lower cache_tokens (the store would repeat texts)."
        )
    print(f"corpus: {len(texts)} texts, {n_tokens} tokens; caching {hp.cache_tokens} tokens")
    hooks = {f"layer_{layer}": hook_name(layer) for layer in layers}
    model = HookedProxyLM(lm.model, lm.tokenizer, hook_names=list(hooks.values()))
    saes = {
        name: BatchTopKTrainingSAEConfig(
            d_in=lm.d_model,
            d_sae=hp.width,
            k=hp.k,
            aux_loss_coefficient=hp.aux_coefficient,
            normalize_activations="expected_average_only_in",
            dtype="float32",
            device="cpu",
        )
        for name in hooks
    }
    run_dir = Path(cfg.work_dir) / "sae_run"
    cfg = MultiSAETrainingRunnerConfig(
        saes=saes,
        hook_names=hooks,
        model_name="SmolLM2-135M-Instruct+refusal-adapter",
        model_class_name="AutoModelForCausalLM",
        dataset_path="organism-chat-corpus",
        streaming=False,
        context_size=hp.context,
        prepend_bos=True,
        sequence_separator_token=None,  # every context opens with <|im_start|>
        exclude_special_tokens=True,
        training_tokens=hp.steps * hp.batch_tokens,
        train_batch_size_tokens=hp.batch_tokens,
        store_batch_size_prompts=8,
        n_batches_in_buffer=16,
        n_batches_for_norm_estimate=16,
        lr=hp.lr,
        lr_warm_up_steps=hp.warm_up,
        lr_scheduler_name="cosineannealing",
        lr_decay_steps=0,
        lr_end=hp.lr / 10,
        dead_feature_window=hp.dead_window,
        feature_sampling_window=500,
        n_eval_batches=1,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=10**9),
        device="cpu",
        seed=hp.seed,
        dtype="float32",
        checkpoint_path=None,
        output_path=str(run_dir),
    )
    runner = MultiSAETrainingRunner(
        cfg, override_dataset=Dataset.from_dict({"text": texts}), override_model=model
    )
    cache = cache_activations(runner, hp)
    print(f"cached {hp.cache_tokens} tokens x {len(cache)} hooks ({timer()} s)")
    runner.activations_store.get_multi_hook_data_loader = lambda: epochs(
        cache, hp.batch_tokens, hp.seed
    )
    runner.run()
    written = {}
    for layer in layers:
        sae = SAE.load_from_disk(str(run_dir / f"layer_{layer}"), device="cpu")
        sae = sae.to(dtype=getattr(torch, hp.save_dtype))
        sae.cfg.dtype = hp.save_dtype
        target = out_dir / f"layer_{layer}"
        if target.exists():
            shutil.rmtree(target)
        sae.save_model(str(target))
        written[layer] = target
    (out_dir / "train_config.json").write_text(
        json.dumps(
            {
                **cast(dict, OmegaConf.to_container(hp, resolve=True)),
                "layers": layers,
                "corpus_tokens": counts,
                "seconds": timer(),
            },
            indent=1,
        )
    )
    print(f"SAEs saved to {out_dir} ({timer()} s)")
    return written


@hydra.main(version_base="1.3", config_path=CONF, config_name="organism")
def main(cfg: DictConfig) -> dict[int, Path]:
    return train(cfg)


if __name__ == "__main__":
    main()
