"""Shared pytest-benchmark fixtures for the GPU benchmarks (benchmarks are not tests: they skip
cleanly without CUDA -- except cases marked ``@pytest.mark.cpu_bench``, which run anywhere -- and
nothing here imports Triton at collection time).

- ``cuda_bench``: runs a callable under pytest-benchmark with a CUDA synchronisation inside every
  timed call (wall clock: host + device), warm-up rounds first (compilation, autotuning, allocator),
  then times it again with CUDA events (``event_ms_median``: device time per call, launches queued
  back to back, no host sync inside) -- every GB/s and copy-bandwidth fraction is computed from the
  event time -- and records the peak memory the call allocates above its inputs
  (``peak_mem_extra_bytes``) and a ``triton.testing.do_bench`` cross-check (L2 flushed) in ``extra_info``.
- ``copy_bandwidth``: device-to-device copy bandwidth (read + write bytes / s) measured once per run.
- The JSON gets GPU/torch/triton versions in ``machine_info`` and the exact command line.
"""
from __future__ import annotations

import os
import shlex
import sys
from typing import Callable

import pytest
import torch

def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` (pytest's default pattern is ``test_*.py``) without a repo-wide ini."""
    # (a bench file named on the command line is already collected by pytest itself)
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_bench: a benchmark case that also runs without CUDA")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU benchmarks need CUDA")
    for item in items:
        if "benchmarks" in str(item.fspath) and item.get_closest_marker("cpu_bench") is None:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    import platform

    machine_info["torch"] = torch.__version__
    machine_info["torch_cuda"] = torch.version.cuda
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        machine_info["gpu"] = props.name
        machine_info["gpu_count"] = torch.cuda.device_count()
        machine_info["gpu_memory_gib"] = round(props.total_memory / 2 ** 30, 1)
        machine_info["gpu_sm_count"] = props.multi_processor_count
    machine_info["hostname"] = platform.node()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["command"] = os.environ.get("IMTA_BENCH_COMMAND") or " ".join(shlex.quote(a) for a in sys.argv)


def _measure_copy_bandwidth(nbytes: int = 1 << 28, reps: int = 20) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    return 2 * nbytes / seconds / 1e9  # read + write


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (read + write), measured in this run."""
    if not torch.cuda.is_available():
        pytest.skip("GPU benchmarks need CUDA")
    return _measure_copy_bandwidth()


def event_times_ms(fn: Callable[[], object], reps: int = 50) -> list:
    """Per-call device time of ``fn`` in ms from CUDA events recorded around each call, the calls queued
    back to back (no host synchronisation between them, so launch latency overlaps)."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated during one call of ``fn`` above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


@pytest.fixture
def cuda_bench(benchmark, copy_bandwidth):
    """``cuda_bench(fn, nbytes, group=..., **extra)``: time ``fn`` (wall clock with a GPU sync per call,
    then CUDA events), record GB/s against ``nbytes`` from the event time, and peak memory."""

    def run(fn: Callable[[], object], nbytes: int, group: str, rounds: int = 50, warmup_rounds: int = 5, **extra):
        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.group = group
        benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
        benchmark.extra_info.update(extra)
        if getattr(benchmark, "stats", None) is None:  # --benchmark-disable: ran once, nothing to report
            return
        times = sorted(event_times_ms(fn, reps=rounds))
        event_ms = times[len(times) // 2]
        gbps = nbytes / (event_ms / 1e3) / 1e9
        benchmark.extra_info.update({
            "bytes_ideal": nbytes,
            "event_ms_median": round(event_ms, 5),
            "event_ms_min": round(times[0], 5),
            "wall_ms_median": round(benchmark.stats.stats.median * 1e3, 5),
            "gbps_median": round(gbps, 1),
            "copy_gbps": round(copy_bandwidth, 1),
            "fraction_of_copy_bw": round(gbps / copy_bandwidth, 3),
            "peak_mem_extra_bytes": peak_extra_bytes(fn),
        })
        try:  # cross-check with Triton's CUDA-event timer (L2 flushed between reps)
            from triton.testing import do_bench

            benchmark.extra_info["do_bench_ms"] = round(do_bench(fn, warmup=10, rep=50), 4)
        except Exception as exc:  # pragma: no cover - informational only
            benchmark.extra_info["do_bench_error"] = repr(exc)

    return run
