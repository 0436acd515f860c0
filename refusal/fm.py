"""Interaction discovery: a degree-2 factorization machine over ablation masks.

    ŷ(x) = w₀ + Σᵢ wᵢxᵢ + Σ_{i<j} ⟨vᵢ, vⱼ⟩ xᵢxⱼ,
    Σ_{i<j} ⟨vᵢ, vⱼ⟩ xᵢxⱼ = ½ Σ_f [(Σᵢ v_{if} xᵢ)² − Σᵢ v_{if}² xᵢ²]    (O(k·n))

x ∈ {0,1}ⁿ says which features a mask ablates. The target is the flip (BCE on logits)
or the refusal score (MSE). Main effects wᵢ and the strongest ⟨vᵢ,vⱼ⟩ are the readout.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc

from refusal.features import Feature
from refusal.records import FMReadout, MainEffect, Pair


class FactorizationMachine(L.LightningModule):
    """Degree-2 FM; `target` is "bce" (predict the flip) or "mse" (the refusal score)."""

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
    """Mask / target pairs with a seeded held-out split."""

    def __init__(
        self,
        masks: torch.Tensor,
        target: torch.Tensor,
        flips: torch.Tensor,
        heldout: float = 0.2,
        batch_size: int = 64,
        seed: int = 0,
    ):
        super().__init__()
        order = torch.randperm(len(masks), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(len(masks) * heldout))
        data = (masks.float(), target.float(), flips.float())
        self.val = TensorDataset(*(t[order[:n_val]] for t in data))
        self.train = TensorDataset(*(t[order[n_val:]] for t in data))
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
    candidates: list[Feature],
    clean: dict[int, torch.Tensor],
    max_extra: int,
) -> list[Feature]:
    """Features beside M that the FM also samples: the other candidates first, then each
    layer's most active latents on the prompt (clean: (T, d_sae) latents per layer)."""
    extra = [f for f in candidates if f not in minimal]
    for layer, z in clean.items():
        extra += [
            Feature(layer, int(i)) for i in z.max(0).values.argsort(descending=True)[:max_extra]
        ]
    return list(dict.fromkeys(f for f in extra if f not in minimal))[:max_extra]


def sample_masks(
    n_masks: int,
    n_minimal: int,
    n_extra: int,
    p_minimal: float | None,
    p_extra: float,
    seed: int,
) -> torch.Tensor:
    """Bernoulli masks: minimal-set features with p_minimal, extra features with p_extra.

    p_minimal=None ablates the whole minimal set in half the masks (p = 0.5^(1/|M|)): a flip
    usually needs all of a 1-minimal set, so a fixed p = 0.5 would leave a set of six with
    one flipping mask in 64 and a held-out split with hardly any positives.
    Row 0 ablates exactly the minimal set and row 1 nothing, so both outcomes appear.
    """
    if p_minimal is None:
        p_minimal = 0.5 ** (1 / max(n_minimal, 1))
    gen = torch.Generator().manual_seed(seed)
    p = torch.tensor([p_minimal] * n_minimal + [p_extra] * n_extra)
    masks = torch.bernoulli(p.expand(n_masks, -1), generator=gen)
    masks[0], masks[1] = torch.cat([torch.ones(n_minimal), torch.zeros(n_extra)]), 0
    return masks


def heldout_auc(model: FactorizationMachine, data: MaskDataModule) -> float | None:
    """AUC for predicting flips on the held-out masks; None if they are all one class."""
    x, _target, flips = data.val.tensors
    if flips.sum() in (0, len(flips)):
        return None
    with torch.no_grad():
        return binary_auroc(model.flip_logit(model(x)).sigmoid(), flips.long()).item()


def fit(
    masks: torch.Tensor,
    scores: torch.Tensor,
    threshold: float,
    features: list[Feature],
    cfg: DictConfig,
    trainer_cfg: DictConfig,
    out_dir: Path,
    logger=False,
    seed: int = 0,
    top_pairs: int = 10,
) -> FMReadout:
    """Train the FM with the configured Lightning Trainer and read out effects and pairs."""
    L.seed_everything(seed, workers=True, verbose=False)
    flips = (scores < threshold).float()
    target = flips if cfg.target == "bce" else scores
    data = MaskDataModule(masks, target, flips, cfg.heldout, cfg.batch_size, seed)
    model = FactorizationMachine(masks.shape[1], cfg.rank, cfg.target, cfg.lr, cfg.weight_decay)
    checkpoint = ModelCheckpoint(dirpath=out_dir, filename="fm", monitor="val_loss", save_top_k=1)
    trainer: L.Trainer = hydra.utils.instantiate(
        trainer_cfg,
        callbacks=[EarlyStopping("val_loss", patience=cfg.patience), checkpoint],
        logger=logger,
        default_root_dir=str(out_dir),
    )
    trainer.fit(model, datamodule=data)
    if checkpoint.best_model_path:
        model = FactorizationMachine.load_from_checkpoint(checkpoint.best_model_path)
    return readout(
        model, data, features, checkpoint.best_model_path or None, trainer.current_epoch, top_pairs
    )


def readout(
    model: FactorizationMachine,
    data: MaskDataModule,
    features: list[Feature],
    checkpoint: str | None,
    epochs: int,
    top_pairs: int,
) -> FMReadout:
    inter = model.interactions().detach()
    i, j = torch.triu_indices(len(features), len(features), offset=1)
    strongest = inter[i, j].abs().argsort(descending=True)[:top_pairs]
    return FMReadout(
        heldout_auc=heldout_auc(model, data),
        main_effects=[MainEffect(feature=f, w=w) for f, w in zip(features, model.w.tolist())],
        top_pairs=[
            Pair(a=features[i[k]], b=features[j[k]], interaction=inter[i[k], j[k]].item())
            for k in strongest.tolist()
        ],
        interactions=inter.tolist(),
        checkpoint=checkpoint,
        epochs=epochs,
    )
