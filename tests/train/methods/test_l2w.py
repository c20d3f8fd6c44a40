"""--method l2w (docs/method.md §11): target distribution, exit allocation and meta loss by hand, the virtual
step against torch's SGD, the meta gradient against finite differences (float64), whole batches against an
independent re-implementation of the reference loop, resume bit-exactness, the dump, and (slow) 2 gloo
processes against the per-rank contract."""
from __future__ import annotations

import copy
import io
import math
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from imta_fast.train.methods.l2w import (L2WMethod, WeightPredictionNet, allocate_exits, allocated_meta_loss,
                                         constrain_weights, exit_counts, target_exit_distribution, virtual_sgd_step)

K, D_IN, HID, NC = 3, 6, 8, 5


# ----------------------------------------------------------------------------- helpers
class TinyMultiExit(nn.Module):
    """K linear exits on a tanh trunk (optionally with BatchNorm, to check the buffers are left alone)."""

    def __init__(self, bn=False):
        super().__init__()
        self.trunk = nn.ModuleList([nn.Linear(D_IN if k == 0 else HID, HID) for k in range(K)])
        self.heads = nn.ModuleList([nn.Linear(HID, NC) for _ in range(K)])
        self.bn = nn.BatchNorm1d(HID) if bn else None

    @property
    def num_exits(self):
        return K

    def forward(self, x):
        out, h = [], x
        for k, (block, head) in enumerate(zip(self.trunk, self.heads)):
            h = torch.tanh(block(h))
            if k == 0 and self.bn is not None:
                h = self.bn(h)
            out.append(head(h))
        return out, None


def ref_forward(P, x):
    """TinyMultiExit (no BN) written as a function of a parameter dict: independent of torch.func."""
    out, h = [], x
    for k in range(K):
        h = torch.tanh(h @ P[f"trunk.{k}.weight"].T + P[f"trunk.{k}.bias"])
        out.append(h @ P[f"heads.{k}.weight"].T + P[f"heads.{k}.bias"])
    return out


def make_ctx(model, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False, runner=None, schedule=False):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 ** it) if schedule else None
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    calls = {"apply": 0, "sched": 0}

    def apply_gradients(loss, step_scheduler=True):
        calls["apply"] += 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step_scheduler and sched is not None:
            calls["sched"] += 1
            sched.step()

    return SimpleNamespace(model=runner or model, module=model, optimizer=opt, scheduler=sched, scaler=scaler,
                           device=torch.device("cpu"), autocast=nullcontext, channels_last=False, dist=None,
                           loss_impl="torch", apply_gradients=apply_gradients, calls=calls)


def make_cfg(tmp=None, **kw):
    base = dict(l2w_epsilon=0.8, l2w_constraint="sample", l2w_meta_grad="jvp", meta_interval=1, meta_lr=1e-2, meta_weight_decay=1e-4,
                meta_net_hidden=16, l2w_target_index=15, dump_weights=False, output=str(tmp or "."), seed=0,
                loss_impl="torch")
    base.update(kw)
    return SimpleNamespace(**base)


def make_model(dtype=torch.float64, bn=False, seed=0):
    torch.manual_seed(seed)
    return TinyMultiExit(bn=bn).to(dtype)


def batches(n=3, B=12, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, D_IN, generator=g).to(dtype), torch.randint(0, NC, (B,), generator=g)) for _ in range(n)]


# ----------------------------------------------------------------------------- the pieces
def test_target_exit_distribution_matches_the_reference_rows():
    torch.testing.assert_close(target_exit_distribution(5, 15), torch.tensor([0.3278, 0.2458, 0.1844, 0.1383, 0.1037]),
                               atol=6e-5, rtol=0)
    torch.testing.assert_close(target_exit_distribution(7, 15),
                               torch.tensor([.2885, .2164, .1623, .1217, .0913, .0685, .0513]), atol=6e-5, rtol=0)
    p = target_exit_distribution(4, 20)  # q = 1: uniform
    torch.testing.assert_close(p, torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="1..39"):
        target_exit_distribution(5, 40)


def test_exit_allocation_hand_example():
    probs = target_exit_distribution(3, 15)  # q = .75: [.4324, .3243, .2432]
    counts = exit_counts(10, probs)
    assert counts == [4, 3, 3]
    conf = torch.tensor([[0.90, 0.99, 0], [0.10, 0.95, 0], [0.80, 0.98, 0], [0.20, 0.10, 0], [0.70, 0.20, 0],
                         [0.30, 0.30, 0], [0.60, 0.97, 0], [0.40, 0.40, 0], [0.50, 0.50, 0], [0.05, 0.60, 0]])
    a = allocate_exits(conf, counts)
    # exit 1: its top 4 (0, 2, 4, 6); exit 2: top 3 of the rest by its own confidence (1, 9, 8); exit 3: the rest.
    want = {0: [0, 2, 4, 6], 1: [1, 8, 9], 2: [3, 5, 7]}
    for k, rows in want.items():
        assert a[:, k].nonzero().flatten().tolist() == rows, k
    assert a.sum(1).tolist() == [1] * 10
    # An exit may get nobody (n small): counts floor to 0 and the last exit takes all.
    assert exit_counts(2, probs) == [0, 0, 2]
    assert allocate_exits(conf[:2], [0, 0, 2])[:, 2].all()


def test_allocated_meta_loss_hand_example():
    torch.manual_seed(0)
    n = 10
    logits = [torch.randn(n, NC, dtype=torch.float64) for _ in range(K)]
    y = torch.randint(0, NC, (n,))
    counts = [4, 3, 3]
    got = allocated_meta_loss(logits, y, counts)
    # the reference's own procedure: sort, list filtering, F.cross_entropy on index lists
    used, want = [], 0.0
    for j in range(K):
        order = F.softmax(logits[j], 1).amax(1).sort(descending=True).indices.tolist()
        free = [i for i in order if i not in used]
        sel = free[: counts[j]] if j < K - 1 else free
        used += sel
        if sel:
            want = want + F.cross_entropy(logits[j][sel], y[sel])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_constraints():
    u = torch.randn(6, K)
    w = constrain_weights(u, 0.8, "sample")
    torch.testing.assert_close(w.mean(1), torch.ones(6))
    torch.testing.assert_close(w - 1, 0.8 * (u - u.mean(1, keepdim=True)))
    torch.testing.assert_close(constrain_weights(u, 0.3, "matrix").mean(), torch.tensor(1.0))
    torch.testing.assert_close(constrain_weights(u, 0.3, "exit").mean(0), torch.ones(K))
    with pytest.raises(ValueError, match="constraint"):
        constrain_weights(u, 0.3, "col")
    wpn = WeightPredictionNet(K, 500)
    assert [tuple(p.shape) for p in wpn.parameters()] == [(500, K), (500,), (K, 500), (K,)]
    assert wpn(torch.rand(4, K) * 5).abs().max() <= 1  # tanh range


@pytest.mark.parametrize("nesterov,dampening", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_virtual_step_equals_torch_sgd_step(nesterov, dampening):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3, nesterov=nesterov,
                          dampening=dampening)
    x, y = batches(1)[0]
    for first in (True, False):  # without, then with momentum buffers
        loss = sum(F.cross_entropy(z, y) for z in model(x)[0])
        opt.zero_grad()
        loss.backward()
        params = dict(model.named_parameters())
        theta = {n: p.detach() for n, p in params.items()}
        new = virtual_sgd_step(theta, [p.grad for p in params.values()], opt, params)
        opt.step()
        for n, p in params.items():
            torch.testing.assert_close(new[n], p.detach(), rtol=1e-13, atol=1e-13, msg=lambda m: f"{n}: {m}")


# ----------------------------------------------------------------------------- the meta gradient
@pytest.mark.parametrize("mode", ["jvp", "double-backward"])
def test_meta_gradient_matches_finite_differences(mode):
    model = make_model(bn=True)
    ctx = make_ctx(model, lr=0.5)
    (x, y), (xm, ym) = batches(2, B=10)
    loss = sum(F.cross_entropy(z, y) for z in model(x)[0])  # one real step: momentum buffers exist
    ctx.apply_gradients(loss)
    method = L2WMethod(make_cfg(l2w_meta_grad=mode), model)
    method.wpn.double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = [p.grad.clone() for p in model.parameters()]
    bufs_before = [ctx.optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    grads, _ = method.meta_gradients(ctx, x, y, xm, ym)
    # the live model (weights, BN running stats) and its optimizer are untouched by the virtual step
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads_before))
    assert all(torch.equal(ctx.optimizer.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), bufs_before))
    h = 1e-6
    checked = 0
    for p, g in zip(method.wpn.parameters(), grads):
        flat = p.data.view(-1)
        for i in torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:3].tolist():
            old = flat[i].item()
            flat[i] = old + h
            up = method.meta_gradients(ctx, x, y, xm, ym)[1].item()
            flat[i] = old - h
            down = method.meta_gradients(ctx, x, y, xm, ym)[1].item()
            flat[i] = old
            fd = (up - down) / (2 * h)
            assert abs(fd - g.view(-1)[i].item()) <= 1e-6 * max(1.0, abs(fd)), (p.shape, i, fd, g.view(-1)[i].item())
            checked += 1
    assert checked == 12
    assert max(g.abs().max().item() for g in grads) > 1e-6  # the meta gradient is not trivially zero


@pytest.mark.parametrize("nesterov,dampening", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_jvp_meta_gradient_equals_double_backward(nesterov, dampening):
    """Forward-over-reverse (default) and reverse-over-reverse (the reference's way) give the same gradient,
    before the optimizer has momentum buffers and after (BN in the model, float64)."""
    model = make_model(bn=True)
    ctx = make_ctx(model, lr=0.5, nesterov=nesterov)
    ctx.optimizer.param_groups[0]["dampening"] = dampening
    (x, y), (xm, ym) = batches(2, B=10)
    for _ in range(2):
        got = {}
        for mode in ("jvp", "double-backward"):
            method = L2WMethod(make_cfg(l2w_meta_grad=mode), model)
            method.wpn.double()
            got[mode] = method.meta_gradients(ctx, x, y, xm, ym)
        for a, b in zip(got["jvp"][0], got["double-backward"][0]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
        assert torch.equal(got["jvp"][1], got["double-backward"][1])
        ctx.apply_gradients(sum(F.cross_entropy(z, y) for z in model(x)[0]))
    with pytest.raises(ValueError, match="--l2w-meta-grad"):
        L2WMethod(make_cfg(l2w_meta_grad="adjoint"), model)


# ----------------------------------------------------------------------------- whole batches
def ref_loaded_batch(model, opt, wpn, wpn_opt, x, y, eps, probs):
    """One loaded batch of the released main_cifar_DDP.py loop (constraint 'col'), re-implemented by hand."""
    halves = list(zip(x.chunk(2), y.chunk(2)))
    for (xt, yt), (xm, ym) in ((halves[0], halves[1]), (halves[1], halves[0])):
        P = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}  # the pseudo net
        L = torch.stack([F.cross_entropy(z, yt, reduction="none") for z in ref_forward(P, xt)], 1)
        u = wpn(L.detach())
        w = 1 + eps * (u - u.mean(1, keepdim=True))
        g = torch.autograd.grad((w * L).mean(0).sum(), list(P.values()), create_graph=True)
        group = opt.param_groups[0]
        newP = {}
        for (n, p), gi, real in zip(P.items(), g, model.parameters()):
            gw = gi + group["weight_decay"] * p.detach()
            buf = opt.state[real].get("momentum_buffer")
            gb = gw if buf is None else buf * group["momentum"] + gw
            newP[n] = p.detach() - group["lr"] * gb
        mo = ref_forward(newP, xm)
        used, meta = [], 0.0
        n = xm.shape[0]
        for j in range(K):
            order = F.softmax(mo[j], 1).amax(1).sort(descending=True).indices.tolist()
            free = [i for i in order if i not in used]
            sel = free[: math.floor(n * probs[j])] if j < K - 1 else free
            used += sel
            if sel:
                meta = meta + F.cross_entropy(mo[j][sel], ym[sel])
        wpn_opt.zero_grad()
        meta.backward()
        wpn_opt.step()
        out = model(xt)[0]
        L = torch.stack([F.cross_entropy(z, yt, reduction="none") for z in out], 1)
        with torch.no_grad():
            u = wpn(L)
            w = 1 + eps * (u - u.mean(1, keepdim=True))
        opt.zero_grad()
        (w * L).mean(0).sum().backward()
        opt.step()


def test_train_steps_match_an_independent_reference_loop():
    model = make_model()
    ctx = make_ctx(model, lr=0.2, schedule=True)
    method = L2WMethod(make_cfg(), model)
    method.wpn.double()
    ref_model, ref_wpn = copy.deepcopy(model), copy.deepcopy(method.wpn)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-4)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda it: 0.5 ** it)
    ref_wpn_opt = torch.optim.Adam(ref_wpn.parameters(), lr=1e-2, weight_decay=1e-4)
    probs = target_exit_distribution(K, 15)
    for i, (x, y) in enumerate(batches(3)):
        res = method.train_step(ctx, x, y)
        for g in ref_wpn_opt.param_groups:  # the WPN lr follows the backbone schedule factor
            g["lr"] = 1e-2 * 0.5 ** i
        ref_loaded_batch(ref_model, ref_opt, ref_wpn, ref_wpn_opt, x, y, 0.8, probs)
        ref_sched.step()
        assert res.batch_size == 12 and len(res.logits) == K and res.logits[0].shape == (12, NC)
    assert ctx.calls == {"apply": 6, "sched": 3}  # two real steps, one schedule step per loaded batch
    for (n, a), b in zip(model.named_parameters(), ref_model.parameters()):
        # the real step's loss goes through the fused-loss dispatch, which computes in fp32
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{n}: {m}")
    for a, b in zip(method.wpn.parameters(), ref_wpn.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    assert not torch.equal(method.wpn.out.weight, WeightPredictionNet(K, 16).double().out.weight)


def test_meta_interval_and_loss_value():
    model = make_model()
    ctx = make_ctx(model)
    method = L2WMethod(make_cfg(meta_interval=2), model)
    calls, losses = [], []
    real_meta, real_step = method.meta_update, method.real_step
    method.meta_update = lambda *a: calls.append(1) or real_meta(*a)

    def recording_step(*a, **kw):
        out = real_step(*a, **kw)
        losses.append(out[0])
        return out

    method.real_step = recording_step
    for x, y in batches(3):
        res = method.train_step(ctx, x, y)
    assert len(calls) == 4  # batches 0 and 2, both halves
    assert len(losses) == 6 and torch.equal(res.loss, losses[-2] * 0.5 + losses[-1] * 0.5)
    x, y = batches(1, B=7)[0]  # odd batch: halves of 4 and 3, weighted by size
    res = method.train_step(ctx, x, y)
    torch.testing.assert_close(res.loss, losses[-2] * 4 / 7 + losses[-1] * 3 / 7)
    with pytest.raises(ValueError, match=">= 2 samples"):
        method.train_step(ctx, x[:1], y[:1])
    with pytest.raises(ValueError, match="--meta-interval"):
        L2WMethod(make_cfg(meta_interval=0), model)
    with pytest.raises(ValueError, match="needs the model"):
        L2WMethod(make_cfg())


def test_no_host_reads_in_a_step_after_warm_up():
    """No device value is read on the host during a step.  Adam's step counters are host tensors on every
    device (capturable=False), so their ``.item()`` is not a device sync and is not counted."""
    model = make_model(torch.float32)
    ctx = make_ctx(model)
    method = L2WMethod(make_cfg(), model)
    (x, y), (x2, y2) = batches(2, dtype=torch.float32)
    method.train_step(ctx, x, y)
    host_steps = {s["step"].data_ptr() for s in method.meta_optimizer.state.values()}
    assert len(host_steps) == 4

    class CountSyncs(TorchDispatchMode):
        syncs, adam = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                if args[0].data_ptr() in host_steps:
                    type(self).adam += 1
                else:
                    type(self).syncs += 1
            return func(*args, **(kwargs or {}))

    with CountSyncs():
        method.train_step(ctx, x2, y2)
    assert CountSyncs.syncs == 0 and CountSyncs.adam == 8  # 2 meta steps x 4 WPN tensors


def test_resume_is_bit_exact(tmp_path):
    data = batches(5, dtype=torch.float32)

    def fresh():
        model = make_model(torch.float32)
        ctx = make_ctx(model, lr=0.2)
        return model, ctx, L2WMethod(make_cfg(), model)

    model, ctx, method = fresh()
    for x, y in data[:3]:
        method.train_step(ctx, x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": ctx.optimizer.state_dict(), "method": method.state_dict()}, buf)
    for x, y in data[3:]:
        method.train_step(ctx, x, y)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, ctx2, method2 = fresh()
    model2.load_state_dict(saved["model"])
    ctx2.optimizer.load_state_dict(saved["opt"])
    method2.load_state_dict(saved["method"])
    assert method2.batches == 3
    for x, y in data[3:]:
        method2.train_step(ctx2, x, y)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(method.wpn.parameters(), method2.wpn.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lacks"):
        method2.load_state_dict({"wpn": {}})


def test_epoch_metrics_and_dump(tmp_path):
    model = make_model(torch.float32)
    ctx = make_ctx(model)
    method = L2WMethod(make_cfg(tmp_path, dump_weights=True), model)
    for x, y in batches(2, dtype=torch.float32):
        method.train_step(ctx, x, y)
    m = method.epoch_metrics()
    assert sorted(m) == [f"l2w_weight_exit{k}" for k in range(1, K + 1)]
    assert abs(sum(m.values()) / K - 1) < 1e-6  # 'sample' constraint: every sample's weights average 1
    dump = torch.load(tmp_path / "l2w" / "epoch0000.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in dump.items()} == {k: (24, K) for k in ("losses", "confidences", "weights")}
    assert (dump["confidences"] <= 1).all() and (dump["losses"] >= 0).all()
    assert method.epoch == 1 and method.state_dict()["epoch"] == 1


def test_bf16_autocast_step_is_finite():
    model = make_model(torch.float32)
    ctx = make_ctx(model)
    ctx.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    method = L2WMethod(make_cfg(), model)
    for x, y in batches(2, dtype=torch.float32):
        res = method.train_step(ctx, x, y)
    assert torch.isfinite(res.loss) and all(torch.isfinite(p).all() for p in method.wpn.parameters())


# ----------------------------------------------------------------------------- DDP
def _ddp_worker(out_path):
    """Rank r trains on its quarter of each half... i.e. on rows r::2 of every batch, with DDP."""
    from imta_fast import distributed as D

    info = D.init_distributed("cpu")
    try:
        model = make_model(torch.float32)
        runner = nn.parallel.DistributedDataParallel(model)
        ctx = make_ctx(model, lr=0.2, runner=runner)
        method = L2WMethod(make_cfg(), model)
        for x, y in batches(3, B=16, dtype=torch.float32):
            method.train_step(ctx, *_shard(x, y, info.rank))
        if info.rank == 0:
            torch.save({"model": model.state_dict(), "wpn": method.wpn.state_dict()}, out_path)
        D.barrier()
        del ctx, runner  # release DDP (and its hold on the group) before the group is destroyed
    finally:
        D.cleanup()


def _shard(x, y, rank):
    """Rank r's batch: its quarter of each half, so the halves of the joint batch are the ranks' halves."""
    xh, yh = x.chunk(2), y.chunk(2)
    q = xh[0].shape[0] // 2
    sl = slice(rank * q, (rank + 1) * q)
    return torch.cat([xh[0][sl], xh[1][sl]]), torch.cat([yh[0][sl], yh[1][sl]])


@pytest.mark.slow
def test_two_gloo_processes_follow_the_per_rank_contract(tmp_path):
    """DDP contract (docs/method.md §11.5): per-rank virtual step and meta loss, WPN gradients averaged over
    ranks; the real step is DDP's averaged gradient = one process on the joint half-batch (no BN here)."""
    from tests.helpers import run_two_gloo_workers

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    model = make_model(torch.float32)
    ctx = make_ctx(model, lr=0.2)
    method = L2WMethod(make_cfg(), model)
    for x, y in batches(3, B=16, dtype=torch.float32):
        shards = [_shard(x, y, r) for r in range(2)]
        halves = [[s[0].chunk(2), s[1].chunk(2)] for s in shards]  # per rank: (x halves, y halves)
        for i, j in ((0, 1), (1, 0)):
            per_rank = [method.meta_gradients(ctx, hx[i], hy[i], hx[j], hy[j])[0] for hx, hy in halves]
            for p, g0, g1 in zip(method.wpn.parameters(), *per_rank):
                p.grad = (g0 + g1) / 2
            method.meta_optimizer.step()
            method.meta_optimizer.zero_grad(set_to_none=True)
            xj = torch.cat([halves[0][0][i], halves[1][0][i]])
            yj = torch.cat([halves[0][1][i], halves[1][1][i]])
            method.real_step(ctx, xj, yj, step_scheduler=i == 1)
    got = run_two_gloo_workers(__file__, tmp_path / "ddp.pt", timeout=180)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["model"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    for k, v in method.wpn.state_dict().items():
        torch.testing.assert_close(got["wpn"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"wpn {k}: {m}")


# ----------------------------------------------------------------------------- train.py end to end
@pytest.mark.slow
def test_train_py_l2w_interrupt_and_resume_is_bit_identical(tmp_path, monkeypatch):
    from tests.helpers import assert_same_tree, interrupted_and_resumed

    full, cut = interrupted_and_resumed(tmp_path, monkeypatch, "--method", "l2w", "--meta-net-hidden", "32",
                                         "--dump-weights")
    assert_same_tree(full["model"], cut["model"], "model")
    assert_same_tree(full["method"], cut["method"], "method")
    assert full["method"]["batches"] == 9 and full["method"]["epoch"] == 3
    header = (tmp_path / "cut" / "summary.csv").read_text().splitlines()[0].split(",")
    assert "l2w_weight_exit1" in header
    dump = torch.load(tmp_path / "full" / "l2w" / "epoch0002.pt", weights_only=True)
    assert dump["weights"].shape[0] == 3 * 16 and dump["weights"].shape[1] == dump["losses"].shape[1]


def test_train_py_l2w_flags(tmp_path):
    from imta_fast.train.config import parse_train_args
    from tests.helpers import train_main

    cfg = parse_train_args(["--method", "l2w", "--l2w-constraint", "matrix", "--l2w-epsilon", "0.3",
                            "--meta-interval", "100"])
    assert (cfg.l2w_constraint, cfg.l2w_epsilon, cfg.meta_interval, cfg.meta_net_hidden) == ("matrix", 0.3, 100, 500)
    assert train_main(tmp_path / "bad", "--epochs", "1", "--method", "l2w", "--meta-interval", "0") == 2


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
