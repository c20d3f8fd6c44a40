"""Gradient Equilibrium (IMTA, docs/method.md §2): identity forward, rescaled gradients backward.

The reference applies two chained rescale ops to block ``k``'s coarsest output ``h``: the head
reads ``r(h, 1/(K-k))`` and block ``k+1`` reads ``r(r(h, 1/(K-k)), K-k-1)``. Their net effect is

    dL/dh = s_head * g_head + s_next * g_next,   s_head = 1/(K-k),  s_next = (K-k-1)/(K-k).

``gradient_equilibrium_split`` is that effect as one op with two outputs that alias ``h`` (no
copy in forward).  This is the plain-PyTorch reference; the fused Triton op in
``imta_fast.kernels`` must match it.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

__all__ = ["gradient_rescale", "gradient_equilibrium_split", "split_backward", "GradientEquilibriumSplit"]


class GradientRescale(torch.autograd.Function):
    """``y = x`` forward, ``dx = scale * dy`` backward (the reference's GradientRescaleFunction)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _axpby(g_head: torch.Tensor, g_next: torch.Tensor, s_head: float, s_next: float) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # Inductor (CPU, torch 2.14) folds add(x, mm_out, alpha=s) into addmm and drops alpha: wrong
        # gradients.  The plain expression compiles right and fuses into one pass anyway.
        return g_head * s_head + g_next * s_next
    return torch.add(g_head * s_head, g_next, alpha=s_next)


def split_backward(g_head: Optional[torch.Tensor], g_next: Optional[torch.Tensor], s_head: float, s_next: float,
                   combine: Callable = _axpby) -> Optional[torch.Tensor]:
    """``dL/dx`` of the split; an unused output's gradient arrives as None. ``combine`` does the
    two-gradient case (the fused Triton op passes its own)."""
    if g_head is None and g_next is None:
        return None
    if g_next is None:
        return g_head * s_head
    if g_head is None:
        return g_next * s_next
    return combine(g_head, g_next, s_head, s_next)


class GradientEquilibriumSplit(torch.autograd.Function):
    """Two aliases of ``x``; backward forms ``s_head * g_head + s_next * g_next`` in one expression."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s_head: float, s_next: float) -> Tuple[torch.Tensor, torch.Tensor]:
        ctx.s_head, ctx.s_next = s_head, s_next
        ctx.set_materialize_grads(False)  # an unused output arrives as None, not a zero tensor
        return x.view_as(x), x.view_as(x)

    @staticmethod
    def backward(ctx, g_head: Optional[torch.Tensor], g_next: Optional[torch.Tensor]):
        return split_backward(g_head, g_next, ctx.s_head, ctx.s_next), None, None


def gradient_rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity whose gradient is multiplied by ``scale``."""
    return GradientRescale.apply(x, scale)


def gradient_equilibrium_split(x: torch.Tensor, s_head: float, s_next: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(head_input, next_input)``, both equal to ``x``, with GE's two gradient scales."""
    return GradientEquilibriumSplit.apply(x, s_head, s_next)
