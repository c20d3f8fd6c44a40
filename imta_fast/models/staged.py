"""Shared ``forward`` / ``forward_stage`` of the staged multi-exit networks (MSDNet, RANet).

See ``docs/method.md`` §1 (MSDNet) and §12 (RANet): both run as a stem followed by ``K`` blocks,
block ``k`` feeding classifier ``k``.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import torch

__all__ = ["StagedMultiExit"]


class StagedMultiExit:
    """Mixin: ``forward``, ``forward_stage`` and ``feature_dims`` of a network of a stem and ``K`` block+head stages.

    Contract (what the class that inherits it provides; list this mixin before ``nn.Module``):

    - ``num_exits``: ``K``, the number of blocks and of heads.
    - ``forward_stem(x) -> state``: image to the state before block 0 (an opaque pytree that the
      early-exit evaluator may index along the batch dimension).
    - ``forward_block(k, state) -> (state, head_input)``: block ``k`` (0-based); the new state feeds
      block ``k + 1``, ``head_input`` feeds head ``k``.
    - ``heads[k](head_input) -> (logits, feature)``: classifier ``k``, with ``heads[k].feature_dim``.
    """

    @property
    def feature_dims(self) -> List[int]:
        """Width of the pooled feature of each exit (IMTA's ``logits_channels``)."""
        return [h.feature_dim for h in self.heads]

    def forward_stage(self, k: int, state: Any) -> Tuple[Any, torch.Tensor]:
        """Block ``k`` + head ``k``: the unit of work of the early-exit evaluator. Returns (state, logits)."""
        state, head_in = self.forward_block(k, state)
        logits, _ = self.heads[k](head_in)
        return state, logits

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Image -> ``(logits, features)``: two lists of ``K`` tensors, one per exit."""
        state = self.forward_stem(x)
        all_logits, all_feats = [], []
        for k in range(self.num_exits):
            state, head_in = self.forward_block(k, state)
            logits, feat = self.heads[k](head_in)
            all_logits.append(logits)
            all_feats.append(feat)
        return all_logits, all_feats
