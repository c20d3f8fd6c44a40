"""Process-group setup and the few collectives the engine needs (torchrun-ready).

Every helper works unchanged in a single process (no process group): reductions return a copy of
the input, gathers return the input, ``is_primary()`` is True. So library code calls them
unconditionally and a plain ``python train.py`` run behaves like world_size=1.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, List

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DistInfo", "all_gather_cat", "all_gather_object", "all_reduce_max", "all_reduce_mean", "all_reduce_sum", "barrier", "cleanup",
    "get_rank", "get_world_size", "init_distributed", "is_dist_active", "is_primary", "seed_everything",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank`` of ``world_size``, ``local_rank`` on its node, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_distributed: bool = False

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def _pick_device(device_pref: str, local_rank: int) -> torch.device:
    if device_pref not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device_pref must be 'auto', 'cuda' or 'cpu', got {device_pref!r}")
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device_pref='cuda' but CUDA is not available")
    if device_pref != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Initialise from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    nccl on ``cuda:LOCAL_RANK`` when CUDA is used, gloo on CPU otherwise. Without the torchrun variables
    (or with WORLD_SIZE=1) no process group is created and a single-process DistInfo is returned.
    Calling it again after a group exists reuses that group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before init so nccl and any .cuda() use this rank's GPU
    if world_size <= 1:
        return DistInfo(0, 1, 0, device, False)
    if not is_dist_active():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # device_id binds nccl communicators to our GPU eagerly (no guessing in barrier()).
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, True)


def is_dist_active() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_active() else 1


def is_primary() -> bool:
    """True on global rank 0 (or in a single process): the one rank that logs, writes files and saves."""
    return get_rank() == 0


def barrier() -> None:
    if is_dist_active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks. Returns a new tensor (same shape/dtype/device); the input is untouched."""
    out = tensor.clone()
    if is_dist_active():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks (a new tensor; the input itself in a single process)."""
    if not is_dist_active():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks, as a floating tensor (integer inputs are promoted)."""
    out = all_reduce_sum(tensor if tensor.is_floating_point() else tensor.double())
    return out / get_world_size()


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order; lengths may differ per rank.

    Shape: ``(N_r, *rest)`` on rank r -> ``(sum_r N_r, *rest)`` on every rank. ``rest`` and dtype must
    match across ranks, and the tensor must live on the backend's device (cuda for nccl). Collectives need
    equal shapes, so each rank pads to the max length, gathers,
    and the padding is trimmed using the gathered lengths. Use it with an *unpadded* eval sampler
    (``DistributedSampler`` repeats samples to equalise lengths, which biases exact metrics).
    """
    if not is_dist_active():
        return tensor
    world = dist.get_world_size()
    # gloo has no bool collectives; uint8 round-trips exactly.
    work = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor.contiguous()
    n = torch.tensor([work.shape[0]], dtype=torch.int64, device=work.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    max_n = max(sizes)
    padded = work.new_zeros((max_n, *work.shape[1:]))
    padded[: work.shape[0]] = work
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    out = torch.cat([g[:s] for g, s in zip(gathered, sizes)], dim=0)
    return out.to(torch.bool) if tensor.dtype == torch.bool else out


def all_gather_object(obj: Any) -> List[Any]:
    """Gather one picklable object per rank (e.g. ``capture_rng_state()``), returned in rank order."""
    if not is_dist_active():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (CPU + all CUDA) with ``seed + rank``; returns the seed used.

    The per-rank offset gives each rank different augmentation / dropout streams; the model init must
    still be identical across ranks, which DDP guarantees by broadcasting rank 0's parameters.
    """
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also seeds every CUDA device
    return s


def cleanup() -> None:
    """Destroy the process group if one exists (safe to call always).

    Garbage is collected first, so a DDP wrapper that only a reference cycle still holds releases the
    group while the interpreter is fully alive, not during its shutdown: gloo's C++ threads touching
    Python objects at finalization abort the process (a 2-process CPU test died once that way with
    "terminate called without an active exception")."""
    if is_dist_active():
        import gc

        gc.collect()
        dist.destroy_process_group()
