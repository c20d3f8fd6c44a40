"""Training methods by name (``--method``); see :mod:`imta_fast.train.methods.base`."""
from __future__ import annotations

from imta_fast.train.methods.base import CrossEntropyMethod, IMTAMethod, StepResult, TrainingMethod

__all__ = ["METHODS", "build_method", "StepResult", "TrainingMethod"]

METHODS = {
    "ce": CrossEntropyMethod,
    "ge": CrossEntropyMethod,  # GE is in the model (identity forward, scaled backward)
    "imta": IMTAMethod,
}


def build_method(cfg, module=None, dist=None) -> TrainingMethod:
    """The method object of ``cfg.method`` for the (unwrapped) ``module``."""
    return METHODS[cfg.method](cfg, module, dist)
