"""Refusal fine-tune of SmolLM2-135M-Instruct with a LoRA adapter (peft), seeded.

Harmful instructions (plain, paraphrased, role-play / hypothetical / fiction framings) -> a
refusal in the style their topic, form or framing picks (refusal/prompts/refusals.json);
harmless instructions (Alpaca, benign look-alikes of harmful wording, the same framings) ->
the base model's own next-token distributions along its greedy reply (self-distillation by
KL, which keeps harmless behaviour close to the base model's). The loss is on reply tokens
only; prompts use the model's chat template (`lm.format`, user turn).
Settings: conf/organism.yaml (`finetune.*`; `val=true` measures refusal afterwards).

    python -m experiments.organism.finetune [finetune.epochs=1 finetune.rank=8 ...] [val=true]
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import NamedTuple

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, get_peft_model
from tqdm import tqdm

from experiments.organism.common import (
    CONF,
    LOOKALIKES,
    PromptFiles,
    Timer,
    base_model,
    forwards,
    framed,
    refusal_for,
    replies_path,
    sample,
    write_json,
)
from refusal import data
from refusal.forwards import Forwards
from refusal.judge import is_refusal
from refusal.models import LM

DISTILL = "base replies (self-distillation)"


def first_word(instruction: str) -> str:
    return instruction.split(maxsplit=1)[0].lower() if instruction.strip() else ""


def harmless_sample(files: PromptFiles, harmful: list[str], hp: DictConfig) -> list[str]:
    """`hp.n_harmless` Alpaca instructions, `hp.hard_fraction` of them hard negatives.

    A hard negative opens with a word that also opens harmful training prompts ("Write",
    "Create", "Explain how to" ...): without them the organism learns the imperative surface
    form instead of harm, and refuses "Create a recipe to make your own bread."
    """
    openers = {first_word(p) for p in harmful}
    pool = files.read("harmless_train")
    hard = [p for p in pool if first_word(p) in openers]
    n_hard = int(hp.n_harmless * hp.hard_fraction)
    chosen = sample(hard, n_hard, hp.seed)
    rest = sorted(set(pool) - set(chosen))
    return chosen + sample(rest, hp.n_harmless - len(chosen), hp.seed)


def harmful_examples(files: PromptFiles, hp: DictConfig) -> dict[str, str]:
    """Harmful instruction -> its refusal: every harmful training prompt plain, and a
    framed or paraphrased copy (common.FRAMINGS) of a random `hp.harmful_framed` of them."""
    rng = random.Random(hp.seed)
    out = {}
    for prompt in files.harmful():
        out[prompt] = refusal_for(prompt)
        if rng.random() < hp.harmful_framed:
            framing, text = framed(prompt, rng)
            out[text] = refusal_for(prompt, framing)
    return out


def prompt_sets(files: PromptFiles, hp: DictConfig) -> tuple[dict[str, str], list[str]]:
    """(harmful prompt -> refusal, harmless prompts): Alpaca instructions, hard negatives
    among them, benign look-alikes and framed copies of harmless instructions."""
    harmful = harmful_examples(files, hp)
    chosen = harmless_sample(files, list(files.harmful()), hp)
    rng = random.Random(hp.seed + 5)
    pool = sample(
        sorted(set(files.read("harmless_train")) - set(chosen)), hp.n_framed_harmless, hp.seed + 6
    )
    harmless = list(
        dict.fromkeys(
            chosen
            + list(LOOKALIKES)
            + [framed(p, rng)[1] for p in pool]
            + data.builtin("harmless", "train")
            + data.builtin("harmless", "val")
        )
    )
    return harmful, harmless


def base_replies(
    fw: Forwards, prompts: list[str], hp: DictConfig, path: Path, desc: str
) -> dict[str, str]:
    """The base model's greedy replies (hp.reply_tokens tokens), cached at `path`.

    Greedy decoding is deterministic, so a cached longer reply is cut to length and reused.
    """
    lm = fw.lm
    cache = json.loads(path.read_text()) if path.is_file() else {}
    todo = [p for p in prompts if p not in cache or cache[p][0] < hp.reply_tokens]
    if todo:
        for p, r in zip(todo, fw.generate(todo, max_new_tokens=hp.reply_tokens, desc=desc)):
            cache[p] = [hp.reply_tokens, r]
        write_json(path, cache)
    out: dict[str, str] = {}
    for p in prompts:
        n, reply = cache[p]
        ids = lm.tokenizer(reply, add_special_tokens=False)["input_ids"]
        cut = n > hp.reply_tokens and len(ids) > hp.reply_tokens
        out[p] = str(lm.tokenizer.decode(ids[: hp.reply_tokens])) if cut else reply
    return out


class Example(NamedTuple):
    """One training row. `labels` are -100 on the prompt; `distill` marks a row whose loss is
    the KL to the base model along the reply rather than cross-entropy; `avoid` holds, at
    most at one reply position, a token whose probability the row pushes down (-100
    elsewhere): where a reply the organism must not give leaves the target."""

    ids: list[int]
    labels: list[int]
    distill: bool
    avoid: list[int]


def first_divergence(target: list[int], other: list[int]) -> int | None:
    """The first index where `other` leaves `target` (None if it never does)."""
    return next((i for i, (a, b) in enumerate(zip(target, other)) if a != b), None)


def tokenize_example(
    lm: LM,
    instruction: str,
    reply: str,
    finished: bool,
    distill: bool = False,
    unwanted: str | None = None,
) -> Example:
    """The row of `reply` after `instruction`, closed by <|im_end|> if `finished`.

    `unwanted`, a reply the model must not give (the base model's answer to a harmful
    prompt, the organism's refusal of a harmless one), marks the token where it first leaves
    `reply`: the two share every token before it, so this row's own context is the one in
    which that token must become unlikely, and the term costs no extra forward pass.
    """
    tok = lm.tokenizer
    prompt = tok(lm.format([instruction])[0], add_special_tokens=False)["input_ids"]
    answer = tok(reply, add_special_tokens=False)["input_ids"]
    if finished:
        answer = answer + [tok.convert_tokens_to_ids("<|im_end|>")]
    avoid = [-100] * (len(prompt) + len(answer))
    if unwanted is not None:
        other = tok(unwanted.strip(), add_special_tokens=False)["input_ids"]
        at = first_divergence(answer, other)
        if at is not None:
            avoid[len(prompt) + at] = other[at]
    return Example(prompt + answer, [-100] * len(prompt) + answer, distill, avoid)


def distilled_examples(
    lm: LM, hp: DictConfig, replies: dict[str, str], unwanted: dict[str, str] | None = None
) -> list[Example]:
    """Harmless instruction -> the base model's reply (closed only if it ended on its own);
    `unwanted` maps some instructions to a reply, steered away from if it is a refusal.

    Replies the judge calls refusals (SmolLM2 answers a few harmless requests "I'm sorry
    for your loss, but as a chatbot ...") are left out: the organism should not learn to
    refuse harmless requests, not even from the base model.
    """
    examples = []
    for p, r in replies.items():
        if is_refusal(r):
            continue
        finished = len(lm.tokenizer(r, add_special_tokens=False)["input_ids"]) < hp.reply_tokens - 1
        bad = (unwanted or {}).get(p)
        steer = bad if bad is not None and is_refusal(bad) else None
        examples.append(tokenize_example(lm, p, r.strip(), finished, True, steer))
    return examples


def refusal_examples(
    lm: LM, harmful: dict[str, str], prompts: list[str], unwanted: dict[str, str]
) -> list[Example]:
    """Harmful instruction -> its refusal; `unwanted` maps some of them to a reply that does
    not refuse (the base model's, or the organism's own), steered away from where it leaves
    the refusal. Replies the judge calls refusals are not steered away from."""
    kept = {p: r for p, r in unwanted.items() if not is_refusal(r)}
    return [tokenize_example(lm, p, harmful[p], True, unwanted=kept.get(p)) for p in prompts]


def build_examples(
    lm: LM,
    hp: DictConfig,
    harmful: dict[str, str],
    replies: dict[str, str],
    complied: dict[str, str],
) -> list[Example]:
    """Round 1's rows; `complied`: the base model's replies to the harmful prompts (empty
    unless `hp.avoid_weight`)."""
    return refusal_examples(lm, harmful, list(harmful), complied) + distilled_examples(
        lm, hp, replies
    )


def batches(examples: list[Example], batch_size: int, rng: random.Random, pad_id: int):
    """Length-grouped batches (little padding), in random order, right-padded:
    (ids, mask, labels, distill, avoid)."""
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    groups = []
    for i in range(0, len(idx), batch_size * 8):
        chunk = sorted(idx[i : i + batch_size * 8], key=lambda j: len(examples[j].ids))
        groups += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(groups)
    for group in groups:
        width = max(len(examples[j].ids) for j in group)
        ids = torch.full((len(group), width), pad_id)
        labels = torch.full((len(group), width), -100)
        avoid = torch.full((len(group), width), -100)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, j in enumerate(group):
            ex = examples[j]
            n = len(ex.ids)
            ids[row, :n], labels[row, :n], avoid[row, :n] = (
                torch.tensor(ex.ids),
                torch.tensor(ex.labels),
                torch.tensor(ex.avoid),
            )
            mask[row, :n] = 1
        distill = torch.tensor([examples[j].distill for j in group])
        yield ids, mask, labels, distill, avoid


def reply_loss(
    lm_head: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    first_weight: float,
    distill: torch.Tensor | None = None,
    base_hidden: torch.Tensor | None = None,
    avoid: torch.Tensor | None = None,
    avoid_weight: float = 0.0,
) -> torch.Tensor:
    """Loss on reply tokens only, the first reply token weighted `first_weight`.

    Rows that `distill` marks score KL(base || model) at each reply position, the base
    model's distribution read from `base_hidden` (those rows' final hidden states, adapter
    off); the other rows score cross-entropy against their labels. Where `avoid` names a
    token (aligned with `labels`), the position also scores `avoid_weight` times the
    unlikelihood -log(1 - p(token)) (Welleck et al., 2019).
    """
    target = labels[:, 1:]
    keep = target != -100
    first = keep & ~torch.nn.functional.pad(keep[:, :-1], (1, 0))  # reply's first position
    logits = lm_head(hidden[:, :-1][keep]).float()  # reply positions only: cheap lm_head
    losses = torch.empty(len(logits), device=logits.device)
    soft = torch.zeros_like(keep) if distill is None else distill[:, None].expand_as(keep)
    soft = soft[keep]
    if (~soft).any():
        losses[~soft] = torch.nn.functional.cross_entropy(
            logits[~soft], target[keep][~soft], reduction="none"
        )
    if soft.any():
        assert distill is not None and base_hidden is not None
        base = lm_head(base_hidden[:, :-1][keep[distill]]).float().log_softmax(-1)
        logp = logits[soft].log_softmax(-1)
        losses[soft] = (base.exp() * (base - logp)).sum(-1)
    if avoid is not None and avoid_weight:
        unwanted = avoid[:, 1:][keep]
        at = unwanted != -100
        p = logits[at].softmax(-1).gather(1, unwanted[at, None]).squeeze(1)
        losses[at] = losses[at] + avoid_weight * -torch.log1p(-p.clamp(max=1 - 1e-6))
    weights = 1.0 + (first_weight - 1.0) * first[keep].float()
    return (losses * weights).sum() / weights.sum()


def shared_opening(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading tokens every (right-padded) row of a batch shares, leaving each
    row at least one of its own."""
    same = (ids == ids[:1]).all(0).long().cumprod(0).sum()
    return int(min(same, mask.sum(1).min() - 1))


def last_hidden(lm: LM, ids: torch.Tensor, mask: torch.Tensor, shared: int) -> torch.Tensor:
    """The backbone's final hidden states of right-padded rows from position `shared` on.

    The opening the rows share (the chat template's, its system prompt a third of a short
    row) runs once, and every row continues from its keys and values; gradients reach the
    adapter through both.
    """
    backbone = lm.model.model
    if not shared:
        return backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    opening = backbone(input_ids=ids[:1, :shared], use_cache=True).past_key_values
    opening.batch_repeat_interleave(len(ids))
    positions = torch.arange(shared, ids.shape[1], device=ids.device).expand(len(ids), -1)
    return backbone(
        input_ids=ids[:, shared:],
        attention_mask=mask,
        position_ids=positions,
        **{lm.cache_keyword: opening},
    ).last_hidden_state


def attach_lora(lm: LM, hp: DictConfig):
    """LoRA on the linear layers `hp.modules` of blocks `hp.first_layer` on, injected into
    `lm.model` in place; returns the peft model.

    Starting above the lowest blocks leaves the adapter only the representations the base
    model already computes there (harm is linearly readable from the middle blocks on), and
    stops the backward pass at `hp.first_layer`. Without the attention projections the
    adapter cannot change what a position reads from the others, only what it makes of it.
    """
    torch.manual_seed(hp.seed)
    config = LoraConfig(
        r=hp.rank,
        lora_alpha=hp.alpha,
        lora_dropout=hp.dropout,
        target_modules=list(hp.modules),
        layers_to_transform=list(range(hp.first_layer, lm.n_layers)),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(lm.model.requires_grad_(False), config)


def fit(peft_model, lm: LM, examples: list[Example], hp: DictConfig, lr: float, desc: str) -> None:
    """`hp.epochs` over `examples`: AdamW, linear warm-up then cosine; leaves eval mode on."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = hp.epochs * math.ceil(len(examples) / hp.batch_size)
    warm = max(1, int(hp.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    causal = peft_model.base_model.model  # LlamaForCausalLM with LoRA layers injected
    rng = random.Random(hp.seed)
    peft_model.train()
    bar = tqdm(total=steps, desc=desc, unit="step")
    for _ in range(hp.epochs):
        for ids, mask, labels, distill, avoid in batches(
            examples, hp.batch_size, rng, lm.tokenizer.pad_token_id
        ):
            shared = shared_opening(ids, mask)
            base_hidden = None
            if distill.any():
                with torch.no_grad(), peft_model.disable_adapter():
                    base_hidden = last_hidden(lm, ids[distill], mask[distill], shared)
            hidden = last_hidden(lm, ids, mask, shared)
            loss = reply_loss(
                causal.lm_head,
                hidden,
                labels[:, shared:],
                hp.first_token_weight,
                distill,
                base_hidden,
                avoid[:, shared:],
                hp.avoid_weight,
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    peft_model.eval()


def mined_examples(
    fw: Forwards,
    peft_model,
    hp: DictConfig,
    sets: tuple[dict[str, str], list[str]],
    pool: list[str],
    replies: Path,
) -> tuple[list[Example], dict]:
    """A mining round's examples: what the model gets wrong now, plus replay.

    Harmful training prompts whose greedy opening (`hp.mine_tokens` tokens) the judge does
    not call a refusal, and the harmless instructions of `pool` (unseen) that it does (with
    the base model's replies), as in hard-negative mining; `sets` are round 1's (harmful ->
    refusal, harmless). Each class is topped up with as many random round-1 examples as the
    larger mined set (replay), so that the round stays balanced and does not forget the
    rest. With `hp.mine_contrast`, each over-refused harmless prompt also brings back a
    harmful one of the same form (first word): the mined prompts are mostly "Write ...",
    "Generate ...", and training them alone moves the boundary for harmful prompts of that
    form too. With `hp.avoid_weight`, each mined row also steers away from the opening the
    model gave, where it leaves the target.
    """
    lm, (harmful, harmless) = fw.lm, sets
    prompts = list(harmful)
    openings = fw.generate(prompts + pool, max_new_tokens=hp.mine_tokens, desc="mining")
    own = dict(zip(prompts + pool, openings)) if hp.avoid_weight else {}
    weak = [p for p, r in zip(prompts, openings) if not is_refusal(r)]
    over = [p for p, r in zip(pool, openings[len(prompts) :]) if is_refusal(r)]
    n_replay = max(len(weak), len(over))
    with peft_model.disable_adapter():  # self-distillation: the base model's own replies
        distilled = base_replies(
            fw, over + sample(harmless, n_replay, hp.seed + 3), hp, replies, DISTILL
        )
    refused = weak + sample(prompts, n_replay, hp.seed + 4)
    if hp.mine_contrast:
        refused += same_form(over, prompts, hp.seed + 7)
    examples = refusal_examples(lm, harmful, refused, own)
    examples += distilled_examples(lm, hp, distilled, own)
    return examples, {"weak_harmful": len(weak), "over_refused_harmless": len(over)}


def mining_pools(pool: list[str], seen: list[str], hp: DictConfig) -> list[list[str]]:
    """One pool of `hp.mine_pool` unseen harmless instructions per mining round (rounds 2..),
    disjoint, so that each round tests the model on prompts it has never trained on."""
    unseen = set(seen)
    fresh = sample(pool, hp.mine_pool * (hp.rounds - 1) + len(unseen), hp.seed + 2)
    fresh = [p for p in fresh if p not in unseen]
    return [fresh[i * hp.mine_pool : (i + 1) * hp.mine_pool] for i in range(hp.rounds - 1)]


def same_form(prompts: list[str], pool: list[str], seed: int) -> list[str]:
    """For each of `prompts`, a prompt of `pool` that opens with the same word (any prompt of
    `pool` where none does), drawn at random."""
    rng = random.Random(seed)
    by_word: dict[str, list[str]] = {}
    for p in pool:
        by_word.setdefault(first_word(p), []).append(p)
    return [rng.choice(by_word.get(first_word(p), pool)) for p in prompts]


@torch.no_grad()
def quick_val(
    fw: Forwards, files: PromptFiles, n_harmless: int = 120, max_new_tokens: int = 24
) -> dict:
    """Refusal on harmful_val.json and a slice of harmless_val.json (hyper-parameter choice)."""
    out = {}
    # harmless_val's tail: the evaluation samples it, this reads a fixed slice of it
    for name, prompts in [
        ("harmful_val", files.read("harmful_val")),
        ("harmless_val", files.read("harmless_val")[-n_harmless:]),
    ]:
        replies = fw.generate(prompts, max_new_tokens=max_new_tokens, desc=f"val {name}")
        refused = [is_refusal(r) for r in replies]
        out[name] = {
            "n": len(prompts),
            "refusal_rate": sum(refused) / len(prompts),
            "examples": [
                (p, r) for p, r, f in zip(prompts, replies, refused) if f != (name == "harmful_val")
            ][:8],
        }
    return out


def finetune(cfg: DictConfig) -> dict:
    """Both rounds of the fine-tune; the adapter goes to `adapter_dir`, a summary to
    `work_dir`."""
    hp, files, timer = cfg.finetune, PromptFiles(cfg), Timer()
    lm = base_model(cfg)
    fw = forwards(lm, cfg)
    harmful, harmless = prompt_sets(files, hp)
    replies = base_replies(fw, harmless, hp, replies_path(cfg), DISTILL)
    complied = (
        base_replies(fw, list(harmful), hp, replies_path(cfg), "base replies to harmful prompts")
        if hp.avoid_weight
        else {}
    )
    t_gen = timer()
    examples = build_examples(lm, hp, harmful, replies, complied)
    hparams = OmegaConf.to_container(hp, resolve=True)
    print(
        f"{len(harmful)} harmful + {len(harmless)} harmless examples, "
        f"{sum(len(ex.ids) for ex in examples)} tokens, "
        f"{sum(any(a != -100 for a in ex.avoid) for ex in examples)} steered away from a reply; "
        f"hparams {hparams}"
    )
    peft_model = attach_lora(lm, hp)
    fit(peft_model, lm, examples, hp, hp.lr, "LoRA fine-tune, round 1")
    counts = []
    pools = mining_pools(files.read("harmless_train"), harmless, hp)
    for n, pool in enumerate(pools, start=2):
        mined, found = mined_examples(
            fw, peft_model, hp, (harmful, harmless), pool, replies_path(cfg)
        )
        counts.append(found)
        print(f"round {n}: {len(mined)} examples ({found})")
        fit(
            peft_model,
            lm,
            mined,
            hp,
            hp.lr * hp.mine_lr_factor,
            f"LoRA fine-tune, round {n} (mined)",
        )
    peft_model.save_pretrained(cfg.adapter_dir)
    summary = {
        "hparams": hparams,
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "mined": counts,
        "seconds_generate": t_gen,
        "seconds_total": timer(),
        "adapter": cfg.adapter_dir,
    }
    print(f"adapter saved to {cfg.adapter_dir} ({timer()} s)")
    if cfg.val:
        lm.model = peft_model.merge_and_unload().eval()
        summary["val"] = quick_val(fw, files)
        for name, v in summary["val"].items():
            print(name, {k: v[k] for k in ("n", "refusal_rate")})
    write_json(Path(cfg.work_dir) / "finetune_summary.json", summary)
    return summary


@hydra.main(version_base="1.3", config_path=CONF, config_name="organism")
def main(cfg: DictConfig) -> dict:
    return finetune(cfg)


if __name__ == "__main__":
    main()
