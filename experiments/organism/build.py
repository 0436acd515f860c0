"""Rebuild the embedded default model organism end to end (seeded, CPU, about 30 minutes).

    python -m experiments.organism.build [--reuse-replies]      # or: make organism

1. finetune.py   LoRA refusal fine-tune of SmolLM2-135M-Instruct -> artifacts/adapter/
2. train_saes.py sae-lens SAEs on the merged organism, layers 6/12/18/24
                 -> artifacts/saes/layer_<L>/
Then `make organism-eval` measures it (outputs/organism_eval.json).
"""

from __future__ import annotations

import argparse

from experiments.organism import finetune, train_saes
from experiments.organism.common import ADAPTER_DIR, ARTIFACTS, SAE_DIR, WORK_DIR, Timer


def size_mb(path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reuse-replies",
        action="store_true",
        help=f"reuse the base model's replies cached in {WORK_DIR} instead of regenerating them",
    )
    args = parser.parse_args(argv)
    timer = Timer()
    if not args.reuse_replies:
        for cached in WORK_DIR.glob("base_replies*.json"):
            cached.unlink()
    finetune.main([])
    t_finetune = timer()
    train_saes.main([])
    t_saes = round(timer() - t_finetune, 1)
    print(f"\norganism rebuilt in {timer()} s (fine-tune {t_finetune} s, SAEs {t_saes} s)")
    print(f"  adapter: {ADAPTER_DIR} ({size_mb(ADAPTER_DIR):.1f} MB)")
    for layer_dir in sorted(SAE_DIR.glob("layer_*")):
        print(f"  SAE:     {layer_dir} ({size_mb(layer_dir):.1f} MB)")
    print(f"  total:   {size_mb(ARTIFACTS):.1f} MB under {ARTIFACTS}")
    print("measure it with `make organism-eval` (python -m experiments.organism.evaluate)")


if __name__ == "__main__":
    main()
