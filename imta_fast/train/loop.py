"""One training epoch: the method's step over a loader, metering, and the non-finite-loss stop."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from imta_fast.distributed import all_reduce_max, all_reduce_sum
from imta_fast.metrics import MultiExitMeter
from imta_fast.train.methods import TrainingMethod
from imta_fast.train.step import StepContext

__all__ = ["EpochStats", "NonFiniteLossError", "train_one_epoch"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the global step."""


@dataclass
class EpochStats:
    loss: float
    top1: List[float]  # per exit, on the training batches (running model)
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def train_one_epoch(ctx: StepContext, method: TrainingMethod, loader, *, epoch: int, start_step: int,
                    max_steps: int = 0, log_interval: int = 50, progress: bool = False) -> Tuple[EpochStats, int]:
    """One pass of ``method.train_step`` over ``loader``. Returns (stats, global step after the epoch).

    Non-finite losses are detected on the device (no per-step host sync) and checked every
    ``log_interval`` steps and at the end; every rank then stops together and the error names the
    first bad global step.
    """
    ctx.model.train()
    n_steps = len(loader) if not max_steps else min(max_steps, len(loader))
    loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float64)
    meter: Optional[MultiExitMeter] = None  # per-exit top-1 on the device, reduced over ranks at the end
    first_bad = torch.full((), -1, device=ctx.device, dtype=torch.long)  # -1 until a non-finite loss
    images, step, t0 = 0, start_step, time.perf_counter()
    bar = tqdm(total=n_steps, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    for i, (x, y) in enumerate(loader):
        if i >= n_steps:
            break
        x, y = ctx.to_device(x, y)
        result = method.train_step(ctx, x, y)
        with torch.no_grad():
            bad = ~torch.isfinite(result.loss)
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
            loss_sum += result.loss.double() * result.batch_size
        meter = meter or MultiExitMeter(len(result.logits), topk=(1,))
        meter.update(result.logits, y)
        images += result.batch_size
        step += 1
        bar.update(1)
        if (i + 1) % log_interval == 0 or i + 1 == n_steps:
            bad_step = int(all_reduce_max(first_bad))  # every rank stops together (no DDP deadlock)
            if bad_step >= 0:
                bar.close()
                raise NonFiniteLossError(f"non-finite loss at global step {bad_step} (epoch {epoch}); "
                                         f"stopping, the last good checkpoint is kept")
            bar.set_postfix(loss=f"{float(loss_sum) / images:.4f}", lr=f"{ctx.optimizer.param_groups[0]['lr']:.4g}")
    bar.close()
    meter.all_reduce()
    result = meter.compute()
    stats = EpochStats(loss=float(all_reduce_sum(loss_sum)) / result["count"], top1=result["top1"],
                       images=result["count"], seconds=time.perf_counter() - t0)
    return stats, step
