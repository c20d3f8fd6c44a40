"""Multi-exit CE + KD loss, forward + backward: eager PyTorch reference vs torch.compile'd reference vs
the fused Triton kernel, side by side in one run (one pytest-benchmark group per shape).

Shapes: K = 5 exits, B in {256, 1024, 8192}, C in {100, 1000}, fp32 and bf16, with and without a
teacher (IMTA OFA: T = 1, gamma = 0.1, 'mean'; label smoothing 0.1).  The logits arrive as a list of
K tensors, as the model returns them, so every provider pays its own stacking.

``bytes_ideal`` = read the K logit tensors (+ the teacher) and write their gradient once:
(2K (+1)) * B * C * itemsize -- the floor for any implementation; GB/s are against that.
"""
from __future__ import annotations

import pytest
import torch

K = 5
BATCHES = [256, 1024, 8192]
CLASSES = [100, 1000]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ["eager", "compile", "triton"]
_COMPILED = {}


def _loss_kwargs(kd: bool) -> dict:
    kw = dict(label_smoothing=0.1)
    if kd:
        kw.update(temperature=1.0, kd_weight=0.1, kl_reduction="mean")
    return kw


def _provider(name: str, kd: bool):
    from imta_fast.ops import dispatch as functional, losses

    kw = _loss_kwargs(kd)
    if name == "eager":
        return lambda z, y, t: losses.multi_exit_loss(z, y, t, **kw)
    if name == "compile":
        key = kd
        if key not in _COMPILED:
            def ref(z, y, t):
                return losses.multi_exit_loss(z, y, t, **kw)

            _COMPILED[key] = torch.compile(ref, fullgraph=True, dynamic=False)
        return _COMPILED[key]
    return lambda z, y, t: functional.multi_exit_loss(z, y, t, impl="triton", **kw)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kd", [False, True], ids=["ce", "kd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("C", CLASSES, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("B", BATCHES, ids=lambda b: f"B{b}")
def test_multi_exit_loss_fwd_bwd(cuda_bench, B, C, dtype, kd, provider):
    dt = DTYPES[dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    zs = [(torch.randn(B, C, device="cuda", generator=gen) * 3).to(dt).requires_grad_(True) for _ in range(K)]
    y = torch.randint(0, C, (B,), device="cuda", generator=gen)
    t = (torch.randn(B, C, device="cuda", generator=gen) * 3).to(dt) if kd else None
    fn = _provider(provider, kd)

    def step():
        loss = fn(zs, y, t)
        torch.autograd.grad(loss, zs)

    itemsize = torch.finfo(dt).bits // 8
    nbytes = (2 * K + (1 if kd else 0)) * B * C * itemsize
    cuda_bench(step, nbytes, group=f"multi_exit_loss K{K} B{B} C{C} {dtype} {'kd' if kd else 'ce'}",
               provider=provider, K=K, B=B, C=C, dtype=dtype, teacher=kd)
