"""SAEs through sae-lens only: registry checks before download, shape checks after load.

One SAE per selected residual-stream layer. The `sae=` config names where they come
from: a pretrained sae-lens release (`release` + an `id` template with `{layer}`), a
directory in sae-lens disk format (`path` template), or random weights (tests).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import DictConfig
from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

from refusal import planted
from refusal.errors import ConfigError
from refusal.hub import require_hub
from refusal.models import LM

_LAYER_IN_HOOK = re.compile(r"(?:blocks|layers)\.(\d+)(?:\.|$)")


def sae_id(cfg: DictConfig, layer: int) -> str:
    return str(cfg.id).format(layer=layer)


def check_registry(release: str, sae_id: str) -> None:
    """Raise unless sae-lens's own registry of pretrained SAEs lists this release and id."""
    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = [r for r in directory if release.split("-")[0] in r][:8]
        raise ConfigError(
            f"SAE release '{release}' is not in sae-lens's registry of pretrained SAEs. "
            f"Similar releases: {close or 'none'}."
        )
    ids = list(directory[release].saes_map)
    if sae_id not in ids:
        digits = re.findall(r"\d+", sae_id)
        close = [i for i in ids if digits and digits[0] in re.findall(r"\d+", i)][:8] or ids[:8]
        raise ConfigError(
            f"SAE id '{sae_id}' is not in release '{release}' ({len(ids)} ids). "
            f"Valid ids include: {close}. Check the layer and the sae.id template."
        )


def neuronpedia_id(cfg: DictConfig, layer: int) -> str | None:
    """The Neuronpedia id of this layer's SAE, when its release has one."""
    if cfg.get("release") is None:
        return None
    lookup = get_pretrained_saes_directory()[cfg.release]
    return (lookup.neuronpedia_id or {}).get(sae_id(cfg, layer))


def hook_layer(sae: SAE) -> int | None:
    """The residual layer an SAE was trained on, read from its hook name."""
    match = _LAYER_IN_HOOK.search(sae.cfg.metadata.hook_name or "")
    return int(match.group(1)) if match else None


def check_against_model(sae: SAE, lm: LM, layer: int, where: str) -> None:
    if sae.cfg.d_in != lm.d_model:
        raise ConfigError(
            f"SAE {where} has d_in={sae.cfg.d_in} but {lm.name} has hidden size {lm.d_model}: "
            "this SAE belongs to another model."
        )
    trained_on = hook_layer(sae)
    if trained_on is not None and trained_on != layer:
        raise ConfigError(
            f"SAE {where} hooks '{sae.cfg.metadata.hook_name}' (layer {trained_on}) but was "
            f"loaded for layer {layer}: fix the sae.id / sae.path template."
        )


def random_sae(d_in: int, width: int, layer: int, seed: int, architecture: str = "standard") -> SAE:
    """A random-weight sae-lens SAE for tests and benchmarks at real widths."""
    torch.manual_seed(seed + layer)
    cfg = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": width,
        "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post"},
    }
    if architecture == "topk":
        cfg["k"] = max(1, width // 64)
    sae = SAE.from_dict(cfg)
    with torch.no_grad():  # a small negative bias keeps random latents sparse, as trained ones are
        sae.b_enc.fill_(-0.5 * sae.W_enc.norm(dim=0).mean().item())
    return sae


def _load_one(cfg: DictConfig, lm: LM, layer: int, seed: int) -> tuple[SAE, str]:
    device = str(lm.device)
    if cfg.kind == "random":
        sae = random_sae(
            lm.d_model, int(cfg.width), layer, seed, cfg.get("architecture", "standard")
        )
        if cfg.get("plant"):  # a latent that reads the smoke model's planted direction
            if cfg.plant.seed is None:
                raise ConfigError("sae=smoke reads model=smoke's planted direction: use both.")
            planted.plant_sae(sae, cfg.plant)
        return sae.to(device), f"random (width {cfg.width}) at layer {layer}"
    if cfg.kind == "local":
        path = Path(str(cfg.path).format(layer=layer)).expanduser()
        if not (path / "cfg.json").is_file():
            raise ConfigError(
                f"sae.path for layer {layer} is {path}, which holds no SAE in sae-lens disk format "
                "(cfg.json + sae_weights.safetensors)."
            )
        return SAE.load_from_disk(str(path), device=device), str(path)
    if cfg.kind == "pretrained":
        sid = sae_id(cfg, layer)
        check_registry(cfg.release, sid)
        require_hub(
            f"SAE {cfg.release}/{sid}",
            "Save it with sae-lens (`SAE.from_pretrained(...).save_model(dir)`) on a machine with "
            "hub access, then use sae=local sae.path='dir/layer_{layer}'.",
        )
        return SAE.from_pretrained(cfg.release, sid, device=device), f"{cfg.release}/{sid}"
    raise ConfigError(f"sae.kind={cfg.kind} is not one of: pretrained, local, random.")


def load(cfg: DictConfig, lm: LM, layers: list[int], seed: int = 0) -> dict[int, SAE]:
    """One sae-lens SAE per layer, checked against the model, in the model's dtype."""
    saes = {}
    for layer in sorted(lm.check_layer(int(layer)) for layer in layers):
        if cfg.kind == "pretrained":  # check every id before the first download
            check_registry(cfg.release, sae_id(cfg, layer))
    for layer in sorted(int(layer) for layer in layers):
        sae, where = _load_one(cfg, lm, layer, seed)
        check_against_model(sae, lm, layer, where)
        saes[layer] = sae.to(dtype=lm.dtype).eval().requires_grad_(False)
    return saes
