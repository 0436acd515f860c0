"""Feature cards on the tiny model: each feature of a finding gets one, its activations
read the same as the engine reads them, and the report renders them (in headless
Chromium too)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread

from refusal import cards, pipeline, report
from refusal.features import Feature
from refusal.records import join, parse_row
from tests.conftest import BASE, make_cfg
from tests.test_report import make_run


def searched(instruction: str, minimal: list[str], dormant: str) -> list:
    """One jailbroken prompt's rows: its minimal set and one dormant feature."""
    rows = [
        {"stage": "baseline", "prompt_id": 0, "instruction": instruction, "score": 3.0}
        | {"reply": "I can't help with that.", "refused": True},
        {"stage": "greedy", "prompt_id": 0, "clean_score": 3.0, "candidates": []}
        | {"flips_all": True, "minimal": minimal, "score": -1.0, "n_masks": 1, "batches": 1},
        {"stage": "verification", "prompt_id": 0, "reply_after": "Sure", "flip_verified": True},
        {
            "stage": "dormant",
            "prompt_id": 0,
            "features": [
                {"feature": dormant, "before": 0.0, "after": 1.0}
                | {"score_without": -1.0, "score_with": -2.0, "effect": -1.0}
            ],
        },
    ]
    return join([parse_row(r) for r in rows])


def test_every_feature_of_a_finding_gets_a_card_read_as_the_engine_reads_it(tmp_path):
    ctx = pipeline.setup(make_cfg(BASE, tmp_path))
    instruction = ctx.prompts.eval[0]
    latents = ctx.engine.latents(ctx.engine.prepare(instruction))
    # the most active latents of the prompt at layers 1 and 2: cards with contexts
    a, b = (Feature(layer, int(latents[layer].max(0).values.argmax())) for layer in (1, 2))
    results = searched(instruction, [str(a)], str(b))
    record = cards.build(ctx, results, None)

    assert [(c.feature, c.roles) for c in record.cards] == [
        (a, ["M of prompt 0"]),
        (b, ["dormant, prompt 0"]),
    ]
    assert record.corpus["eval"] == 1 and record.corpus["eval (reply)"] == 1
    assert record.corpus["harmful_train"] == len(ctx.prompts.harmful_train)
    special = set(ctx.lm.tokenizer.all_special_ids)
    ids = ctx.engine.prepare(instruction).input_ids[0].tolist()
    for card in record.cards:
        f = card.feature
        assert len(card.promoted) == len(card.suppressed) == cards.N_TOKENS
        assert card.promoted[0][1] > card.suppressed[0][1]
        peaks = [s.peak for s in card.contexts]
        assert peaks == sorted(peaks, reverse=True) and 0 < len(peaks) <= cards.N_CONTEXTS
        assert card.on_prompt is not None and card.on_prompt.source == "eval 0"
        expected = latents[f.layer][:, f.latent].float()
        expected[[i for i, t in enumerate(ids) if t in special]] = 0.0
        torch.testing.assert_close(
            torch.tensor(card.on_prompt.acts), expected, rtol=1e-3, atol=1e-3
        )
        assert max(peaks) >= card.on_prompt.peak - 1e-3  # its own prompt is in the corpus


def test_no_finding_no_cards(tmp_path):
    ctx = pipeline.setup(make_cfg(BASE, tmp_path))
    assert cards.build(ctx, [], None).cards == []


def planted_card(feature: str) -> cards.FeatureCard:
    tokens = ["How", " to", " pick"]
    snippet = cards.Snippet(source="harmful_train 3", tokens=tokens, acts=[0, 2, 5])
    return cards.FeatureCard(
        feature=Feature.parse(feature),
        roles=["M of prompt 0"],
        promoted=[(" sorry", 1.5)],
        suppressed=[(" Sure", -1.2)],
        contexts=[snippet],
        on_prompt=snippet,
    )


def report_with_a_card(tmp_path: Path) -> Path:
    run = make_run(tmp_path / "run", [1, 2], {0: ["L1/1", "L2/7"], 2: ["L1/3"]})
    record = cards.CardsRecord(corpus={"harmful_train": 4}, cards=[planted_card("L2/7")])
    (run / cards.SAVED).write_text(record.model_dump_json())
    report.write(report.load_jobs(run), run, str(run))
    return run


def test_the_report_shows_cards_replies_and_marks_m(tmp_path):
    run = report_with_a_card(tmp_path)
    text = (run / "report.md").read_text()
    assert "## Feature cards" in text and "### L2/7: M of prompt 0" in text
    assert "## Replies before and after" in text and "> Sure" in text
    page = (run / "report.html").read_text()
    assert 'id="card-L2/7"' in page and "L1/1 L2/7" in page and "data:image/png;base64," in page
    assert "http" not in page.replace("https://www.neuronpedia.org", "")  # self-contained


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs chromium (.ci/run): it is missing")
        pytest.skip("needs chromium (apt-get install chromium); CI installs it")
    return found


def headless(*args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    return subprocess.run(
        [chromium(), *flags, *args], capture_output=True, text=True, timeout=120, check=True
    )


@pytest.mark.slow
def test_the_html_report_renders_in_headless_chromium(tmp_path):
    run = report_with_a_card(tmp_path)
    url = (run / "report.html").as_uri()
    dom = headless("--dump-dom", url).stdout
    assert "L1/1 L2/7" in dom and 'class="card"' in dom and "promotes" in dom
    shot = tmp_path / "shot.png"
    headless(f"--screenshot={shot}", "--window-size=1200,1600", url)
    pixels = imread(shot)[..., :3]
    inked = (pixels < 0.9).any(-1).mean()  # not near-white
    assert 0.01 < inked < 0.9 and pixels.std() > 0.05, "the screenshot is blank"
