"""Training methods by name (``--method``); see :mod:`imta_fast.train.methods.base`."""
from __future__ import annotations

from imta_fast.train.methods.base import CrossEntropyMethod, IMTAMethod, StepResult, TrainingMethod
from imta_fast.train.methods.distill import DistillMethod
from imta_fast.train.methods.l2w import L2WMethod

__all__ = ["METHODS", "build_method", "StepResult", "TrainingMethod"]

METHODS = {
    "ce": CrossEntropyMethod,
    "ge": CrossEntropyMethod,  # GE is in the model (identity forward, scaled backward)
    "imta": IMTAMethod,
    "distill": DistillMethod,  # Phuong & Lampert, annealed temperature (docs/method.md §10)
    "l2w": L2WMethod,  # meta-learned sample weights (docs/method.md §11)
}


def build_method(cfg, module=None, dist=None) -> TrainingMethod:
    """The method object of ``cfg.method`` for the (unwrapped) ``module``."""
    return METHODS[cfg.method](cfg, module, dist)
