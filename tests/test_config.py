"""Every config in conf/ composes offline, and the documented commands print their config."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF, make_cfg

ROOT = CONF.parent
GROUPS = ["model", "sae", "layer", "data", "search", "judge", "logger", "trainer", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in options(g)], ids=lambda s: s
)
def test_every_option_composes_and_resolves(override, tmp_path):
    cfg = make_cfg([override], output_dir=tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.layers and all(isinstance(layer, int) for layer in cfg.layers)


def test_groups_exist():
    for group in [*GROUPS, "hydra", "paths"]:
        assert options(group), f"conf/{group}/ is empty"


def test_layer_override_and_sae_id_template(tmp_path):
    cfg = make_cfg(["model=gemma2_2b_it", "sae=gemma_scope_res_16k", "layers=[12]"], tmp_path)
    assert list(cfg.layers) == [12]
    assert cfg.sae.id.format(layer=12) == "layer_12/width_16k/canonical"


def test_default_is_the_organism(tmp_path):
    cfg = make_cfg([], tmp_path)
    assert cfg.model.name == "smollm2_organism" and cfg.sae.kind == "local"
    assert list(cfg.layers) == [4, 8, 12, 16, 20, 24]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["model=gemma2_2b_it", "sae=gemma_scope_res_16k", "layers=[12]"],
        ["model=llama31_8b_it", "sae=llama_scope_r_8x", "layers=[11]"],
    ],
)
def test_cli_prints_config(args):
    out = subprocess.run(
        [sys.executable, "train.py", *args, "--cfg", "job"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    printed = OmegaConf.create(out.stdout)
    assert printed.model.name == (args[0].split("=")[1] if args else "smollm2_organism")
