"""Optimiser and learning-rate schedule (docs/method.md §5)."""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn as nn

__all__ = ["trainable_parameters", "build_optimizer", "build_lr_schedule"]


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float, nesterov: bool,
                    device: torch.device) -> torch.optim.Optimizer:
    """SGD on every trainable parameter (BN and biases decay too, as in the reference).

    Uses torch's fused kernel on CUDA (apex's FusedSGD successor) and the foreach path elsewhere.
    """
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(trainable_parameters(model), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov, **impl)


def build_lr_schedule(optimizer: torch.optim.Optimizer, kind: str, epochs: int, steps_per_epoch: int,
                      milestones: Tuple[int, ...], decay: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration. 'step': constant within an epoch, x``decay`` at each milestone
    epoch (the reference's adjust_learning_rate); 'cosine': 0.5*(1+cos(pi*t/T)) per iteration."""
    total = max(1, epochs * steps_per_epoch)

    def factor(it: int) -> float:
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(it, total) / total))
        epoch = it // max(1, steps_per_epoch)
        return decay ** sum(epoch >= m for m in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
