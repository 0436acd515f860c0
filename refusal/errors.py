"""The errors a person can act on: what was wrong, the offending value, what to do.

`train.py` prints these as one short message and exits non-zero; any other exception
is a bug and keeps its traceback.
"""

import os
import sys
from typing import NoReturn


class RefusalError(Exception):
    """A mistake in the input or the environment, explained for the person who made it."""


class ConfigError(RefusalError):
    """A config value that cannot work (unknown name, bad layer, mismatched SAE)."""


class DataError(RefusalError):
    """A prompt source that is missing, empty or malformed."""


class HubUnavailable(RefusalError):
    """Something needs the Hugging Face hub and the hub cannot be reached."""


class NumericsError(RefusalError):
    """NaN or inf appeared in the model's activations."""


def exit_with(error: RefusalError) -> NoReturn:
    """Print the error as one line and exit 2; re-raise when HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
