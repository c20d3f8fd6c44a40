"""All exits' logits over a loader (anytime / budgeted protocols, hold-out scoring during training)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from imta_fast.distributed import all_gather_cat
from imta_fast.precision import autocast_context

__all__ = ["predict"]


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, amp: bool = False, amp_dtype: str = "bfloat16",
            channels_last: bool = False, progress: bool = False, desc: str = "eval") -> Tuple[torch.Tensor, torch.Tensor]:
    """All exits' logits on a loader: ``([K, N, C] float32 on CPU, labels [N])``, gathered over ranks."""
    model.eval()
    all_logits, all_labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp, amp_dtype):
            logits, _ = model(x)
        all_logits.append(torch.stack([z.float() for z in logits], dim=1))  # [B, K, C]
        all_labels.append(y.to(device))
    logits = all_gather_cat(torch.cat(all_logits)).transpose(0, 1).contiguous()
    labels = all_gather_cat(torch.cat(all_labels))
    return logits.cpu(), labels.cpu()
