"""Fast paths, each a named step applied in this order: memory format, BN sync, compile, DDP.

Compile comes before the DDP wrap (torchtitan's order), so DDP's gradient hooks see the compiled module.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from imta_fast.distributed import DistInfo

__all__ = ["apply_channels_last", "apply_sync_bn", "apply_compile", "apply_ddp"]

log = logging.getLogger("imta_fast")


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
    # Gradients as views into the all-reduce buckets: one copy fewer per step, same numbers.
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
