"""Checkpoints: atomic writes, weights_only payloads, RNG round trips, --resume auto, clear errors."""
import collections
import os
import pathlib
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from imta_fast.train.checkpoint import (
    CheckpointError, CheckpointManager, build_payload, capture_rng_state, check_resume_compatible, clean_state_dict,
    load_checkpoint, load_model_state, model_state_dict, restore_rng_state, save_checkpoint, unwrap_model,
)


def _net() -> nn.Module:
    # Conv + BN gives parameters *and* buffers (running stats, num_batches_tracked).
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def _trained(epoch=1, step=10):
    """A model/optimizer/scheduler/scaler after one real step, so the optimizer has per-parameter state."""
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    scaler = torch.amp.GradScaler("cpu")
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    sched.step()
    payload = build_payload(model=model, optimizer=opt, scheduler=sched, epoch=epoch, step=step,
                            config={"model": "msdnet_tiny", "lr": 1e-3, "gr_factor": (1, 2, 4), "data_dir": None},
                            split_sha256="ab" * 32, metrics={"top1": [50.0, 60.0]}, scaler=scaler, ema=model)
    return model, opt, sched, payload


class _Compiled(nn.Module):
    """Stands in for torch.compile's OptimizedModule (same ``_orig_mod`` submodule), without importing dynamo."""

    def __init__(self, mod: nn.Module):
        super().__init__()
        self._orig_mod = mod


def test_full_payload_loads_with_weights_only(tmp_path):
    model, opt, sched, payload = _trained()
    path = tmp_path / "ck.pt"
    save_checkpoint(path, payload)
    raw = torch.load(path, weights_only=True)  # the plain contract, independent of load_checkpoint
    assert raw["epoch"] == 1 and raw["step"] == 10 and raw["format_version"] == 1
    assert set(raw) >= {"model", "optimizer", "scheduler", "rng", "config", "split_sha256", "metrics", "scaler", "ema"}
    loaded = load_checkpoint(path)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded["model"][k], v)
    # The optimizer/scheduler states are usable, not just loadable.
    model2 = _net()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=5)
    load_model_state(model2, loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_save_rejects_values_weights_only_would_refuse(tmp_path):
    _, _, _, payload = _trained()
    payload["config"]["output"] = pathlib.Path("runs/x")
    with pytest.raises(TypeError, match=r"\['config'\]\['output'\] is a pathlib\.\w*Path"):
        save_checkpoint(tmp_path / "ck.pt", payload)
    payload["config"]["output"] = "runs/x"
    payload["metrics"]["acc"] = np.float64(0.5)
    with pytest.raises(TypeError, match="metrics"):
        save_checkpoint(tmp_path / "ck.pt", payload)
    payload["metrics"]["acc"] = 0.5
    payload["metrics"]["per_class"] = collections.defaultdict(int)
    with pytest.raises(TypeError, match=r"\['per_class'\] is a collections.defaultdict"):
        save_checkpoint(tmp_path / "ck.pt", payload)
    del payload["metrics"]["per_class"]
    del payload["rng"]
    with pytest.raises(TypeError, match="rng"):
        save_checkpoint(tmp_path / "ck.pt", payload)
    assert not os.listdir(tmp_path)  # nothing written on rejection


def test_crash_during_save_keeps_old_last(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    mgr.save(_trained(epoch=1)[3], is_best=True)

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        mgr.save(_trained(epoch=2)[3])
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]  # the temp file was cleaned up


def test_rng_restore_reproduces_python_numpy_torch(tmp_path):
    random.gauss(0, 1)  # leaves a cached gaussian in both legacy generators: part of the state too
    np.random.standard_normal()
    state = capture_rng_state()
    first = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
             torch.rand(3).tolist())
    # Round trip through a weights_only load, as a resume would.
    _, _, _, payload = _trained()
    payload["rng"] = state
    save_checkpoint(tmp_path / "ck.pt", payload)
    assert restore_rng_state(load_checkpoint(tmp_path / "ck.pt")["rng"])
    again = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
             torch.rand(3).tolist())
    assert first == again


def test_restore_rng_per_rank_list():
    torch.manual_seed(1)
    s0 = capture_rng_state()
    torch.manual_seed(2)
    s1 = capture_rng_state()
    expected = torch.rand(2)
    assert restore_rng_state([s0, s1], rank=1)
    assert torch.equal(torch.rand(2), expected)
    assert not restore_rng_state([s0, s1], rank=2)  # more ranks than saved states: caller re-seeds


def test_resume_auto_picks_last_and_falls_back(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.resolve_resume("auto") is None  # empty run dir -> fresh start
    assert mgr.resolve_resume(None) is None and mgr.resolve_resume("") is None
    for epoch in (1, 2, 3):
        mgr.save(_trained(epoch=epoch, step=10 * epoch)[3], is_best=(epoch == 1))
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "checkpoint-epoch0002-step000000020.pt",
                                            "checkpoint-epoch0003-step000000030.pt", "last.pt"]
    assert mgr.resolve_resume("auto") == str(tmp_path / "last.pt")
    assert load_checkpoint(mgr.best_path)["epoch"] == 1  # best is a snapshot, later saves don't touch it

    (tmp_path / "last.pt").write_bytes(b"garbage, e.g. a disk-full partial copy")
    assert mgr.resolve_resume("auto") == str(tmp_path / "checkpoint-epoch0003-step000000030.pt")
    assert CheckpointManager(tmp_path / "other").resolve_resume(str(tmp_path)) == mgr.resolve_resume("auto")

    for name in ("checkpoint-epoch0002-step000000020.pt", "checkpoint-epoch0003-step000000030.pt"):
        os.remove(tmp_path / name)
    assert mgr.resolve_resume("auto") == str(tmp_path / "best.pt")

    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        mgr.resolve_resume("auto")  # never silently restart over a damaged run
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        mgr.resolve_resume(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "missing", "foreign", "unsafe"])
def test_bad_files_raise_one_line_checkpoint_error(tmp_path, kind):
    path = tmp_path / "last.pt"
    if kind == "truncated":
        save_checkpoint(path, _trained()[3])
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(os.urandom(256))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        torch.save(_net().state_dict(), path)  # a bare state dict, e.g. from another project
    elif kind == "unsafe":
        torch.save({"model": _Compiled(_net())}, path)  # a pickled module: refused by weights_only
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg and len(msg) < 400
    if kind == "foreign":
        assert "not an imta_fast checkpoint" in msg and "optimizer" in msg


def test_check_resume_compatible_names_every_differing_key():
    saved = {"model": "msdnet_tiny", "num_classes": 10, "gr_factor": [1, 2, 4], "lr": 0.1}
    current = {"model": "msdnet_mnist", "num_classes": 100, "gr_factor": (1, 2, 4), "lr": 0.1}
    check_resume_compatible(saved, saved, ["model", "num_classes"])
    with pytest.raises(CheckpointError) as info:
        check_resume_compatible(saved, current, ["model", "num_classes", "gr_factor", "lr", "seed"])
    msg = str(info.value)
    assert msg.startswith("cannot resume: checkpoint was trained with model='msdnet_tiny', this run has "
                          "model='msdnet_mnist'")
    assert "num_classes=10, this run has num_classes=100" in msg
    assert "gr_factor" not in msg and "lr" not in msg  # tuple vs list (YAML round trip) is not a change
    assert "seed" not in msg  # absent on both sides


def test_unwrap_and_state_dict_prefixes():
    net = _net()
    wrapped = _Compiled(net)
    assert unwrap_model(wrapped) is net
    assert list(model_state_dict(wrapped)) == list(net.state_dict())
    # DDP prefix and per-block compile prefixes both disappear.
    ddp_keys = {"module.0._orig_mod.weight": 1, "module.module.x": 2, "a.module.b": 3}
    assert clean_state_dict(ddp_keys) == {"0.weight": 1, "x": 2, "a.module.b": 3}
    # A clean state dict loads into a model whose block 0 is compiled per block, and back.
    target = _net()
    target[0] = _Compiled(target[0])
    assert "0._orig_mod.weight" in target.state_dict()
    load_model_state(target, {f"module.{k}": v for k, v in net.state_dict().items()})
    torch.testing.assert_close(target[0]._orig_mod.weight, net[0].weight)
