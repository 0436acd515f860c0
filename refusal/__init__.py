"""refusal: find the SAE features that make an instruction-tuned LLM refuse."""

import os
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Config resolvers: where the checkout is, and whether W&B may go online.
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
OmegaConf.register_new_resolver(
    "wandb_offline", lambda: "WANDB_API_KEY" not in os.environ, replace=True
)

__version__ = "0.1.0"
