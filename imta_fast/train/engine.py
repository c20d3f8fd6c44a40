"""Training engine: model construction per method, optimiser/schedule, one epoch, evaluation.

Each fast path is a named, separate step (``apply_channels_last``, ``apply_compile``,
``apply_ddp``) so that ``train.py`` reads top to bottom.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from imta_fast.train.checkpoint import CheckpointError, load_checkpoint
from imta_fast.distributed import DistInfo, all_reduce_max, all_reduce_sum
from imta_fast.ops.dispatch import multi_exit_loss
from imta_fast.metrics import MultiExitMeter
from imta_fast.models.build import build_model  # noqa: F401  (re-exported for the train loop)
from imta_fast.precision import autocast_context

__all__ = ["apply_sync_bn", "build_model", "build_optimizer", "build_lr_schedule", "train_one_epoch",
           "NonFiniteLossError", "EpochStats"]

log = logging.getLogger("imta_fast")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the global step."""


# ----------------------------------------------------------------------------- construction
def load_teacher_state(path: str, config: Dict, split_sha256: str) -> Dict:
    """Stage-1 weights for stage 2; refuses a checkpoint of another model/dataset or data split
    (a different split would leak stage-1 hold-out images into training, spec §9.1 item 7)."""
    payload = load_checkpoint(path)
    saved = payload["config"]
    if payload.get("split_sha256") != split_sha256:
        raise CheckpointError(f"--teacher {path}: it was trained on another train/hold-out split than this run's "
                              f"split.json; start stage 2 in a fresh --output so the teacher's split is copied")
    for key in ("model", "dataset"):
        if saved.get(key) != config[key]:
            raise CheckpointError(f"--teacher {path}: it was trained with {key}={saved.get(key)!r}, "
                                  f"this run has {key}={config[key]!r}")
    if saved.get("method") == "imta":
        raise CheckpointError(f"--teacher {path}: is a stage-2 (imta) checkpoint; pass the stage-1 (ge) one")
    if saved.get("method") != "ge":
        log.warning("--teacher %s was trained with method=%s, not ge (IMTA's stage 1)", path, saved.get("method"))
    return payload["model"]


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


def apply_channels_last(model: nn.Module, enabled: bool) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if enabled else model


def apply_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """Whole-model compile; MSDNet and IMTA have no graph breaks (tested with fullgraph=True)."""
    return torch.compile(model) if enabled else model


def apply_sync_bn(model: nn.Module, enabled: bool, dist_info: DistInfo) -> nn.Module:
    """BatchNorm statistics over all GPUs (apex's SyncBN successor); only CUDA DDP runs have it."""
    if not enabled or not dist_info.is_distributed:
        return model
    if dist_info.device.type != "cuda":
        log.warning("--sync-bn ignored: SyncBatchNorm needs CUDA processes, this run uses %s", dist_info.device)
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def apply_ddp(model: nn.Module, dist_info: DistInfo) -> nn.Module:
    if not dist_info.is_distributed:
        return model
    ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


# ----------------------------------------------------------------------------- one epoch
@dataclass
class EpochStats:
    loss: float
    top1: List[float]  # per exit, on the training batches (running model)
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def compute_loss(outputs, target: torch.Tensor, method: str, temperature: float, gamma: float, kl_reduction: str,
                 loss_impl: str) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Model outputs -> (scalar loss, per-exit logits). ce/ge: sum of per-exit CE; imta: OFA (spec §4)."""
    logits, extra = outputs
    if method == "imta":
        loss = multi_exit_loss(logits, target, teacher=extra, temperature=temperature, kd_weight=gamma,
                               kl_reduction=kl_reduction, impl=loss_impl)
    else:
        loss = multi_exit_loss(logits, target, impl=loss_impl)
    return loss, logits


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, loss_fn: Callable, device: torch.device,
                    epoch: int, start_step: int, amp: bool, amp_dtype: str, channels_last: bool,
                    max_steps: int = 0, log_interval: int = 50, progress: bool = False,
                    scaler: Optional[torch.amp.GradScaler] = None) -> Tuple[EpochStats, int]:
    """One pass over ``loader``. Returns (stats, global step after the epoch).

    ``scaler``: a GradScaler for fp16 autocast (disabled/None for fp32 and bf16, which need none).

    Non-finite losses are detected on the device (no per-step host sync) and checked every
    ``log_interval`` steps and at the end; the error names the first bad global step.
    """
    model.train()
    n_steps = len(loader) if not max_steps else min(max_steps, len(loader))
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    meter: Optional[MultiExitMeter] = None  # per-exit top-1 on the device, reduced over ranks at the end
    # -1 until the first non-finite loss; then that global step (max-reduced over ranks when checked).
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    images, step, t0 = 0, start_step, time.perf_counter()
    bar = tqdm(total=n_steps, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    for i, (x, y) in enumerate(loader):
        if i >= n_steps:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp, amp_dtype):
            loss, logits = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        with torch.no_grad():
            bad = ~torch.isfinite(loss.detach())
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
            loss_sum += loss.detach().double() * y.numel()
        meter = meter or MultiExitMeter(len(logits), topk=(1,))
        meter.update(logits, y)
        images += y.numel()
        step += 1
        bar.update(1)
        if (i + 1) % log_interval == 0 or i + 1 == n_steps:
            bad_step = int(all_reduce_max(first_bad))  # every rank stops together (no DDP deadlock)
            if bad_step >= 0:
                bar.close()
                raise NonFiniteLossError(f"non-finite loss at global step {bad_step} (epoch {epoch}); "
                                         f"stopping, the last good checkpoint is kept")
            bar.set_postfix(loss=f"{float(loss_sum) / images:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
    bar.close()
    meter.all_reduce()
    result = meter.compute()
    stats = EpochStats(loss=float(all_reduce_sum(loss_sum)) / result["count"], top1=result["top1"],
                       images=result["count"], seconds=time.perf_counter() - t0)
    return stats, step
