"""Each search stage against a synthetic oracle with planted ground truth (seconds)."""

import torch

from refusal.features import Feature
from refusal.judge import verdict
from refusal.stages import dormant, greedy

FEATURES = [Feature(1, i) for i in range(6)] + [Feature(2, i) for i in range(6)]


class Oracle:
    """A probe whose refusal score is a planted function of which features are ablated."""

    def __init__(self, fn, latents=None):
        self.fn, self._latents, self.calls = fn, latents, 0

    def score(self, features, masks):
        self.calls += 1
        return torch.tensor(
            [self.fn({f for f, m in zip(features, row) if m}) for row in masks.tolist()]
        )

    def latents(self, features=None, mask=None):
        ablated = (
            set(features or [])
            if mask is None
            else {f for f, m in zip(features, mask.flatten()) if m}
        )
        return self._latents(ablated)


def test_greedy_recovers_planted_minimal_set():
    planted = {FEATURES[1], FEATURES[4], FEATURES[8]}
    # refusal breaks only when all three planted features are ablated; others nudge slightly
    oracle = Oracle(lambda s: 1.0 - 0.4 * len(s & planted) - 0.01 * len(s - planted))
    result = greedy.minimal_set(oracle, FEATURES, threshold=0.0)
    assert result.flips_all and result.one_minimal
    assert set(result.minimal) == planted
    assert result.score < 0 and result.batches == oracle.calls
    sequential = greedy.sequential_minimal_set(oracle, FEATURES, threshold=0.0)
    assert set(sequential.minimal) == planted
    assert result.batches < sequential.batches


def test_prefix_sizes_are_few_and_reach_both_ends():
    assert greedy.prefix_sizes(5) == [2, 3, 4, 5]  # small steps try every size
    for n in (2, 9, 31, 127, 1000):
        sizes = greedy.prefix_sizes(n)
        assert sizes == sorted(set(sizes)) and sizes[0] == 2 and sizes[-1] == n
        assert {n - 1, n - 2} & set(range(2, n)) <= set(sizes)  # fine where sets end up
        assert len(sizes) <= 2 * n.bit_length()


def test_greedy_drops_a_whole_block_in_one_coarse_step():
    """128 candidates, only three needed: one single-removal batch and one prefix batch
    reach the planted set, with far fewer masks than scanning every prefix."""
    features = [Feature(1, i) for i in range(128)]
    planted = {features[5], features[60], features[99]}
    oracle = Oracle(lambda s: -1.0 if planted <= s else 1.0)
    result = greedy.minimal_set(oracle, features, threshold=0.0)
    assert set(result.minimal) == planted and result.one_minimal
    assert result.evals < 1 + 128 + 30 + 3 + 2  # full, singles, coarse prefixes, last singles


def test_greedy_reports_no_flip():
    result = greedy.minimal_set(Oracle(lambda s: 1.0), FEATURES, threshold=0.0)
    assert not result.flips_all and result.minimal == [] and result.evals == 1


def test_greedy_on_a_prompt_that_is_not_refused_returns_the_empty_set():
    result = greedy.minimal_set(Oracle(lambda s: -1.0), FEATURES, threshold=0.0)
    assert result.flips_all and result.minimal == [] and result.one_minimal


def test_greedy_result_is_one_minimal_under_redundancy():
    a, b, c = FEATURES[0], FEATURES[3], FEATURES[7]
    # either {a, b} or {c} suffices: a verified 1-minimal set is one of them
    oracle = Oracle(lambda s: -1.0 if {a, b} <= s or c in s else 1.0)
    result = greedy.minimal_set(oracle, FEATURES, threshold=0.0)
    assert set(result.minimal) in ({a, b}, {c})
    for f in result.minimal:
        assert oracle.fn(set(result.minimal) - {f}) >= 0


def test_dormant_finds_planted_backup_and_nothing_else():
    m = Feature(1, 3)
    backup, bystander, always = 7, 9, 5

    def latents(ablated):
        layer2 = torch.zeros(4, 16)
        layer2[:, always] = 1.0
        if m in ablated:
            layer2[2, backup] = 2.0  # wakes up and carries refusal
            layer2[1, bystander] = 3.0  # wakes up but does nothing
        return {1: torch.ones(4, 16), 2: layer2}

    def fn(s):
        return (
            2.0
            - 1.0 * (m in s)
            - 1.5 * (m in s and Feature(2, backup) in s)
            - 0.1 * (Feature(2, always) in s)
        )

    found = dormant.find(
        Oracle(fn, latents), [m], [1, 2], min_activation=0.5, max_candidates=8, margin=0.5
    )
    assert [d.feature for d in found] == [Feature(2, backup)]
    assert found[0].before == 0 and found[0].after == 2.0 and found[0].effect == -1.5


def test_classifier_verdicts():
    assert verdict(" Yes", "harmbench") and not verdict("No.", "harmbench")
    assert verdict("\n\nunsafe\nS2", "llamaguard") and not verdict("safe", "llamaguard")
    assert not verdict("", "harmbench")
