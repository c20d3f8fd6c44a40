"""Gradient Equilibrium backward: the reference's two chained rescale ops (IMTA's
GradientRescaleFunction twice, autograd accumulating the two branches) vs the single-node PyTorch
split (reference backward: mul + add, 5 units) vs the fused split (one ``torch.lerp``, 3 units; it
replaced the Triton axpby kernel, benchmarks/NOTES.md "Kernels"), on MSDNet coarsest-scale shapes.

Timed: forward split + backward of both branches with given upstream gradients, i.e. exactly the GE
part of a training step.  ``bytes_ideal`` = read g_head and g_next, write dL/dh: 3 * numel * itemsize.
"""
from __future__ import annotations

import pytest
import torch

SHAPES = {  # (B, C, H, W) of block k's coarsest output
    "imagenet_b256_384x7x7": (256, 384, 7, 7),
    "imagenet_b256_560x7x7": (256, 560, 7, 7),
    "cifar_b64_160x8x8": (64, 160, 8, 8),
    "large_b128_512x14x14": (128, 512, 14, 14),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ["two_rescales", "split_torch", "split_fused"]
S_HEAD, S_NEXT = 1.0 / 5, 4.0 / 5  # block k = 0 of a 5-exit network


def _split(provider: str):
    from imta_fast.ops import gradient_equilibrium as ge

    if provider == "two_rescales":  # the reference's placement: head = r(h, 1/(K-k)); next = r(head, K-k-1)
        def split(h):
            head = ge.gradient_rescale(h, S_HEAD)
            return head, ge.gradient_rescale(head, S_NEXT / S_HEAD)

        return split
    if provider == "split_torch":
        return lambda h: ge.gradient_equilibrium_split(h, S_HEAD, S_NEXT)
    from imta_fast.ops import dispatch

    return lambda h: dispatch.gradient_equilibrium_split(h, S_HEAD, S_NEXT, impl="triton")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_ge_backward(cuda_bench, shape, dtype, channels_last, provider):
    dt = DTYPES[dtype]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dims = SHAPES[shape]
    h = torch.randn(dims, device="cuda", dtype=dt).contiguous(memory_format=fmt).requires_grad_(True)
    g_head = torch.randn_like(h)
    g_next = torch.randn_like(h)
    split = _split(provider)

    def step():
        a, b = split(h)
        torch.autograd.grad((a, b), h, (g_head, g_next))

    nbytes = 3 * h.numel() * h.element_size()
    cuda_bench(step, nbytes, group=f"ge_backward {shape} {dtype} {'nhwc' if channels_last else 'nchw'}",
               bench="ge_backward", provider=provider, shape_name=shape, shape=list(dims), dtype=dtype,
               channels_last=channels_last)
