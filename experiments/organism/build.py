"""Rebuild the embedded default model organism end to end (seeded, CPU, under 45 minutes).

    python -m experiments.organism.build [reuse_replies=true]      # or: make organism

1. finetune.py   LoRA refusal fine-tune of SmolLM2-135M-Instruct -> artifacts/adapter/
2. train_saes.py sae-lens SAEs on the merged organism, layers 4/8/12/16/20/24
                 -> artifacts/saes/layer_<L>/
Settings: conf/organism.yaml (`finetune.*`, `saes.*`, where things go; `--help` lists them).
Then `make organism-eval` measures it (outputs/organism_eval.json).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments.organism import finetune, train_saes
from experiments.organism.common import CONF, Timer


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def build(cfg: DictConfig) -> None:
    timer = Timer()
    if not cfg.reuse_replies:
        for cached in Path(cfg.work_dir).glob("base_replies*.json"):
            cached.unlink()
    finetune.finetune(cfg)
    t_finetune = timer()
    train_saes.train(cfg)
    t_saes = round(timer() - t_finetune, 1)
    adapter, saes = Path(cfg.adapter_dir), Path(cfg.sae_dir)
    print(f"\norganism rebuilt in {timer()} s (fine-tune {t_finetune} s, SAEs {t_saes} s)")
    print(f"  adapter: {adapter} ({size_mb(adapter):.1f} MB)")
    for layer_dir in sorted(saes.glob("layer_*")):
        print(f"  SAE:     {layer_dir} ({size_mb(layer_dir):.1f} MB)")
    print(f"  total:   {size_mb(adapter) + size_mb(saes):.1f} MB")
    print("measure it with `make organism-eval` (python -m experiments.organism.evaluate)")


@hydra.main(version_base="1.3", config_path=CONF, config_name="organism")
def main(cfg: DictConfig) -> None:
    build(cfg)


if __name__ == "__main__":
    main()
