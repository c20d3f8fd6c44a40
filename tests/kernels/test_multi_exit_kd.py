"""Fused multi-exit CE + KD kernel vs a float64 PyTorch reference, the trainer's torch loss and the
direct IMTA formulation; autograd, op registration and torch.compile(fullgraph=True).

On CPU the kernel runs in Triton's interpreter (see conftest.py); shapes are chosen small but odd.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from imta_fast.ops import dispatch as FN
from imta_fast.ops import losses
from imta_fast.kernels import multi_exit_kd as kd_mod
from imta_fast.kernels.multi_exit_kd import block_sizes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (dtype, loss atol, loss rtol, grad atol as a fraction of max|grad|, grad rtol).  Inputs are rounded to
# `dtype` first and the float64 reference sees the same rounded values, so the loss (fp32 math) is
# tight for every dtype; the gradient is returned in `dtype` (Liger convention), hence its looser bound.
TOLS = {
    torch.float32: (1e-5, 1e-5, 1e-5, 1e-4),
    torch.bfloat16: (1e-5, 1e-5, 8e-3, 8e-3),
    torch.float16: (1e-5, 1e-5, 1e-3, 1e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """allclose with a message that says where and by how much it failed."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        raise AssertionError(f"{what}: max abs err {err.max().item():.3e} (max rel {(err / e.abs().clamp_min(1e-30)).max().item():.3e}); "
                             f"worst at flat index {i}: got {a.flatten()[i].item():.8e}, want {e.flatten()[i].item():.8e}, "
                             f"atol={atol:g} rtol={rtol:g}")


# ----------------------------------------------------------------------------- float64 reference
def ref_loss64(z, y, teacher=None, *, temperature=1.0, kd_weight=0.5, exit_weights=None, sample_weights=None,
               label_smoothing=0.0, kl_reduction="mean", kd_form="kl", kd_exits=None):
    """The contract written out exit by exit in float64 (independent of imta_fast.ops.losses)."""
    K, B, C = z.shape
    z = z.double()
    w = [1.0] * K if exit_weights is None else [float(v) for v in exit_weights]
    gam = [float(kd_weight)] * K if isinstance(kd_weight, (int, float)) else [float(v) for v in kd_weight]
    kd_set = set(range(K - 1)) if kd_exits is None else {k % K for k in kd_exits}
    s = torch.ones(B, K, dtype=torch.float64) if sample_weights is None else sample_weights.double().cpu()
    s = s.to(z.device)
    eps, T = label_smoothing, temperature
    q = torch.full((B, C), eps / C, dtype=torch.float64, device=z.device)
    q[torch.arange(B), y] += 1.0 - eps
    out = []
    for k in range(K):
        logp = torch.log_softmax(z[k], -1)
        ce = -(q * logp).sum(-1)
        term = (s[:, k] * ce).sum() / B
        g = gam[k] if (teacher is not None and k in kd_set) else 0.0
        if g != 0.0:
            lpt = torch.log_softmax(teacher.double() / T, -1)
            pt = lpt.exp()
            lps = torch.log_softmax(z[k] / T, -1)
            kd = (pt * (lpt - lps)).sum(-1) if kd_form == "kl" else -(pt * lps).sum(-1)
            kd = T * T * kd
            denom = B * C if kl_reduction == "mean" else B
            term = (1.0 - g) * term + g * (s[:, k] * kd).sum() / denom
        out.append(w[k] * term)
    return torch.stack(out)


def make_inputs(K, B, C, dtype, scale=3.0, teacher=True, sw=False, device=DEVICE):
    z = (torch.randn(K, B, C, device=device) * scale).to(dtype)
    y = torch.randint(0, C, (B,), device=device)
    t = (torch.randn(B, C, device=device) * scale).to(dtype) if teacher else None
    s = (torch.rand(B, K, device=device) * 1.5 + 0.25) if sw else None
    return z, y, t, s


def run_impl(impl, z, y, t, go=None, **kw):
    """Loss ([K] per-exit) and d(sum_k go_k loss_k)/dz for one implementation."""
    z = z.detach().clone().requires_grad_(True)
    per_exit = FN.multi_exit_loss(z, y, t, reduction="none", impl=impl, **kw)
    go = torch.ones_like(per_exit) if go is None else go
    (grad,) = torch.autograd.grad(per_exit, z, go)
    return per_exit.detach(), grad


def run_ref(z, y, t, go=None, **kw):
    z64 = z.detach().double().requires_grad_(True)
    t64 = None if t is None else t.double()
    per_exit = ref_loss64(z64, y, t64, **kw)
    go = torch.ones_like(per_exit) if go is None else go.double()
    (grad,) = torch.autograd.grad(per_exit, z64, go)
    return per_exit.detach(), grad


def check_against_ref(z, y, t, dtype, go=None, what="", **kw):
    latol, lrtol, gatol, grtol = TOLS[dtype]
    exp_l, exp_g = run_ref(z, y, t, go=go, **kw)
    got_l, got_g = run_impl("triton", z, y, t, go=go, **kw)
    assert got_l.dtype == torch.float32
    assert got_g.dtype == z.dtype
    assert_close(got_l, exp_l, latol * max(1.0, exp_l.abs().max().item()), lrtol, f"{what} loss")
    assert_close(got_g, exp_g, gatol * exp_g.abs().max().item() + 1e-12, grtol, f"{what} grad")


# ----------------------------------------------------------------------------- shapes x options
OPTIONS = {
    "ce_only": dict(),
    "imta_ofa": dict(temperature=1.0, kd_weight=0.1, kl_reduction="mean"),
    "batchmean_T3": dict(temperature=3.0, kd_weight=0.9, kl_reduction="batchmean"),
    "soft_ce_phuong": dict(temperature=4.0, kd_weight=0.5, kl_reduction="batchmean", kd_form="soft_ce"),
    "label_smoothing": dict(temperature=2.0, kd_weight=0.3, label_smoothing=0.1),
    "per_exit_gamma_weights": dict(temperature=1.5, kd_weight="per_exit", exit_weights="per_exit"),
    "kd_on_all_exits": dict(temperature=2.0, kd_weight=0.7, kd_exits="all", kl_reduction="batchmean"),
}


def materialize(opts: dict, K: int) -> dict:
    kw = dict(opts)
    if kw.get("kd_weight") == "per_exit":
        kw["kd_weight"] = [0.1 + 0.8 * k / max(1, K - 1) for k in range(K)]
    if kw.get("exit_weights") == "per_exit":
        kw["exit_weights"] = [0.5 + k for k in range(K)]
    if kw.get("kd_exits") == "all":
        kw["kd_exits"] = list(range(K))
    return kw


@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("sw", [False, True], ids=["no_sw", "sw"])
def test_options_fp32(opt, sw):
    K, B, C = 5, 41, 1271
    z, y, t, s = make_inputs(K, B, C, torch.float32, sw=sw)
    kw = materialize(OPTIONS[opt], K)
    teacher = None if opt == "ce_only" else t
    check_against_ref(z, y, teacher, torch.float32, sample_weights=s, what=opt, **kw)


SHAPES = [  # (K, B, C)
    (1, 1, 1),
    (1, 3, 10),
    (2, 1, 7),
    (5, 41, 1271),
    (7, 16, 100),
    (5, 8, 1000),
    (2, 3, 21841),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K{}_B{}_C{}".format(*s))
def test_shapes_dtypes(shape, dtype):
    K, B, C = shape
    z, y, t, s = make_inputs(K, B, C, dtype, sw=True)
    kw = dict(temperature=2.0, kd_weight=[0.2 + 0.1 * k for k in range(K)], exit_weights=[1.0 + k for k in range(K)],
              label_smoothing=0.1, kl_reduction="batchmean", kd_exits=list(range(K)))
    check_against_ref(z, y, t, dtype, sample_weights=s, what=f"{shape}", **kw)


@pytest.mark.parametrize("shape,block_c", [((5, 41, 1271), 256), ((2, 3, 21841), 4096), ((3, 5, 10), 4), ((2, 2, 1), 1)],
                         ids=["C1271_by256", "C21841_by4096", "C10_by4", "C1_by1"])
@pytest.mark.parametrize("form", ["kl", "soft_ce"])
def test_multi_chunk_path(shape, block_c, form):
    """Rows longer than BLOCK_C: online softmax over chunks + a second pass (ragged last chunk)."""
    K, B, C = shape
    z, y, t, s = make_inputs(K, B, C, torch.float32, sw=True)
    kw = dict(temperature=2.5, kd_weight=0.6, label_smoothing=0.05, kd_form=form, kl_reduction="mean")
    with block_sizes(block_b=min(16, B - 1) if B > 2 else 1, block_c=block_c):  # several row tiles, ragged last
        check_against_ref(z, y, t, torch.float32, sample_weights=s, what="chunked", **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("block_c", [None, 512], ids=["one_tile", "chunked"])
def test_large_logits(dtype, block_c):
    """|logits| ~ 1e4: no overflow, no inf - inf, loss terms still accurate (log-domain accumulation)."""
    K, B, C = 3, 6, 1000
    z = ((torch.rand(K, B, C, device=DEVICE) * 2 - 1) * 1e4).to(dtype)
    t = ((torch.rand(B, C, device=DEVICE) * 2 - 1) * 1e4).to(dtype)
    y = torch.randint(0, C, (B,), device=DEVICE)
    kw = dict(temperature=3.0, kd_weight=0.5, kl_reduction="batchmean", label_smoothing=0.1)
    with block_sizes(block_c=block_c):
        check_against_ref(z, y, t, dtype, what="1e4 logits", **kw)
    # and the same input where student == teacher: the KL is exactly ~0 despite the magnitudes
    got, _ = run_impl("triton", t.unsqueeze(0).expand(2, B, C), y, t, temperature=1.0, kd_weight=1.0,
                      kl_reduction="batchmean", kd_exits=[0, 1])
    assert got.abs().max().item() < 1e-2


def test_grad_output_not_one():
    K, B, C = 4, 9, 33
    z, y, t, s = make_inputs(K, B, C, torch.float32, sw=True)
    go = torch.tensor([0.5, -2.0, 3.25, 0.0], device=DEVICE)
    kw = dict(temperature=2.0, kd_weight=0.4, label_smoothing=0.1)
    check_against_ref(z, y, t, torch.float32, go=go, sample_weights=s, what="go", **kw)
    # the scalar path with a scaled backward
    zz = z.clone().requires_grad_(True)
    (FN.multi_exit_loss(zz, y, t, impl="triton", **kw) * 7.5).backward()
    exp = run_ref(z, y, t, go=torch.full((K,), 7.5, device=DEVICE), **kw)[1]
    assert_close(zz.grad, exp, 1e-9, 1e-4, "scalar * 7.5 grad")


def test_fp16_gradient_survives_loss_scaling():
    """fp16 + GradScaler: with KD 'mean' on C = 1000 the per-element KD gradient is ~1e-9, below fp16's
    range; it must still arrive once the loss scale (2**16) is applied in the backward."""
    K, B, C = 2, 4, 1000
    z, y, t, _ = make_inputs(K, B, C, torch.float16, scale=1.0)
    kw = dict(temperature=1.0, kd_weight=1.0, kl_reduction="mean", kd_exits=[0, 1])  # pure KD
    go = torch.full((K,), 2.0 ** 16, device=DEVICE)
    exp_l, exp_g = run_ref(z, y, t, go=go, **kw)
    got_l, got_g = run_impl("triton", z, y, t, go=go, **kw)
    assert got_g.dtype == torch.float16
    tol = (1e-3 * exp_g.abs().max().item(), 1e-3)
    assert_close(got_g, exp_g, *tol, "scaled fp16 grad")
    # the test has teeth: a gradient saved in fp16 before scaling (subnormal / flushed) fails it
    naive = (exp_g / 2 ** 16).half().double() * 2 ** 16
    with pytest.raises(AssertionError):
        assert_close(naive, exp_g, *tol, "fp16-stored grad")


def test_non_contiguous_inputs():
    """Logits as a transposed view [B, K, C] -> [K, B, C], a column-strided slice, a strided teacher and
    a transposed sample-weight matrix."""
    K, B, C = 3, 10, 50
    base = torch.randn(B, K, 2 * C, device=DEVICE) * 2
    z = base.transpose(0, 1)[..., ::2]  # strides (2C, 2KC, 2)
    assert not z.is_contiguous()
    t = torch.randn(C, B, device=DEVICE).t()
    s = torch.rand(K, B, device=DEVICE).t()
    y = torch.randint(0, C, (B,), device=DEVICE)
    kw = dict(temperature=2.0, kd_weight=0.5, label_smoothing=0.05, sample_weights=s)
    check_against_ref(z, y, t, torch.float32, what="non-contiguous", **kw)
    got_l, got_g = run_impl("triton", z, y, t, **kw)
    exp_l, exp_g = run_impl("triton", z.contiguous(), y, t.contiguous(), **dict(kw, sample_weights=s.contiguous()))
    assert torch.equal(got_l, exp_l) and torch.equal(got_g, exp_g)


def test_list_input_grads_reach_every_exit():
    K, B, C = 3, 5, 12
    zs = [torch.randn(B, C, device=DEVICE, requires_grad=True) for _ in range(K)]
    y = torch.randint(0, C, (B,), device=DEVICE)
    t = torch.randn(B, C, device=DEVICE)
    kw = dict(temperature=2.0, kd_weight=0.3)
    FN.multi_exit_loss(zs, y, t, impl="triton", **kw).backward()
    exp_l, exp_g = run_ref(torch.stack([v.detach() for v in zs]), y, t, **kw)
    for k in range(K):
        assert_close(zs[k].grad, exp_g[k], 1e-9, 1e-4, f"exit {k} grad")


@pytest.mark.parametrize("opt", ["ce_only", "imta_ofa", "soft_ce_phuong", "per_exit_gamma_weights"])
def test_trainer_torch_loss_equals_kernel(opt):
    """``--loss-impl torch`` (imta_fast.ops.losses) and ``--loss-impl triton`` agree on value and gradient."""
    K, B, C = 5, 12, 100
    z, y, t, s = make_inputs(K, B, C, torch.float32, sw=True)
    kw = materialize(OPTIONS[opt], K)
    teacher = None if opt == "ce_only" else t
    zt = z.clone().requires_grad_(True)
    lt = losses.multi_exit_loss(zt, y, teacher, sample_weights=s, **kw)
    lt.backward()
    zk = z.clone().requires_grad_(True)
    lk = FN.multi_exit_loss(zk, y, teacher, sample_weights=s, impl="triton", **kw)
    lk.backward()
    assert_close(lk, lt, 1e-6, 1e-5, "loss")
    assert_close(zk.grad, zt.grad, 1e-8, 1e-4, "grad")


def test_functional_module_op_agree():
    K, B, C = 4, 7, 30
    z, y, t, s = make_inputs(K, B, C, torch.float32, sw=True)
    kw = dict(temperature=3.0, kd_weight=0.9, label_smoothing=0.1, kl_reduction="batchmean", kd_form="soft_ce")
    f = FN.multi_exit_loss(z, y, t, sample_weights=s, impl="triton", **kw)
    m = FN.MultiExitLoss(impl="triton", **kw)(z, y, t, sample_weights=s)
    alias = FN.MultiExitKDLoss(impl="triton", **kw)(list(z.unbind(0)), y, t, sample_weights=s)
    coef = torch.tensor([[1.0 - 0.9, 0.9]] * (K - 1) + [[1.0, 0.0]], device=DEVICE)
    row_loss, grad = torch.ops.imta_fast.multi_exit_kd(z, y, t, s, coef, 3.0, 0.1, True, True, True)
    assert row_loss.shape == (K, B) and grad.shape == (K, B, C)
    assert torch.equal(f, m) and torch.equal(f, alias)
    assert_close(row_loss.sum(), f, 0, 1e-6, "op")
    per_exit = FN.MultiExitLoss(impl="triton", reduction="none", **kw)(z, y, t, sample_weights=s)
    assert per_exit.shape == (K,)
    assert_close(per_exit.sum(), f, 0, 1e-6, "reduction=none")


def test_no_grad_and_frozen_logits_skip_gradient():
    K, B, C = 2, 4, 9
    z, y, t, _ = make_inputs(K, B, C, torch.float32)
    coef = torch.tensor([[0.5, 0.5], [1.0, 0.0]], device=DEVICE)
    _, grad = torch.ops.imta_fast.multi_exit_kd(z, y, t, None, coef, 1.0, 0.0, False, False, False)
    assert grad.numel() == 0
    with torch.no_grad():
        a = FN.multi_exit_loss(z.clone().requires_grad_(True), y, t, impl="triton")
    b = FN.multi_exit_loss(z, y, t, impl="triton")
    assert not a.requires_grad and not b.requires_grad
    assert_close(a, ref_loss64(z, y, t).sum(), 1e-6, 1e-5, "no-grad value")


def test_teacher_gets_no_gradient():
    K, B, C = 3, 4, 8
    z, y, t, _ = make_inputs(K, B, C, torch.float32)
    z.requires_grad_(True)
    t.requires_grad_(True)
    FN.multi_exit_loss(z, y, t, impl="triton", kd_weight=0.5).backward()
    assert t.grad is None and z.grad is not None


def test_imta_ofa_matches_kldivloss_formulation():
    """docs/method.md §4: L = CE(z_K) + sum_{k<K} [(1-g) CE(z_k) + g T^2 KLDivLoss()(log_softmax(z_k/T), softmax(t/T))],
    with nn.KLDivLoss's legacy 'mean' reduction (divide by B*C)."""
    K, B, C, T, g = 5, 16, 100, 1.0, 0.1
    z, y, t, _ = make_inputs(K, B, C, torch.float32)
    ce, kl = nn.CrossEntropyLoss(), nn.KLDivLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KLDivLoss warns that 'mean' is not 'batchmean' -- that is the point
        ref = ce(z[-1], y) + sum((1 - g) * ce(z[k], y) + g * T * T * kl(F.log_softmax(z[k] / T, 1), F.softmax(t / T, 1))
                                 for k in range(K - 1))
    got = FN.multi_exit_loss(list(z), y, t, temperature=T, kd_weight=g, kl_reduction="mean", impl="triton")
    assert_close(got, ref, 1e-6, 1e-5, "IMTA OFA")


def test_weights_requiring_grad_route_to_torch():
    K, B, C = 2, 3, 5
    z, y, t, _ = make_inputs(K, B, C, torch.float32)
    s = torch.rand(B, K, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        FN.multi_exit_loss(z, y, t, sample_weights=s, impl="triton")
    loss = FN.multi_exit_loss(z, y, t, sample_weights=s, impl="auto")  # -> PyTorch, differentiable in s
    (gs,) = torch.autograd.grad(loss, s)
    assert gs.abs().sum() > 0


# ----------------------------------------------------------------------------- registration / compile
def test_opcheck():
    """torch.library's schema, fake-tensor, autograd-registration and AOT-dispatch (dynamic) checks."""
    K, B, C = 3, 4, 9
    z, y, t, s = make_inputs(K, B, C, torch.float32, sw=True)
    coef = torch.tensor([[0.5, 0.5]] * K, device=DEVICE)
    args = (z.requires_grad_(True), y, t, s, coef, 2.0, 0.1, True, False, True)
    result = torch.library.opcheck(torch.ops.imta_fast.multi_exit_kd.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


def _tiny_multi_exit_net(K=3, D=16, C=10):
    torch.manual_seed(1)
    body = nn.ModuleList([nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(K)]).to(DEVICE)
    heads = nn.ModuleList([nn.Linear(D, C) for _ in range(K)]).to(DEVICE)
    return body, heads


def _train_step_fn(body, heads, impl, **loss_kw):
    def step(x, y, teacher):
        h, zs = x, []
        for blk, head in zip(body, heads):
            h = blk(h)
            zs.append(head(h))
        return FN.multi_exit_loss(zs, y, teacher, impl=impl, **loss_kw)

    return step


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compile_fullgraph_no_graph_break(dtype):
    """torch.compile(fullgraph=True) of forward + loss (the op appears in the graph; one frame), then
    backward through AOTAutograd; values and parameter grads equal eager PyTorch."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs, CompileCounterWithBackend

    body, heads = _tiny_multi_exit_net()
    body, heads = body.to(dtype), heads.to(dtype)
    params = list(body.parameters()) + list(heads.parameters())
    x = torch.randn(6, 16, device=DEVICE, dtype=dtype)
    y = torch.randint(0, 10, (6,), device=DEVICE)
    t = torch.randn(6, 10, device=DEVICE, dtype=dtype)
    kw = dict(temperature=2.0, kd_weight=0.5, label_smoothing=0.1, exit_weights=[1.0, 0.5, 2.0])
    ref = _train_step_fn(body, heads, "torch", **kw)(x, y, t)
    ref_g = torch.autograd.grad(ref, params)

    torch._dynamo.reset()
    rec = AotEagerAndRecordGraphs()
    cnt = CompileCounterWithBackend(rec)
    step = torch.compile(_train_step_fn(body, heads, "triton", **kw), backend=cnt, fullgraph=True)
    out = step(x, y, t)
    got_g = torch.autograd.grad(out, params)
    assert cnt.frame_count == 1
    fw_ops = [str(n.target) for g in rec.fw_graphs for n in g.graph.nodes]
    assert "imta_fast.multi_exit_kd.default" in fw_ops
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(out, ref, tol, tol, "compiled loss")
    for a, b in zip(got_g, ref_g):
        assert_close(a.float(), b.float(), tol * b.abs().max().item(), tol, "compiled grad")
    # a second call with new data reuses the graph (no recompile) ...
    step(x * 0.5, y, t)
    assert cnt.frame_count == 1
    # ... and another batch size recompiles once, with dynamic shapes, and is still right
    x2, y2, t2 = x.repeat(2, 1)[:9], y.repeat(2)[:9], t.repeat(2, 1)[:9]
    assert_close(step(x2, y2, t2), _train_step_fn(body, heads, "torch", **kw)(x2, y2, t2), tol, tol, "dynamic B")
    assert cnt.frame_count == 2
    torch._dynamo.reset()


def test_compile_inductor_train_step_with_ge():
    """The real backend: inductor compiles a training step that uses both fused ops (the fused
    loss in the forward graph, the fused GE lerp in the backward graph) without a graph break.
    On CPU the loss op is an opaque custom op whose kernel runs in Triton's interpreter."""
    import functools

    gradient_equilibrium_split_triton = functools.partial(FN.gradient_equilibrium_split, impl="triton")

    body, heads = _tiny_multi_exit_net()
    params = list(body.parameters()) + list(heads.parameters())
    K = len(body)

    def step(x, y, teacher, impl, split):
        h, zs = x, []
        for k in range(K):
            h = body[k](h)
            head_in, h = split(h, 1.0 / (K - k), (K - k - 1) / (K - k))
            zs.append(heads[k](head_in))
        return FN.multi_exit_loss(zs, y, teacher, temperature=2.0, kd_weight=0.5, impl=impl)

    from imta_fast.ops.gradient_equilibrium import gradient_equilibrium_split

    x = torch.randn(6, 16, device=DEVICE)
    y = torch.randint(0, 10, (6,), device=DEVICE)
    t = torch.randn(6, 10, device=DEVICE)
    ref = step(x, y, t, "torch", gradient_equilibrium_split)
    ref_g = torch.autograd.grad(ref, params)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(step)(x, y, t, "triton", gradient_equilibrium_split_triton)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    out = compiled(x, y, t, "triton", gradient_equilibrium_split_triton)
    got_g = torch.autograd.grad(out, params)
    assert_close(out, ref, 1e-5, 1e-5, "inductor loss")
    for a, b in zip(got_g, ref_g):
        assert_close(a, b, 1e-5 * b.abs().max().item(), 1e-4, "inductor grad")
    torch._dynamo.reset()


def test_registration_mode():
    """Interpreter/CPU -> opaque custom_op; GPU with torch>=2.6 -> triton_op (inductor-visible)."""
    if kd_mod.INTERPRET:
        assert not kd_mod.USES_TRITON_OP
    else:
        assert kd_mod.USES_TRITON_OP == hasattr(torch.library, "triton_op")


def test_impl_resolution():
    K, B, C = 2, 3, 4
    z, y, t, _ = make_inputs(K, B, C, torch.float32)
    assert FN.resolve_impl("auto", torch.device("cpu"), ()) == "torch"
    assert FN.resolve_impl("torch", torch.device("cpu"), ()) == "torch"
    with pytest.raises(ValueError):
        FN.multi_exit_loss(z, y, t, impl="cuda")
    if kd_mod.INTERPRET:
        assert FN.resolve_impl("triton", torch.device("cpu"), ()) == "triton"


_SM90_COMPILE_SCRIPT = r"""
import itertools, re, sys
import triton
from triton.runtime.jit import JITFunction
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print("SKIP", exc); sys.exit(0)
from imta_fast.kernels import multi_exit_kd as kd

def compile_(fn, sig, consts, ptrs, num_warps):
    names = fn.arg_names
    idx = {n: i for i, n in enumerate(names)}
    sig = {n: ("constexpr" if n in consts else sig.get(n, "i32")) for n in names}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs={(idx[k],): v for k, v in consts.items()},
                        attrs={(idx[p],): [["tt.divisibility", 16]] for p in ptrs})
    except TypeError as exc:  # another Triton version's ASTSource
        print("SKIP", exc); sys.exit(0)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps)).asm["ptx"]

k = JITFunction(kd._multi_exit_kd_kernel.fn)
n_vec = 0
for dt, teacher, single, soft, sw, wg, align, split in [
        ("bf16", True, True, False, True, True, 8, False), ("fp32", True, False, True, False, True, 4, True),
        ("bf16", False, True, False, False, True, 1, True), ("fp16", True, False, False, True, False, 1, False),
        ("fp32", False, False, False, True, True, 4, False)]:
    ptrs = {"y_ptr": "*i64", "n_ptr": "*i64", "t_ptr": "*" + dt, "s_ptr": "*fp32", "coef_ptr": "*fp32",
            "loss_ptr": "*fp32", "g_ptr": "*" + dt, **{f"z{i}": "*" + dt for i in range(8)}}
    sig = dict(ptrs, **{n: "fp32" for n in ("inv_D", "inv_C", "T", "inv_T", "eps")})
    consts = dict(K=5, COUNT_ROWS=single, COUNT_BLOCK=256, HAS_TEACHER=teacher, HAS_SW=sw, SOFT_CE=soft, WRITE_GRAD=wg, SINGLE_TILE=single, ALIGN=align,
                  BLOCK_B=2 if single else 1, BLOCK_C=1024, EXIT_SPLIT=split, stride_zc=1, stride_tc=1)
    ptx = compile_(k, sig, consts, ptrs, 8)
    n_vec += bool(re.search(r"ld\.global\.v\d", ptx)) if align > 1 else 0
# K = B = C = 1 as a GPU launch specialises it: integer arguments equal to 1 become constants
ones = {n: 1 for n in ("B", "C", "stride_zb", "stride_y", "stride_tb", "stride_gk", "stride_gb", "stride_sb", "stride_sk")}
compile_(k, sig, dict(consts, K=1, COUNT_ROWS=True, COUNT_BLOCK=1, HAS_TEACHER=True, HAS_SW=True, WRITE_GRAD=True,
                      SINGLE_TILE=True, ALIGN=1, BLOCK_B=1, BLOCK_C=1, **ones), ptrs, 1)
g = JITFunction(kd._grad_scale_kernel.fn)
compile_(g, {"g_ptr": "*bf16", "out_ptr": "*bf16", "go_ptr": "*fp32"}, dict(SKIP_ONES=True, BLOCK=4096),
         ("g_ptr", "out_ptr", "go_ptr"), 8)
print("OK", n_vec)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real launches compile these kernels")
def test_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler: compile the real (non-interpreted)
    kernels for sm_90 through Triton's bundled toolchain (no GPU needed), in a subprocess without
    TRITON_INTERPRET -- feature flags, the exit-split grid, and K = B = C = 1 with the integer arguments
    a launch turns into constants -- and check that aligned rows get vector loads."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SM90_COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    last = (out.stdout.strip().splitlines() or [""])[-1]
    if last.startswith("SKIP"):
        pytest.skip(f"Triton's AOT compile API differs here: {last}")
    assert out.returncode == 0 and last.startswith("OK"), out.stderr[-3000:]
    assert last == "OK 3", f"vectorised loads expected in the 3 aligned variants: {last}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_and_cuda_graph_capture():
    """GPU only: after a warm-up step (kernel compile, launch configuration tuned, per-exit weight
    constants cached) the loss's forward + backward does no host synchronisation, and it can be captured
    in a CUDA graph and replayed on new data."""
    K, B, C = 5, 64, 1000
    kw = dict(temperature=2.0, kd_weight=0.1, exit_weights=[1.0, 0.5, 1.0, 2.0, 1.0], label_smoothing=0.1)
    z = torch.randn(K, B, C, device="cuda", requires_grad=True)
    y = torch.randint(0, C, (B,), device="cuda")
    t = torch.randn(B, C, device="cuda")
    s = torch.rand(B, K, device="cuda")

    def step():
        FN.multi_exit_loss(z, y, t, sample_weights=s, impl="triton", **kw).backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            z.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z.grad = None
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    z.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = FN.multi_exit_loss(z, y, t, sample_weights=s, impl="triton", **kw)
        static_loss.backward()
    with torch.no_grad():
        z.copy_(torch.randn_like(z))
    graph.replay()
    torch.cuda.synchronize()
    exp_l, exp_g = run_ref(z.detach(), y, t, sample_weights=s, **kw)
    assert_close(static_loss, exp_l.sum(), 1e-5, 1e-5, "graph loss")
    assert_close(z.grad, exp_g, 1e-5 * exp_g.abs().max().item(), 1e-4, "graph grad")
