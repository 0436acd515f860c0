"""Shared fixtures: composed configs and tiny random models (CPU, no network)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import refusal  # noqa: F401  (registers the config resolvers)
from refusal import models, saes
from refusal.engine import Engine
from refusal.forwards import Forwards
from refusal.judge import refusal_token_ids

CONF = Path(__file__).resolve().parent.parent / "conf"
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def make_cfg(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml as `python train.py <overrides>` would, outputs under output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_llama() -> models.LM:
    return models.load(make_cfg(["model=tiny_llama"]).model, seed=0)


@pytest.fixture(scope="session")
def tiny_gemma2() -> models.LM:
    return models.load(make_cfg(["model=tiny_gemma2"]).model, seed=0)


@pytest.fixture(params=["tiny_llama", "tiny_gemma2"])
def tiny_lm(request) -> models.LM:
    return request.getfixturevalue(request.param)


def tiny_engine(
    lm: models.LM, layers=(1, 2), width: int = 128, architecture: str = "standard", **kwargs
) -> Engine:
    sae_by_layer = {
        layer: saes.random_sae(lm.d_model, width, layer, 0, architecture) for layer in layers
    }
    return Engine(lm, sae_by_layer, **kwargs)


def tiny_forwards(lm: models.LM, batch_size: int = 64) -> Forwards:
    """Many-prompt passes, the refusal score read from the token "I"."""
    return Forwards(lm, refusal_token_ids(lm.tokenizer, ["I"]), batch_size)


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield
