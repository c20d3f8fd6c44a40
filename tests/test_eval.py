"""eval.py: anytime + budgeted outputs for several runs, cache keyed on the checkpoint, errors."""
import csv
import json

import pytest
import torch

import eval as evaluate
import train

FAST = ["--dataset", "digits", "--holdout-size", "64", "--batch-size", "16", "--max-steps-per-epoch", "4",
        "--no-progress", "--epochs", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert train.main(FAST + ["--method", "ge", "--output", str(root / "ge")]) == 0
    assert train.main(FAST + ["--method", "imta", "--teacher", str(root / "ge" / "best.pt"), "--output", str(root / "imta")]) == 0
    return root


def test_two_runs_overlaid(runs, capsys):
    out = runs / "cmp"
    assert evaluate.main([str(runs / "ge"), str(runs / "imta"), "--labels", "GE", "IMTA", "--output", str(out),
                          "--budget-points", "10"]) == 0
    table = capsys.readouterr().out
    assert "GE" in table and "IMTA" in table
    anytime = list(csv.DictReader(open(out / "anytime.csv")))
    assert [r["run"] for r in anytime] == ["GE"] * 4 + ["IMTA"] * 4
    budget = list(csv.DictReader(open(out / "budgeted.csv")))
    assert len(budget) == 2 * 10
    macs = [float(r["expected_mmacs"]) for r in budget if r["run"] == "GE"]
    assert min(macs) >= float(anytime[0]["cumulative_mmacs"]) - 1e-6
    assert max(macs) <= float(anytime[3]["cumulative_mmacs"]) + 1e-6
    summary = json.load(open(out / "summary.json"))
    assert {s["label"] for s in summary} == {"GE", "IMTA"}
    for png in ("anytime.png", "budgeted.png"):
        assert (out / png).stat().st_size > 10_000


def test_logits_cache_is_keyed_on_checkpoint_and_options(tmp_path):
    run_dir = tmp_path / "ce"
    assert train.main(FAST + ["--output", str(run_dir)]) == 0
    cache = run_dir / "logits_test.pt"

    def cached():
        blob = torch.load(cache, weights_only=True)
        return blob["key"], blob["logits"]

    assert evaluate.main([str(run_dir), "--budget-points", "4", "--checkpoint", "last"]) == 0
    key1, logits1 = cached()
    assert evaluate.main([str(run_dir), "--budget-points", "4", "--checkpoint", "last"]) == 0
    assert cached()[0] == key1  # same checkpoint and options: reused
    assert evaluate.main([str(run_dir), "--budget-points", "4", "--checkpoint", "last", "--amp"]) == 0
    assert cached()[0] != key1  # bf16 logits are not the fp32 ones
    assert train.main(FAST + ["--output", str(run_dir), "--epochs", "2", "--resume", "auto"]) == 0
    assert evaluate.main([str(run_dir), "--budget-points", "4", "--checkpoint", "last"]) == 0
    key3, logits3 = cached()
    assert key3 != key1 and not torch.equal(logits3, logits1)  # new weights, new logits
    cache.write_bytes(b"garbage")  # a damaged cache is recomputed, not an error
    assert evaluate.main([str(run_dir), "--budget-points", "4", "--checkpoint", "last"]) == 0
    assert torch.equal(cached()[1], logits3)


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    assert evaluate.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and str(tmp_path) in err


def test_wallclock_mode_really_exits_and_matches_simulation(runs, capsys):
    out = runs / "wall"
    assert evaluate.main([str(runs / "ge"), "--mode", "wallclock", "--wallclock-points", "2", "--repeats", "1",
                          "--budget-points", "8", "--latency-budget", "1.0", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "clock x" in printed and "latency budget" in printed
    rows = list(csv.DictReader(open(out / "wallclock.csv")))
    assert len(rows) == 2
    for r in rows:
        assert float(r["parity_with_simulated"]) == 1.0  # CPU fp32: exits identical to the simulated protocol
        assert float(r["ms_per_image"]) > 0 and float(r["flops_speedup"]) >= 1.0
    budget = {f"{float(r['q']):.2f}": float(r["test_top1"]) for r in csv.DictReader(open(out / "budgeted.csv"))}
    for r in rows:  # real early exit gives the simulated accuracy
        assert float(r["test_top1"]) == pytest.approx(budget[r["q"]])
    assert (out / "wallclock.png").stat().st_size > 10_000


def test_wallclock_streaming_and_options(runs, capsys):
    """B = 1 without padding rows (exit agreement reported, not bit equality); stage shares in the CSV."""
    out = runs / "stream"
    assert evaluate.main([str(runs / "ge"), "--mode", "wallclock", "--wallclock-points", "1", "--repeats", "1",
                          "--budget-points", "4", "--streaming", "--no-fold-bn", "--output", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "wallclock.csv")))
    assert len(rows) == 1 and rows[0]["batch_size"] == "1"
    assert float(rows[0]["parity_with_simulated"]) >= 0.95
    for key in ("stage_time_shares", "stage_mac_shares"):
        shares = [float(v) for v in rows[0][key].split()]
        assert len(shares) == 4 and sum(shares) == pytest.approx(1.0, abs=0.01)
    assert evaluate.main([str(runs / "ge"), "--buckets", "step0"]) == 2
    assert "--buckets" in capsys.readouterr().err


def test_device_backend_gives_the_pytorch_backend_logits(runs, tmp_path):
    """--data-backend device (uint8 dataset on the device, batched transforms) scores the same logits,
    and the backend is part of the cache key (each run recomputes, neither reuses the other's file)."""
    def logits(backend):
        out = tmp_path / backend
        assert evaluate.main([str(runs / "ge"), "--output", str(out), "--budget-points", "5",
                              "--data-backend", backend]) == 0
        return torch.load(runs / "ge" / "logits_test.pt", weights_only=True)

    a, b = logits("pytorch"), logits("device")
    assert a["key"] != b["key"]
    assert torch.equal(a["labels"], b["labels"])
    torch.testing.assert_close(a["logits"], b["logits"], rtol=0, atol=1e-5)
