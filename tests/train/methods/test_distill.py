"""--method distill (docs/method.md §10): the loss against a float64 formula (torch and the fused Triton op in
its interpreter), the annealed temperature against a hand computation, no host sync per step, state
round trip, and (slow) 2 gloo processes = one process on the concatenated batch."""
from __future__ import annotations

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

from imta_fast.train.methods.distill import AnnealedTemperature, DistillMethod, distill_loss


# ----------------------------------------------------------------------------- helpers
class TinyMultiExit(nn.Module):
    """K linear exits on a shared 2-layer trunk; no BatchNorm (so DDP == one process on the joint batch)."""

    def __init__(self, d_in=6, hidden=8, num_classes=5, num_exits=3):
        super().__init__()
        self.trunk = nn.ModuleList([nn.Linear(d_in if k == 0 else hidden, hidden) for k in range(num_exits)])
        self.heads = nn.ModuleList([nn.Linear(hidden, num_classes) for _ in range(num_exits)])

    @property
    def num_exits(self):
        return len(self.heads)

    def forward(self, x):
        out, h = [], x
        for block, head in zip(self.trunk, self.heads):
            h = torch.tanh(block(h))
            out.append(head(h))
        return out, None


def confident_model():
    """Seeded TinyMultiExit whose last exit starts confident (maxprob > 0.5), so T anneals from the start."""
    torch.manual_seed(0)
    model = TinyMultiExit()
    with torch.no_grad():
        model.heads[-1].weight.mul_(8)
    return model


def make_ctx(model, lr=0.1, momentum=0.9, weight_decay=1e-4, runner=None):
    """The StepContext fields a method uses (docs: imta_fast/train/step.py), with plain SGD, no scheduler."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def apply_gradients(loss, step_scheduler=True):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return SimpleNamespace(model=runner or model, module=model, optimizer=opt, scheduler=None, scaler=scaler,
                           device=torch.device("cpu"), autocast=nullcontext, channels_last=False, dist=None,
                           loss_impl="torch", apply_gradients=apply_gradients)


def make_cfg(**kw):
    base = dict(distill_c=0.5, distill_temperature=None, distill_anneal_factor=1.05, distill_anneal_threshold=0.5,
                loss_impl="torch")
    base.update(kw)
    return SimpleNamespace(**base)


def ref_loss64(logits, y, T, C=0.5):
    """docs/method.md §10.1 written out in float64, exit by exit."""
    K = len(logits)
    z = [t.double() for t in logits]
    q = F.softmax(z[-1].detach() / T, dim=1)
    loss = (1 - C) * F.cross_entropy(z[-1], y)
    for k in range(K - 1):
        soft_ce = -(q * F.log_softmax(z[k] / T, dim=1)).sum(1).mean()
        loss = loss + (1 - C) * F.cross_entropy(z[k], y) + C * T * T * soft_ce
    return loss * (10.0 / K)


# ----------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("t_kind", ["float", "tensor"])
@pytest.mark.parametrize("T,C", [(1.0, 0.5), (2.7, 0.5), (4.0, 0.3)])
def test_loss_and_grad_match_float64_formula(impl, t_kind, T, C):
    torch.manual_seed(0)
    K, B, NC = 4, 7, 11
    base = [torch.randn(B, NC, dtype=torch.float64) * 3 for _ in range(K)]
    y = torch.randint(0, NC, (B,))
    ref_in = [b.clone().requires_grad_() for b in base]
    ref = ref_loss64(ref_in, y, T, C)
    ref.backward()
    got_in = [b.float().requires_grad_() for b in base]
    temp = T if t_kind == "float" else torch.tensor(T, dtype=torch.float64)
    got = distill_loss(got_in, y, temp, C=C, impl=impl)
    got.backward()
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for k in range(K):
        torch.testing.assert_close(got_in[k].grad.double(), ref_in[k].grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"exit {k}: {m}")
    # The teacher gets only its CE gradient: (1-C) g (softmax - onehot) / B.
    onehot = F.one_hot(y, NC).double()
    torch.testing.assert_close(got_in[-1].grad.double(), (1 - C) * (10.0 / K) * (F.softmax(base[-1], 1) - onehot) / B,
                               rtol=1e-4, atol=1e-6)


def test_single_exit_is_scaled_ce():
    z = torch.randn(5, 3)
    y = torch.randint(0, 3, (5,))
    got = distill_loss([z], y, torch.tensor(2.0, dtype=torch.float64), C=0.5, impl="torch")
    torch.testing.assert_close(got, 10.0 * 0.5 * F.cross_entropy(z, y))


def test_bf16_logits_use_fp32_math():
    torch.manual_seed(1)
    z = [torch.randn(6, 9).bfloat16() for _ in range(3)]
    y = torch.randint(0, 9, (6,))
    got = distill_loss(z, y, torch.tensor(3.0, dtype=torch.float64), impl="torch")
    torch.testing.assert_close(got.double(), ref_loss64([t.double() for t in z], y, 3.0), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the temperature
def test_temperature_trajectory_matches_hand_computation():
    """Teacher logits [a, 0, ..., 0] over NC classes: maxprob(T) = 1 / (1 + (NC-1) exp(-a/T)) (by hand)."""
    a, NC, B = 6.0, 10, 4
    teacher = torch.zeros(B, NC, dtype=torch.float64)
    teacher[:, 0] = a
    sched = AnnealedTemperature(1.0, 1.05, 0.5)
    T, trajectory = 1.0, []
    for _ in range(60):
        m = sched.update(teacher.float())
        m_hand = 1.0 / (1.0 + (NC - 1) * math.exp(-a / T))
        assert abs(float(m) - m_hand) < 1e-6
        T = T * 1.05 if m_hand > 0.5 else T
        trajectory.append(T)
        assert abs(float(sched.value) - T) <= 1e-12 * T
    # It grows until maxprob <= 0.5 (a/T <= ln 9) and then stays: never decreases.
    assert trajectory == sorted(trajectory)
    T_stop = trajectory[-1]
    assert 1.0 / (1.0 + (NC - 1) * math.exp(-a / T_stop)) <= 0.5 < 1.0 / (1.0 + (NC - 1) * math.exp(-a * 1.05 / T_stop))
    assert trajectory.index(T_stop) == math.ceil(math.log(a / math.log(NC - 1)) / math.log(1.05)) - 1
    # A uniform teacher (maxprob 1/NC < 0.5) never moves T; it never goes down either.
    sched.update(torch.zeros(B, NC))
    assert float(sched.value) == pytest.approx(T_stop, rel=1e-15)
    metrics = sched.epoch_metrics()
    assert metrics["temperature"] == pytest.approx(T_stop, rel=1e-15) and 0.1 <= metrics["teacher_maxprob"] <= 1


def test_temperature_validation():
    with pytest.raises(ValueError, match="annealed temperature"):
        AnnealedTemperature(1.0, 0.9, 0.5)
    with pytest.raises(ValueError, match="--distill-c"):
        DistillMethod(make_cfg(distill_c=1.5))
    with pytest.raises(ValueError, match="--distill-temperature"):
        DistillMethod(make_cfg(distill_temperature=0.0))


class CountSyncs(TorchDispatchMode):
    """Counts host reads of device values (``aten._local_scalar_dense`` is what ``.item()``/``bool()`` call)."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def test_train_steps_never_read_a_device_value():
    torch.manual_seed(0)
    model = TinyMultiExit()
    ctx = make_ctx(model)
    method = DistillMethod(make_cfg())
    x, y = torch.randn(16, 6), torch.randint(0, 5, (16,))
    method.train_step(ctx, x, y)  # warm-up (caches)
    with CountSyncs() as mode:
        for _ in range(3):
            res = method.train_step(ctx, x, y)
    assert mode.syncs == 0
    assert isinstance(method.temperature, torch.Tensor) and method.temperature.dtype == torch.float64
    assert res.batch_size == 16 and len(res.logits) == 3 and not res.loss.requires_grad
    # The loss the step optimised is the formula at the T before the step's update.
    with CountSyncs() as mode:
        T_before = method.temperature.clone()
        res = method.train_step(ctx, x, y)
    assert mode.syncs == 0 and float(method.temperature) >= float(T_before)


def test_method_trajectory_and_resume_state():
    """T after each step = the hand rule applied to the teacher logits the step saw; state survives torch.save."""
    torch.manual_seed(0)
    model = TinyMultiExit()
    ctx = make_ctx(model, lr=0.5)
    method = DistillMethod(make_cfg())
    T = 1.0
    x, y = torch.randn(16, 6) * 4, torch.randint(0, 5, (16,))  # one batch, learnt: the teacher gets confident
    for i in range(25):
        with torch.no_grad():
            m = F.softmax(model(x)[0][-1].double() / T, 1).amax(1).mean().item()
        res = method.train_step(ctx, x, y)
        T = T * 1.05 if m > 0.5 else T
        assert float(method.temperature) == pytest.approx(T, rel=1e-6), i
    assert T > 1.0  # the schedule moved
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    fresh = DistillMethod(make_cfg())
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh.temperature, method.temperature)
    with pytest.raises(ValueError, match="no temperature"):
        fresh.load_state_dict({})
    assert method.epoch_metrics()["temperature"] == float(method.temperature)


def test_fixed_temperature():
    torch.manual_seed(0)
    model = TinyMultiExit()
    ctx = make_ctx(model)
    method = DistillMethod(make_cfg(distill_temperature=4.0))
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    with torch.no_grad():
        want = ref_loss64(model(x)[0], y, 4.0)
    res = method.train_step(ctx, x, y)
    torch.testing.assert_close(res.loss.double(), want, rtol=1e-5, atol=1e-6)
    assert method.temperature == 4.0 and method.state_dict() == {}
    assert method.epoch_metrics() == {"temperature": 4.0}


# ----------------------------------------------------------------------------- DDP
def _ddp_worker(out_path):
    """Each rank trains on its half of every batch with DDP; rank 0 saves weights and T."""
    from imta_fast import distributed as D

    info = D.init_distributed("cpu")
    try:
        model = confident_model()
        runner = nn.parallel.DistributedDataParallel(model)
        ctx = make_ctx(model, lr=0.05, runner=runner)
        method = DistillMethod(make_cfg())
        for x, y in _batches():
            half = x.shape[0] // 2
            sl = slice(info.rank * half, (info.rank + 1) * half)
            method.train_step(ctx, x[sl], y[sl])
        if info.rank == 0:
            torch.save({"model": model.state_dict(), "method": method.state_dict()}, out_path)
        D.barrier()
        del ctx, runner  # release DDP (and its hold on the group) before the group is destroyed
    finally:
        D.cleanup()


def _batches():
    g = torch.Generator().manual_seed(1)
    two = [(torch.randn(16, 6, generator=g) * 4, torch.randint(0, 5, (16,), generator=g)) for _ in range(2)]
    return two * 10  # learnable, so the teacher gets confident and T moves


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_joint_batch(tmp_path):
    from tests.helpers import run_two_gloo_workers

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    model = confident_model()
    ctx = make_ctx(model, lr=0.05)
    method = DistillMethod(make_cfg())
    for x, y in _batches():
        method.train_step(ctx, x, y)
    assert float(method.temperature) > 1.0
    got = run_two_gloo_workers(__file__, tmp_path / "ddp.pt", timeout=120)
    assert torch.equal(got["method"]["temperature"], method.state_dict()["temperature"])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["model"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


# ----------------------------------------------------------------------------- train.py end to end
@pytest.mark.slow
def test_train_py_distill_interrupt_and_resume_is_bit_identical(tmp_path, monkeypatch):
    from tests.helpers import assert_same_tree, interrupted_and_resumed

    full, cut = interrupted_and_resumed(tmp_path, monkeypatch, "--method", "distill")
    assert_same_tree(full["model"], cut["model"], "model")
    assert_same_tree(full["method"], cut["method"], "method")
    assert full["method"]["temperature"].dtype == torch.float64
    header, *rows = (tmp_path / "cut" / "summary.csv").read_text().strip().splitlines()
    assert "temperature" in header.split(",") and "teacher_maxprob" in header.split(",") and len(rows) == 3
    col = header.split(",").index("temperature")
    temps = [float(r.split(",")[col]) for r in rows]
    assert temps == sorted(temps) and temps[-1] == float(full["method"]["temperature"])


def test_train_py_distill_flags(tmp_path):
    from imta_fast.train.config import parse_train_args
    from tests.helpers import train_main

    cfg = parse_train_args(["--method", "distill", "--distill-temperature", "4", "--distill-c", "0.3"])
    assert (cfg.method, cfg.distill_temperature, cfg.distill_c) == ("distill", 4.0, 0.3)
    assert train_main(tmp_path / "bad", "--epochs", "1", "--method", "distill", "--distill-c", "2") == 2


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
