"""Fail at once, with a useful message, when something needs the Hugging Face hub offline."""

import os
import socket
from functools import cache

from refusal.errors import HubUnavailable

HUB_HOST = "huggingface.co"


@cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub answers a TCP connection; honours HF_HUB_OFFLINE."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def require_hub(what: str, local_hint: str) -> None:
    """Raise HubUnavailable naming `what` was needed and how to use a local copy instead."""
    if not hub_reachable():
        raise HubUnavailable(
            f"{what} must be downloaded from the Hugging Face hub, which cannot be reached "
            f"from this machine. {local_hint}"
        )
