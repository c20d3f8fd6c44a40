"""The plain-PyTorch multi-exit loss (imta_fast.ops.losses, the trainer's ``--loss-impl torch``): a hand
computation, the reference formulations of MSDNet / IMTA OFA / Phuong & Lampert / L2W, options,
validation, the module and the functional dispatcher on CPU.  The Triton kernel is compared with this
loss in tests/kernels/test_multi_exit_kd.py."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from imta_fast.ops import dispatch as FN
from imta_fast.ops.dispatch import MultiExitKDLoss, MultiExitLoss, multi_exit_kd_loss
from imta_fast.ops.losses import multi_exit_loss


def _log_softmax(v):
    m = max(v)
    lse = m + math.log(sum(math.exp(x - m) for x in v))
    return [x - lse for x in v]


def test_hand_computed_tiny_example():
    """K=2, B=2, C=3, T=2, gamma=0.5, kl_reduction='mean', default kd_exits (exit 0 only), with every
    term computed in plain Python floats: L = (1-g) CE(z1) + g T^2 KL_sum / (B C) + CE(z2)."""
    z1 = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
    z2 = [[2.0, 0.0, -1.0], [1.0, -1.0, 0.5]]
    t = [[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]
    y = [2, 0]
    T, g = 2.0, 0.5
    ce1 = sum(-_log_softmax(z1[b])[y[b]] for b in range(2)) / 2
    ce2 = sum(-_log_softmax(z2[b])[y[b]] for b in range(2)) / 2
    kl = 0.0
    for b in range(2):
        lpt = _log_softmax([v / T for v in t[b]])
        lps = _log_softmax([v / T for v in z1[b]])
        kl += sum(math.exp(a) * (a - c) for a, c in zip(lpt, lps))
    expected = (1 - g) * ce1 + g * T * T * kl / (2 * 3) + ce2
    # anchors written out by hand: CE([1,2,3], y=2) = log(e+e^2+e^3) - 3, CE([0,0,0], y=0) = log 3
    assert ce1 == pytest.approx((math.log(math.e + math.e ** 2 + math.e ** 3) - 3 + math.log(3)) / 2, rel=1e-12)
    assert expected == pytest.approx(2.3278856443, rel=1e-9)

    zs = [torch.tensor(z1, requires_grad=True), torch.tensor(z2, requires_grad=True)]
    got = multi_exit_loss(zs, torch.tensor(y), torch.tensor(t), temperature=T, kd_weight=g, kl_reduction="mean")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    per_exit = multi_exit_loss(zs, torch.tensor(y), torch.tensor(t), temperature=T, kd_weight=g, reduction="none")
    assert per_exit.tolist() == pytest.approx([(1 - g) * ce1 + g * T * T * kl / 6, ce2], rel=1e-6)
    # batchmean divides the KD sum by B instead of B*C; soft_ce adds the teacher entropy
    bm = multi_exit_loss(zs, torch.tensor(y), torch.tensor(t), temperature=T, kd_weight=g, kl_reduction="batchmean")
    assert bm.item() == pytest.approx((1 - g) * ce1 + g * T * T * kl / 2 + ce2, rel=1e-6)
    ent = -sum(math.exp(a) * a for b in range(2) for a in _log_softmax([v / T for v in t[b]]))
    sce = multi_exit_loss(zs, torch.tensor(y), torch.tensor(t), temperature=T, kd_weight=g, kl_reduction="batchmean",
                          kd_form="soft_ce")
    assert sce.item() == pytest.approx((1 - g) * ce1 + g * T * T * (kl + ent) / 2 + ce2, rel=1e-6)


def _rand(K=4, B=6, C=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = [torch.randn(B, C, generator=g) * 2 for _ in range(K)]
    y = torch.randint(0, C, (B,), generator=g)
    t = torch.randn(B, C, generator=g) * 2
    return z, y, t


def test_msdnet_baseline_is_sum_of_cross_entropies():
    z, y, _ = _rand()
    expected = sum(F.cross_entropy(zk, y) for zk in z)
    torch.testing.assert_close(multi_exit_loss(z, y), expected)
    # a teacher with kd_weight=0 and K=1 are the same thing
    torch.testing.assert_close(multi_exit_loss(z, y, _rand()[2], kd_weight=0.0), expected)
    torch.testing.assert_close(multi_exit_loss(z[:1], y, _rand()[2], kd_weight=0.9), F.cross_entropy(z[0], y))


def test_imta_ofa_matches_reference_formulation():
    """docs/method.md §4 with nn.KLDivLoss() (legacy 'mean' = sum / (B*C)) and nn.CrossEntropyLoss()."""
    z, y, t = _rand(K=5, B=8, C=20)
    T, g = 3.0, 0.9
    ce, kl = nn.CrossEntropyLoss(), nn.KLDivLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ce(z[-1], y) + sum((1 - g) * ce(z[k], y) + g * T * T * kl(F.log_softmax(z[k] / T, 1), F.softmax(t / T, 1))
                                 for k in range(4))
    torch.testing.assert_close(multi_exit_loss(z, y, t, temperature=T, kd_weight=g, kl_reduction="mean"), ref)
    ref_bm = ce(z[-1], y) + sum((1 - g) * ce(z[k], y) + g * T * T * F.kl_div(F.log_softmax(z[k] / T, 1),
                                F.softmax(t / T, 1), reduction="batchmean") for k in range(4))
    torch.testing.assert_close(multi_exit_loss(z, y, t, temperature=T, kd_weight=g, kl_reduction="batchmean"), ref_bm)


def test_phuong_lampert_distillation_loss():
    """docs/method.md §10.1: g [(1-C) CE(z_K) + sum_{k<K} ((1-C) CE(z_k) + C T^2 H(q, p_T(z_k)))], q = p_T(z_K.detach())."""
    z, y, _ = _rand(K=5, B=8, C=20)
    K, T, Cmix = 5, 4.0, 0.5
    gs = 2 * 5 / K
    q = F.softmax(z[-1].detach() / T, 1)
    ref = gs * ((1 - Cmix) * F.cross_entropy(z[-1], y) + sum(
        (1 - Cmix) * F.cross_entropy(z[k], y) + Cmix * T * T * (-(q * F.log_softmax(z[k] / T, 1)).sum(1).mean())
        for k in range(K - 1)))
    got = multi_exit_loss(z, y, z[-1].detach(), temperature=T, kd_weight=Cmix, kd_form="soft_ce",
                          kl_reduction="batchmean", exit_weights=[gs] * (K - 1) + [gs * (1 - Cmix)])
    torch.testing.assert_close(got, ref)


def test_l2w_weighted_loss_and_meta_gradient():
    """docs/method.md §11.3: sum_k mean_i(w_ik CE_ik); the weights stay differentiable (L2W meta step)."""
    z, y, _ = _rand(K=5, B=8, C=20)
    w = (torch.rand(8, 5) + 0.5).requires_grad_(True)
    ref = sum((w[:, k] * F.cross_entropy(z[k], y, reduction="none")).mean() for k in range(5))
    got = multi_exit_loss(z, y, sample_weights=w)
    torch.testing.assert_close(got, ref)
    (gw,) = torch.autograd.grad(got, w)
    expected = torch.stack([F.cross_entropy(z[k], y, reduction="none") for k in range(5)], 1) / 8
    torch.testing.assert_close(gw, expected)


def test_label_smoothing_matches_cross_entropy():
    z, y, _ = _rand()
    ref = sum(F.cross_entropy(zk, y, label_smoothing=0.1) for zk in z)
    torch.testing.assert_close(multi_exit_loss(z, y, label_smoothing=0.1), ref)


def test_exit_weights_kd_exits_and_per_exit_gamma():
    z, y, t = _rand(K=4)
    T, gam, w = 2.0, [0.1, 0.2, 0.3, 0.4], [1.0, 0.5, 2.0, 3.0]

    def kl(zk):
        return F.kl_div(F.log_softmax(zk / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T

    # kd on exits 1 and 3 only (negative index allowed); gamma of exits 0 and 2 is ignored
    ref = sum(w[k] * ((1 - gam[k]) * F.cross_entropy(z[k], y) + gam[k] * kl(z[k])) if k in (1, 3)
              else w[k] * F.cross_entropy(z[k], y) for k in range(4))
    got = multi_exit_loss(z, y, t, temperature=T, kd_weight=gam, exit_weights=w, kd_exits=[1, -1],
                          kl_reduction="batchmean")
    torch.testing.assert_close(got, ref)
    # the same weights as tensors (e.g. scheduled on device)
    got_t = multi_exit_loss(z, y, t, temperature=T, kd_weight=torch.tensor(gam), exit_weights=torch.tensor(w),
                            kd_exits=[1, 3], kl_reduction="batchmean")
    torch.testing.assert_close(got_t, ref)


def test_gradients_match_autograd_of_direct_formula():
    z, y, t = _rand(K=3, B=5, C=7)
    zs = [v.clone().requires_grad_(True) for v in z]
    multi_exit_loss(zs, y, t, temperature=2.0, kd_weight=0.3, label_smoothing=0.1).backward()
    zr = [v.clone().requires_grad_(True) for v in z]
    ref = sum((1 - 0.3) * F.cross_entropy(zr[k], y, label_smoothing=0.1) + 0.3 * 4.0 * F.kl_div(
        F.log_softmax(zr[k] / 2.0, 1), F.softmax(t / 2.0, 1), reduction="sum") / (5 * 7) for k in range(2))
    ref = ref + F.cross_entropy(zr[2], y, label_smoothing=0.1)
    ref.backward()
    for a, b in zip(zs, zr):
        torch.testing.assert_close(a.grad, b.grad)


def test_teacher_is_detached_and_low_precision_inputs():
    z, y, t = _rand(K=2)
    zb = torch.stack(z).to(torch.bfloat16).requires_grad_(True)
    tb = t.to(torch.bfloat16).requires_grad_(True)
    loss = multi_exit_loss(zb, y, tb, kd_weight=0.5)
    assert loss.dtype == torch.float32
    loss.backward()
    assert tb.grad is None and zb.grad.dtype == torch.bfloat16
    ref = multi_exit_loss(zb.detach().float(), y, tb.detach().float(), kd_weight=0.5)
    torch.testing.assert_close(loss, ref)


def test_stacked_list_and_non_contiguous_agree():
    z, y, t = _rand(K=3, B=4, C=9)
    a = multi_exit_loss(z, y, t)
    b = multi_exit_loss(torch.stack(z), y, t)
    c = multi_exit_loss(torch.stack(z, 1).transpose(0, 1), y, t.t().contiguous().t())
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_reduction_none_per_exit():
    z, y, t = _rand(K=4)
    per_exit = multi_exit_loss(z, y, t, reduction="none")
    assert per_exit.shape == (4,)
    torch.testing.assert_close(per_exit.sum(), multi_exit_loss(z, y, t))
    torch.testing.assert_close(per_exit[-1], F.cross_entropy(z[-1], y))


def test_module_functional_and_aliases_agree_on_cpu():
    z, y, t = _rand()
    kw = dict(temperature=3.0, kd_weight=0.9, label_smoothing=0.1, kl_reduction="batchmean")
    ref = multi_exit_loss(z, y, t, **kw)
    for impl in ("torch", "auto"):  # 'auto' on CPU is the PyTorch path
        torch.testing.assert_close(FN.multi_exit_loss(z, y, t, impl=impl, **kw), ref)
        torch.testing.assert_close(MultiExitLoss(impl=impl, **kw)(z, y, t), ref)
    torch.testing.assert_close(MultiExitKDLoss(**kw)(z, y, t), ref)
    torch.testing.assert_close(multi_exit_kd_loss(z, y, t, **kw), ref)
    torch.testing.assert_close(FN.multi_exit_kd_loss(z, y, t, impl="torch", **kw), ref)
    assert "kd_weight=0.9" in repr(MultiExitLoss(**kw))


@pytest.mark.parametrize("bad,err", [
    (dict(temperature=0.0), ValueError),
    (dict(kl_reduction="sum"), ValueError),
    (dict(kd_form="js"), ValueError),
    (dict(reduction="mean"), ValueError),
    (dict(label_smoothing=1.5), ValueError),
    (dict(kd_weight=[0.1, 0.2]), ValueError),
    (dict(exit_weights=[1.0] * 3), ValueError),
    (dict(kd_exits=[7]), ValueError),
    (dict(sample_weights=torch.ones(4, 6)), ValueError),
])
def test_validation(bad, err):
    z, y, t = _rand(K=4, B=6)
    with pytest.raises(err):
        multi_exit_loss(z, y, t, **bad)


def test_shape_and_type_validation():
    z, y, t = _rand(K=2, B=3, C=5)
    with pytest.raises(ValueError):
        multi_exit_loss(z, y[:2], t)
    with pytest.raises(ValueError):
        multi_exit_loss(z, y, t[:, :4])
    with pytest.raises(TypeError):
        multi_exit_loss(z, y.float(), t)
    with pytest.raises(ValueError):
        multi_exit_loss(torch.randn(3, 5), y)
    with pytest.raises(ValueError):
        MultiExitLoss(impl="cuda")


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
def test_torch_loss_compiles_fullgraph():
    """The trainer's torch path under torch.compile(fullgraph=True): no graph break, same value/grad
    (per-exit weights become graph constants instead of cached device tensors)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    z, y, t = _rand(K=3, B=4, C=9)
    kw = dict(temperature=2.0, kd_weight=[0.1, 0.5, 0.9], exit_weights=[1.0, 2.0, 0.5], label_smoothing=0.1)
    zs = torch.stack(z).requires_grad_(True)
    ref = multi_exit_loss(zs, y, t, **kw)
    (g_ref,) = torch.autograd.grad(ref, zs)
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda z_, y_, t_: FN.multi_exit_loss(z_, y_, t_, impl="auto", **kw), backend=cnt,
                       fullgraph=True)
    out = fn(zs, y, t)
    (g,) = torch.autograd.grad(out, zs)
    assert cnt.frame_count == 1
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
    torch._dynamo.reset()
