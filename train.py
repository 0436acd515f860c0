"""Hydra entry point: compose conf/, then run the search pipeline.

python train.py                                   # the embedded organism
python train.py model=gemma2_2b_it sae=gemma_scope_res_16k 'layers=[12]'
python train.py -m 'layers=[6],[12],[18],[24]'    # a layer sweep
"""

import os
import sys

import hydra
from omegaconf import DictConfig

import refusal  # noqa: F401  (registers the config resolvers)
from refusal.errors import RefusalError


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from refusal import pipeline

    try:
        return pipeline.run(cfg)
    except RefusalError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
