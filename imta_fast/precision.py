"""Mixed precision: one autocast context for training and inference."""
from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["autocast_context"]


def autocast_context(device: torch.device, enabled: bool, dtype: str):
    if not enabled:
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))
