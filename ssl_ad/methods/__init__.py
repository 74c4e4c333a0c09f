"""Self-supervised methods; :func:`build_method` maps ``config.method`` to one."""

from __future__ import annotations

from typing import Any

from ssl_ad.errors import UserInputError
from ssl_ad.methods.base import Method, ReconstructingMethod, can_reconstruct
from ssl_ad.methods.dino import DINO
from ssl_ad.methods.mae import MAE

METHODS: dict[str, type] = {"mae": MAE, "dino": DINO}

__all__ = ["METHODS", "Method", "ReconstructingMethod", "build_method", "can_reconstruct"]


def build_method(config: Any) -> Method:
    """Returns the method object named by ``config.method`` ('mae' or 'dino').

    Raises:
      UserInputError: for any other name.
    """
    if config.method not in METHODS:
        raise UserInputError(f"unknown method {config.method!r}; choose from {sorted(METHODS)}")
    return METHODS[config.method](config)
