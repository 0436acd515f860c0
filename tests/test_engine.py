"""The engine's scores equal a plain hooked full forward with sae-lens's own splice."""

import platform
import resource
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from refusal import models
from refusal.engine import REFERENCE_ROWS, PromptProbe
from refusal.features import Feature
from refusal.forwards import hooked
from refusal.interventions import Ablation, Steer
from refusal.judge import Openings, refusal_score
from refusal.reference import hooked_scores
from tests.conftest import make_cfg, tiny_engine, tiny_forwards

PROMPT = "Explain how to pick a lock on a neighbour's front door."


def active_features(engine, cache, per_layer: int = 3) -> list[Feature]:
    latents = engine.latents(cache)
    return [
        Feature(layer, int(i))
        for layer, z in latents.items()
        for i in z.max(0).values.topk(per_layer).indices
    ]


def reference_scores(engine, features, masks) -> torch.Tensor:
    """HF forward and generate per mask, hooks splicing each SAE with sae-lens's own
    encode/decode."""
    return hooked_scores(engine, PROMPT, features, masks, batch_size=1)


def clean_reply(lm, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """The model's greedy reply to PROMPT (n tokens) and the logits before each token."""
    batch = lm.tokenize([PROMPT])
    out = lm.model.generate(
        **batch,
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=lm.tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, batch["input_ids"].shape[1] :].tolist(), list(out.logits)


def own_openings(lm, n: int = 4) -> Openings:
    """Openings a random model's greedy reply walks deep into: its own first n tokens, and
    each first token's runner-up after the first (so paths both finish and leave)."""
    reply, logits = clean_reply(lm, n)
    runner_up = int(logits[1][0].topk(2).indices[1])
    return Openings.build([reply, [reply[0], runner_up, reply[2]]])


@pytest.mark.parametrize("openings", ["markers", "own"])
@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize(
    "ablation",
    [Ablation(), Ablation(mode="scale", scale=-2.0), Ablation(positions="prompt")],
    ids=["zero", "clamp", "prompt-only"],
)
def test_engine_equals_hooked_full_forward(tiny_lm, architecture, ablation, openings):
    engine = tiny_engine(
        tiny_lm,
        layers=(1, 2),
        architecture=architecture,
        intervention=ablation,
        batch_size=3,
        openings=own_openings(tiny_lm) if openings == "own" else None,
    )
    cache = engine.prepare(PROMPT)
    features = active_features(engine, cache)
    masks = torch.tensor(
        [[0] * 6, [1] * 6, [1, 0, 1, 0, 1, 0], [0, 1, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1]]
    )
    ours = engine.score(cache, features, masks)
    expected = reference_scores(engine, features, masks)
    if openings == "own":
        assert (ours > 0).any()  # some rows walked a whole opening
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert ours[1] != pytest.approx(ours[0])  # the ablation did change something
    assert engine.evals == len(masks)


def test_empty_mask_is_the_clean_model(tiny_lm):
    engine = tiny_engine(tiny_lm, openings=own_openings(tiny_lm))
    cache = engine.prepare(PROMPT)
    features = active_features(engine, cache)
    clean = reference_scores(engine, features, torch.zeros(1, len(features))).item()
    assert clean > 0  # the clean greedy reply is an opening: the walk went to its end
    assert cache.score == pytest.approx(clean, abs=1e-4)
    assert engine.score(cache, features, torch.zeros(1, len(features))).item() == pytest.approx(
        clean, abs=1e-4
    )


def test_latents_are_read_before_their_own_edit(tiny_llama):
    engine = tiny_engine(tiny_llama, layers=(1, 2))
    cache = engine.prepare(PROMPT)
    clean = engine.latents(cache)
    batch = tiny_llama.tokenize([PROMPT])
    h2 = tiny_llama.run_blocks(tiny_llama.embed(batch["input_ids"]), 0, 3)
    torch.testing.assert_close(clean[2], engine.saes[2].encode(h2[0]))
    own = [Feature(2, int(clean[2].max(0).values.argmax()))]
    torch.testing.assert_close(engine.latents(cache, own)[2], clean[2])
    upstream = [Feature(1, int(i)) for i in clean[1].max(0).values.topk(5).indices]
    assert not torch.allclose(engine.latents(cache, upstream)[2], clean[2])


def test_out_of_memory_halves_the_batch(tiny_llama, monkeypatch):
    engine = tiny_engine(tiny_llama, batch_size=8)
    cache = engine.prepare(PROMPT)
    features = active_features(engine, cache)
    masks = 1 - torch.eye(5, len(features))
    expected = engine.score(cache, features, masks)
    real = engine._score_chunk

    def flaky(cache, features, masks, reference):
        if len(masks) > 2:
            raise torch.OutOfMemoryError("simulated")
        return real(cache, features, masks, reference)

    monkeypatch.setattr(engine, "_score_chunk", flaky)
    got = engine.score(cache, features, masks)
    assert engine.batch_size == 2
    torch.testing.assert_close(got, expected)


def test_a_repeated_mask_is_scored_once(tiny_llama):
    engine = tiny_engine(tiny_llama)
    cache = engine.prepare(PROMPT)
    features = active_features(engine, cache)
    distinct = torch.randint(0, 2, (6, len(features))).float().unique(dim=0)
    order = torch.tensor([2, 0, 2, 1, 0, 2]) % len(distinct)
    expected = engine.score(cache, features, distinct)
    before = engine.evals
    torch.testing.assert_close(engine.score(cache, features, distinct[order]), expected[order])
    assert engine.evals - before == len(order.unique())


def test_rows_that_differ_late_share_the_blocks_before(tiny_llama):
    """Greedy's single removals: rows that keep every layer-1 feature ablated run blocks
    2..3 once, branching at layer 3, and score as when every row runs alone."""
    engine = tiny_engine(tiny_llama, layers=(1, 3))
    cache = engine.prepare(PROMPT)
    features = active_features(engine, cache)  # three at layer 1, then three at layer 3
    masks = 1 - torch.eye(len(features) + 1, len(features))
    flops = {}
    for share in (True, False):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            scores = engine._score_chunk(cache, features, masks, share=share)
        flops[share] = counter.get_total_flops()
        torch.testing.assert_close(scores, reference_scores(engine, features, masks))
    # 7 rows, 4 distinct at layer 1: blocks 2..3 run for 4 rows instead of 7
    assert flops[True] < 0.8 * flops[False]


def fire_late(engine, cache, early: list[Feature], layer: int, after: int, n: int) -> list[Feature]:
    """n latents of the SAE at `layer` (above the first) shifted to fire only from position
    `after` on, with the `early` features (all at the first) ablated: the n that fire
    most there."""
    sae = engine.saes[layer]
    ones = torch.ones(1, len(early))
    edit = engine.edit(early, ones, cache.input_ids, cache.latents)
    with torch.no_grad():
        h = engine.lm.run_blocks(edit(engine.start, cache.hidden), engine.start + 1, layer + 1)
        pre = (h[0] - sae.b_dec * sae.cfg.apply_b_dec_to_input) @ sae.W_enc + sae.b_enc
        before = pre[:after].max(0).values
        chosen = (pre[after:].max(0).values - before).topk(n).indices
        sae.b_enc[chosen] -= before[chosen] + 1e-3
    assert (pre[after:, chosen].max(0).values > before[chosen] + 1e-3).all()
    return [Feature(layer, int(i)) for i in chosen]


def test_rows_start_where_they_part_from_the_reference(tiny_llama, monkeypatch):
    """Greedy's single removals, every feature ablated but one: before the kept feature
    first fires a row equals the reference row (every feature ablated), so rows keeping
    late-firing features run the prompt's later positions only, from the reference's
    keys and values, and score as when every row runs whole."""
    engine = tiny_engine(tiny_llama, layers=(1, 2))
    cache = engine.prepare(PROMPT)
    after = cache.length // 2
    early = active_features(engine, cache, per_layer=1)[:1]  # layer 1, fires early
    late = fire_late(engine, cache, early, layer=2, after=after, n=REFERENCE_ROWS - 1)
    features = [*early, *late]
    masks = torch.ones(REFERENCE_ROWS, len(features))
    masks[1:, 1:] = 1 - torch.eye(len(late))
    reference = engine.reference(cache, features, masks)
    assert reference.mask.tolist() == [1.0] * len(features)
    assert engine.starts(cache, features, masks, reference).min() >= after
    assert engine.starts(cache, features, masks, cache.clean).min() < after  # clean: early
    positions = []
    run_blocks = tiny_llama.run_blocks

    def counted(h, start, *args, **kwargs):
        if start > 0:  # the prompt's blocks after the first SAE layer (the walk starts at 0)
            positions.append(h.shape[0] * h.shape[1])
        return run_blocks(h, start, *args, **kwargs)

    monkeypatch.setattr(tiny_llama, "run_blocks", counted)
    scores = {}
    for name, ref in (("reference", reference), ("clean", None)):
        positions.clear()
        scores[name] = engine._score_chunk(cache, features, masks, ref)
        torch.testing.assert_close(scores[name], reference_scores(engine, features, masks))
        if name == "reference":  # one state to layer 2, then one a row: T - after positions
            assert sum(positions) <= (1 + len(masks)) * (cache.length - after)
    assert not torch.equal(scores["reference"], cache.score * torch.ones(len(masks)))


def silence_on_prompt(
    engine, layer: int, prompt_ids: torch.Tensor, reply_ids: torch.Tensor, n: int
) -> list[int]:
    """n latents of the SAE at `layer` shifted to read zero on the prompt's edited positions
    though they still fire on the clean reply's tokens (those that fire most there)."""
    lm, sae = engine.lm, engine.saes[layer]
    ids = torch.cat([prompt_ids, reply_ids], 1)
    with torch.no_grad():
        pre = lm.run_blocks(lm.embed(ids), 0, layer + 1)[0] @ sae.W_enc + sae.b_enc
        edited = ~engine.spared(prompt_ids)[0]
        prompt_top = pre[: prompt_ids.shape[1]][edited].max(0).values
        reply_top = pre[prompt_ids.shape[1] :].max(0).values - prompt_top
        chosen = reply_top.argsort(descending=True)[:n]
        assert (reply_top[chosen] > 0).all()
        sae.b_enc[chosen] -= prompt_top[chosen] + 1e-3
    return chosen.tolist()


def test_rows_that_differ_only_in_silent_latents_share_blocks(tiny_llama, monkeypatch):
    """Ablating a latent that is zero at every edited prompt position changes nothing
    there: rows that differ only in such latents run the later blocks once, and each
    still decodes its reply under its own mask (such a latent may fire on the reply)."""
    openings = own_openings(tiny_llama)
    engine = tiny_engine(tiny_llama, layers=(1, 2), openings=openings)
    cache = engine.prepare(PROMPT)
    reply = torch.tensor([openings.chain[0][:2].tolist()])  # the clean reply opens so
    silent = silence_on_prompt(engine, 2, cache.input_ids, reply, n=4)
    top = engine.latents(cache)[2].max(0).values.topk(2).indices
    features = [Feature(2, int(i)) for i in [*top, *silent]]
    # the clean prompt; each silent latent ablated, then all four; the top latent ablated
    masks = torch.zeros(7, len(features))
    masks[1:5, 2:] = torch.eye(4)
    masks[5, 2:] = 1
    masks[6, 0] = 1
    rows_after_layer_2 = []
    run_blocks = tiny_llama.run_blocks

    def counted(h, start, *args, **kwargs):
        if start == 3:
            rows_after_layer_2.append(len(h))
        return run_blocks(h, start, *args, **kwargs)

    monkeypatch.setattr(tiny_llama, "run_blocks", counted)
    scores = engine.score(cache, features, masks)
    torch.testing.assert_close(scores, reference_scores(engine, features, masks))
    # rows 0-5 edit nothing on the prompt: one state; row 6 another
    assert rows_after_layer_2 == [2]
    assert scores[0] > 0  # the clean reply walks its whole opening
    assert (scores[1:6] != scores[0]).any()  # and a silent latent's row decodes its own


def test_the_search_reads_latents_only_where_an_edit_acts(tiny_llama):
    """A latent that fires only on a spared special token is inert (ablating it changes
    no score): the probe's latents, which pick candidates, random draws and FM extras,
    leave those positions out."""
    engine = tiny_engine(tiny_llama, layers=(1, 2))
    cache = engine.prepare(PROMPT)
    spared = engine.spared(cache.input_ids)[0]
    assert spared.any() and not spared.all()
    sae = engine.saes[2]
    with torch.no_grad():  # shift the latent that most prefers the special tokens
        h = tiny_llama.run_blocks(tiny_llama.embed(cache.input_ids), 0, 3)[0]
        pre = h @ sae.W_enc + sae.b_enc
        edited_top = pre[~spared].max(0).values
        latent = int((pre[spared].max(0).values - edited_top).argmax())
        sae.b_enc[latent] -= edited_top[latent] + 1e-3
    probe = PromptProbe(engine, cache)
    full, seen = engine.latents(cache), probe.latents()
    for layer in full:
        torch.testing.assert_close(seen[layer], full[layer][~spared])
    assert full[2][:, latent].max() > 0 and seen[2][:, latent].max() == 0
    feature = [Feature(2, latent)]
    assert engine.score(cache, feature, torch.ones(1, 1)).item() == pytest.approx(cache.score)


def test_batch_size_tunes_itself_on_the_first_masks_scored(tiny_llama):
    fixed = tiny_engine(tiny_llama, batch_size=4)
    tuned = tiny_engine(tiny_llama, batch_size=4, tune=True)
    cache = fixed.prepare(PROMPT)
    features = active_features(fixed, cache)
    masks = torch.randint(0, 2, (12, len(features))).float()
    got = tuned.score(cache, features, masks)
    size = tuned.batch_size
    assert not tuned.tune and size & (size - 1) == 0 and size <= 1024  # a power of two
    torch.testing.assert_close(got, fixed.score(cache, features, masks), rtol=0, atol=1e-4)
    tuned.score(cache, features, masks)
    assert tuned.batch_size == size  # tuned once, then kept


def test_generate_without_features_is_plain_greedy(tiny_llama):
    batch = tiny_llama.tokenize([PROMPT])
    out = tiny_llama.model.generate(
        **batch, max_new_tokens=6, do_sample=False, pad_token_id=tiny_llama.tokenizer.pad_token_id
    )
    expected = tiny_llama.tokenizer.decode(
        out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert tiny_forwards(tiny_llama).generate([PROMPT], max_new_tokens=6) == [expected]


@pytest.mark.parametrize("intervention", [Ablation(), Steer(alpha=8.0)], ids=["ablate", "steer"])
def test_generation_edit_matches_scoring_edit(tiny_llama, intervention):
    """The hooked generation path applies the same edit: its first token's logits agree."""
    engine = tiny_engine(tiny_llama, intervention=intervention)
    refusal_ids = tiny_forwards(tiny_llama).refusal_ids
    engine.openings = Openings.build([[i] for i in refusal_ids])  # first token only
    cache = engine.prepare(PROMPT)
    features = active_features(engine, cache)
    edit = engine.feature_edit(features)
    batch = tiny_llama.tokenize([PROMPT])
    with hooked(tiny_llama, edit, edit.layers, spare=engine.spared):
        score = refusal_score(tiny_llama.model(**batch).logits[:, -1], refusal_ids)
    expected = engine.score(cache, features, torch.ones(1, len(features)))
    torch.testing.assert_close(score, expected)
    # the capability cost's many-prompt pass too
    logits = tiny_forwards(tiny_llama).first_token_logits([PROMPT], edit, spare=engine.spared)
    torch.testing.assert_close(refusal_score(logits, refusal_ids), expected, rtol=1e-4, atol=1e-4)


def test_special_token_positions_are_left_alone_unless_asked(tiny_llama):
    """special_tokens=false: at <|im_start|> / <|im_end|> the residual keeps its latents,
    elsewhere it is the splice with the features' latents zeroed; true: both are spliced.
    Either way the engine scores as the hooked reference does."""
    engines = {
        special_tokens: tiny_engine(  # the same random SAEs: one prompt cache serves both
            tiny_llama,
            intervention=Ablation(special_tokens=special_tokens),
            openings=own_openings(tiny_llama),
        )
        for special_tokens in (False, True)
    }
    cache = engines[False].prepare(PROMPT)
    special = tiny_llama.is_special(cache.input_ids[0])
    z, sae = cache.latents, engines[False].saes[1]
    # the latents most active at a special position and at an ordinary one
    latents = sorted({int(z[where].max(0).values.argmax()) for where in (special, ~special)})
    features = [Feature(1, i) for i in latents]
    ablated = z.clone()
    ablated[:, latents] = 0
    spliced = cache.hidden[0] + sae.decode(ablated) - sae.decode(z)
    for where in (special, ~special):  # the features are active at both kinds of position
        assert not torch.allclose(spliced[where], cache.hidden[0][where])
    ones = torch.ones(1, len(features))
    edited = {
        special_tokens: engine.edit(features, ones, cache.input_ids, cache.latents)(
            1, cache.hidden
        )[0]
        for special_tokens, engine in engines.items()
    }
    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(edited[True], spliced, **close)
    torch.testing.assert_close(edited[False][special], cache.hidden[0][special], **close)
    torch.testing.assert_close(edited[False][~special], spliced[~special], **close)
    masks = torch.tensor([[1] * len(features), [0] * len(features)])
    for engine in engines.values():
        expected = reference_scores(engine, features, masks)
        torch.testing.assert_close(engine.score(cache, features, masks), expected, **close)


@pytest.mark.parametrize("positions", ["all", "prompt"])
def test_steering_equals_hooked_full_forward(tiny_llama, positions):
    """search.intervention=steer: α × the selected decoder rows added at every position,
    as a plain hooked forward and generate adds them."""
    engine = tiny_engine(
        tiny_llama,
        intervention=Steer(alpha=6.0, positions=positions),
        batch_size=3,
        openings=own_openings(tiny_llama),
    )
    cache = engine.prepare(PROMPT)
    features = active_features(engine, cache)
    masks = torch.tensor([[0] * 6, [1] * 6, [1, 0, 1, 0, 1, 0], [0, 0, 0, 1, 1, 1]])
    ours = engine.score(cache, features, masks)
    torch.testing.assert_close(
        ours, reference_scores(engine, features, masks), rtol=1e-4, atol=1e-4
    )
    assert ours[0] == pytest.approx(cache.score, abs=1e-4)  # nothing steered: the clean score
    assert ours[1] != pytest.approx(ours[0])  # steering did change something


def test_nan_in_activations_names_the_layer():
    from refusal import models
    from refusal.errors import NumericsError
    from tests.conftest import make_cfg

    lm = models.load(make_cfg(["model=tiny_llama"]).model, seed=0)
    with torch.no_grad():
        lm.blocks[2].mlp.down_proj.weight.fill_(float("nan"))
    engine = tiny_engine(lm, layers=(1, 3))
    with pytest.raises(NumericsError, match="at layer 2.*float32"):
        engine.prepare(PROMPT)


@pytest.mark.slow
def test_compiled_blocks_score_as_the_plain_ones():
    """search.compile=true runs the engine's blocks through torch.compile, decoding through
    the KV cache too: same scores."""
    lms = [models.load(make_cfg(["model=tiny_llama"]).model, seed=0) for _ in range(2)]
    openings = own_openings(lms[0])
    plain = tiny_engine(lms[0], openings=openings)
    compiled = tiny_engine(lms[1], compile=True, openings=openings)
    feats = [Feature(1, i) for i in range(6)] + [Feature(2, i) for i in range(6)]
    masks = torch.bernoulli(
        torch.full((8, len(feats)), 0.5), generator=torch.Generator().manual_seed(0)
    )
    masks[0] = 0  # the clean reply: a whole opening
    scores = [e.score(e.prepare(PROMPT), feats, masks) for e in (plain, compiled)]
    assert compiled.lm.compiled is not None
    assert (scores[0] > 0).any()  # some rows decoded a whole opening
    assert torch.allclose(*scores, atol=1e-4)


# Thirty batches of three 20 MB activations, freed and allocated again, after a first batch:
# the pages faulted in, in a fresh process.
REALLOCATIONS = """
import resource, torch
from refusal.allocator import keep_freed_memory
assert keep_freed_memory()
def batch():
    _ = [torch.ones(20 * 2**18) for _ in range(3)]
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_activations_are_kept_for_reuse_not_faulted_in_again():
    """The heap may grow once more, never batch after batch. (glibc's defaults faulted in
    2 to 20 batches' worth in thirty, depending on how its adaptive thresholds moved.)"""
    run = subprocess.run(
        [sys.executable, "-c", REALLOCATIONS], capture_output=True, text=True, check=True
    )
    batch_pages = 3 * 20 * 2**20 // resource.getpagesize()
    assert int(run.stdout) < 2 * batch_pages
