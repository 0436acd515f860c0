"""The factorization machine against oracles with planted ground truth: what it calls an
interaction, how its masks are sampled and split (seconds each)."""

import pytest
import torch
from omegaconf import OmegaConf
from torchmetrics.functional.classification import binary_auroc

from refusal import fm, pipeline
from refusal.errors import ConfigError
from refusal.features import Feature
from refusal.records import Candidate
from tests.conftest import make_cfg

FEATURES = [Feature(1, i) for i in range(10)]
A, B = FEATURES[0], FEATURES[1]  # the sampler's M: the first two columns
CFG = OmegaConf.create(
    {
        "target": "bce",
        "rank": 4,
        "val": 0.15,
        "test": 0.25,
        "bootstrap": 1000,
        "lr": 0.05,
        "weight_decay": 1e-4,
        "batch_size": 128,
        "patience": 20,
    }
)
TRAINER = OmegaConf.create(
    {
        "_target_": "lightning.Trainer",
        "accelerator": "cpu",
        "max_epochs": 200,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
    }
)


def fit(masks: torch.Tensor, scores: torch.Tensor, out, cfg=CFG, trainer=TRAINER):
    """The FM on masks over FEATURES, M = (A, B); a score below 0 is a flip."""
    return fm.fit(masks, scores, 0.0, FEATURES, 2, cfg, trainer, out, seed=0)


def planted_pair(masks: torch.Tensor) -> torch.Tensor:
    """Refusal score, additive in four features but for one pairwise term: ablating A AND B
    flips, and so does ablating three of the four additive features."""
    return 1.0 - 2.0 * masks[:, 0] * masks[:, 1] - 0.5 * masks[:, 2:6].sum(1)


def additive(masks: torch.Tensor) -> torch.Tensor:
    """Refusal score linear in the ablated features plus logistic noise: P(flip) is a
    logistic function of a weighted sum, with no pairwise term."""
    w = torch.tensor([1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.0, 0.0, 0.0, 0.0])
    u = torch.rand(len(masks), generator=torch.Generator().manual_seed(1)).clamp(1e-6, 1 - 1e-6)
    return 1.5 - masks @ w + 0.3 * (u.log() - (1 - u).log())


def test_fm_pairwise_term_matches_explicit_sum():
    model = fm.FactorizationMachine(5, rank=3)
    x = torch.bernoulli(torch.full((7, 5), 0.5))
    explicit = (
        model.w0
        + x @ model.w
        + torch.stack(
            [
                sum(
                    (model.v[i] @ model.v[j]) * row[i] * row[j]
                    for i in range(5)
                    for j in range(i + 1, 5)
                )
                for row in x
            ]
        )
    )
    torch.testing.assert_close(model(x), explicit)


def test_rank_zero_is_additive():
    model = fm.FactorizationMachine(5, rank=0)
    x = torch.bernoulli(torch.full((7, 5), 0.5))
    torch.testing.assert_close(model(x), model.w0 + x @ model.w)
    assert not model.interactions().any()


def test_a_planted_pairwise_interaction_is_called(tmp_path):
    masks = fm.sample_masks(600, 2, 8, 0.5, seed=0)
    out = fit(masks, planted_pair(masks), tmp_path)
    assert out.interaction_gain == pytest.approx(out.test_auc - out.additive_test_auc)
    assert out.gain_interval[0] > 0 and out.interactions_significant
    assert out.test_auc > 0.95 and out.all_of_m_auc < out.test_auc
    assert {out.top_pairs[0].a, out.top_pairs[0].b} == {A, B}
    assert out.top_pairs[0].interaction > 0  # together they make the flip likelier


def test_an_additive_oracle_gets_no_interaction(tmp_path):
    masks = fm.sample_masks(600, 2, 8, 0.5, seed=0)
    out = fit(masks, additive(masks), tmp_path)
    assert out.test_auc > 0.8, "the FM still predicts the flips"
    lo, hi = out.gain_interval
    assert lo <= 0 <= hi and not out.interactions_significant
    assert lo <= out.interaction_gain <= hi


def test_fm_recovers_the_pair_of_a_planted_and_with_either_target(tmp_path):
    """A flip needs A AND B; a third feature has a weak main effect only. An AND is
    additive in rank (both ablated ranks first), so it wins no AUC over the additive model,
    but the FM's strongest pair is still A, B."""
    masks = fm.sample_masks(400, 2, 6, 0.5, seed=0)
    scores = 1.0 - 2.0 * masks[:, 0] * masks[:, 1] - 0.2 * masks[:, 2]
    features = FEATURES[:8]
    for target in ("bce", "mse"):
        cfg = OmegaConf.merge(CFG, {"target": target})
        out = fm.fit(masks, scores, 0.0, features, 2, cfg, TRAINER, tmp_path / target)
        assert {out.top_pairs[0].a, out.top_pairs[0].b} == {A, B}
        assert out.test_auc > 0.95 and out.all_of_m_auc == 1.0
        assert not out.interactions_significant


def test_sequential_sampling_stops_only_where_no_interaction_can_show(tmp_path):
    assert fm.fit_points(768, 256) == [256, 512, 768]
    assert fm.fit_points(700, 256) == [256, 512, 700]
    assert fm.fit_points(96, 256) == [96]  # a step past n_masks: one fit on all
    masks = fm.sample_masks(600, 2, 8, 0.5, seed=0)
    planted = fit(masks, planted_pair(masks), tmp_path / "pair")
    assert not fm.settled(planted, 0.01)  # a real interaction keeps sampling
    none = fit(masks, additive(masks), tmp_path / "additive")
    lo, hi = none.gain_interval
    assert fm.settled(none, hi + 1e-6) and not fm.settled(none, hi)
    assert not fm.settled(none.model_copy(update={"gain_interval": None}), 1.0)  # one class
    significant = none.model_copy(update={"gain_interval": (0.001, 0.002)})
    assert not fm.settled(significant.model_copy(update={"interactions_significant": True}), 1.0)


def test_a_test_split_of_one_class_has_no_auc(tmp_path):
    masks = fm.sample_masks(64, 2, 8, 0.5, seed=0)
    out = fit(
        masks, torch.ones(len(masks)), tmp_path, trainer=OmegaConf.merge(TRAINER, {"max_epochs": 2})
    )
    assert out.test_auc is out.additive_test_auc is out.all_of_m_auc is None
    assert out.interaction_gain is out.gain_interval is None
    assert not out.interactions_significant


def test_masks_are_distinct_and_test_masks_are_never_trained_on():
    masks = fm.sample_masks(300, 3, 4, 0.5, seed=0)  # 128 masks exist: most draws repeat
    assert len(masks) == len(fm.distinct(masks)) == 128
    data = fm.MaskDataModule(masks, torch.zeros(len(masks)), torch.zeros(len(masks)), 0.2, 0.3)
    test, val, train = (
        set(map(tuple, d.tensors[0].tolist())) for d in (data.test, data.val, data.train)
    )
    assert len(test) == len(data.test) == int(128 * 0.3) and len(val) == int(128 * 0.2)
    assert not test & (train | val) and len(test | val | train) == 128
    with pytest.raises(ValueError, match="repeat"):
        fm.MaskDataModule(torch.cat([masks, masks[:1]]), *torch.zeros(2, 129))


@pytest.mark.parametrize(
    "split", [["search.fm.val=0.5", "search.fm.test=0.5"], ["search.fm.test=0"]]
)
def test_a_split_that_leaves_no_masks_to_train_or_test_on_is_a_config_error(split):
    pipeline.validate(make_cfg([]))  # the defaults split
    with pytest.raises(ConfigError, match="search.fm.val"):
        pipeline.validate(make_cfg(split))


def test_the_sampler_covers_every_partial_ablation_of_m():
    n_minimal = 6
    masks = fm.sample_masks(700, n_minimal, 10, 0.3, seed=0)
    assert len(masks) == 700 and len(fm.distinct(masks)) == 700
    counts = torch.bincount(masks[:, :n_minimal].sum(1).long(), minlength=n_minimal + 1)
    assert len(counts) == n_minimal + 1 and (counts >= 0.8 * 700 / (n_minimal + 1)).all()
    # which features of M a partial mask ablates varies too: every one is ablated sometimes
    partial = masks[(masks[:, :n_minimal].sum(1) > 0) & (masks[:, :n_minimal].sum(1) < n_minimal)]
    assert (partial[:, :n_minimal].mean(0) > 0.3).all()
    assert abs(masks[:, n_minimal:].mean().item() - 0.3) < 0.03


def test_auc_counts_ties_a_half_and_weights_resample():
    scores = torch.tensor([0.1, 0.4, 0.4, 0.8, 0.3, 0.9])
    flips = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    once = fm.auc(scores, flips, torch.ones(1, 6))
    assert once.item() == pytest.approx(binary_auroc(scores, flips.long()).item())
    # a resample drawing masks 0, 2, 2, 3 is those masks counted that often
    resample = fm.auc(scores, flips, torch.tensor([[1.0, 0, 2, 1, 0, 0]]))
    drawn = torch.tensor([0, 2, 2, 3])
    assert resample.item() == pytest.approx(binary_auroc(scores[drawn], flips[drawn].long()).item())
    assert fm.auc(scores, flips, torch.tensor([[0.0, 1, 0, 0, 1, 0]])).isnan()  # no flip drawn
    counts = fm.bootstrap_counts(6, 50, seed=0)
    assert counts.shape == (50, 6) and (counts.sum(1) == 6).all() and counts.std() > 0


def test_fits_are_quiet_but_keep_warnings(tmp_path, caplog):
    caplog.set_level("INFO")
    fm.L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert any("GPU available" in r.getMessage() for r in caplog.records)  # Lightning's notice
    caplog.clear()
    level = fm.logging.getLogger(fm.CHATTY[0]).level
    masks = fm.sample_masks(400, 2, 8, 0.3, seed=0)
    fit(masks, planted_pair(masks), tmp_path)
    assert not any("available" in r.getMessage() for r in caplog.records)
    assert fm.logging.getLogger(fm.CHATTY[0]).level == level  # restored after the fit


def test_a_sample_step_that_is_not_positive_is_a_config_error():
    with pytest.raises(ConfigError, match="search.fm.sample_step"):
        pipeline.validate(make_cfg(["search.fm.sample_step=0"]))


def test_the_fms_extras_are_the_most_aligned_candidates_of_any_layer():
    """Candidates come layer by layer; the extras are the other candidates by alignment
    with the refusal direction, then each layer's most active latents, never M."""
    candidates = [
        Candidate(feature=Feature(layer, latent), cos=cos)
        for layer, latent, cos in [(4, 1, 0.10), (4, 2, 0.12), (8, 3, 0.30), (12, 4, 0.20)]
    ]
    minimal = [Feature(12, 4)]
    clean = {4: torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 5.0]]), 8: torch.zeros(1, 8)}
    extra = fm.extra_features(minimal, candidates, clean, max_extra=4)
    assert extra == [Feature(8, 3), Feature(4, 2), Feature(4, 1), Feature(4, 5)]
