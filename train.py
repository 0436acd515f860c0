"""Hydra entry point: compose conf/, then run the search pipeline.

python train.py                                   # the embedded organism
python train.py model=gemma2_2b_it sae=gemma_scope_res_16k 'layers=[12]'
python train.py -m 'layers=[6],[12],[18],[24]'    # a layer sweep
python train.py hparams_search=organism_optuna    # Optuna over the search settings
"""

import hydra
from omegaconf import DictConfig

import refusal  # noqa: F401  (registers the config resolvers)
from refusal.errors import RefusalError, exit_with


def objective(value: float | list | None) -> float:
    """The optimised summary metric as a float a sweeper can rank: a per-prompt list
    counts by its mean, and a metric nothing was measured for (no prompt refused, no
    flip) counts as 0.0, the worst value of the metrics a sweep maximises (jailbreak rate,
    flip rate, AUC), instead of failing the sweep as None or NaN would."""
    if isinstance(value, list):
        value = [v for v in value if v is not None]
        value = sum(value) / len(value) if value else None
    return 0.0 if value is None else float(value)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from refusal import pipeline, tracking

    try:
        return objective(pipeline.run(cfg))
    except RefusalError as error:
        exit_with(error)
    finally:  # each job of a multirun closes its own W&B run, even when it failed
        tracking.finish_open_run()


if __name__ == "__main__":
    main()
