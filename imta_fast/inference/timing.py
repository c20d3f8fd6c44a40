"""Honest wall-clock comparisons (docs/method.md §13): every contender is timed with the same clock
(``perf_counter`` around the whole call, with a device sync before and after), the same statistic
(median over repeats, with the spread), repeats interleaved (contender order rotated each round, so
slow drifts and background load hit all of them alike), and every contender warmed up before the
first timed round (compilation, CUDA-graph capture and every shape it will run happen there, never
inside a timed round).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Mapping, Optional

import torch

__all__ = ["TimingStats", "time_interleaved", "time_full_network"]


@dataclass
class TimingStats:
    """Wall time of one contender over the timed rounds (ms per call)."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    samples_ms: List[float]

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else 0.0

    @classmethod
    def of(cls, samples: List[float]) -> "TimingStats":
        s = sorted(samples)
        if len(s) >= 2:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1 = q3 = s[0]
        return cls(statistics.median(s), q1, q3, s[0], s[-1], list(samples))

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1,
                     device: Optional[torch.device] = None) -> Dict[str, TimingStats]:
    """Median wall time of each callable, rounds interleaved (see the module docstring).

    Args:
        fns: name -> zero-argument callable (one timed call each per round).
        repeats: timed rounds (each runs every callable once; the order rotates by one per round).
        warmup: untimed rounds first (at least 1 is recommended: compile / capture / allocator).
        device: synchronised around every call when it is a CUDA device.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    with torch.no_grad():
        for _ in range(warmup):
            for name in names:
                fns[name]()
        samples: Dict[str, List[float]] = {name: [] for name in names}
        for r in range(repeats):
            shift = r % max(len(names), 1)
            for name in names[shift:] + names[:shift]:
                _sync(device)
                t0 = time.perf_counter()
                fns[name]()
                _sync(device)
                samples[name].append(1e3 * (time.perf_counter() - t0))
    return {name: TimingStats.of(samples[name]) for name in names}


@torch.no_grad()
def time_full_network(model_or_evaluator, x: torch.Tensor, *, repeats: int = 10, warmup: int = 3,
                      amp_dtype: Optional[torch.dtype] = None) -> float:
    """Median wall time (ms per batch) of the full network on ``x``: ``forward_stem`` + every
    ``forward_stage`` on the whole batch.  With an evaluator (anything with ``full_network``), its
    ``full_network`` (same compiled / graphed stages and padding) is timed instead."""
    if hasattr(model_or_evaluator, "full_network"):
        fn = lambda: model_or_evaluator.full_network(x)  # noqa: E731
    else:
        model = model_or_evaluator

        def fn():
            ctx = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with ctx:
                state = model.forward_stem(x)
                for k in range(model.num_exits):
                    state, logits = model.forward_stage(k, state)
            return logits

    return time_interleaved({"full": fn}, repeats=repeats, warmup=warmup, device=x.device)["full"].median_ms
