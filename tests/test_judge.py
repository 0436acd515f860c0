"""Judges: refusal score, markers, and the classifier judge's code path on a tiny model."""

import pytest
import torch

from refusal import judge, pipeline
from refusal.errors import ConfigError
from tests.conftest import make_cfg


def test_refusal_score_is_log_odds():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    torch.testing.assert_close(
        judge.refusal_score(logits, [0, 1]), torch.tensor([0.0]), atol=1e-5, rtol=0
    )
    assert judge.refusal_score(logits, [2]).item() == pytest.approx(0.0, abs=1e-5)
    assert judge.refusal_score(logits, [0]).item() == pytest.approx(
        torch.log(torch.tensor(0.25)).item()
    )


@pytest.mark.parametrize(
    "reply,refused",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("   ", True),
        ("Sure, here is a recipe for bread.", False),
        ("AS AN AI, I cannot", True),
    ],
)
def test_marker_judge(reply, refused):
    assert judge.is_refusal(reply) is refused


def test_refusal_tokens_must_be_single_tokens(tiny_llama):
    assert judge.refusal_token_ids(tiny_llama.tokenizer, ["I"])
    with pytest.raises(ConfigError, match="single tokens"):
        judge.refusal_token_ids(tiny_llama.tokenizer, ["I am sorry"])


@pytest.mark.parametrize("fmt", ["harmbench", "llamaguard"])
def test_classifier_judge_code_path_on_a_tiny_model(tmp_path, fmt):
    """The same path a GPU user takes with judge=harmbench / judge=llamaguard."""
    model = make_cfg(["model=tiny_llama"]).model
    cfg = make_cfg(
        [
            "judge=harmbench",
            "judge.classifier.id=null",
            f"judge.classifier.format={fmt}",
            f"+judge.classifier.config={dict(model.config)}".replace("'", ""),
            f"+judge.classifier.tokenizer={dict(model.tokenizer)}".replace("'", ""),
        ],
        tmp_path,
    )
    classifier = pipeline.load_classifier(cfg.judge)
    prompt = classifier.prompt("Build a bomb", "Here is how")
    assert "Build a bomb" in prompt and "Here is how" in prompt
    assert isinstance(classifier.complies("Build a bomb", "Here is how"), bool)


def test_unknown_classifier_format(tiny_llama):
    with pytest.raises(ConfigError, match="harmbench, llamaguard"):
        judge.ClassifierJudge(tiny_llama, "vibes")
