"""SAEs through sae-lens: local round trip, shape and hook checks, registry checks."""

import pytest
from omegaconf import OmegaConf

from refusal import saes
from refusal.errors import ConfigError, HubUnavailable
from refusal.hub import hub_reachable
from tests.conftest import make_cfg

REAL = [
    ("gemma_scope_res_16k", 12),
    ("gemma_scope_res_65k", 12),
    ("llama_scope_r_8x", 11),
    ("llama31_it_andyrdt", 11),
]


def saved(tmp_path, d_in: int, layers, width: int = 96):
    for layer in layers:
        saes.random_sae(d_in, width, layer, seed=1).save_model(tmp_path / f"layer_{layer}")
    return OmegaConf.create({"kind": "local", "path": str(tmp_path / "layer_{layer}")})


def test_local_round_trip_via_config(tiny_llama, tmp_path):
    cfg = make_cfg(
        ["model=tiny_llama", "sae=local", f"sae.path='{tmp_path}/layer_{{layer}}'", "layers=[1,3]"],
        tmp_path,
    )
    saved(tmp_path, tiny_llama.d_model, [1, 3])
    loaded = saes.load(cfg.sae, tiny_llama, list(cfg.layers))
    original = saes.random_sae(tiny_llama.d_model, 96, 1, seed=1)
    assert sorted(loaded) == [1, 3] and loaded[1].cfg.d_sae == 96
    assert (loaded[1].W_dec == original.W_dec).all()
    assert saes.hook_layer(loaded[3]) == 3


def test_d_in_mismatch_names_both_values(tiny_llama, tmp_path):
    cfg = saved(tmp_path, 32, [1])
    with pytest.raises(ConfigError, match="d_in=32.*hidden size 64"):
        saes.load(cfg, tiny_llama, [1])


def test_hook_layer_mismatch(tiny_llama, tmp_path):
    saes.random_sae(tiny_llama.d_model, 16, 2, seed=1).save_model(tmp_path / "layer_1")
    cfg = OmegaConf.create({"kind": "local", "path": str(tmp_path / "layer_{layer}")})
    with pytest.raises(ConfigError, match=r"blocks\.2\.hook_resid_post.*layer 1"):
        saes.load(cfg, tiny_llama, [1])


def test_missing_local_sae(tiny_llama, tmp_path):
    cfg = OmegaConf.create({"kind": "local", "path": str(tmp_path / "nope_{layer}")})
    with pytest.raises(ConfigError, match="nope_1.*sae-lens disk format"):
        saes.load(cfg, tiny_llama, [1])


def test_layer_out_of_range(tiny_llama):
    with pytest.raises(ConfigError, match="out of range"):
        saes.load(OmegaConf.create({"kind": "random", "width": 8}), tiny_llama, [7])


@pytest.mark.parametrize("name,layer", REAL)
def test_real_sae_ids_are_in_the_registry(name, layer, tmp_path):
    sae_cfg = make_cfg([f"sae={name}"], tmp_path).sae
    saes.check_registry(sae_cfg.release, saes.sae_id(sae_cfg, layer))
    assert saes.neuronpedia_id(sae_cfg, layer)


@pytest.mark.parametrize("name", [n for n, _ in REAL])
def test_wrong_sae_id_fails_clearly(name, tmp_path):
    sae_cfg = make_cfg([f"sae={name}"], tmp_path).sae
    with pytest.raises(ConfigError, match="is not in release.*Valid ids include"):
        saes.check_registry(sae_cfg.release, saes.sae_id(sae_cfg, 99))


def test_unknown_release():
    with pytest.raises(ConfigError, match="not in sae-lens's registry"):
        saes.check_registry("gemma-scope-9b-nope", "x")


def test_pretrained_offline_fails_before_download(tiny_llama, tmp_path):
    if hub_reachable():
        pytest.skip("the hub is reachable here")
    cfg = OmegaConf.create(
        {
            "kind": "pretrained",
            "release": "gemma-scope-2b-pt-res-canonical",
            "id": "layer_{layer}/width_16k/canonical",
        }
    )
    with pytest.raises(HubUnavailable, match="sae=local"):
        saes.load(cfg, tiny_llama, [1])
