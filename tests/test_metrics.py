"""Meters, top-k, summary.csv, environment info and logging. (Cross-rank reduction: test_distributed.py.)"""
import csv
import logging
import re

import pytest
import torch

from imta_fast.metrics import (
    AverageMeter, MultiExitMeter, SummaryWriterCSV, environment_info, setup_logging, topk_correct,
)


def test_average_meter():
    m = AverageMeter()
    m.update(1.0, n=3)
    m.update(3.0)
    assert (m.val, m.sum, m.count, m.avg) == (3.0, 6.0, 4, 1.5)


def test_topk_with_fewer_classes_than_k():
    logits = torch.tensor([[3.0, 2.0, 1.0],   # target 0: top-1 hit
                           [3.0, 2.0, 1.0],   # target 1: top-2 only
                           [3.0, 2.0, 1.0],   # target 2: last place
                           [0.0, 1.0, 5.0]])  # target 2: top-1 hit
    target = torch.tensor([0, 1, 2, 2])
    counts = topk_correct(logits, target, topk=(1, 2, 5))
    assert counts.dtype == torch.int64 and counts.tolist() == [2, 3, 4]  # k=5 clipped to C=3: everything


@pytest.mark.parametrize("shape", [(41, 10), (7, 100)])
def test_topk_matches_brute_force(shape):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=g)
    target = torch.randint(0, shape[1], (shape[0],), generator=g)
    # Rank of the target = number of classes with a strictly larger logit (no ties with random floats).
    rank = (logits > logits.gather(1, target[:, None])).sum(1)
    assert topk_correct(logits, target, (1, 5)).tolist() == [(rank < 1).sum().item(), (rank < 5).sum().item()]


def test_multi_exit_meter_weights_batches_by_size():
    meter = MultiExitMeter(num_exits=2, topk=(1, 5))
    t = torch.tensor([0, 1, 2])
    right = torch.eye(3) * 5  # predicts every target
    wrong = right.roll(1, dims=1)  # predicts target+1: top-1 miss, top-5 (clipped to 3) hit
    meter.update([wrong, right], t, losses=torch.tensor([1.0, 0.5]))
    meter.update([right[:1], right[:1]], t[:1], losses=[torch.tensor(3.0), 0.0])
    meter.all_reduce()  # single process: a no-op sum
    meter.all_reduce()  # idempotent
    out = meter.compute()
    assert out["count"] == 4
    assert out["loss"] == pytest.approx([(1.0 * 3 + 3.0) / 4, (0.5 * 3 + 0.0) / 4])
    assert out["top1"] == pytest.approx([25.0, 100.0]) and out["top5"] == pytest.approx([100.0, 100.0])
    assert meter.flat("val_")["val_top1_exit0"] == pytest.approx(25.0)
    with pytest.raises(RuntimeError, match="reset"):
        meter.update([right, right], t)


def test_summary_csv_header_once_and_resume(tmp_path):
    path = tmp_path / "summary.csv"
    w = SummaryWriterCSV(path)
    w.write({"epoch": 0, "train_loss": 2.5, "val_top1": torch.tensor(10.0)})
    w.write({"val_top1": 20.0, "epoch": 1, "train_loss": 2.0})  # key order does not matter
    # A resumed run re-opens the file: header kept, not repeated; re-run epochs dropped by rewind().
    w2 = SummaryWriterCSV(path)
    w2.write({"epoch": 2, "train_loss": 1.5, "val_top1": 30.0})
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["epoch", "train_loss", "val_top1"], ["0", "2.5", "10.0"], ["1", "2.0", "20.0"],
                    ["2", "1.5", "30.0"]]
    SummaryWriterCSV(path).rewind(epoch=2)
    w3 = SummaryWriterCSV(path)
    w3.write({"epoch": 2, "train_loss": 1.4, "val_top1": 31.0})
    assert path.read_text().splitlines()[1:] == ["0,2.5,10.0", "1,2.0,20.0", "2,1.4,31.0"]
    with pytest.raises(ValueError, match=r"extra \['lr'\]"):
        w3.write({"epoch": 3, "train_loss": 1.0, "val_top1": 40.0, "lr": 0.1})


def test_environment_info():
    info = environment_info()
    assert info["torch"] == torch.__version__ and info["cpu_count"] >= 1 and info["hostname"]
    assert {"python", "triton", "torchvision", "cuda_available"} <= set(info)
    assert info["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", info["git_commit"])
    if info["cuda_available"]:
        assert re.fullmatch(r"\d+\.\d+", info["cuda_capability"]) and info["cuda_device_name"]


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def test_setup_logging_primary_and_other_ranks(tmp_path, capsys, restore_root_logger):
    log = logging.getLogger("imta_fast.test")
    setup_logging(tmp_path, primary=True)
    setup_logging(tmp_path, primary=True)  # idempotent: no duplicate lines
    log.info("epoch 1 top1 50.0")
    assert capsys.readouterr().out.count("epoch 1 top1 50.0") == 1
    assert (tmp_path / "log.txt").read_text().count("epoch 1 top1 50.0") == 1

    other = tmp_path / "rank1"
    setup_logging(other, primary=False)
    log.info("hidden")
    log.warning("shown")
    out = capsys.readouterr().out
    assert "hidden" not in out and "shown" in out
    assert not other.exists()  # non-primary ranks write no files
    assert "hidden" not in (tmp_path / "log.txt").read_text()
