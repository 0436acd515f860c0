"""The refusal direction (difference of means), its selection, and candidate SAE features.

r[layer, pos] = mean(h | harmful) − mean(h | harmless) at the post-instruction token
positions (the chat-template tokens between the instruction and the reply). The
(position, layer) is chosen as in Arditi et al. 2024: ablating r everywhere should
stop refusal on harmful prompts (bypass score, lower is better), adding r at its layer
should induce refusal on harmless prompts (induce score), and ablating r should barely
change harmless first-token distributions (KL); the last 20% of layers are excluded.
Where no candidate passes both filters the selection says so and falls back (RULES), or
stops, as Arditi et al. do. As they do, the prompts are first filtered by the model's
own baseline: harmful ones kept only where it refuses them, harmless ones only where it
does not.

The candidate SAE features are the latents whose decoder rows lie nearest the selected
direction, at every SAE layer (or, per_layer, each layer's own difference of means).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from rich.console import Console
from sae_lens import SAE
from tqdm import tqdm

from refusal.errors import ConfigError, DataError
from refusal.features import Feature
from refusal.forwards import Forwards
from refusal.interventions import direction_ablation, direction_addition
from refusal.judge import refusal_score
from refusal.models import LM
from refusal.records import DirectionRecord, DirectionScore, PromptCount

console = Console(stderr=True)
# What admits a (layer, position), strictest first: both of Arditi et al.'s filters, then
# the fallbacks where none passes both (the induce filter first: the direction must carry
# refusal), the last admitting every candidate.
RULES = ("induce and KL", "induce only", "KL only", "bypass only")


def post_instruction_positions(lm: LM) -> list[int]:
    """Negative offsets of the template tokens that follow the user's instruction."""
    marker = "XQZX"
    ids = lm.tokenizer(lm.format([marker])[0], add_special_tokens=False)["input_ids"]
    marker_ids = lm.tokenizer(marker, add_special_tokens=False)["input_ids"]
    for end in range(len(ids), 0, -1):
        if ids[end - len(marker_ids) : end] == marker_ids:
            return list(range(end - len(ids), 0))
    raise ValueError("the chat template does not contain the instruction verbatim")


def filter_by_baseline(
    forwards: Forwards, sets: dict[str, list[str]], threshold: float
) -> tuple[dict[str, list[str]], dict[str, PromptCount]]:
    """Each harmful_* set kept to the prompts the model refuses (first-token refusal score
    above `threshold`), each harmless_* set to those it does not; and the counts."""
    kept = {}
    for name, prompts in sets.items():
        harmful = name.startswith("harmful")
        refused = (forwards.refusal_scores(prompts) > threshold).tolist()
        kept[name] = [p for p, r in zip(prompts, refused) if r == harmful]
        if not kept[name]:
            raise DataError(
                f"the model {'refuses none' if harmful else 'refuses all'} of the "
                f"{len(prompts)} {name} prompts (first-token refusal score above "
                f"{threshold}), so the baseline filter leaves none to take the refusal "
                "direction from: check model.refusal_tokens and judge.threshold, or set "
                "search.direction.filter_prompts=false."
            )
    counts = {
        name: PromptCount(kept=len(kept[name]), dropped=len(sets[name]) - len(kept[name]))
        for name in sets
    }
    return kept, counts


def mean_diff(forwards: Forwards, harmful: list[str], harmless: list[str]) -> torch.Tensor:
    """Difference-of-means directions, shape (n_layers, n_positions, d_model)."""
    positions = post_instruction_positions(forwards.lm)
    means = forwards.residual_means
    return means(harmful, positions) - means(harmless, positions)


def first_token_kl(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ edited) of next-token distributions, per prompt."""
    clean, edited = clean_logits.float().log_softmax(-1), logits.float().log_softmax(-1)
    return (clean.exp() * (clean - edited)).sum(-1)


@dataclass
class Selection:
    layer: int
    position: int  # negative offset from the end of the prompt
    direction: torch.Tensor  # (d_model,), unnormalised difference of means
    scores: list[DirectionScore]  # every candidate's induce, bypass and KL where read
    chosen_by: str  # the rule (RULES) that admitted it: both filters, or a fallback
    # prompts kept and dropped per set by the baseline filter; empty: not filtered
    prompts: dict[str, PromptCount] = field(default_factory=dict)

    @property
    def admissible(self) -> bool:
        """Whether it passed both filters, as Arditi et al. require."""
        return self.chosen_by == RULES[0]

    def record(self) -> DirectionRecord:
        return DirectionRecord(
            layer=self.layer,
            position=self.position,
            admissible=self.admissible,
            chosen_by=self.chosen_by,
            prompts=self.prompts,
            scores=self.scores,
        )

    @classmethod
    def of(cls, record: DirectionRecord, direction: torch.Tensor) -> Selection:
        return cls(
            record.layer,
            record.position,
            direction,
            record.scores,
            record.chosen_by,
            record.prompts,
        )


def select(
    forwards: Forwards,
    directions: torch.Tensor,
    harmful_val: list[str],
    harmless_val: list[str],
    exclude_last_fraction: float = 0.2,
    kl_max: float = 0.1,
    induce_min: float = 0.0,
    n_positions: int | None = None,
    on_none_admissible: str = "warn",
    score_all: bool = False,
) -> Selection:
    """Choose (position, layer) by bypass score among candidates passing the KL and induce
    filters; where none passes both, warn and fall back (RULES), or raise a ConfigError
    (on_none_admissible="error").

    n_positions limits the search to the last n post-instruction positions (None: all).
    The induce score is read for every candidate first (cheap: r is added at its own layer,
    above a checkpoint of the clean pass); bypass and KL need a full ablated pass, so they
    are read only where the induce filter passes, unless none does or `score_all`. Every
    rule in RULES chooses the same candidate either way: with an induce-passing candidate,
    the admitted ones are among those; without one, every candidate is scored.
    """
    n_layers, all_positions, _ = directions.shape
    positions = post_instruction_positions(forwards.lm)
    first = all_positions - min(n_positions or all_positions, all_positions)
    max_layer = int(n_layers * (1 - exclude_last_fraction))
    grid = [(layer, p) for p in range(first, all_positions) for layer in range(max_layer)]
    induce = _induce_scores(forwards, directions, harmless_val, grid)
    passing = [c for c, score in zip(grid, induce) if score > induce_min]
    read = grid if score_all or not passing else passing
    ablated = _ablation_scores(forwards, directions, harmful_val, harmless_val, read)
    scores = [
        DirectionScore(layer=layer, position=positions[p], induce=i, **ablated.get((layer, p), {}))
        for (layer, p), i in zip(grid, induce)
    ]
    rule, admitted = _admissible(scores, kl_max, induce_min)
    if rule != RULES[0]:
        _none_admissible(rule, kl_max, induce_min, on_none_admissible)
    best = min(admitted, key=lambda s: s.bypass if s.bypass is not None else math.inf)
    p = positions.index(best.position)
    return Selection(best.layer, best.position, directions[best.layer, p], scores, rule)


def _induce_scores(
    forwards: Forwards,
    directions: torch.Tensor,
    harmless_val: list[str],
    grid: list[tuple[int, int]],
) -> list[float]:
    """Each candidate's refusal score on harmless prompts with r added at its layer."""
    # r is added at its own layer: the blocks below it are the clean pass's, run once
    harmless = forwards.checkpoint(harmless_val)
    out = []
    for layer, p in tqdm(grid, desc="direction selection: induce", unit="candidate"):
        added = harmless.first_token_logits(layer, direction_addition(directions[layer, p], layer))
        out.append(refusal_score(added, forwards.refusal_ids).mean().item())
    return out


def _ablation_scores(
    forwards: Forwards,
    directions: torch.Tensor,
    harmful_val: list[str],
    harmless_val: list[str],
    grid: list[tuple[int, int]],
) -> dict[tuple[int, int], dict[str, float]]:
    """Bypass (harmful refusal score) and KL (harmless first token) with r ablated
    everywhere, for the candidates of `grid`."""
    clean_harmless = forwards.first_token_logits(harmless_val)
    out = {}
    for layer, p in tqdm(grid, desc="direction selection: bypass and KL", unit="candidate"):
        # one pass over both sets: the template's opening, ablated, runs once for both
        edit = direction_ablation(directions[layer, p])
        logits = forwards.first_token_logits(harmful_val + harmless_val, *edit)
        harmful, harmless = logits[: len(harmful_val)], logits[len(harmful_val) :]
        out[layer, p] = {
            "bypass": refusal_score(harmful, forwards.refusal_ids).mean().item(),
            "kl": first_token_kl(clean_harmless, harmless).mean().item(),
        }
    return out


def _admissible(
    scores: list[DirectionScore], kl_max: float, induce_min: float
) -> tuple[str, list[DirectionScore]]:
    """The strictest rule (RULES) that admits some candidate, and those it admits."""
    induces = [s for s in scores if s.induce > induce_min]
    gentle = [s for s in scores if s.kl is not None and s.kl < kl_max]
    both = [s for s in induces if s in gentle]
    return next((r, found) for r, found in zip(RULES, (both, induces, gentle, scores)) if found)


def _none_admissible(rule: str, kl_max: float, induce_min: float, action: str) -> None:
    """Say that no candidate passed both filters, and by which rule one was chosen instead;
    or stop there, as Arditi et al. do (action "error")."""
    found = (
        "no (layer, position) of the refusal direction passes both filters "
        f"(induce > {induce_min} and KL < {kl_max})"
    )
    if action == "error":
        raise ConfigError(
            f"{found}: relax search.direction.kl_max or induce_min, or set "
            f"search.direction.on_none_admissible=warn to choose by {rule}."
        )
    console.print(
        f"[yellow]{found}: chosen by {rule} instead (direction.json: admissible false)[/]",
        soft_wrap=True,  # one line, to grep logs for
    )


def candidate_directions(
    lm: LM, selection: Selection, directions: torch.Tensor, layers: Iterable[int], mode: str
) -> dict[int, torch.Tensor]:
    """The direction each SAE layer's decoder rows are ranked against: the selected one at
    every layer ("selected"), or that layer's own difference of means at the selected
    position ("per_layer")."""
    if mode == "selected":
        return dict.fromkeys(layers, selection.direction)
    p = post_instruction_positions(lm).index(selection.position)
    return {layer: directions[layer, p] for layer in layers}


def candidates(
    saes: dict[int, SAE],
    targets: dict[int, torch.Tensor],
    latents: dict[int, torch.Tensor],
    top_k: int,
    cos_floor: float,
    min_activation: float = 0.0,
) -> list[tuple[Feature, float]]:
    """Per SAE layer, the latents whose decoder rows are most aligned with that layer's
    target direction (candidate_directions), kept where active on the prompt.

    latents: the prompt's clean latents per layer, (positions, d_sae) each, at the positions
    an edit acts on (PromptProbe.latents).
    """
    found = []
    for layer, sae in saes.items():
        r = targets[layer].to(sae.W_dec)
        cos = torch.nn.functional.cosine_similarity(sae.W_dec, r.unsqueeze(0), dim=-1)
        active = latents[layer].max(0).values > min_activation
        cos = torch.where(active & (cos >= cos_floor), cos, torch.full_like(cos, -2.0))
        top = cos.topk(min(top_k, len(cos)))
        found += [
            (Feature(layer, int(i)), float(c)) for c, i in zip(top.values, top.indices) if c > -2.0
        ]
    return found
