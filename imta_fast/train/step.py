"""The step context: everything one optimisation step needs, built once per run.

``StepContext`` bundles the runner (the model after channels_last / SyncBN / compile / DDP), the
unwrapped module, optimiser, LR schedule, grad scaler and precision settings, so a training method
(``imta_fast.train.methods``) writes its step against one object instead of a dozen arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn

from imta_fast.distributed import DistInfo
from imta_fast.precision import autocast_context

__all__ = ["StepContext"]


@dataclass
class StepContext:
    """One run's step machinery.

    Attributes:
        model: the runner to call for forward passes (possibly compiled and/or DDP-wrapped).
        module: the plain ``nn.Module`` inside it (``torch.func.functional_call``, parameters, state).
        optimizer / scheduler: stepped once per optimisation step by :meth:`apply_gradients`.
        scaler: fp16 GradScaler; disabled for fp32 and bf16.
        amp / amp_dtype: autocast switch and dtype name ('bfloat16' | 'float16').
        loss_impl: 'auto' | 'torch' | 'triton' for the fused multi-exit loss.
    """

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    dist: DistInfo
    amp: bool = False
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    loss_impl: str = "auto"

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def autocast(self):
        return autocast_context(self.device, self.amp, self.amp_dtype)

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def apply_gradients(self, loss: torch.Tensor, step_scheduler: bool = True) -> None:
        """zero_grad, backward (through the scaler when enabled), optimiser step, schedule step.

        ``step_scheduler=False`` leaves the schedule alone (L2W takes two optimiser steps per loaded
        batch but advances the schedule once, as its reference does)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if step_scheduler:
            self.scheduler.step()
