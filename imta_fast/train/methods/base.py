"""Training methods: how one batch becomes a loss and an update, plus any state a method carries.

``ce`` (MSDNet baseline) and ``ge`` (IMTA stage 1) both minimise the sum of the exits' cross entropies
(GE lives in the model, docs/method.md §2); ``imta`` (stage 2) adds one-for-all KD from the frozen
GE network's last exit (docs/method.md §4).  Methods with extra state (an annealed temperature, a
meta network) return it from ``state_dict`` so the checkpoint manager saves and restores it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch

from imta_fast.ops.dispatch import multi_exit_loss

__all__ = ["StepResult", "TrainingMethod", "CrossEntropyMethod", "IMTAMethod"]


@dataclass
class StepResult:
    loss: torch.Tensor            # detached scalar: the batch's mean training loss
    logits: List[torch.Tensor]    # per-exit logits of the batch (train top-1 metering)
    batch_size: int


class TrainingMethod:
    """Default step: forward under autocast, :meth:`loss`, one optimiser step, :meth:`after_step`."""

    name = "base"

    def __init__(self, cfg, module: torch.nn.Module = None, dist=None):
        self.cfg = cfg

    def loss(self, outputs, target: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        raise NotImplementedError

    def train_step(self, ctx, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        with ctx.autocast():
            outputs = ctx.model(x)
            loss, logits = self.loss(outputs, y)
        ctx.apply_gradients(loss)
        self.after_step(outputs)
        return StepResult(loss.detach(), logits, y.numel())

    def after_step(self, outputs) -> None:
        """Hook after the optimiser step (e.g. a temperature update); no-op by default."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} carries no state, but the checkpoint has {sorted(state)}")

    def epoch_metrics(self) -> Dict[str, float]:
        """Extra per-epoch ``summary.csv`` columns."""
        return {}


class CrossEntropyMethod(TrainingMethod):
    """``ce`` / ``ge``: sum over exits of the cross entropy (MSDNet's loss; docs/method.md §2, §5)."""

    name = "ce"

    def loss(self, outputs, target):
        logits, _ = outputs
        return multi_exit_loss(logits, target, impl=self.cfg.loss_impl), logits


class IMTAMethod(TrainingMethod):
    """``imta``: ISC heads trained with OFA KD from the frozen GE net's last exit (docs/method.md §4)."""

    name = "imta"

    def loss(self, outputs, target):
        logits, teacher = outputs
        cfg = self.cfg
        loss = multi_exit_loss(logits, target, teacher=teacher, temperature=cfg.temperature, kd_weight=cfg.gamma,
                               kl_reduction=cfg.kl_reduction, impl=cfg.loss_impl)
        return loss, logits
