"""Feature cards: what a feature of a finding is, for a reader who has only its id.

For every feature in a jailbroken prompt's minimal set, the shared set or a dormant list:
where it fires most in a corpus of the run's own prompt sets and clean replies (token by
token), which tokens its decoder row promotes and suppresses through the unembedding, and
its activation over the prompt it was found on. Written to cards.json (CardsRecord) at the
end of a run; the report shows them, with the Neuronpedia link where the SAE has one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import cast

import torch
from pydantic import Field

from refusal.context import Context
from refusal.features import Feature
from refusal.records import ControlsRecord, FeatureField, Model, PromptResult
from refusal.tracking import neuronpedia_ids, neuronpedia_url

SAVED = "cards.json"
N_CONTEXTS = 5  # top-activating contexts per card
N_TOKENS = 8  # promoted and suppressed tokens per card
BEFORE, AFTER = 12, 4  # tokens of context either side of the top activation


class Snippet(Model):
    """Tokens and the feature's activation on each (special tokens and padding: 0)."""

    source: str  # which corpus document: "eval 3 (reply)", "harmless_train 17", ...
    tokens: list[str]
    acts: list[float]

    @property
    def peak(self) -> float:
        return max(self.acts, default=0.0)


class FeatureCard(Model):
    feature: FeatureField
    roles: list[str]  # "M of prompt 3", "shared set", "dormant, prompt 5"
    neuronpedia: str = ""
    promoted: list[tuple[str, float]] = Field(default_factory=list)  # token, logit weight
    suppressed: list[tuple[str, float]] = Field(default_factory=list)
    contexts: list[Snippet] = Field(default_factory=list)  # highest peak first
    on_prompt: Snippet | None = None  # the prompt it was found on, clean


class CardsRecord(Model):
    """cards.json: the run's feature cards, and what their contexts were drawn from."""

    corpus: dict[str, int]  # source -> documents
    cards: list[FeatureCard]


def roles(results: list[PromptResult], checks: ControlsRecord | None) -> dict[Feature, list[str]]:
    """Each feature of a finding, with where it was found (first prompt first)."""
    found: dict[Feature, list[str]] = {}
    for r in results:
        for f in r.minimal:
            found.setdefault(f, []).append(f"M of prompt {r.prompt_id}")
        for d in r.dormant_features:
            found.setdefault(d.feature, []).append(f"dormant, prompt {r.prompt_id}")
    for f in checks.shared.features if checks and checks.shared else []:
        found.setdefault(f, []).append("shared set")
    return found


def home_prompt(feature: Feature, results: list[PromptResult]) -> int | None:
    """The first prompt whose finding holds the feature."""
    for r in results:
        if feature in r.minimal or feature in {d.feature for d in r.dormant_features}:
            return r.prompt_id
    return None


def corpus(ctx: Context, results: list[PromptResult]) -> Iterator[tuple[str, str]]:
    """(source, chat-formatted text): the run's prompt sets, and each evaluation prompt
    with its clean reply (so contexts show replies too)."""
    lm = ctx.lm
    for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val"):
        for i, text in enumerate(lm.format(getattr(ctx.prompts, name))):
            yield f"{name} {i}", text
    for r in results:
        yield f"eval {r.prompt_id}", lm.format([r.instruction])[0]
        yield f"eval {r.prompt_id} (reply)", lm.format([r.instruction])[0] + r.baseline.reply


@torch.no_grad()
def activations(
    ctx: Context, texts: list[str], features: list[Feature]
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Per text: its token ids and the features' activations (T, n_features), read clean;
    special tokens (the SAEs never saw them) read 0."""
    layers = sorted({f.layer for f in features})
    special = torch.tensor(sorted(ctx.lm.tokenizer.all_special_ids))
    for ids, mask, residuals in ctx.forwards.residuals(texts, layers):
        acts = torch.zeros(*ids.shape, len(features))
        for layer, h in residuals.items():
            latents = ctx.engine.saes[layer].encode(h).float().cpu()
            for j, f in enumerate(features):
                if f.layer == layer:
                    acts[..., j] = latents[..., f.latent]
        acts[torch.isin(ids, special) | (mask == 0)] = 0.0
        for row in range(len(ids)):
            n = int(mask[row].sum())
            yield ids[row, :n].tolist(), acts[row, :n]


def piece(ctx: Context, token_id: int) -> str:
    """One token's text."""
    return cast(str, ctx.lm.tokenizer.decode([token_id]))


def snippet(ctx: Context, source: str, ids: list[int], acts: torch.Tensor) -> Snippet:
    """The window around the peak activation."""
    peak = int(acts.argmax())
    lo, hi = max(0, peak - BEFORE), min(len(ids), peak + AFTER + 1)
    tokens = [piece(ctx, t) for t in ids[lo:hi]]
    return Snippet(source=source, tokens=tokens, acts=[round(a, 3) for a in acts[lo:hi].tolist()])


def logit_lens(ctx: Context, feature: Feature) -> tuple[list, list]:
    """The tokens the decoder row promotes and suppresses, read as a final residual."""
    row = ctx.engine.saes[feature.layer].W_dec[feature.latent]
    logits = ctx.lm.next_token_logits(row.to(ctx.lm.dtype)[None]).float()[0]

    def listed(values: torch.Tensor, idx: torch.Tensor) -> list[tuple[str, float]]:
        return [(piece(ctx, int(i)), round(float(v), 3)) for v, i in zip(values, idx)]

    return listed(*logits.topk(N_TOKENS)), listed(*logits.topk(N_TOKENS, largest=False))


def build(ctx: Context, results: list[PromptResult], checks: ControlsRecord | None) -> CardsRecord:
    """A card for every feature of a finding (none without findings)."""
    found = roles(results, checks)
    features = list(found)
    docs = list(corpus(ctx, results)) if features else []
    contexts, own = read_corpus(ctx, docs, features, results)
    ids = neuronpedia_ids(ctx.cfg)
    cards = []
    for f in features:
        promoted, suppressed = logit_lens(ctx, f)
        cards.append(
            FeatureCard(
                feature=f,
                roles=found[f],
                neuronpedia=neuronpedia_url(ids.get(f.layer), f),
                promoted=promoted,
                suppressed=suppressed,
                contexts=contexts[f],
                on_prompt=own.get(f),
            )
        )
    counts = Counter(
        source.split()[0] + (" (reply)" * source.endswith("(reply)")) for source, _ in docs
    )
    return CardsRecord(corpus=dict(counts), cards=cards)


def read_corpus(
    ctx: Context, docs: list[tuple[str, str]], features: list[Feature], results: list[PromptResult]
) -> tuple[dict[Feature, list[Snippet]], dict[Feature, Snippet]]:
    """Each feature's top contexts in the corpus, and its activation over its own prompt."""
    top: dict[Feature, list[Snippet]] = {f: [] for f in features}
    own: dict[Feature, Snippet] = {}
    homes = {f: f"eval {home_prompt(f, results)}" for f in features}
    texts = [text for _, text in docs]
    for (source, _), (ids, acts) in zip(docs, activations(ctx, texts, features)):
        for j, f in enumerate(features):
            if acts[:, j].max() > 0:
                found = snippet(ctx, source, ids, acts[:, j])
                if all(s.tokens != found.tokens for s in top[f]):  # a shared template, once
                    top[f] = sorted([*top[f], found], key=peak)[:N_CONTEXTS]
            if source == homes[f]:
                tokens = [piece(ctx, t) for t in ids]
                own[f] = Snippet(source=source, tokens=tokens, acts=acts[:, j].tolist())
    return top, own


def peak(s: Snippet) -> float:
    return -s.peak  # highest first
