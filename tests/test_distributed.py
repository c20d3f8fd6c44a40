"""Distributed helpers: single-process fallbacks, and real collectives on 2 gloo CPU processes."""
import os
import subprocess
import sys

import pytest
import torch

from imta_fast import distributed as D
from imta_fast.metrics import MultiExitMeter

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_single_process_fallbacks(monkeypatch):
    for var in _TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed("cpu")
    assert info == D.DistInfo(0, 1, 0, torch.device("cpu"), False) and info.is_primary
    assert D.is_primary() and D.get_world_size() == 1
    x = torch.arange(4)
    s = D.all_reduce_sum(x)
    assert torch.equal(s, x) and s is not x
    assert torch.equal(D.all_reduce_mean(x), x.double())
    assert D.all_gather_cat(x) is x and D.all_gather_object("a") == ["a"]
    D.barrier()
    D.cleanup()


def test_seed_everything_offsets_by_rank():
    assert D.seed_everything(7, rank=0) == 7
    a = torch.rand(3)
    assert D.seed_everything(7, rank=1) == 8
    b = torch.rand(3)
    D.seed_everything(7, rank=0)
    assert torch.equal(torch.rand(3), a) and not torch.equal(a, b)


def _worker() -> None:
    """One rank, launched by torchrun (which sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*): every collective on
    unequal per-rank data. Assertions run on both ranks; a failure exits non-zero and fails the launcher."""
    info = D.init_distributed("cpu")
    rank, world = info.rank, info.world_size
    try:
        assert info == D.DistInfo(rank, 2, int(os.environ["LOCAL_RANK"]), torch.device("cpu"), True)
        assert D.is_primary() == (rank == 0) and D.get_world_size() == world == 2

        assert D.all_reduce_sum(torch.tensor([rank + 1.0])).item() == 3.0
        assert D.all_reduce_mean(torch.tensor([rank + 1])).item() == 1.5

        # Unequal lengths: rank 0 holds 3 rows, rank 1 holds 1 (as an unpadded eval sampler would give).
        n = 3 if rank == 0 else 1
        rows = torch.arange(n * 2, dtype=torch.float32).view(n, 2) + 100 * rank
        got = D.all_gather_cat(rows)
        expected = torch.cat([torch.arange(6.0).view(3, 2), torch.arange(2.0).view(1, 2) + 100])
        assert torch.equal(got, expected), got
        # A rank with nothing to contribute, and a bool tensor (no gloo bool collective).
        assert D.all_gather_cat(torch.zeros(0 if rank == 0 else 2, dtype=torch.int64)).shape == (2,)
        flags = D.all_gather_cat(torch.tensor([rank == 0, True]))
        assert flags.dtype == torch.bool and flags.tolist() == [True, True, False, True]
        assert D.all_gather_object({"rank": rank}) == [{"rank": 0}, {"rank": 1}]

        # MultiExitMeter: per-rank counts summed exactly (rank 0: 2 samples, both right; rank 1: 1, wrong).
        meter = MultiExitMeter(num_exits=1, topk=(1,))
        t = torch.tensor([0, 1]) if rank == 0 else torch.tensor([0])
        logits = torch.eye(2)[t] if rank == 0 else torch.tensor([[0.0, 1.0]])
        meter.update([logits], t, losses=torch.tensor([float(rank)]))
        meter.all_reduce()
        out = meter.compute()
        assert out["count"] == 3 and abs(out["top1"][0] - 200 / 3) < 1e-9 and abs(out["loss"][0] - 1 / 3) < 1e-9
        D.barrier()
        print(f"rank {rank}: ok", flush=True)
    finally:
        D.cleanup()


def test_two_gloo_processes_under_torchrun():
    """The real launch path: torchrun --standalone picks a free rendezvous port itself (no port races)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:  # a hung rendezvous must fail, not stall CI
        pytest.fail(f"2-process gloo run timed out; output:\n{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "rank 0: ok" in proc.stdout and "rank 1: ok" in proc.stdout


if __name__ == "__main__":
    _worker()
