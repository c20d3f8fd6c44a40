"""Plumbing shared by several test files: train.py end to end (tests/test_train.py, tests/train/methods/),
a data folder with unreadable images (tests/data/), the compiled training step of a model (tests/models/).

Import it as ``from tests.helpers import ...`` (pytest runs from the repository root). The method test
files are also run as scripts by torchrun (outside the repository's import path), so they import it
inside their test functions.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.nn.functional as F

__all__ = ["FAST", "train_main", "interrupted_and_resumed", "assert_same_tree", "run_two_gloo_workers",
           "broken_image_folder", "assert_compiled_step_matches_eager"]

# Small but real: digits (1,497 training images), 3 steps of 16 images per epoch.
FAST = ["--dataset", "digits", "--holdout-size", "64", "--batch-size", "16", "--max-steps-per-epoch", "3",
        "--no-progress", "--log-interval", "1", "--lr", "0.05"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def train_main(out, *extra):
    """``train.main`` with the FAST flags, writing to ``out``; returns its exit code."""
    import train

    return train.main(FAST + ["--output", str(out), *extra])


def interrupted_and_resumed(tmp_path, monkeypatch, *flags, cut_epoch=None):
    """Run 3 epochs straight, and 3 epochs killed in epoch 2 then resumed; return both last.pt payloads.

    With ``cut_epoch`` set, also check the epoch recorded in the interrupted run's last.pt.
    """
    from imta_fast.train import trainer
    from imta_fast.train.checkpoint import load_checkpoint

    assert train_main(tmp_path / "full", "--epochs", "3", *flags) == 0
    real_epoch = trainer.train_one_epoch

    def dies_in_epoch_2(*args, **kwargs):
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", dies_in_epoch_2)
    assert train_main(tmp_path / "cut", "--epochs", "3", *flags) == 130
    if cut_epoch is not None:
        assert load_checkpoint(str(tmp_path / "cut" / "last.pt"))["epoch"] == cut_epoch
    monkeypatch.setattr(trainer, "train_one_epoch", real_epoch)
    assert train_main(tmp_path / "cut", "--epochs", "3", "--resume", "auto", *flags) == 0
    return [load_checkpoint(str(tmp_path / d / "last.pt")) for d in ("full", "cut")]


def assert_same_tree(a, b, where="state"):
    """Nested dicts / lists / tuples of tensors and plain values are equal to the bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same_tree(u, v, f"{where}[{i}]")
    else:
        assert a == b, where


def run_two_gloo_workers(script, out, timeout):
    """``torchrun --standalone --nproc_per_node=2 script out`` (one intra-op thread, without this process's
    torchrun variables); checks it succeeded and returns what it saved at ``out``."""
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def broken_image_folder(tmp_path, n_train):
    """ImageNet-layout data: val/ with 3 JPEGs per class, of which dog/1.jpg truncated, plus a text file named
    cat/x.JPEG; returns its ``build_data`` bundle (16 px images, holdout 1)."""
    from imta_fast.data import build_data
    from imta_fast.data.fake import write_fake_image_folder

    root = write_fake_image_folder(tmp_path, n_train=n_train, n_val=3, size=(40, 48))
    bad = root / "val" / "dog" / "1.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    (root / "val" / "cat" / "x.JPEG").write_text("this is not an image\n")
    return build_data("imagenet", root, None, holdout_size=1, image_size=16)


def assert_compiled_step_matches_eager(net, x, y):
    """A CE-on-every-exit training step under ``torch.compile(fullgraph=True, backend="aot_eager")`` gives the
    eager loss and gradients."""
    def step(inp, tgt):
        logits, _ = net(inp)
        return sum(F.cross_entropy(z, tgt) for z in logits)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, y)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    loss_e = step(x, y)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for gc, p in zip(grads_c, net.parameters()):
        torch.testing.assert_close(gc, p.grad, rtol=1e-4, atol=1e-6)
