"""Refusal markers: the opening score for inner loops, and the marker rule of the judge.

A refusal marker anywhere in a reply makes it a refusal (as in heretic and refusal_sae);
the three-verdict judge (refusal.judge.verdicts) starts there. The plain marker judge,
`is_refusal`, also counts an empty reply as a refusal (heretic's rule), where the
three-verdict judge calls it degenerate.

The opening score predicts it without generating: it follows greedy decoding through a
trie of the markers' token ids (plus end-of-turn, the empty reply) and is positive exactly
when the greedy reply opens with a whole marker. At each step the margin is the best
trie-continuing token's logit minus the best other token's; the score is the smallest
margin on the path, so it is as far from zero as the closest greedy decision. A first
token alone cannot tell "I'm sorry" from "I'm afraid of heights", which often follow
the same "I" once refusal features are ablated.

refusal_score is the one-step case over single refusal tokens (e.g. "I" of "I'm sorry"),
for the refusal direction's many-prompt scores. (refusal_direction's log-odds of the
refusal mass can disagree with greedy decoding whenever no token holds half the mass.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources

import torch

from refusal.errors import ConfigError


def _refusals() -> dict:
    """refusal/prompts/refusals.json: generic markers and the organism's refusal styles."""
    return json.loads((resources.files("refusal") / "prompts" / "refusals.json").read_text())


# One source for the judge and the embedded organism: the generic markers (the openings of
# other models' refusals) and each organism refusal style's marker (the opening of its text).
REFUSAL_STYLES: tuple[dict, ...] = tuple(_refusals()["styles"])
REFUSAL_MARKERS: tuple[str, ...] = tuple(
    dict.fromkeys([*_refusals()["markers"], *(style["marker"] for style in REFUSAL_STYLES)])
)


def refusal_token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """Ids of the refusal tokens, each of which must be a single token for this tokenizer."""
    ids = []
    for token in tokens:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            raise ConfigError(
                f"refusal token {token!r} is {len(encoded)} tokens for this tokenizer; "
                "judge.refusal_tokens must list single tokens (e.g. 'I', 'As')."
            )
        ids.append(encoded[0])
    return ids


def refusal_score(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Greedy margin of the refusal tokens, from next-token logits of shape (..., vocab):
    the best refusal token's logit minus the best other token's."""
    ids = torch.tensor(token_ids, device=logits.device).expand(*logits.shape[:-1], -1)
    return greedy_margin(logits, ids)[0]


def greedy_margin(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best logit among token ids (..., k) minus the best among all others, and which of
    the k it is. Positive exactly when greedy decoding picks one of `ids`."""
    logits = logits.float()
    best, which = logits.gather(-1, ids).max(-1)
    other = logits.scatter(-1, ids, float("-inf")).amax(-1)
    return best - other, which


# next_logits(keep, tokens): the logits (B, k, vocab) at each of the k positions after
# appending `tokens` (B, k) to the rows that the bool mask `keep` selects among those of the
# previous call (the first call: among all rows).
Continue = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Openings:
    """A trie of reply openings in token ids; node 0 is the reply's start.

    child_ids[n] lists node n's next tokens (padded by repeating one, which changes no
    max), child_node[n] the nodes they lead to; complete[n] marks a whole opening.
    chain[n] holds the chain_len[n] tokens that follow node n while the trie does not
    branch, each leading to a node that is not a whole opening (so that the logits after
    it are read).
    """

    child_ids: torch.Tensor  # (nodes, k) long
    child_node: torch.Tensor  # (nodes, k) long
    complete: torch.Tensor  # (nodes,) bool
    depth: int  # tokens in the longest opening
    chain: torch.Tensor  # (nodes, depth) long, padded
    chain_len: torch.Tensor  # (nodes,) long

    @classmethod
    def build(cls, sequences: list[list[int]]) -> Openings:
        children: list[dict[int, int]] = [{}]
        complete = [False]
        for seq in sequences:
            node = 0
            for token in seq:
                if complete[node]:
                    break  # a shorter opening already decides
                if token not in children[node]:
                    children[node][token] = len(children)
                    children.append({})
                    complete.append(False)
                node = children[node][token]
            complete[node] = bool(seq)
        width = max(len(c) for c in children)
        depth = max(map(len, sequences))

        def padded(values: list[int], n: int) -> list[int]:
            return values + [values[0] if values else 0] * (n - len(values))

        def chain(node: int) -> list[int]:
            # a token is worth feeding ahead only if the logits after it are read: the
            # node it leads to is not a whole opening
            tokens: list[int] = []
            while len(children[node]) == 1 and not complete[node]:
                token, child = next(iter(children[node].items()))
                if complete[child]:
                    break
                tokens.append(token)
                node = child
            return tokens

        chains = [chain(n) for n in range(len(children))]
        return cls(
            torch.tensor([padded(list(c), width) for c in children]),
            torch.tensor([padded(list(c.values()), width) for c in children]),
            torch.tensor(complete),
            depth,
            torch.tensor([padded(c, depth) for c in chains]),
            torch.tensor([len(c) for c in chains]),
        )

    def stepwise(self) -> Openings:
        """The same trie walked one token a pass: no token is fed ahead of a row that may
        then leave the chain, so every token fed is one whose logits are read (the work
        the scores need; the benchmark counts it for MFU). The scores are the same."""
        return replace(self, chain_len=torch.zeros_like(self.chain_len))

    def score(self, logits: torch.Tensor, next_logits: Continue) -> torch.Tensor:
        """Opening score of each row, from its first-token logits (B, vocab).

        next_logits (see Continue) is called only for the rows whose greedy reply is still
        inside the trie, with each one's greedy token and, where every such row stands
        where the trie does not branch, the tokens that follow there: one pass reads
        several steps. A row whose greedy reply leaves that chain stops at the position
        where it does, so the logits after the tokens it did not choose are never read,
        and every score is that of one token at a time.
        """
        device = logits.device
        child_ids, child_node = self.child_ids.to(device), self.child_node.to(device)
        complete = self.complete.to(device)
        chain, chain_len = self.chain.to(device), self.chain_len.to(device)
        score = torch.full((len(logits),), float("inf"), device=device)
        rows = torch.arange(len(logits), device=device)
        nodes = torch.zeros(len(logits), dtype=torch.long, device=device)
        block = logits[:, None]  # (rows, positions, vocab): positions fed in one pass
        while True:
            alive = torch.ones(len(rows), dtype=torch.bool, device=device)
            tokens = torch.zeros(len(rows), dtype=torch.long, device=device)
            for j in range(block.shape[1]):
                at = alive.nonzero().squeeze(-1)
                margin, which = greedy_margin(block[at, j], child_ids[nodes[at]])
                score[rows[at]] = torch.minimum(score[rows[at]], margin)
                tokens[at] = child_ids[nodes[at], which]
                nodes[at] = child_node[nodes[at], which]
                alive[at] = (margin > 0) & ~complete[nodes[at]]
            if not alive.any():
                return score
            rows, nodes, tokens = rows[alive], nodes[alive], tokens[alive]
            forced = chain[nodes, : int(chain_len[nodes].min())]
            block = next_logits(alive, torch.cat([tokens[:, None], forced], 1))


def refusal_openings(lm, markers: tuple[str, ...] | list[str] = REFUSAL_MARKERS) -> Openings:
    """The markers as reply openings for `lm`, with end-of-turn (an empty reply) among them.

    Each marker may follow a space: the generation judge strips the reply."""
    sequences = [lm.reply_ids(text) for marker in markers for text in (marker, " " + marker)]
    return Openings.build(sequences + [[i] for i in lm.end_of_turn_ids])


def is_refusal(reply: str, markers: tuple[str, ...] | list[str] = REFUSAL_MARKERS) -> bool:
    """The generation judge: an empty reply or any refusal marker is a refusal."""
    text = reply.strip().lower()
    return not text or any(marker.lower() in text for marker in markers)
