"""Engine pieces: LR schedules (docs/method.md §5), optimiser parameter sets, SyncBN step, model construction."""
import math

import pytest
import torch
import torch.nn as nn

from imta_fast.distributed import DistInfo
from imta_fast.inference.protocol import anytime_accuracy
from imta_fast.models.build import build_model
from imta_fast.train.optim import build_lr_schedule, build_optimizer
from imta_fast.train.parallel import apply_sync_bn


def lrs(kind, epochs=4, steps=3, milestones=(2, 3)):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_lr_schedule(opt, kind, epochs, steps, milestones, 0.1)
    out = []
    for _ in range(epochs * steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_schedule_constant_within_epoch_and_decays_at_milestones():
    got = lrs("step")
    expected = [0.1] * 6 + [0.01] * 3 + [0.001] * 3
    assert got == pytest.approx(expected)


def test_cosine_schedule_per_iteration():
    got = lrs("cosine")
    total = 12
    assert got == pytest.approx([0.05 * (1 + math.cos(math.pi * t / total)) for t in range(total)])


def test_imta_optimises_only_new_heads_and_ge_backbone_is_built():
    cfg = {"method": "imta", "model": "msdnet_tiny", "isc_detach": False, "backbone_bn": "train", "loss_impl": "torch"}
    model = build_model(cfg, num_classes=10, in_channels=3)
    assert model.backbone.gradient_equilibrium and model.backbone.ge_impl == "torch"
    opt = build_optimizer(model, 0.1, 0.9, 1e-4, False, torch.device("cpu"))
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    new = {id(p) for p in list(model.classifiers.parameters()) + list(model.isc.parameters())}
    assert ids == new


def test_sync_bn_only_converts_cuda_ddp_runs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    single = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_distributed=False)
    cpu_ddp = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), is_distributed=True)
    assert apply_sync_bn(model, True, single) is model
    assert isinstance(apply_sync_bn(model, True, cpu_ddp)[1], nn.BatchNorm2d)  # gloo/CPU: left as is, warned
    cuda_ddp = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cuda", 0), is_distributed=True)
    assert isinstance(apply_sync_bn(model, True, cuda_ddp)[1], nn.SyncBatchNorm)  # conversion needs no GPU


def test_holdout_selection_metric_is_per_exit_top1():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])  # [K=2, N=2, C=2]
    assert anytime_accuracy(logits, torch.tensor([0, 1]), topk=(1,))[1] == [100.0, 50.0]
