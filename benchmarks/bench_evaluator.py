"""Early-exit evaluator vs the full network: ImageNet MSDNet step 4, random weights, GPU only.

    pytest benchmarks/bench_evaluator.py --benchmark-only [--benchmark-autosave]
    IMTA_BENCH_COMPILE=1 pytest ...   # also torch.compile'd stages (minutes of compile time)

Setup per batch size B in {256, 1024}: bf16 autocast, channels_last model and input.  For each
budget q the thresholds are fitted (``fit_thresholds``) on the random-weight confidences of the
same batch, so the evaluator realises the geometric exit fractions ``π_k ∝ q^k`` on it.  Random
weights give meaningless accuracy but real per-stage costs, which is what is measured here.

``extra_info``: target and realised exit fractions, expected MACs (cumulative per-exit MACs of
spec §1.8, MSD op_counter convention), FLOPs speedup = full MACs / expected MACs, wall-clock
speedup = full-network median / early-exit median (same impl: eager vs eager, graphs vs graphs),
images/s.  Groups: one per (B, impl), holding the full network and every budget.
"""
from __future__ import annotations

import functools
import os
import statistics

import pytest
import torch

from imta_fast.inference.protocol import confidences_and_predictions, exit_fractions, fit_thresholds
from imta_fast.inference.evaluator import EarlyExitEvaluator, time_full_network
from imta_fast.models import create_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")

MODEL = "msdnet_imagenet_step4"
# Cumulative per-exit MACs (millions) of ImageNet step 4, spec §1.8 (op_counter convention).
MACS_STEP4 = [339.90, 685.46, 1008.16, 1254.47, 1360.53]
BATCH_SIZES = (256, 1024)
QS = (0.25, 0.5, 1.0, 2.0)
IMPLS = ("eager", "cuda_graphs") + (("compile",) if os.environ.get("IMTA_BENCH_COMPILE") == "1" else ())
ROUNDS, WARMUP = 10, 3


class _Setup:
    """Model, input and evaluators for one batch size (built once per module)."""

    def __init__(self, batch_size: int):
        torch.manual_seed(0)
        torch.backends.cudnn.benchmark = True
        self.batch_size = batch_size
        self.model = create_model(MODEL).cuda().eval().to(memory_format=torch.channels_last)
        self.x = torch.randn(batch_size, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = self.model(self.x)
        self.conf, _ = confidences_and_predictions(logits)
        self._evaluators = {}
        self._full_ms = {}

    def thresholds(self, q: float) -> torch.Tensor:
        return fit_thresholds(self.conf.cpu(), exit_fractions(q, len(MACS_STEP4)))

    def evaluator(self, impl: str) -> EarlyExitEvaluator:
        if impl not in self._evaluators:
            self._evaluators[impl] = EarlyExitEvaluator(
                self.model, amp_dtype=torch.bfloat16, channels_last=True, buckets="pow2",
                cuda_graphs=impl == "cuda_graphs", compile=impl == "compile", timing=False)
        return self._evaluators[impl]

    def full_ms(self, impl: str) -> float:
        if impl not in self._full_ms:
            self._full_ms[impl] = time_full_network(self.evaluator(impl), self.x, repeats=ROUNDS, warmup=WARMUP)
        return self._full_ms[impl]


@pytest.fixture(scope="module")
def bench_setup():
    return functools.lru_cache(maxsize=None)(_Setup)


def _synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _median_ms(benchmark) -> float:
    try:
        return 1e3 * benchmark.stats.stats.median
    except AttributeError:  # pytest-benchmark disabled (--benchmark-disable)
        return float("nan")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_full_network(benchmark, bench_setup, batch_size, impl):
    s = bench_setup(batch_size)
    ev = s.evaluator(impl)
    benchmark.group = f"evaluator B={batch_size} {impl}"
    benchmark.pedantic(_synced(lambda: ev.full_network(s.x)), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    ms = _median_ms(benchmark)
    benchmark.extra_info.update(model=MODEL, batch_size=batch_size, impl=impl, q=None, expected_macs=MACS_STEP4[-1],
                                flops_speedup=1.0, wallclock_speedup=1.0, images_per_s=1e3 * batch_size / ms)


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_early_exit(benchmark, bench_setup, batch_size, impl, q):
    s = bench_setup(batch_size)
    ev = s.evaluator(impl)
    thr = s.thresholds(q)
    ev.thresholds = thr  # cached on the device: no per-call host-to-device copy
    out = ev(s.x)  # also captures / compiles the buckets this budget uses
    counts = torch.bincount(out.exit_index, minlength=len(MACS_STEP4)).cpu()
    realised = (counts.double() / batch_size).tolist()
    expected = sum(f * m for f, m in zip(realised, MACS_STEP4))
    benchmark.group = f"evaluator B={batch_size} {impl}"
    benchmark.pedantic(_synced(lambda: ev(s.x)), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    ms = _median_ms(benchmark)
    full = s.full_ms(impl)
    benchmark.extra_info.update(
        model=MODEL, batch_size=batch_size, impl=impl, q=q,
        target_fractions=exit_fractions(q, len(MACS_STEP4)).tolist(), exit_fractions=realised,
        active_per_stage=out.active, rows_per_stage=out.computed,
        expected_macs=expected, flops_speedup=MACS_STEP4[-1] / expected,
        full_network_ms=full, early_exit_ms=ms, wallclock_speedup=full / ms, images_per_s=1e3 * batch_size / ms,
        stage_ms_profiled=_profile_stages(s, impl),
    )


def _profile_stages(s: _Setup, impl: str) -> list:
    """Median per-stage ms (CUDA events) over a few extra runs of the benchmarked evaluator."""
    ev = s.evaluator(impl)
    ev.timing = True
    try:
        runs = [ev(s.x) for _ in range(5)]
    finally:
        ev.timing = False
    return [statistics.median(r.stage_ms[k] for r in runs) for k in range(len(MACS_STEP4))]
