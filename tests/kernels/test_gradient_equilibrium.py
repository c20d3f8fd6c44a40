"""Fused Gradient Equilibrium split vs the reference ``imta_fast.ops.gradient_equilibrium``: views in the
forward, ``s_head * g_head + s_next * g_next`` in one Triton pass in the backward, None gradients,
layouts, double backward, op registration and torch.compile(fullgraph=True).  CPU: interpreter."""
from __future__ import annotations

import pytest
import torch

from imta_fast.ops.gradient_equilibrium import gradient_equilibrium_split
from imta_fast.kernels import gradient_equilibrium as ge_mod
from imta_fast.kernels.gradient_equilibrium import block_size, gradient_equilibrium_split_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (dtype, atol, rtol) of the fused backward vs the reference (which rounds twice: two scalings + add).
TOLS = [
    (torch.float32, 1e-6, 1e-6),
    (torch.bfloat16, 1e-2, 1e-2),
    (torch.float16, 1e-3, 1e-3),
]


def _branch_loss(a: torch.Tensor, b: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Different random upstream gradients for the two branches: g_head = wa, g_next = 2 b wb."""
    return (a.float() * wa).sum() + (b.float() ** 2 * wb).sum()


def _grads(split, x, s_head, s_next, wa, wb, create_graph=False):
    x = x.detach().clone().requires_grad_(True)
    a, b = split(x, s_head, s_next)
    (g,) = torch.autograd.grad(_branch_loss(a, b, wa, wb), x, create_graph=create_graph)
    return g


@pytest.mark.parametrize("dtype,atol,rtol", TOLS, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 8, 7, 7), (5, 33, 4, 3)], ids=str)
@pytest.mark.parametrize("k,K", [(0, 5), (3, 5), (0, 2)])
def test_backward_matches_reference(dtype, atol, rtol, shape, k, K):
    s_head, s_next = 1.0 / (K - k), (K - k - 1) / (K - k)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    wa, wb = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    exp = _grads(gradient_equilibrium_split, x, s_head, s_next, wa, wb)
    got = _grads(gradient_equilibrium_split_triton, x, s_head, s_next, wa, wb)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), exp.float(), atol=atol, rtol=rtol)


def test_forward_is_two_views_without_copy():
    x = torch.randn(2, 3, 4, 4, device=DEVICE, requires_grad=True)
    a, b = gradient_equilibrium_split_triton(x, 0.25, 0.75)
    assert a.data_ptr() == x.data_ptr() == b.data_ptr()
    assert torch.equal(a, x) and torch.equal(b, x)
    assert a._base is x and b._base is x


@pytest.mark.parametrize("use", ["head", "next", "none"])
def test_missing_gradients(use):
    """An unused output contributes no gradient: the result is a single scale (or nothing at all)."""
    x = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 6, device=DEVICE)
    results = []
    for split in (gradient_equilibrium_split, gradient_equilibrium_split_triton):
        xx = x.detach().clone().requires_grad_(True)
        a, b = split(xx, 0.2, 0.8)
        out = {"head": (a * w).sum(), "next": (b * w).sum(), "none": (xx * w).sum()}[use]
        out.backward()
        results.append(xx.grad)
    torch.testing.assert_close(results[1], results[0], atol=1e-7, rtol=1e-7)
    scale = {"head": 0.2, "next": 0.8, "none": 1.0}[use]
    torch.testing.assert_close(results[1], w * scale, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("layouts", ["channels_last_both", "mixed", "non_dense"])
def test_layouts(layouts):
    """Gradients in channels_last (flat fast path), mixed layouts and non-dense views (copied to
    contiguous first) all give the reference result."""
    x = torch.randn(2, 5, 3, 4, device=DEVICE)
    ga, gb = torch.randn_like(x), torch.randn_like(x)
    if layouts == "channels_last_both":
        ga, gb = ga.contiguous(memory_format=torch.channels_last), gb.contiguous(memory_format=torch.channels_last)
    elif layouts == "mixed":
        gb = gb.contiguous(memory_format=torch.channels_last)
    else:
        ga = torch.randn(2, 5, 3, 8, device=DEVICE)[..., ::2]
    out = torch.ops.imta_fast.ge_axpby(ga, gb, 0.3, 0.7)
    torch.testing.assert_close(out, 0.3 * ga + 0.7 * gb, atol=1e-6, rtol=1e-6)
    if layouts == "channels_last_both":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n,block", [(1, 1), (1000, 64), (4097, 1024)])
def test_axpby_op_many_programs(n, block):
    """Several programs with a ragged tail block."""
    a, b = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    with block_size(block):
        out = torch.ops.imta_fast.ge_axpby(a, b, -1.5, 0.25)
    torch.testing.assert_close(out, -1.5 * a + 0.25 * b, atol=1e-6, rtol=1e-6)


def test_double_backward_matches_reference():
    """The fused backward is differentiable (the L2W meta step uses create_graph=True)."""
    x = torch.randn(3, 5, device=DEVICE)
    wa, wb = torch.randn(3, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE)
    hs = []
    for split in (gradient_equilibrium_split, gradient_equilibrium_split_triton):
        xx = x.clone().requires_grad_(True)
        a, b = split(xx, 1 / 3, 2 / 3)
        (g,) = torch.autograd.grad(_branch_loss(a, b, wa, wb), xx, create_graph=True)
        (h,) = torch.autograd.grad((g ** 2).sum(), xx)
        hs.append(h)
    torch.testing.assert_close(hs[1], hs[0], atol=1e-6, rtol=1e-6)


def test_opcheck():
    a, b = torch.randn(3, 4, device=DEVICE, requires_grad=True), torch.randn(3, 4, device=DEVICE, requires_grad=True)
    result = torch.library.opcheck(torch.ops.imta_fast.ge_axpby.default, (a, b, 0.25, 0.75))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
def test_compile_fullgraph():
    """Dynamo traces the autograd.Function (views forward) without a graph break; the AOT backward
    graph calls the fused op; grads equal the reference."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs, CompileCounterWithBackend

    lin = torch.nn.Linear(8, 8).to(DEVICE)
    head = torch.nn.Linear(8, 3).to(DEVICE)

    def f(x, split):
        h = torch.tanh(lin(x))
        a, b = split(h, 0.25, 0.75)
        return head(a).square().sum() + b.sin().sum()

    x = torch.randn(4, 8, device=DEVICE)
    params = list(lin.parameters()) + list(head.parameters())
    ref = torch.autograd.grad(f(x, gradient_equilibrium_split), params)
    torch._dynamo.reset()
    rec = AotEagerAndRecordGraphs()
    cnt = CompileCounterWithBackend(rec)
    cf = torch.compile(f, backend=cnt, fullgraph=True)
    got = torch.autograd.grad(cf(x, gradient_equilibrium_split_triton), params)
    assert cnt.frame_count == 1
    bw_ops = [str(n.target) for g in rec.bw_graphs for n in g.graph.nodes]
    assert "imta_fast.ge_axpby.default" in bw_ops
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


def test_msdnet_with_fused_ge_matches_reference():
    """The whole GE network: msdnet_tiny's parameter grads with the fused split (ge_impl='triton')
    equal the reference (ge_impl='torch')."""
    from imta_fast.models import create_model

    torch.manual_seed(0)
    net = create_model("msdnet_tiny", num_classes=10, gradient_equilibrium=True).to(DEVICE)
    x = torch.randn(2, net.cfg.in_channels, net.cfg.image_size, net.cfg.image_size, device=DEVICE)
    y = torch.randint(0, 10, (2,), device=DEVICE)

    def grads():
        net.zero_grad()
        logits, _ = net(x)
        sum(torch.nn.functional.cross_entropy(z, y) for z in logits).backward()
        return [p.grad.clone() for p in net.parameters() if p.grad is not None]

    net.ge_impl = "torch"
    ref = grads()
    net.ge_impl = "triton"
    got = grads()
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_registration_mode():
    if ge_mod.INTERPRET:
        assert not ge_mod.USES_TRITON_OP
