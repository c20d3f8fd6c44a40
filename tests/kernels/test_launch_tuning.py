"""Launch tuning of the fused multi-exit kernel (issue #9 item 5): every candidate configuration --
the exit-split grid (one program per row tile and exit), packed rows, chunked rows, other warp counts
-- against the float64 reference; the tuner's choice (fastest, cached per key with the dtype in it,
never while disabled / traced / in a dispatch mode) with a fake timer; registers and spills at sm_90
from an AOT compile without a GPU (``python -m benchmarks.kernel_registers``).

On CPU the kernel runs in Triton's interpreter (conftest.py): the candidates are GPU configurations
run on small batches, so every tile shape, grid and chunking is exercised at a few programs each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from imta_fast.kernels import multi_exit_kd as kd_mod
from imta_fast.kernels.multi_exit_kd import LaunchConfig
from imta_fast.ops import dispatch as FN
from tests.kernels.test_fused_loss_path import _ref64_ignore
from tests.kernels.test_multi_exit_kd import DEVICE, check_against_ref, make_inputs, run_ref

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh_tuner(monkeypatch):
    monkeypatch.delenv(kd_mod.AUTOTUNE_ENV, raising=False)
    kd_mod.clear_autotune_cache()
    yield
    kd_mod.clear_autotune_cache()


# ----------------------------------------------------------------------------- the candidate set
def test_candidate_sets_are_small_and_start_with_the_heuristic():
    for B in (1, 8, 256, 1024, 8192, 65536):
        for C in (1, 10, 100, 1000, 4096, 21841):
            for K in (1, 2, 5, 8):
                cands = kd_mod.candidate_configs(B, C, K)
                assert 1 <= len(cands) <= kd_mod.MAX_CANDIDATES and len(set(cands)) == len(cands)
                assert cands[0] == kd_mod._heuristic(B, C, K, True)
                for c in cands:
                    assert c.block_b & (c.block_b - 1) == 0 and c.block_c & (c.block_c - 1) == 0
                    assert c.block_c <= 4096 and 1 <= c.num_warps <= 16 and not (K == 1 and c.exit_split)
    # the shapes of the issue: one exit per program at B = 256 (256 row tiles), a 1 x 1024 tile at 4 warps
    # at B = 8192 (8 elements per thread; ptxas: >= 4 blocks per SM), the former tile still a candidate
    assert kd_mod.candidate_configs(256, 1000, 5)[0] == LaunchConfig(1, 1024, 4, True)
    assert kd_mod.candidate_configs(8192, 1000, 5)[0] == LaunchConfig(1, 1024, 4, False)
    assert LaunchConfig(2, 1024, 8, False) in kd_mod.candidate_configs(8192, 1000, 5)
    assert LaunchConfig(1, 1024, 4, False) in kd_mod.candidate_configs(256, 1000, 5)
    assert kd_mod.candidate_configs(256, 1000, 5, on_gpu=False) == (kd_mod._heuristic(256, 1000, 5, False),)
    with pytest.raises(TypeError, match="LaunchConfig"):
        kd_mod.launch_config((1, 1024, 4, False))


# (K, B of the data, C, dtype, teacher, B the candidate set is made for)
CASES = [
    (3, 7, 1000, torch.float32, True, 256),  # split heuristic, 1D grid, 8 warps, two rows per tile
    (3, 7, 1000, torch.bfloat16, True, 8192),  # 1 x 1024 at 4 / 8 warps, split, the former 2 x 1024
    (5, 5, 1000, torch.bfloat16, False, 8192),  # CE only
    (2, 9, 100, torch.float32, True, 8192),  # 8 and 16 rows x 128 (ragged last tile)
    (4, 6, 100, torch.float16, True, 256),  # 1 x 128 at 1 and 2 warps, split and not
    (2, 3, 5000, torch.float32, True, 256),  # chunked rows: 4096-, 2048- and 1024-wide chunks, ragged last
    (3, 3, 5000, torch.bfloat16, False, 8192),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "K{}_B{}_C{}_{}_{}_for_B{}".format(
    c[0], c[1], c[2], str(c[3]).split(".")[-1], "kd" if c[4] else "ce", c[5]))
def test_every_candidate_matches_float64(case):
    K, B, C, dtype, teacher, b_key = case
    z, y, t, s = make_inputs(K, B, C, dtype, sw=True, teacher=teacher)
    kw = dict(label_smoothing=0.1)
    if teacher:
        kw.update(temperature=2.0, kd_weight=[0.2 + 0.1 * k for k in range(K)], exit_weights=[1.0 + k for k in range(K)],
                  kl_reduction="batchmean", kd_exits=list(range(K)))
    cands = kd_mod.candidate_configs(b_key, C, K)
    assert len(cands) >= 3
    for cfg in cands:
        with kd_mod.launch_config(cfg):
            check_against_ref(z, y, t, dtype, sample_weights=s, what=f"{cfg}", **kw)


def test_exit_split_with_exit_groups_ignored_rows_and_aten_row_count(monkeypatch):
    """K = 10 (two launches: 8 + 2 exits) on the exit-split grid with ignored rows, CE's denominator
    counted in the kernel and, when the programs would read too many targets, by ATen."""
    K, B, C = 10, 5, 40
    z, y, t, s = make_inputs(K, B, C, torch.float32, sw=True)
    y[[0, 3]] = -100
    kw = dict(temperature=1.5, kd_weight=0.4, label_smoothing=0.05, kl_reduction="batchmean", sample_weights=s)
    z64 = z.double().requires_grad_(True)
    exp = _ref64_ignore(z64, y, t, **kw)
    (exp_g,) = torch.autograd.grad(exp.sum(), z64)
    for max_reads in (kd_mod.COUNT_IN_KERNEL_MAX_READS, 0):
        monkeypatch.setattr(kd_mod, "COUNT_IN_KERNEL_MAX_READS", max_reads)
        with kd_mod.launch_config(LaunchConfig(2, 64, 1, True)):
            got, got_g = _loss_and_grad(z, y, t, **kw)
        torch.testing.assert_close(got.double(), exp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_g.double(), exp_g, atol=1e-7, rtol=1e-4)


def _loss_and_grad(z, y, t, **kw):
    z = z.detach().clone().requires_grad_(True)
    loss = FN.multi_exit_loss(z, y, t, reduction="none", impl="triton", **kw)
    (g,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), g


# ----------------------------------------------------------------------------- the tuner (fake timer)
FAKE = (LaunchConfig(8, 64, 4, False), LaunchConfig(2, 64, 4, True), LaunchConfig(4, 16, 4, False))


class FakeTimer:
    """Stands in for ``_time_launch``: launches the candidate once (so each runs in the interpreter) and
    reports a made-up time from ``ms`` -- the real one needs CUDA events."""

    def __init__(self, ms):
        self.ms = ms
        self.calls = []

    def __call__(self, launch, cfg):
        self.calls.append(cfg)
        launch(cfg)
        return self.ms[cfg]


@pytest.fixture
def tuner(monkeypatch):
    """The forward as on a GPU with three interpreter-sized candidates, a fake timer, and a record of
    the configuration of every forward launch."""
    timer = FakeTimer({FAKE[0]: 3.0, FAKE[1]: 1.0, FAKE[2]: 2.0})
    launched = []
    real_run = kd_mod._run

    def recording_run(kernel, grid, traceable, *args, **kwargs):
        if kernel is kd_mod._multi_exit_kd_kernel:
            launched.append(LaunchConfig(kwargs["BLOCK_B"], kwargs["BLOCK_C"], kwargs["num_warps"], kwargs["EXIT_SPLIT"]))
        real_run(kernel, grid, traceable, *args, **kwargs)

    monkeypatch.setattr(kd_mod, "_launch_candidates", lambda B, C, K, *rest: tuple((c, c.programs(B, K)) for c in FAKE))
    monkeypatch.setattr(kd_mod, "_time_launch", timer)
    monkeypatch.setattr(kd_mod, "_run", recording_run)
    return timer, launched


KW = dict(temperature=2.0, kd_weight=0.3, label_smoothing=0.1)


def test_tuner_picks_the_fastest_and_caches_it_per_key(tuner):
    timer, launched = tuner
    K, B, C = 3, 6, 50
    z, y, t, _ = make_inputs(K, B, C, torch.float32)
    loss, grad = _loss_and_grad(z, y, t, **KW)
    assert timer.calls == list(FAKE)  # every candidate timed once, in order
    assert launched[-1] == FAKE[1]  # then the fastest launched for the result
    exp_l, exp_g = run_ref(z, y, t, **KW)
    torch.testing.assert_close(loss.double(), exp_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), exp_g, atol=1e-6, rtol=1e-4)
    (rec,) = kd_mod.autotune_log()
    assert (rec["B"], rec["C"], rec["K"], rec["dtype"], rec["teacher"]) == (B, C, K, "float32", True)
    assert rec["chosen"] == str(FAKE[1]) and rec["heuristic"] == str(FAKE[0])
    assert rec["times_ms"] == {str(c): timer.ms[c] for c in FAKE}

    n = len(timer.calls)
    launched.clear()
    _loss_and_grad(z * 0.5, y, t, **KW)  # same key: a dict lookup, no timing
    assert len(timer.calls) == n and launched == [FAKE[1]]

    _loss_and_grad(z.to(torch.bfloat16), y, t.to(torch.bfloat16), **KW)  # the dtype is part of the key
    assert len(timer.calls) == 2 * n
    _loss_and_grad(z, y, None)  # so is the teacher
    assert len(timer.calls) == 3 * n
    _loss_and_grad(z[:, :4], y[:4], t[:4], **KW)  # and the batch size
    assert len(timer.calls) == 4 * n
    assert sorted((r["dtype"], r["teacher"], r["B"]) for r in kd_mod.autotune_log()) == [
        ("bfloat16", True, 6), ("float32", False, 6), ("float32", True, 4), ("float32", True, 6)]


@pytest.mark.parametrize("value", ["0", "off"])
def test_tuner_switched_off_by_the_environment(tuner, monkeypatch, value):
    timer, launched = tuner
    monkeypatch.setenv(kd_mod.AUTOTUNE_ENV, value)
    z, y, t, _ = make_inputs(2, 4, 20, torch.float32)
    _loss_and_grad(z, y, t, **KW)
    assert timer.calls == [] and launched == [FAKE[0]] and kd_mod.autotune_log() == []


def test_tuner_never_times_while_tracing_but_uses_a_cached_winner(tuner, monkeypatch):
    timer, launched = tuner
    z, y, t, _ = make_inputs(2, 4, 20, torch.float32)
    assert not kd_mod._may_time(traceable=True)  # the triton_op path under torch.compile
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _loss_and_grad(z, y, t, **KW)
    assert timer.calls == [] and launched == [FAKE[0]]  # nothing cached yet: the heuristic
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    _loss_and_grad(z, y, t, **KW)  # an eager call tunes ...
    assert len(timer.calls) == len(FAKE)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    launched.clear()
    _loss_and_grad(z, y, t, **KW)  # ... and a traced one then uses the winner
    assert len(timer.calls) == len(FAKE) and launched == [FAKE[1]]


def test_tuner_never_times_under_a_dispatch_mode(tuner):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    timer, launched = tuner
    K, B, C = 2, 4, 20
    z, y, t, _ = make_inputs(K, B, C, torch.float32)
    coef = torch.tensor([[0.7, 0.3], [1.0, 0.0]], device=DEVICE)
    with Passthrough():
        kd_mod.multi_exit_kd_forward(list(z), y, t, None, coef, 2.0, 0.1, False, False, True)
    assert timer.calls == [] and launched == [FAKE[0]]


def test_a_failing_candidate_loses_and_a_failing_heuristic_raises(tuner, monkeypatch):
    timer, launched = tuner

    def flaky(launch, cfg):
        if cfg == FAKE[1]:
            raise RuntimeError("out of resources")
        return timer(launch, cfg)

    monkeypatch.setattr(kd_mod, "_time_launch", flaky)
    z, y, t, _ = make_inputs(2, 4, 20, torch.float32)
    with pytest.warns(UserWarning, match="failed"):
        _loss_and_grad(z, y, t, **KW)
    assert kd_mod.autotune_log()[0]["chosen"] == str(FAKE[2])  # the fastest that ran
    assert kd_mod.autotune_log()[0]["times_ms"][str(FAKE[1])] == float("inf")

    kd_mod.clear_autotune_cache()

    def broken(launch, cfg):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(kd_mod, "_time_launch", broken)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="no kernel image"):
        warnings.simplefilter("ignore")
        _loss_and_grad(z, y, t, **KW)


# ----------------------------------------------------------------------------- registers at sm_90
@pytest.mark.slow  # ~50 AOT compiles: ~10 s with Triton's cache warm, ~40 s cold on one core
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real launches compile these kernels")
def test_candidates_have_no_spills_and_the_b8192_default_fits_4_blocks_per_sm(tmp_path):
    """Every candidate of the cases in benchmarks/kernel_registers.py, compiled for sm_90a by Triton's
    bundled toolchain in a subprocess without TRITON_INTERPRET: no register spills; at B = 8192, C = 1000
    the default configuration leaves room for >= 4 blocks per SM; aligned bf16 rows are loaded and
    stored in vectors (no 16-bit scalar global access)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out_json = tmp_path / "regs.json"
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_registers", "-q", "--json", str(out_json)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    last = (out.stdout.strip().splitlines() or [""])[-1]
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0, out.stderr[-3000:] + last
    records = json.loads(out_json.read_text())["records"]
    assert len(records) >= 40
    spilled = [(r["B"], r["C"], r["dtype"], r["teacher"], r["config"], r["spill_stores"], r["spill_loads"])
               for r in records if r["spill_stores"] or r["spill_loads"]]
    assert spilled == []
    defaults = [r for r in records if r["B"] == 8192 and r["C"] == 1000 and r["heuristic"]]
    assert len(defaults) == 4  # bf16 / fp32, teacher or not
    assert all(r["blocks_per_sm"] >= 4 for r in defaults), [(r["dtype"], r["teacher"], r["regs"]) for r in defaults]
    for r in records:
        if r["C"] == 1000 and r["dtype"] == "bf16":  # ALIGN = 8: 16- or 8-byte accesses only
            assert r["scalar_b16_loads"] == 0 and r["scalar_b16_stores"] == 0 and r["vector_stores"] >= 5, r
    assert "| 8192 | 1000 | bf16 | yes | **1x1024 w4** |" in out.stdout


def test_blocks_per_sm_follows_the_sm90_occupancy_rules():
    from benchmarks.kernel_registers import blocks_per_sm, parse_ptxas

    assert blocks_per_sm(64, 8, 0) == 4  # 64 regs x 256 threads: the "4 blocks per SM"
    assert blocks_per_sm(77, 8, 0) == 3  # the former 2 x 1024 tile: 80 allocated -> 6 warps per sub-partition
    assert blocks_per_sm(72, 4, 16) == 7
    assert blocks_per_sm(32, 1, 0) == 32  # the block limit
    assert blocks_per_sm(255, 16, 0) == 0  # 512 threads x 256 registers do not fit
    assert blocks_per_sm(16, 4, 100 * 1024) == 2  # shared memory
    log = ("ptxas info    : Used 72 registers, used 1 barriers, 16 bytes cumulative stack size\n"
           "    16 bytes stack frame, 20 bytes spill stores, 40 bytes spill loads\n")
    assert parse_ptxas(log) == {"regs": 72, "spill_stores": 20, "spill_loads": 40}


# ----------------------------------------------------------------------------- GPU: real timing
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B", [256, 2048])
def test_autotune_on_gpu_times_every_candidate_and_stays_exact(B):
    """The first call per key times each candidate with CUDA events (all finite: every candidate compiles
    and runs on this GPU), the result equals the float64 reference, and later calls reuse the winner."""
    K, C, dtype = 5, 1000, torch.bfloat16
    z, y, t, s = make_inputs(K, B, C, dtype, sw=True)
    kw = dict(temperature=2.0, kd_weight=0.3, label_smoothing=0.1, kl_reduction="batchmean")
    check_against_ref(z, y, t, dtype, sample_weights=s, what=f"tuned B={B}", **kw)
    (rec,) = [r for r in kd_mod.autotune_log() if r["B"] == B and r["write_grad"]]
    assert set(rec["times_ms"]) == {str(c) for c in kd_mod.candidate_configs(B, C, K)}
    assert all(0 < v < float("inf") for v in rec["times_ms"].values()), rec
    assert rec["chosen"] == min(rec["times_ms"], key=rec["times_ms"].get)
    n = len(kd_mod.autotune_log())
    check_against_ref(z, y, t, dtype, sample_weights=s, what=f"tuned B={B}, cached", **kw)
    assert len(kd_mod.autotune_log()) == n
