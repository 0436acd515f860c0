"""Shared fixtures: composed configs and tiny random models (CPU, no network)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import refusal  # noqa: F401  (registers the config resolvers)
from refusal import models, pipeline, saes
from refusal.engine import Engine
from refusal.forwards import Forwards
from refusal.judge import refusal_token_ids
from refusal.records import RESULTS, PromptResult, join, parse_row
from refusal.rundir import RunDir

CONF = Path(__file__).resolve().parent.parent / "conf"
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
# A verdict model that calls every reply the rules leave compliance
SAYS_COMPLIANCE = CONF.parent / "refusal" / "judge" / "markers_only.json"

# A whole run on tiny_llama with random SAEs, small enough for tests.
BASE = [
    "model=tiny_llama",
    "judge.flip_margin=0",
    "sae=random",
    "layer=tiny",
    "data.max_eval=3",
    "logger=none",
    "judge.markers=[' ']",
    # a random model's replies are token salad: the markers alone decide (planted judge)
    f"judge.verdict_model={SAYS_COMPLIANCE}",
    "judge.pmi=false",
    "search.fm.n_masks=64",
    "search.fm.patience=5",
    "trainer.max_epochs=30",
    "search.candidates.top_k=6",
    "search.capability.n_prompts=2",
    "data.n_train=4",
    "data.n_val=2",
    # a random model's refusal scores say nothing of harm: its thresholds here would leave
    # the baseline filter no harmless (or harmful) prompt (tests/test_direction.py)
    "search.direction.filter_prompts=false",
]
# Smaller still: two prompts, few generated tokens, W&B on.
TINY = [
    *(o for o in BASE if o not in ("logger=none", "data.max_eval=3")),
    "data.max_eval=2",
    "judge.max_new_tokens=4",
]


def make_cfg(
    overrides: list[str], output_dir: Path | None = None, config: str = "train"
) -> DictConfig:
    """Compose conf/<config>.yaml as `python train.py <overrides>` would, outputs under
    output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config, overrides=overrides, return_hydra_config=True)
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


@pytest.fixture(scope="session")
def organism() -> models.LM:
    """The embedded organism (SmolLM2-135M-Instruct + its refusal LoRA), as `make run` loads it."""
    return models.load(make_cfg([]).model, seed=0)


def read_results(output_dir: Path) -> list[PromptResult]:
    """A run's results.jsonl, its rows joined per prompt."""
    return join([parse_row(row) for row in RunDir(output_dir).read(RESULTS)])


@pytest.fixture(scope="session")
def flipping(tmp_path_factory) -> tuple[float, str]:
    """A threshold and a refusal marker under which the tiny model (TINY) refuses a prompt
    and ablating its minimal set verifiably flips it: the marker is its clean reply, which
    the reply with M ablated no longer holds, so the planted judge calls that compliance."""

    def probe(*markers: str) -> list[PromptResult]:
        out = tmp_path_factory.mktemp("probe")
        cfg = make_cfg([*TINY, "logger=none", "judge.threshold=-1000"], out)
        with open_dict(cfg):
            cfg.judge.markers = list(markers) or cfg.judge.markers
        pipeline.run(cfg)
        return read_results(out)

    # the first prompt greedy filtering ran on (one with candidates)
    search = next(r for r in probe() if r.greedy is not None and r.greedy.candidates)
    marker = search.baseline.reply.strip()
    # the opening score reads the markers: place the threshold on their scores
    greedy = next(r.greedy for r in probe(marker) if r.prompt_id == search.prompt_id)
    assert greedy is not None and greedy.score is not None
    return (greedy.clean_score + greedy.score) / 2, marker
