"""refusal: find the SAE features that make an instruction-tuned LLM refuse."""

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def wandb_offline() -> bool:
    """W&B stays offline unless it can log in: WANDB_MODE decides where set; otherwise an
    API key in WANDB_API_KEY or stored by `wandb login` (the netrc entry of its host)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode not in ("online", "run")
    if os.environ.get("WANDB_API_KEY"):
        return False
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is None
    except (OSError, netrc.NetrcParseError):  # no netrc file, or one W&B cannot read either
        return True


# Config resolvers: where the checkout is, and whether W&B may go online.
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
OmegaConf.register_new_resolver("wandb_offline", wandb_offline, replace=True)

__version__ = "0.1.0"
