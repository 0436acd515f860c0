"""End to end on tiny_llama with random SAEs: every stage runs and writes its results."""

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import open_dict

from refusal import controls, pipeline
from refusal.engine import PromptProbe
from refusal.errors import ConfigError
from refusal.features import Feature
from refusal.forwards import Forwards
from refusal.records import ControlsRecord, PromptResult, join, parse_row
from tests.conftest import BASE, CONF, TINY, make_cfg


def results(run_dir) -> list[PromptResult]:
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    return join([parse_row(json.loads(line)) for line in lines])


@pytest.fixture(scope="module")
def threshold(tmp_path_factory) -> float:
    """A refusal threshold between the tiny model's clean score and its all-candidates score."""
    out = tmp_path_factory.mktemp("probe")
    pipeline.run(make_cfg([*BASE, "judge.threshold=-1000", "search.batch_size=auto"], out))
    size = json.loads((out / "summary.json").read_text())["batch_size"]
    assert size & (size - 1) == 0, "auto tunes the batch size to a power of two"
    searched = [r.greedy for r in results(out) if r.greedy and r.greedy.score is not None]
    search = min(searched, key=lambda g: g.score - g.clean_score)
    assert search.score < search.clean_score, "no candidate set lowers the score"
    return (search.clean_score + search.score) / 2


@pytest.mark.slow
def test_every_stage_runs_end_to_end(tmp_path, flipping):
    threshold, marker = flipping
    # the FM samples its 64 masks 32 at a time
    overrides = [*TINY, "logger=none", f"judge.threshold={threshold}", "search.fm.sample_step=32"]
    cfg = make_cfg(overrides, tmp_path)
    with open_dict(cfg):
        cfg.judge.markers = [marker]
    pipeline.run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "n_eval",
        "n_refused",
        "n_flipped_verified",
        "flip_rate",
        "n_jailbroken",
        "jailbreak_rate",
        "n_unresolved",
        "one_minimal_rate",
        "judge_agreement",
        "median_seconds_per_prompt",
        "minimal_set_sizes",
        "all_minimal_verified",
        "fm_heldout_auc",
        "harmless_kl",
        "n_dormant",
        "batch_size",
        "wall_seconds",
        "seed",
        "versions",
    ):
        assert key in summary
    assert summary["n_eval"] == 2
    assert summary["precision"] == "float32"  # model.dtype auto, on a CPU
    parts = summary["stage_seconds"]
    assert list(parts) == ["setup", "baseline", "direction", "search", "controls", "cards"]
    assert 0 < sum(parts.values()) <= summary["wall_seconds"]
    got = results(tmp_path)
    assert [r.prompt_id for r in got] == [0, 1]
    searched = [r for r in got if r.flips_all]
    assert searched, "the threshold was chosen so that ablating all candidates flips"
    with open_dict(cfg):
        cfg.resume = True  # reopened to inspect: a resume keeps the run's files
    state = pipeline.setup(cfg)
    jailbroken = [row for row in searched if row.flip_verified]
    assert jailbroken, "the marker was chosen so that a flip is judged compliance"
    for row in searched:
        assert row.greedy and row.verification and row.capability
        if not row.flip_verified:  # unresolved: FM and dormant run on jailbreaks only
            assert row.stages == ["greedy", "verification", "random_control", "capability"]
            assert row.verification.minimality == [] and not row.one_minimal
    for row in jailbroken:
        assert row.greedy and row.verification and row.interactions and row.dormant
        assert row.stages == [
            "greedy",
            "verification",
            "interactions",
            "dormant",
            "random_control",
            "capability",
        ]
        minimal = row.greedy.minimal
        checks = row.verification.minimality
        assert [c.feature for c in checks] == minimal  # each M minus one, generated and judged
        assert row.one_minimal == all(c.verdict == "refusal" for c in checks)
        probe = PromptProbe(state.engine, state.engine.prepare(row.instruction))
        masks = torch.ones(len(minimal) + 1, len(minimal)) - torch.cat(
            [torch.zeros(1, len(minimal)), torch.eye(len(minimal))]
        )
        scores = probe.score(minimal, masks)
        assert scores[0] < threshold and (scores[1:] >= threshold).all()  # flips, and 1-minimal
        assert row.interactions.n_masks == 64 and len(row.interactions.main_effects) >= len(minimal)
        assert row.capability.harmless_kl >= 0 and isinstance(row.dormant.features, list)
        saved = torch.load(tmp_path / "fm" / f"prompt_{row.prompt_id}" / "masks.pt")
        assert saved["features"] == [str(f) for f in row.interactions.features]
        assert (
            len(saved["masks"]) == 32 * row.interactions.fits == row.interactions.n_distinct_masks
        )
        rescored = probe.score([Feature.parse(f) for f in saved["features"]], saved["masks"])
        assert torch.allclose(rescored, saved["scores"], atol=1e-4)  # the FM's data, as scored
    checks = ControlsRecord.model_validate_json((tmp_path / "controls.json").read_text())
    assert checks.transfer is not None and checks.direction is not None
    assert checks.clean_harmless_refusal_rate is not None
    assert checks.transfer.sources == [r.prompt_id for r in searched]  # every M
    assert checks.transfer.targets == [r.prompt_id for r in searched]
    for s, row in zip(checks.transfer.sources, checks.transfer.flips):
        assert row[checks.transfer.targets.index(s)], "the diagonal is each prompt's own flip"
    assert summary["transfer_rate"] == checks.transfer.rate
    assert checks.minimal_cost is not None and checks.minimal_cost.n_prompts == 2
    assert checks.minimal_cost.n_edits == len(checks.transfer.sources)  # every M costed
    assert 0 <= checks.direction.cost.harmless_refusal_rate <= 1
    assert (tmp_path / "direction.pt").exists() and json.loads(
        (tmp_path / "direction.json").read_text()
    )["layer"] >= 0


def test_pairs_generated_together_get_the_replies_they_get_alone(tmp_path):
    """Context.replies batches many (instruction, feature set) pairs, each row with its
    own mask; the Ms' and random draws' capability costs generate that way."""
    ctx = pipeline.setup(make_cfg([*BASE, "search.batch_size=3"], tmp_path))
    first, second = ctx.prompts.eval[:2]
    latents = ctx.engine.latents(ctx.engine.prepare(first))
    top = [
        Feature(layer, int(i))
        for layer, z in latents.items()
        for i in z.max(0).values.topk(4).indices
    ]
    sets = [[], top, top[:4], top[4:], [], top[:4]]
    instructions = [first, second, first, first, second, second]
    together = ctx.replies(instructions, sets, max_new_tokens=6)
    alone = [ctx.replies([i], [s], max_new_tokens=6)[0] for i, s in zip(instructions, sets)]
    assert together == alone
    assert len(set(together[:4])) == 4  # every set gives its own reply
    batched = controls.feature_costs(ctx, sets[1:3], "two sets")
    each = [controls.cost(ctx, controls.feature_spec(ctx, s), "one set") for s in sets[1:3]]
    for got, expected in zip(batched, each):
        assert got.harmless_refusal_rate == expected.harmless_refusal_rate
        assert got.harmless_kl == pytest.approx(expected.harmless_kl, abs=1e-6)


def test_no_refused_prompt_is_a_result_not_a_crash(tmp_path):
    cfg = make_cfg([*BASE, "judge.threshold=1000"], tmp_path)
    assert pipeline.run(cfg) is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_refused"] == 0 and summary["flip_rate"] is None


STAGES = "search.stages=[baseline,direction,greedy,verification]"


@pytest.mark.slow
def test_a_stage_left_out_is_skipped(tmp_path, threshold):
    pipeline.run(make_cfg([*BASE, f"judge.threshold={threshold}", STAGES], tmp_path))
    searched = [r for r in results(tmp_path) if r.searched]
    assert searched and all(r.stages in (["greedy"], ["greedy", "verification"]) for r in searched)
    assert any(r.verification for r in searched) and not (tmp_path / "fm").exists()


@pytest.mark.slow
def test_prompts_searched_together_find_what_they_find_one_at_a_time(
    tmp_path, threshold, monkeypatch
):
    """search.prompts_together runs each stage on several prompts before the next stage:
    the rows are those of one prompt at a time, and verification decodes the prompts'
    replies in fewer generation batches."""
    batches = []
    generate = Forwards.generate
    monkeypatch.setattr(
        Forwards, "generate", lambda fw, *a, **k: batches.append(1) or generate(fw, *a, **k)
    )
    found, generated = {}, {}
    for together in (1, 8):
        out = tmp_path / str(together)
        overrides = [*BASE, f"judge.threshold={threshold}", "data.max_eval=8", STAGES]
        cfg = make_cfg([*overrides, f"search.prompts_together={together}"], out)
        batches.clear()
        pipeline.run(cfg)
        generated[together] = len(batches)
        found[together] = [
            [row and row.model_dump(exclude={"seconds", "evals"}) for row in rows]
            for rows in ((r.greedy, r.verification) for r in results(out) if r.searched)
        ]
    assert sum(r[1] is not None for r in found[1]) >= 2, "two prompts verified"
    assert found[8] == found[1]
    assert generated[8] < generated[1]


@pytest.mark.parametrize(
    "stages, missing",
    [
        ("[baseline,greedy,interactions]", "'direction'"),
        ("[baseline,direction,dormant]", "'greedy', 'verification'"),
        ("[baseline,direction,greedy,interactions]", "'verification'"),
    ],
)
def test_a_stage_without_its_input_stops_at_start_up(tmp_path, stages, missing):
    cfg = make_cfg([*BASE, f"search.stages={stages}"], tmp_path)
    with pytest.raises(ConfigError, match=f"needs \\[{missing}\\]"):
        pipeline.setup(cfg)


def test_an_unknown_stage_or_intervention_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'bogus'.*unknown"):
        pipeline.setup(make_cfg([*BASE, "search.stages=[baseline,bogus]"], tmp_path))
    with pytest.raises(ConfigError, match="search.intervention=bogus"):
        pipeline.setup(make_cfg([*BASE, "search.intervention=bogus"], tmp_path))
    with pytest.raises(ConfigError, match="search.candidates.direction=bogus"):
        pipeline.setup(make_cfg([*BASE, "search.candidates.direction=bogus"], tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, model, scale",
    [("paper_gemma2", "tiny_gemma2", -3), ("paper_llama31", "tiny_llama", -1)],
)
def test_paper_presets_run_end_to_end_on_tiny_shapes(tmp_path, preset, model, scale):
    """The presets' own settings (clamp, the HarmBench classifier judge, 512-token
    verification, SAEs at many layers) compose and run; only what needs a GPU or the hub
    is swapped for its tiny stand-in: model, SAEs, data, trainer, the classifier's weights."""
    tiny = make_cfg([f"model={model}"]).model
    paper = make_cfg([f"experiment={preset}"])
    assert len(paper.layers) >= 10  # dormant features need later SAE layers to wake at
    cfg = make_cfg(
        [
            f"experiment={preset}",
            f"model={model}",
            "sae=random",
            "layer=tiny",
            "trainer=default",
            "trainer.max_epochs=5",
            "logger=none",
            "data.harmful_train=builtin:harmful/train",
            "data.harmless_train=builtin:harmless/train",
            "data.eval=builtin:harmful/eval",
            "data.max_eval=2",
            "data.n_train=4",
            "data.n_val=2",
            "search.compile=false",
            "search.batch_size=16",
            "search.fm.n_masks=32",
            "search.direction.filter_prompts=false",
            "judge.threshold=-1000",
            "judge.markers=[' ']",  # every clean reply of the random model refuses: searched
            "judge.classifier.id=null",
            f"+judge.classifier.config={dict(tiny.config)}".replace("'", ""),
            f"+judge.classifier.tokenizer={dict(tiny.tokenizer)}".replace("'", ""),
        ],
        tmp_path,
    )
    assert cfg.search.ablation.mode == "scale" and cfg.search.ablation.scale == scale
    assert cfg.judge.kind == "classifier" and cfg.judge.classifier.format == "harmbench"
    assert cfg.judge.max_new_tokens == 512
    with open_dict(cfg):
        cfg.judge.max_new_tokens = 8  # the preset's 512, shortened for a random model
    pipeline.run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_eval"] == 2 and summary["judge_agreement"] is None  # the classifier judged
    assert summary["n_refused"] >= 1 and any(r.greedy for r in results(tmp_path))  # searched


@pytest.mark.slow
def test_the_smoke_run_finds_the_planted_latent_and_writes_everything(tmp_path):
    """experiment=smoke (the README's first command), as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    out = subprocess.run(
        [sys.executable, "train.py", "experiment=smoke", f"hydra.run.dir={tmp_path}"],
        cwd=CONF.parent,
        capture_output=True,
        text=True,
        timeout=600,
        env=env | {"WANDB_SILENT": "true"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_jailbroken"] >= 1 and summary["fm_heldout_auc"]
    jailbroken = [r for r in results(tmp_path) if r.flip_verified]
    planted = make_cfg(["experiment=smoke"]).sae.plant.latent
    assert all(f.latent == planted for r in jailbroken for f in r.minimal), "ground truth"
    # a prompt without a trigger word is not refused: the refusal follows the plant
    assert any(not r.baseline.refused for r in results(tmp_path))
    assert (tmp_path / "report.html").exists() and (tmp_path / "cards.json").exists()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
