"""Self-supervised methods; :func:`build_method` maps ``config.method`` to one."""

from __future__ import annotations

from typing import Any

from ssl_ad.errors import UserInputError


def build_method(config: Any) -> Any:
    """Returns the method object named by ``config.method`` ('mae' or 'dino')."""
    from ssl_ad.methods.mae import MAE

    methods = {"mae": MAE}
    try:
        from ssl_ad.methods.dino import DINO

        methods["dino"] = DINO
    except ImportError:  # pragma: no cover - DINO not built yet
        pass
    if config.method not in methods:
        raise UserInputError(f"unknown method {config.method!r}; choose from {sorted(methods)}")
    return methods[config.method](config)
