"""Each search stage against a synthetic oracle with planted ground truth (seconds)."""

import torch

from refusal import controls
from refusal.features import Feature
from refusal.judge import says_complies
from refusal.stages import controls as controls_stage
from refusal.stages import dormant, greedy, random_control

FEATURES = [Feature(1, i) for i in range(6)] + [Feature(2, i) for i in range(6)]


class Oracle:
    """A probe whose refusal score is a planted function of which features are ablated."""

    def __init__(self, fn, latents=None):
        self.fn, self._latents, self.calls, self.rows = fn, latents, 0, 0

    def score(self, features, masks):
        self.calls += 1
        self.rows += len(masks)
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
    assert result.flips_all and result.one_minimal_by_score
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
    assert set(result.minimal) == planted and result.one_minimal_by_score
    assert result.evals < 1 + 128 + 30 + 3 + 2  # full, singles, coarse prefixes, last singles


def test_greedy_reports_no_flip():
    result = greedy.minimal_set(Oracle(lambda s: 1.0), FEATURES, threshold=0.0)
    assert not result.flips_all and result.minimal == [] and result.evals == 1


def test_greedy_on_a_prompt_that_is_not_refused_returns_the_empty_set():
    result = greedy.minimal_set(Oracle(lambda s: -1.0), FEATURES, threshold=0.0)
    assert result.flips_all and result.minimal == [] and not result.one_minimal_by_score


def test_greedy_result_is_one_minimal_under_redundancy():
    a, b, c = FEATURES[0], FEATURES[3], FEATURES[7]
    # either {a, b} or {c} suffices: a verified 1-minimal set is one of them
    oracle = Oracle(lambda s: -1.0 if {a, b} <= s or c in s else 1.0)
    result = greedy.minimal_set(oracle, FEATURES, threshold=0.0)
    assert set(result.minimal) in ({a, b}, {c})
    for f in result.minimal:
        assert oracle.fn(set(result.minimal) - {f}) >= 0


def test_dormant_finds_planted_backup_and_nothing_else():
    """M = {m1, m2}. With m1 alone ablated (a partial M: the model still refuses) three
    latents wake at layer 2: a backup that holds refusal, one of the opposite sign and a
    weak one no stronger than latents already active at matched activation (the null)."""
    m1, m2 = Feature(1, 3), Feature(1, 4)
    backup, opposite, weak, bystander = 7, 11, 13, 9
    null = list(range(20, 40))  # active on the clean prompt: the null's pool
    drop = {Feature(2, i): 0.05 * k for k, i in enumerate(null)}  # 0 .. 0.95

    def latents(ablated):
        layer2 = torch.zeros(4, 64)
        layer2[:, null] = 2.0
        if m1 in ablated:
            layer2[2, [backup, opposite, weak, bystander]] = torch.tensor([2.0, 2.0, 2.0, 3.0])
        return {1: torch.ones(4, 64), 2: layer2}

    def fn(s):
        score = 2.0 - 1.0 * (m1 in s) - 1.0 * (m2 in s) - sum(drop.get(f, 0.0) for f in s)
        if m1 in s:
            score += -1.5 * (Feature(2, backup) in s) + 1.5 * (Feature(2, opposite) in s)
            score -= 0.6 * (Feature(2, weak) in s)
        return score

    settings = dormant.Settings(
        min_activation=0.5, max_candidates=8, margin=0.5, null_size=20, null_percentile=95
    )
    found = dormant.find(Oracle(fn, latents), [m1, m2], [1, 2], settings)
    assert [d.feature for d in found] == [Feature(2, backup)]
    (d,) = found
    assert d.setting == [m1] and d.before == 0 and d.after == 2.0
    assert d.score_without == 1.0 and d.effect == -1.5 and d.sign == "lowers"
    assert d.null_percentile == 100.0 and d.null_size == 20
    # the weak latent passes the margin but not the null; the opposite one has the wrong sign
    assert dormant.settings_of([m1, m2]) == [[m2], [m1]]


def test_dormant_skips_the_null_where_no_woken_latent_lowers_refusal():
    """A latent that wakes under a partial M but raises refusal when ablated: its row and
    the setting's are scored, the 20 null latents are not (they could only reject)."""
    m1, m2, opposite, null = Feature(1, 3), Feature(1, 4), 11, list(range(20, 40))

    def latents(ablated):
        layer2 = torch.zeros(4, 64)
        layer2[:, null] = 2.0
        if m1 in ablated:
            layer2[2, opposite] = 2.0
        return {1: torch.ones(4, 64), 2: layer2}

    oracle = Oracle(lambda s: 1.0 + 1.5 * (Feature(2, opposite) in s), latents)
    settings = dormant.Settings(
        min_activation=0.5, max_candidates=8, margin=0.5, null_size=20, null_percentile=95
    )
    assert dormant.find(oracle, [m1, m2], [1, 2], settings) == []
    assert oracle.rows == 2


def test_classifier_answers():
    assert says_complies(" Yes", "harmbench") and not says_complies("No.", "harmbench")
    assert says_complies("\n\nunsafe\nS2", "llamaguard") and not says_complies("safe", "llamaguard")
    assert not says_complies("", "harmbench")


def test_random_draws_are_shaped_like_m_active_and_never_of_m():
    minimal = [Feature(1, 0), Feature(1, 1), Feature(2, 5)]
    clean = {1: torch.zeros(3, 32), 2: torch.zeros(3, 32)}
    clean[1][1, :10] = 1.0  # latents 0..9 active at layer 1 (0 and 1 are M's)
    clean[2][0, 3:8] = 2.0  # latents 3..7 active at layer 2 (5 is M's)
    gen = torch.Generator().manual_seed(0)
    sets = random_control.draws(clean, minimal, 200, 0.0, gen)
    assert len(sets) == 200
    for s in sets:
        assert not set(s) & set(minimal)
        assert sorted(f.layer for f in s) == [1, 1, 2] and len(set(s)) == 3
        assert all(clean[f.layer][:, f.latent].max() > 0 for f in s)
    # every active latent outside M is drawn at some point: uniform, not a fixed pick
    assert {f for s in sets for f in s} == {Feature(1, i) for i in range(2, 10)} | {
        Feature(2, i) for i in (3, 4, 6, 7)
    }
    features, masks = random_control.masks_for(sets[:5])
    for row, s in zip(masks, sets[:5]):
        assert {f for f, m in zip(features, row) if m} == set(s)


def test_random_draws_need_enough_active_latents():
    clean = {1: torch.zeros(2, 8)}
    clean[1][0, 0] = 1.0  # only M's own latent is active
    gen = torch.Generator().manual_seed(0)
    assert random_control.draws(clean, [Feature(1, 0)], 4, 0.0, gen) == []


def test_shared_set_cover_recovers_a_planted_universal_feature():
    """Six prompts, each with its own M of two features; one feature U flips five of them
    alone, and the sixth only with its whole M. Greedy cover over single features and
    whole minimal sets finds U first, then the sixth prompt's M, and nothing else."""
    universal = Feature(3, 0)
    own = [[Feature(1, k), Feature(2, k)] for k in range(6)]

    def prompt(k):
        return Oracle(lambda s: -1.0 if (universal in s and k < 5) or set(own[k]) <= s else 1.0)

    probes = [prompt(k) for k in range(6)]
    units = [*own, [universal]]  # U last: the cover must find it, not be handed it
    chosen, covered = controls.cover(probes, units, 0.0, max_size=8, share=1.0)
    assert chosen == [universal, *own[5]] and all(covered)
    chosen, covered = controls.cover(probes, units, 0.0, max_size=8, share=0.8)
    assert chosen == [universal] and sum(covered) == 5
    # no single feature flips anything: whole minimal sets still cover
    chosen, covered = controls.cover(probes[5:], own[5:], 0.0, max_size=8, share=1.0)
    assert chosen == own[5] and covered == [True]


def test_costs_are_averaged_over_a_seeded_sample_in_order_only_where_there_are_more():
    items = list(range(40))
    assert controls_stage.seeded_subset(items[:16], 16, seed=0) == items[:16]
    sample = controls_stage.seeded_subset(items, 16, seed=0)
    assert len(sample) == 16 and sample == sorted(sample) and len(set(sample)) == 16
    assert sample == controls_stage.seeded_subset(items, 16, seed=0)  # seeded
    assert sample != controls_stage.seeded_subset(items, 16, seed=1)
    assert sample != items[:16]  # a sample, not the first prompts
