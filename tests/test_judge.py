"""Judges: refusal score, markers, and the classifier judge's code path on a tiny model."""

import pytest
import torch

from refusal import judge, pipeline
from refusal.errors import ConfigError
from tests.conftest import make_cfg


def test_refusal_score_is_the_greedy_margin():
    logits = torch.tensor([[1.0, 3.0, 2.5, 0.0], [4.0, 0.5, 1.0, 2.0]])
    # the best refusal token against the best other token, per row
    torch.testing.assert_close(judge.refusal_score(logits, [0, 1]), torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(judge.refusal_score(logits, [2]), torch.tensor([-0.5, -3.0]))


def test_refusal_score_sign_is_the_greedy_first_token():
    logits = torch.randn(256, 50, generator=torch.Generator().manual_seed(0))
    refusal_ids = [3, 17, 41]
    greedy_refuses = torch.isin(logits.argmax(-1), torch.tensor(refusal_ids))
    assert torch.equal(judge.refusal_score(logits, refusal_ids) > 0, greedy_refuses)
    # both decisions occur, so the check is not vacuous
    assert greedy_refuses.any() and (~greedy_refuses).any()


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
