"""imta_fast.inference.latency: the latency model predicts the shapes the evaluator runs, and the clock.

The 10 % agreement of predicted and measured wall clock for real MSDNets on CPU is a measurement, not
a test (it depends on the machine's load): benchmarks/bench_evaluator.py records it.  Here the
mechanism is tested deterministically (same shapes, same arithmetic), and end to end on a model whose
stage times are sleeps (CPU contention hardly changes a sleep).
"""
import time

import pytest
import torch
import torch.nn as nn

from imta_fast.inference.buckets import resolve_bucket
from imta_fast.inference.evaluator import EarlyExitEvaluator
from imta_fast.inference.latency import (
    StageCosts,
    active_counts,
    fit_latency_budget,
    measure_stage_costs,
    predict_batches_ms,
    predict_latency,
    stage_rows,
)
from imta_fast.inference.protocol import apply_thresholds, confidences_and_predictions, exit_fractions, fit_thresholds
from imta_fast.inference.timing import time_interleaved
from imta_fast.models import create_model


def _sim(n=150, q=1.0):
    torch.manual_seed(0)
    model = create_model("msdnet_tiny").eval()
    x = torch.randn(n, 3, 16, 16)
    with torch.no_grad():
        logits, _ = model(x)
    conf, pred = confidences_and_predictions(logits)
    thr = fit_thresholds(conf, exit_fractions(q, model.num_exits))
    sim = apply_thresholds(conf, pred, torch.zeros(n, dtype=torch.long), thr)
    return model, x, thr, sim


@pytest.mark.parametrize("buckets,min_rows,bs", [(None, 2, 150), (None, 1, 7), ("pow2", 2, 64), (16, 2, 50),
                                                 ([8, 32], 2, 150), ([16, 48, 100], 2, 100)])
def test_prediction_uses_the_shapes_the_evaluator_runs(buckets, min_rows, bs):
    model, x, thr, sim = _sim()
    ev = EarlyExitEvaluator(model, thr, buckets=buckets, min_rows=min_rows)
    K = model.num_exits
    for xb, eb in zip(x.split(bs), sim.exit_index.split(bs)):
        out = ev(xb)
        active = active_counts(eb, K)
        assert out.active == active
        assert out.computed == stage_rows(active, buckets, min_rows, xb.shape[0])
    # and the predicted time is the cost model summed over exactly those shapes
    costs = StageCosts(batch_size=bs, per_image_ms=[0.0] * K, overhead_ms=[0.0] * K, buckets=buckets, min_rows=min_rows,
                       table_rows=[1, 1000], table_ms=[[1.0 + k, 1.0 + k + 999 * (k + 1)] for k in range(K)],
                       batch_overhead_ms=0.5)
    expected = 0.0
    for xb in x.split(bs):
        out = ev(xb)
        expected += 0.5 + sum(costs.stage_ms(k, r) for k, r in enumerate(out.computed))
    assert predict_batches_ms(sim.exit_index, costs, bs) == pytest.approx(expected / x.shape[0], rel=1e-12)


def test_stage_ms_table_interpolates_and_extrapolates():
    c = StageCosts(batch_size=8, per_image_ms=[9.0], overhead_ms=[9.0], table_rows=[2, 4, 8], table_ms=[[1.0, 2.0, 6.0]])
    assert [c.stage_ms(0, r) for r in (0, 1, 2, 3, 4, 6, 8, 10)] == [0.0, 0.5, 1.0, 1.5, 2.0, 4.0, 6.0, 8.0]
    line = StageCosts(batch_size=8, per_image_ms=[0.5], overhead_ms=[1.0])
    assert line.stage_ms(0, 4) == 3.0


def test_predict_latency_rounds_like_the_executor():
    costs = StageCosts(batch_size=100, per_image_ms=[1.0, 1.0], overhead_ms=[0.0, 0.0], buckets="pow2", min_rows=2)
    # 1 of 100 samples stays: the executor computes resolve_bucket(1, 'pow2', 2) = 2 rows at stage 2
    assert predict_latency([0.99, 0.01], costs) == pytest.approx((128 + 2) / 100)  # pow2 of 100 is 128
    assert resolve_bucket(100, "pow2", 2, 100) == 128
    step = StageCosts(batch_size=100, per_image_ms=[1.0, 1.0], overhead_ms=[0.0, 0.0], buckets=64, min_rows=2)
    assert predict_latency([0.5, 0.5], step) == pytest.approx((100 + 64) / 100)
    assert predict_latency([0.5, 0.5], step, buckets=None) == pytest.approx(1.5)


class VirtualClock:
    """Stands in for ``time.perf_counter``: advances only when a model "works" (deterministic under load)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def work(self, ms):
        self.now += ms / 1e3


class ClockNet(nn.Module):
    """Stage k costs ``a_k + b_k·rows + c·rows²`` virtual ms (convex, so the interpolation is not exact);
    exit k's logits are ``[x[:, k], 0]``."""

    num_exits = 3
    A, B, C = (3.0, 2.0, 2.0), (0.20, 0.30, 0.25), 0.002

    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    def cost(self, k, rows):
        return self.A[k] + self.B[k] * rows + self.C * rows * rows

    def forward_stem(self, x):
        return x

    def forward_stage(self, k, state):
        self.clock.work(self.cost(k, state.shape[0]))
        return state, torch.stack([state[:, k], torch.zeros_like(state[:, k])], 1)


def test_measured_latency_model_predicts_the_clock(monkeypatch):
    clock = VirtualClock()
    monkeypatch.setattr(time, "perf_counter", clock)  # the stage timer and time_interleaved read it
    torch.manual_seed(0)
    net = ClockNet(clock).eval()
    x = torch.randn(64, 3) * 3
    conf, pred = confidences_and_predictions([torch.stack([x[:, k], torch.zeros(64)], 1) for k in range(3)])
    ev = EarlyExitEvaluator(net, min_rows=2)
    costs = measure_stage_costs(ev, x, batch_sizes=[64, 32, 16, 8], repeats=3, warmup=1)
    assert costs.table_rows == [8, 16, 32, 64] and costs.min_rows == 2 and costs.buckets is None
    for k in range(3):
        assert costs.table_ms[k] == pytest.approx([net.cost(k, r) for r in (8, 16, 32, 64)])
    fns, preds = {}, {}
    for q in (0.3, 1.0, 3.0):
        thr = fit_thresholds(conf, exit_fractions(q, 3))
        idx = apply_thresholds(conf, pred, pred[0], thr).exit_index
        assert len(set(idx.tolist())) == 3
        preds[q] = predict_batches_ms(idx, costs, 64) * 64
        fns[q] = (lambda t: lambda: ev(x, t))(thr)
    stats = time_interleaved(fns, repeats=3, warmup=1)
    for q in fns:
        assert stats[q].spread == 0.0
        assert stats[q].median_ms == pytest.approx(preds[q], rel=0.10), (q, stats[q], preds[q])
        assert stats[q].median_ms != pytest.approx(preds[q], rel=1e-6)  # convex costs: interpolation error > 0


def test_fit_latency_budget_uses_recorded_rounding():
    model, x, thr, sim = _sim(n=64)
    with torch.no_grad():
        logits, _ = model(x)
    conf, pred = confidences_and_predictions(logits)
    costs = StageCosts(batch_size=64, per_image_ms=[1.0, 1.0, 1.0], overhead_ms=[0.0] * 3, buckets=64, min_rows=2)
    fit = fit_latency_budget(conf, pred, pred[-1], costs, 2.5)
    # with buckets of 64 rows every stage any sample reaches costs the whole batch
    assert fit.feasible and fit.predicted_ms in (1.0, 2.0)


def test_compaction_is_charged_by_the_rows_gathered(monkeypatch):
    """A profile gathers every row; a real run gathers only the survivors.  With compaction costing
    ``G`` virtual ms per gathered row, the model charges it by the rows entering the next stage: its
    prediction matches the clock, and dropping the gather table (compaction inside ``t_k(r_k)``)
    over-predicts budgets with many early exits."""
    G = 0.4
    clock = VirtualClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    torch.manual_seed(0)
    net = ClockNet(clock).eval()
    monkeypatch.setattr(ClockNet, "C", 0.0)  # linear stage costs: the interpolation itself is exact
    x = torch.randn(64, 3) * 3
    ev = EarlyExitEvaluator(net, min_rows=2)
    gather = ev.executor.gather

    def costly_gather(k, state, idx):
        clock.work(G * idx.numel())
        return gather(k, state, idx)

    monkeypatch.setattr(ev.executor, "gather", costly_gather)
    costs = measure_stage_costs(ev, x, batch_sizes=[64, 32, 16], repeats=3, warmup=1)
    assert costs.gather_table_ms[0] == pytest.approx([G * r for r in (16, 32, 64)])
    assert costs.gather_table_ms[-1] == pytest.approx([0.0, 0.0, 0.0])
    conf, pred = confidences_and_predictions([torch.stack([x[:, k], torch.zeros(64)], 1) for k in range(3)])
    thr = fit_thresholds(conf, exit_fractions(0.3, 3))  # most samples leave early
    out = ev(x, thr)
    assert out.gather_ms[0] == pytest.approx(G * out.active[1]) and out.gather_ms[2] == 0.0
    idx = apply_thresholds(conf, pred, pred[0], thr).exit_index
    measured = time_interleaved({"q": lambda: ev(x, thr)}, repeats=3, warmup=1)["q"].median_ms
    assert predict_batches_ms(idx, costs, 64) * 64 == pytest.approx(measured, rel=0.02)
    old_style = StageCosts(**{**costs.to_dict(), "gather_table_ms": []})
    assert predict_batches_ms(idx, old_style, 64) * 64 > 1.1 * measured
