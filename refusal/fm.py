"""Interaction discovery: a degree-2 factorization machine over ablation masks.

    ŷ(x) = w₀ + Σᵢ wᵢxᵢ + Σ_{i<j} ⟨vᵢ, vⱼ⟩ xᵢxⱼ,
    Σ_{i<j} ⟨vᵢ, vⱼ⟩ xᵢxⱼ = ½ Σ_f [(Σᵢ v_{if} xᵢ)² − Σᵢ v_{if}² xᵢ²]    (O(k·n))

x ∈ {0,1}ⁿ says which features a mask ablates. The target is the flip (BCE on logits)
or the refusal score (MSE). Main effects wᵢ and the strongest ⟨vᵢ,vⱼ⟩ are the readout.

The readout is only worth what the FM predicts beyond simpler rules, so the distinct
masks are split into train, validation (early stopping, checkpoint) and test (scored
only), and on the test masks the FM's AUC is set beside that of the same model without
pairwise terms (rank 0, "additive") and of the rule "all of M ablated". The interaction
gain (FM AUC − additive AUC) counts as an interaction only where its bootstrap interval
lies above zero. An AND of features (all of M) is additive in rank, so it gains nothing:
a gain needs flips that no weighted sum of the ablated features ranks.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc

from refusal.features import Feature
from refusal.records import Candidate, FMReadout, MainEffect, Pair

LEVEL = 0.95  # of the gain's two-sided percentile bootstrap interval
# Lightning's per-Trainer notices (GPU/TPU available, tips): every prompt fits two models
CHATTY = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")
# and its warnings that say nothing here: the FM's checkpoint directory holds its additive
# baseline's by design; a deprecation inside Lightning's own pytree helper
EXPECTED = (
    r"Checkpoint directory .* exists and is not empty",
    r".*isinstance\(treespec, LeafSpec\)",
)
TRIES = 20  # rounds of drawing replacements for repeated masks before settling for fewer


class FactorizationMachine(L.LightningModule):
    """Degree-2 FM; `target` is "bce" (predict the flip) or "mse" (the refusal score).
    rank=0 leaves no pairwise term: the additive model the FM is measured against."""

    def __init__(
        self,
        n_features: int,
        rank: int = 4,
        target: str = "bce",
        lr: float = 0.05,
        weight_decay: float = 1e-4,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.w0 = torch.nn.Parameter(torch.zeros(1))
        self.w = torch.nn.Parameter(torch.zeros(n_features))
        self.v = torch.nn.Parameter(0.01 * torch.randn(n_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairwise = 0.5 * ((x @ self.v) ** 2 - (x**2) @ (self.v**2)).sum(-1)
        return self.w0 + x @ self.w + pairwise

    def interactions(self) -> torch.Tensor:
        """⟨vᵢ, vⱼ⟩ for all pairs, diagonal zeroed."""
        gram = self.v @ self.v.T
        return gram - torch.diag(torch.diag(gram))

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.hparams["target"] == "bce":
            return torch.nn.functional.binary_cross_entropy_with_logits(pred, target)
        return torch.nn.functional.mse_loss(pred, target)

    def flip_logit(self, pred: torch.Tensor) -> torch.Tensor:
        """Higher = more likely a flip, whatever the target (scores fall when refusal breaks)."""
        return pred if self.hparams["target"] == "bce" else -pred

    def training_step(self, batch, _):
        x, target, _flip = batch
        loss = self.loss(self(x), target)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, _):
        x, target, flip = batch
        pred = self(x)
        self.log("val_loss", self.loss(pred, target), prog_bar=True)
        if 0 < flip.sum() < len(flip):
            self.log("val_auc", binary_auroc(self.flip_logit(pred).sigmoid(), flip.long()))

    def configure_optimizers(self):
        return torch.optim.Adam(
            self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )


class MaskDataModule(L.LightningDataModule):
    """Distinct masks with their targets, split (seeded) into test, validation and train.

    Validation stops training and picks the checkpoint, so its AUC is tuned on; test is
    only scored. Masks must not repeat, or a test mask could also be a training mask.
    """

    def __init__(
        self,
        masks: torch.Tensor,
        target: torch.Tensor,
        flips: torch.Tensor,
        val: float = 0.15,
        test: float = 0.2,
        batch_size: int = 64,
        seed: int = 0,
    ):
        super().__init__()
        if len(distinct(masks)) < len(masks):
            raise ValueError("masks repeat: a test mask would also be a training mask")
        n_test, n_val = (max(1, int(len(masks) * share)) for share in (test, val))
        order = torch.randperm(len(masks), generator=torch.Generator().manual_seed(seed))
        parts = order.split([n_test, n_val, len(masks) - n_test - n_val])
        data = (masks.float(), target.float(), flips.float())
        self.test, self.val, self.train = (TensorDataset(*(t[i] for t in data)) for i in parts)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(
            self.train,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=len(self.val))


def extra_features(
    minimal: list[Feature],
    candidates: list[Candidate],
    clean: dict[int, torch.Tensor],
    max_extra: int,
) -> list[Feature]:
    """Features beside M that the FM also samples: the other candidates, most aligned with
    the refusal direction first, then each layer's most active latents on the prompt
    (clean: (positions, d_sae) latents per layer, at the positions an edit acts on).
    Candidates come layer by layer; taken in that order, every extra would be a latent of
    the first SAE layer, and the FM would never pair M with a later one."""
    ranked = sorted(candidates, key=lambda c: -c.cos)
    extra = [c.feature for c in ranked if c.feature not in minimal]
    for layer, z in clean.items():
        extra += [
            Feature(layer, int(i)) for i in z.max(0).values.argsort(descending=True)[:max_extra]
        ]
    return list(dict.fromkeys(f for f in extra if f not in minimal))[:max_extra]


def sample_masks(
    n_masks: int, n_minimal: int, n_extra: int, p_extra: float, seed: int
) -> torch.Tensor:
    """Up to n_masks distinct masks over M (the first n_minimal columns) and the extras.

    How many features of M a mask ablates, k, takes each value 0..|M| in turn, and which k
    is drawn at random; each extra feature is ablated with p_extra. A 1-minimal M flips
    mostly when all of it is ablated, so masks that ablated all of M in half the samples
    let the rule "all of M ablated" explain nearly every flip and left the pairwise terms
    little to show. Spreading k evenly puts masks on every partial ablation of M (where
    pairs inside M and with the extras can tell), and keeps a share of about 1/(|M|+1) of
    masks with all of M ablated and as many with none, so both outcomes occur.

    Repeats are dropped and redrawn (up to TRIES rounds of n_masks): when M and the extras
    are few, fewer distinct masks exist, and then fewer come back.
    """
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(0, n_minimal + n_extra)
    for _ in range(TRIES):
        if len(masks) == n_masks:
            break
        # a whole round each time: drawing only the shortfall would seldom hit rare masks
        fresh = _draw(n_masks, n_minimal, n_extra, p_extra, gen)
        masks = distinct(torch.cat([masks, fresh]))[:n_masks]
    return masks


def _draw(
    n: int, n_minimal: int, n_extra: int, p_extra: float, gen: torch.Generator
) -> torch.Tensor:
    k = torch.arange(n) % (n_minimal + 1)
    # a random permutation per row: its k smallest entries pick k features of M
    minimal = torch.rand(n, n_minimal, generator=gen).argsort(1) < k[:, None]
    extra = torch.rand(n, n_extra, generator=gen) < p_extra
    return torch.cat([minimal, extra], 1).float()


def fit_points(n_masks: int, step: int) -> list[int]:
    """How many masks are scored when each fit of sequential sampling is made: every
    `step`, and all of them last (one fit on all when step >= n_masks)."""
    return [*range(step, n_masks, step), n_masks]


def settled(readout: FMReadout, stop_gain: float) -> bool:
    """Whether more masks could no longer show an interaction worth calling: the gain is
    not significant and its interval lies wholly below `stop_gain`. Stopping early then
    only ever ends on "no interaction", so it cannot raise the chance of calling one that
    is not there; it gives up only gains smaller than `stop_gain`. A test split of one
    class (no interval) never settles."""
    interval = readout.gain_interval
    return interval is not None and interval[1] < stop_gain and not readout.interactions_significant


def distinct(masks: torch.Tensor) -> torch.Tensor:
    """The rows of masks in first-seen order, repeats dropped (torch.unique would sort)."""
    rows = dict.fromkeys(tuple(row) for row in masks.tolist())
    return masks.new_tensor(list(rows)).reshape(len(rows), masks.shape[1])


class Fitted(NamedTuple):
    """A trained model, its best checkpoint and the epochs it ran."""

    model: FactorizationMachine
    checkpoint: str | None
    epochs: int


def fit(
    masks: torch.Tensor,
    scores: torch.Tensor,
    threshold: float,
    features: list[Feature],
    n_minimal: int,
    cfg: DictConfig,
    trainer_cfg: DictConfig,
    out_dir: Path,
    logger=False,
    seed: int = 0,
    top_pairs: int = 10,
) -> FMReadout:
    """Train the FM and its additive baseline with the configured Lightning Trainer on the
    same split; read out effects and pairs, and how the FM does on the test masks."""
    flips = (scores < threshold).float()
    target = flips if cfg.target == "bce" else scores
    data = MaskDataModule(masks, target, flips, cfg.val, cfg.test, cfg.batch_size, seed)
    # the loggers are the FM's (its curves): the baseline logs none
    additive = train(0, data, cfg, trainer_cfg, out_dir / "additive", False, seed)
    # started from the additive fit, pairwise terms that do not help validation stay near
    # zero; from scratch, the FM stopped early on noise and fell behind the baseline
    fm = train(cfg.rank, data, cfg, trainer_cfg, out_dir, logger, seed, additive.model)
    return readout(fm, additive, data, features, n_minimal, cfg.bootstrap, seed, top_pairs)


def train(
    rank: int,
    data: MaskDataModule,
    cfg: DictConfig,
    trainer_cfg: DictConfig,
    out_dir: Path,
    logger,
    seed: int,
    start: FactorizationMachine | None = None,
) -> Fitted:
    """One model fitted on data's train split, stopped and checkpointed (out_dir/fm.ckpt)
    on its validation split; the best checkpoint's model."""
    L.seed_everything(seed, workers=True, verbose=False)
    n_features = data.train.tensors[0].shape[1]
    model = FactorizationMachine(n_features, rank, cfg.target, cfg.lr, cfg.weight_decay)
    if start is not None:
        with torch.no_grad():
            model.w0.copy_(start.w0)
            model.w.copy_(start.w)
    checkpoint = ModelCheckpoint(dirpath=out_dir, filename="fm", monitor="val_loss", save_top_k=1)
    with quiet(CHATTY, EXPECTED):  # the notices come from the Trainer's constructor and fit
        trainer: L.Trainer = hydra.utils.instantiate(
            trainer_cfg,
            callbacks=[EarlyStopping("val_loss", patience=cfg.patience), checkpoint],
            logger=logger,
            default_root_dir=str(out_dir),
        )
        trainer.fit(model, datamodule=data)
    if checkpoint.best_model_path:
        model = FactorizationMachine.load_from_checkpoint(checkpoint.best_model_path)
    return Fitted(model, checkpoint.best_model_path or None, trainer.current_epoch)


@contextmanager
def quiet(names: tuple[str, ...], expected: tuple[str, ...] = ()) -> Iterator[None]:
    """The named loggers at WARNING for the block (their notices off, warnings kept), and
    the `expected` warnings (message regexes) ignored."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in expected:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def auc(scores: torch.Tensor, flips: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUC of scores for predicting flips, once per row of weights (B, n): how many times
    each mask counts, so a bootstrap resample is a row of counts. Ties count a half; NaN
    where the counted masks hold one class only."""
    pos, neg = flips.bool(), ~flips.bool()
    above = scores[pos, None] > scores[None, neg]
    wins = above.float() + 0.5 * (scores[pos, None] == scores[None, neg]).float()
    w_pos, w_neg = weights[:, pos], weights[:, neg]
    return ((w_pos @ wins) * w_neg).sum(1) / (w_pos.sum(1) * w_neg.sum(1))


def bootstrap_counts(n: int, resamples: int, seed: int) -> torch.Tensor:
    """(resamples, n): how often each of n items is drawn, n draws with replacement each."""
    drawn = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    return torch.zeros(resamples, n).scatter_add_(1, drawn, torch.ones(resamples, n))


def interval(samples: torch.Tensor) -> tuple[float, float] | None:
    """The central LEVEL percentile interval of the finite samples (None if there are none)."""
    finite = samples[samples.isfinite()]
    if not len(finite):
        return None
    tails = torch.tensor([(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    lo, hi = finite.quantile(tails).tolist()
    return lo, hi


def _value(x: torch.Tensor) -> float | None:
    return x.item() if x.isfinite() else None


def compare_on_test(
    fm: Fitted, additive: Fitted, data: MaskDataModule, n_minimal: int, resamples: int, seed: int
) -> dict[str, Any]:
    """On the test masks: the AUC of the FM, of the additive model and of the rule "all of
    M ablated", the FM's gain over the additive model and the gain's bootstrap interval."""
    x, _target, flips = data.test.tensors
    with torch.no_grad():
        predictors = [m.model.flip_logit(m.model(x)) for m in (fm, additive)]
    predictors.append(x[:, :n_minimal].all(1).float())
    # row 0 counts every test mask once; the others are bootstrap resamples of them
    weights = torch.cat([torch.ones(1, len(x)), bootstrap_counts(len(x), resamples, seed)])
    fm_auc, additive_auc, all_of_m_auc = (auc(p, flips, weights) for p in predictors)
    gain = fm_auc - additive_auc  # paired: both models on the same resample
    gain_interval = interval(gain[1:])
    return {
        "test_auc": _value(fm_auc[0]),
        "additive_test_auc": _value(additive_auc[0]),
        "all_of_m_auc": _value(all_of_m_auc[0]),
        "interaction_gain": _value(gain[0]),
        "gain_interval": gain_interval,
        "interactions_significant": gain_interval is not None and gain_interval[0] > 0,
        "n_test": len(x),
    }


def readout(
    fm: Fitted,
    additive: Fitted,
    data: MaskDataModule,
    features: list[Feature],
    n_minimal: int,
    resamples: int,
    seed: int,
    top_pairs: int,
) -> FMReadout:
    inter = fm.model.interactions().detach()
    i, j = torch.triu_indices(len(features), len(features), offset=1)
    strongest = inter[i, j].abs().argsort(descending=True)[:top_pairs]
    return FMReadout(
        **compare_on_test(fm, additive, data, n_minimal, resamples, seed),
        n_distinct_masks=len(data.train) + len(data.val) + len(data.test),
        main_effects=[MainEffect(feature=f, w=w) for f, w in zip(features, fm.model.w.tolist())],
        top_pairs=[
            Pair(a=features[i[k]], b=features[j[k]], interaction=inter[i[k], j[k]].item())
            for k in strongest.tolist()
        ],
        interactions=inter.tolist(),
        checkpoint=fm.checkpoint,
        epochs=fm.epochs,
    )
