"""Fused Gradient Equilibrium split (Triton), imported as ``imta_fast.kernels.gradient_equilibrium``.

Reference: ``imta_fast.ops.gradient_equilibrium.gradient_equilibrium_split`` (spec imta_msdnet.md §2).
GE hands block k's coarsest tensor ``h`` to head k and to block k+1; both are ``h`` in the forward and

    dL/dh = s_head * g_head + s_next * g_next,   s_head = 1/(K-k),  s_next = (K-k-1)/(K-k).

The reference does this with two rescale nodes plus autograd's accumulation (three passes over the
gradient: two scalings and an add).  Here the forward returns two views of ``h`` (no copy) from an
``autograd.Function``, and its backward calls ``torch.ops.imta_fast.ge_axpby`` -- one Triton pass that
reads both gradients once, accumulates in fp32 and writes ``dL/dh`` in ``h``'s dtype.  If only one
gradient arrives (the other output unused) it is a single scale.

A ``torch.library`` op may not return aliases of its inputs, hence the split: the aliasing forward
stays in the ``autograd.Function`` (Dynamo traces it), the arithmetic is the registered op
(``triton_op`` on GPU so inductor can see the kernel, an opaque ``custom_op`` in Triton's interpreter
-- no GPU, or ``TRITON_INTERPRET=1`` -- or on older torch), with ``register_fake`` and ``register_autograd`` (it is linear,
so double backward, e.g. an L2W meta step, works).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from imta_fast.ops.gradient_equilibrium import GradientEquilibriumSplit, split_backward
from imta_fast.kernels._runtime import INTERPRET, USES_TRITON_OP, jit

__all__ = ["gradient_equilibrium_split_triton", "ge_axpby", "block_size", "INTERPRET", "USES_TRITON_OP"]

@jit
def _axpby_kernel(a_ptr, b_ptr, out_ptr, n, alpha, beta, BLOCK: tl.constexpr):
    """out = alpha * a + beta * b over ``n`` elements of identically laid-out dense buffers."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (alpha * a + beta * b).to(out_ptr.dtype.element_ty), mask=mask)


_BLOCK_OVERRIDE: dict = {}


@contextlib.contextmanager
def block_size(block: int) -> Iterator[None]:
    """Force the elements-per-program (a power of two) for launches inside the block (tests)."""
    prev = _BLOCK_OVERRIDE.get("block")
    _BLOCK_OVERRIDE["block"] = block
    try:
        yield
    finally:
        if prev is None:
            _BLOCK_OVERRIDE.pop("block", None)
        else:
            _BLOCK_OVERRIDE["block"] = prev


def _same_dense_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both tensors cover their storage densely with identical strides, so flat index i of one
    pairs with flat index i of the other (contiguous or channels_last alike)."""
    if a.shape != b.shape or a.stride() != b.stride():
        return False
    return a.is_contiguous() or (a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last))


def _axpby_impl(a: torch.Tensor, b: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    if not _same_dense_layout(a, b):
        a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a)  # preserves the dense layout of a
    n = a.numel()
    if n == 0:
        return out
    if a.is_cuda and not INTERPRET:
        block, num_warps = 4096, 8
    else:
        block, num_warps = min(triton.next_power_of_2(n), 1 << 20), 4
    block = _BLOCK_OVERRIDE.get("block", block)
    kernel = torch.library.wrap_triton(_axpby_kernel) if USES_TRITON_OP else _axpby_kernel
    kernel[(triton.cdiv(n, block),)](a, b, out, n, float(alpha), float(beta), BLOCK=block, num_warps=num_warps)
    return out


_OP_NAME = "imta_fast::ge_axpby"
if USES_TRITON_OP:
    ge_axpby = torch.library.triton_op(_OP_NAME, mutates_args=())(_axpby_impl)
else:
    ge_axpby = torch.library.custom_op(_OP_NAME, mutates_args=())(_axpby_impl)


@ge_axpby.register_fake
def _(a, b, alpha, beta):
    return torch.empty_like(a) if _same_dense_layout(a, b) else torch.empty_like(a, memory_format=torch.contiguous_format)


def _axpby_setup(ctx, inputs, output) -> None:
    ctx.alpha, ctx.beta = inputs[2], inputs[3]


def _axpby_backward(ctx, grad: torch.Tensor):
    return grad * ctx.alpha, grad * ctx.beta, None, None


ge_axpby.register_autograd(_axpby_backward, setup_context=_axpby_setup)


def _fused_axpby(g_head: torch.Tensor, g_next: torch.Tensor, s_head: float, s_next: float) -> torch.Tensor:
    if not (g_head.is_cuda or INTERPRET):  # CPU without the interpreter: Triton cannot run
        return torch.add(g_head * s_head, g_next, alpha=s_next)
    return torch.ops.imta_fast.ge_axpby(g_head, g_next, s_head, s_next)


class _GradientEquilibriumSplit(GradientEquilibriumSplit):
    """The reference split (two views of ``x``) whose two-gradient backward is one fused pass."""

    @staticmethod
    def backward(ctx, g_head: Optional[torch.Tensor], g_next: Optional[torch.Tensor]):
        return split_backward(g_head, g_next, ctx.s_head, ctx.s_next, combine=_fused_axpby), None, None


def gradient_equilibrium_split_triton(x: torch.Tensor, s_head: float, s_next: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for ``imta_fast.ops.gradient_equilibrium.gradient_equilibrium_split`` with a fused backward.

    Args:
        x: block k's coarsest-scale output ``[B, C, H, W]`` (any shape/dtype/layout).
        s_head: gradient scale of the head branch, ``1/(K-k)``.
        s_next: gradient scale of the next-block branch, ``(K-k-1)/(K-k)``.

    Returns:
        ``(head_input, next_input)``: two views of ``x`` (no copy).  The backward runs on Triton for
        CUDA tensors (or any tensor under ``TRITON_INTERPRET=1``); otherwise it is the same formula in
        PyTorch.

    Example:
        >>> head_in, next_in = gradient_equilibrium_split_triton(h, 1 / 5, 4 / 5)
    """
    return _GradientEquilibriumSplit.apply(x, float(s_head), float(s_next))
