"""Ops layer: the plain-PyTorch references (``losses``, ``gradient_equilibrium``; they import nothing from
the package), and ``dispatch``, which picks a reference or a fused implementation (``imta_fast.kernels``)
through one :func:`resolve_impl`.  Callers (models, training) import from here or from ``dispatch``."""
from imta_fast.ops.dispatch import (MultiExitLoss, gradient_equilibrium_split, multi_exit_loss,
                                    resolve_impl)

__all__ = ["multi_exit_loss", "gradient_equilibrium_split", "MultiExitLoss", "resolve_impl"]
