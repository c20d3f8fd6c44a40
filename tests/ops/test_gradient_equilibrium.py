"""Fused Gradient Equilibrium split (``imta_fast.ops.dispatch``, impl='triton') vs the reference
``imta_fast.ops.gradient_equilibrium``: views in the forward, ``s_head * g_head + s_next * g_next`` as one
``torch.lerp`` pass in the backward (docs/method.md §2: the two scales sum to 1), None gradients,
layouts, double backward and torch.compile(fullgraph=True).  (Moved from tests/kernels when the Triton
axpby kernel was retired in favour of the single ATen op; see benchmarks/NOTES.md "Kernels".)"""
from __future__ import annotations

import pytest
import torch

from imta_fast.ops import dispatch
from imta_fast.ops.gradient_equilibrium import gradient_equilibrium_split


def gradient_equilibrium_split_triton(x, s_head, s_next):
    """The fused split under test (the name the tests used for the retired Triton version)."""
    return dispatch.gradient_equilibrium_split(x, s_head, s_next, impl="triton")

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
    out = dispatch._lerp_combine(ga, gb, 0.3, 0.7)
    torch.testing.assert_close(out, 0.3 * ga + 0.7 * gb, atol=1e-6, rtol=1e-6)
    if layouts == "channels_last_both":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n", [1, 1000, 4097])
def test_scales_not_summing_to_one_take_the_reference_expression(n):
    """lerp needs s_head + s_next = 1; any other pair falls back to s_head * a + s_next * b."""
    a, b = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    out = dispatch._lerp_combine(a, b, -1.5, 0.25)
    torch.testing.assert_close(out, -1.5 * a + 0.25 * b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("K", range(2, 9))
def test_lerp_equals_ge_axpby_in_float64(K):
    """For every GE placement (K <= 8 exits, block k < K-1) the scales sum to 1 exactly in float64 and
    the one-op lerp equals s_head * g_head + s_next * g_next to within 2 ulp of |g_head| + |g_next|."""
    g_head = torch.randn(4096, dtype=torch.float64, device=DEVICE)
    g_next = torch.randn(4096, dtype=torch.float64, device=DEVICE)
    for k in range(K - 1):
        r = K - k
        s_head, s_next = 1.0 / r, (r - 1) / r
        assert s_head + s_next == 1.0
        exp = s_head * g_head + s_next * g_next
        got = dispatch._lerp_combine(g_head, g_next, s_head, s_next)
        bound = 2 * torch.finfo(torch.float64).eps * (g_head.abs() + g_next.abs())
        assert bool(((got - exp).abs() <= bound).all()), (K, k, (got - exp).abs().max().item())
        # and through autograd, the whole split against the reference
        x = torch.randn(64, dtype=torch.float64, device=DEVICE)
        wa, wb = torch.randn_like(x), torch.randn_like(x)
        torch.testing.assert_close(_grads(gradient_equilibrium_split_triton, x, s_head, s_next, wa, wb),
                                   _grads(gradient_equilibrium_split, x, s_head, s_next, wa, wb),
                                   atol=1e-15, rtol=1e-14)


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


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
def test_compile_fullgraph():
    """Dynamo traces the autograd.Function (views forward) without a graph break; the AOT backward
    graph calls the fused op (one aten.lerp); grads equal the reference."""
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
    # compiled, the backward is the plain s_head * g_head + s_next * g_next (inductor fuses it; it
    # miscompiles lerp / add(alpha=) here, see test_reference_and_fused_split_under_inductor)
    assert "aten.lerp.Scalar" not in bw_ops and "aten.mul.Tensor" in bw_ops
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


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_reference_and_fused_split_under_inductor(fused):
    """Inductor (CPU, torch 2.14) folded the reference's add(g_head * s_head, g_next, alpha=s_next) into an
    addmm with the gradient of the next layer's matmul and dropped alpha (grads off by O(1)); both splits
    now give the compiled graph the plain expression.  Fails with the alpha form."""
    torch.manual_seed(0)
    lin, head = torch.nn.Linear(8, 8).to(DEVICE), torch.nn.Linear(8, 3).to(DEVICE)
    split = gradient_equilibrium_split_triton if fused else gradient_equilibrium_split

    def f(x):
        h = torch.tanh(lin(x))
        a, b = split(h, 0.25, 0.75)
        return head(a).square().sum() + lin(b).sin().sum()

    x = torch.randn(4, 8, device=DEVICE)
    params = list(lin.parameters()) + list(head.parameters())
    ref = torch.autograd.grad(f(x), params)
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(f, backend="inductor", fullgraph=True)(x), params)
    torch._dynamo.reset()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
