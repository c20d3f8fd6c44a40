"""Fused multi-exit cross-entropy + distillation loss (Triton), imported as ``imta_fast.kernels.multi_exit_kd``.

Plain-PyTorch twin and the loss definition: ``imta_fast.ops.losses.multi_exit_loss``.  Public entry point:
``imta_fast.ops.dispatch.multi_exit_loss(..., impl='triton')``.

Maths (per exit k, sample b, fp32; z = logits row, t = teacher row, y = label)::

    m = max_c z_c,  lse = log sum_c exp(z_c - m),  log p_c = z_c - m - lse
    q_c  = (1 - eps) [c == y] + eps / C                       (label-smoothed target)
    CE   = -sum_c q_c log p_c,                  dCE/dz_c = p_c - q_c
    log s_c = (z_c - m)/T - log sum_c exp((z_c - m)/T)       (student at temperature T)
    log r_c = (t_c - max t)/T - log sum_c exp((t_c - max t)/T)     (teacher, constant)
    KD   = T^2 sum_c r_c (log r_c - log s_c)   ['kl']   or   -T^2 sum_c r_c log s_c   ['soft_ce']
    dKD/dz_c = T (s_c - r_c)                                  (the same for both forms)

    row loss  = s_bk [ a_ce_k / N * CE + a_kd_k / D * KD ],   D = B ('batchmean') or B*C ('mean')
    row grad  = s_bk [ a_ce_k / N * (p - q) + a_kd_k * T / D * (s - r) ]

with N the number of rows whose label is not ``ignore_index`` (N = B when none is); ignored rows have
no CE term and no CE gradient.

Per-exit ``(a_ce_k, a_kd_k) = (w_k (1-g_k), w_k g_k)`` come from ``exit_coef``.  One program owns a tile of
``BLOCK_B`` samples and loops over the K exits, so the teacher statistics are computed once per
sample; or, with ``EXIT_SPLIT`` (small B: too few row tiles to fill the GPU), K programs per tile take
one exit each and each recomputes the tile's teacher statistics (K reads of the teacher instead of one,
K - 1 of them L2 hits: a tile's K programs are adjacent in the grid).  When a row fits in one
``BLOCK_C`` chunk (C <= 4096 on GPU: C = 10/100/1000) the row is read once and kept in registers;
otherwise an online-softmax pass (running max, rescaled sums) is followed by a second pass that writes
the gradient.  The loss terms are accumulated element-wise in the log domain (no ``sum(p z) - m``
cancellation), so logits of magnitude 1e4 are safe; softmax probabilities are exponentials times a
per-row reciprocal (no per-element division).  When C and the row strides are multiples of 16 bytes'
worth of elements (C = 1000 in bf16), an ``ALIGN`` hint gives 16-byte vector loads and stores.

Launch configuration (tile, warps, exit split): a heuristic (8 elements per thread, <= 1024-element
tiles below C = 4096, exit split under 512 row tiles) and, on a GPU, up to 3 alternatives
(:func:`candidate_configs`).  The first call per (B, C, K, dtype, teacher, sample weights, gradient,
alignment) times each candidate with CUDA events and keeps the fastest in a dict; later calls are one
lookup.  ``IMTA_FAST_KERNEL_AUTOTUNE=0`` switches the timing off (the heuristic, or a winner already
cached); tracing (``torch.compile``), CUDA graph capture, dispatch modes and the interpreter never
time.  Registers / spills / blocks per SM at sm_90a per candidate: ``python -m
benchmarks.kernel_registers`` (benchmarks/NOTES.md "Kernels").

Exits: up to 8 exit tensors per launch as separate pointer arguments (``z0 .. z7``, ``K`` a compile-time
constant, the loop over exits unrolled), so a list of heads' outputs is never stacked; more exits go in
groups of 8 (the teacher is then re-read once per group).  A [K, B, C] tensor is passed as its K views.

Ignored rows (``target == ignore_index``, default -100): no CE and no CE gradient, and CE's mean is over
the rows not ignored (``F.cross_entropy``); KD still applies to them.  The count of those rows is made in
the kernel for B <= 1024 when all programs together read at most 2**20 targets (each program reads the
B targets, L2 hits) or else by one ATen reduction on [B].

Autograd, eager (``_FusedMultiExitLoss``, a plain ``autograd.Function``: the ``torch.library`` wrapper's
host cost dominates a host-bound step): the forward writes ``d(loss)/d(logits)`` into one [K, B, C]
buffer (in the logits dtype; fp32 for fp16 logits so that a GradScaler's scale, applied afterwards,
cannot meet underflowed values), ``set_materialize_grads(False)``; the backward multiplies it in place
by ``grad_output`` on the device (:func:`scale_grad`: fp32 multiply, one rounding; a program whose
``grad_output`` is exactly 1 -- a plain ``loss.backward()`` -- returns without touching the buffer) and
returns views of it as the exits' gradients.  One backward per forward.  Byte counts per design:
benchmarks/NOTES.md "Kernels".  No host synchronisation anywhere (T, eps are runtime float arguments,
per-exit weights a small cached device tensor).

Registration (``torch.compile`` and dispatch modes): ``torch.ops.imta_fast.multi_exit_kd`` (a [K, B, C]
tensor) is a ``torch.library.triton_op`` (inductor sees the kernel) when available and Triton runs on a
GPU; in Triton's interpreter (no GPU, or ``TRITON_INTERPRET=1``: the CPU tests) or on torch without
``triton_op`` it is an opaque ``torch.library.custom_op``, because ``wrap_triton`` cannot trace an
interpreted kernel.  Both have ``register_fake`` and ``register_autograd``, so
``torch.compile(fullgraph=True)`` has no graph break either way.  ``multi_exit_kd_exits`` (K tensors),
``multi_exit_kd_grad_scale_`` and ``multi_exit_kd_grad_cast`` are what the eager path calls under a
dispatch mode (``FlopCounterMode``, an op trace), which therefore sees the fused work as these ops; a
FLOP formula is registered for both forward ops.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _get_current_dispatch_mode

from imta_fast.kernels._runtime import INTERPRET, USES_TRITON_OP, jit

__all__ = ["multi_exit_kd", "multi_exit_kd_exits", "multi_exit_kd_forward", "fused_multi_exit_loss", "scale_grad",
           "multi_exit_kd_flops", "block_sizes", "launch_config", "LaunchConfig", "candidate_configs", "autotune_log",
           "clear_autotune_cache", "AUTOTUNE_ENV", "INTERPRET", "USES_TRITON_OP"]

# Finite stand-in for -inf on padded columns: exp() of it is 0 and 0 * it is 0 (no inf - inf = nan).
_NEG = tl.constexpr(-1.0e30)
# Row reductions through the builtin tl.reduce with the combine functions tl.sum / tl.max use (the
# interpreter maps these two to numpy sum / max); own equivalents should a Triton version lack them.
_SUM = getattr(tl.standard, "_sum_combine", None)
_MAX = getattr(tl.standard, "_elementwise_max", None)
if _SUM is None or _MAX is None:  # pragma: no cover - not in Triton 3.x

    @jit
    def _SUM(a, b):
        return a + b

    @jit
    def _MAX(a, b):
        return tl.maximum(a, b)


@jit
def _multi_exit_kd_kernel(
    z0, z1, z2, z3, z4, z5, z6, z7,  # the K <= 8 exits' logits [B, C] (separate tensors; unused = z0)
    stride_zb, stride_zc,  # their common strides
    y_ptr, stride_y, ignore_index,  # target [B]; rows equal to ignore_index get no CE
    n_ptr,  # int64 scalar: number of rows not ignored (CE's denominator, read on device; unless COUNT_ROWS)
    t_ptr, stride_tb, stride_tc,  # teacher logits [B, C] (dummy when HAS_TEACHER is False)
    s_ptr, stride_sb, stride_sk,  # sample weights [B, K] (dummy when HAS_SW is False)
    coef_ptr,  # [K, 2] fp32: (w_k (1 - g_k), w_k g_k)
    loss_ptr,  # [K, B] fp32 out: weighted per-row loss
    g_ptr, stride_gk, stride_gb,  # grad [K, B, C] out, unit stride over C
    B, C,
    inv_D, inv_C, T, inv_T, eps,
    K: tl.constexpr, COUNT_ROWS: tl.constexpr, COUNT_BLOCK: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_SW: tl.constexpr, SOFT_CE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    SINGLE_TILE: tl.constexpr, ALIGN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    EXIT_SPLIT: tl.constexpr,
):
    # Grid: one program per row tile, looping over the K exits; with EXIT_SPLIT, K programs per row tile
    # (program tile * K + k handles exit k alone and computes its rows' teacher statistics itself).  The
    # exit is the fast index so that a tile's K programs run together and K - 1 of the teacher reads hit L2.
    if EXIT_SPLIT:
        tile = tl.program_id(0) // K
        k_prog = tl.program_id(0) % K
    else:
        tile = tl.program_id(0)
    rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    zero_rows = tl.full([BLOCK_B], 0.0, tl.float32)
    # ALIGN divides C and every row stride (host-checked): with the hints below the compiler can use
    # 16-byte vector loads/stores (C = 1000 bf16 -> 8 per access); the column mask is written as
    # cols // ALIGN < C // ALIGN (equal to cols < C) so that it is constant over each vector.
    C_div = C // ALIGN
    y = tl.load(y_ptr + rows64 * stride_y, mask=row_mask, other=0)
    valid = y != ignore_index  # F.cross_entropy: an ignored row adds 0 to CE and leaves its mean
    y = y.to(tl.int32)
    if COUNT_ROWS:  # small B: every program counts the B targets itself (an L2 read, no extra launch)
        nv = tl.full([COUNT_BLOCK], 0, tl.int32)
        for b0 in range(0, B, COUNT_BLOCK):
            bb = b0 + tl.arange(0, COUNT_BLOCK)
            yy = tl.load(y_ptr + bb.to(tl.int64) * stride_y, mask=bb < B, other=ignore_index)
            nv += (yy != ignore_index).to(tl.int32)
        n_rows = tl.reduce(nv, 0, _SUM)
    else:
        n_rows = tl.load(n_ptr)
    inv_N = 1.0 / n_rows.to(tl.float32)  # all rows ignored: inf, so CE = 0 * inf = NaN as PyTorch
    q_off = eps * inv_C  # label-smoothing mass on every class
    q_on = 1.0 - eps + q_off  # ... and on the true class
    t_row = t_ptr + tl.multiple_of(rows64 * stride_tb, ALIGN)[:, None]

    # ---- teacher: log r = (t - max t)/T - log sum exp((t - max t)/T), once per program for its exits.
    # The max is subtracted before scaling by 1/T and log-sum kept apart from it: with |t| ~ 1e4 the
    # rounding of t/T or of (max + log sum) alone would perturb r by ~1e-4 relative.
    if HAS_TEACHER:
        if SINGLE_TILE:
            cmask = (cols // ALIGN) < C_div
            tt = tl.load(t_row + cols[None, :] * stride_tc, mask=row_mask[:, None] & cmask[None, :], other=0.0)
            tt = tl.where(cmask[None, :], tt.to(tl.float32), _NEG)
            ts = (tt - tl.reduce(tt, 1, _MAX)[:, None]) * inv_T
            lpt_tile = ts - tl.log(tl.reduce(tl.exp(ts), 1, _SUM))[:, None]
        else:
            mt = zero_rows + _NEG
            st = zero_rows
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + cols
                cmask = (cc // ALIGN) < C_div
                tt = tl.load(t_row + cc[None, :] * stride_tc, mask=row_mask[:, None] & cmask[None, :], other=0.0)
                tt = tl.where(cmask[None, :], tt.to(tl.float32), _NEG)
                m_new = tl.maximum(mt, tl.reduce(tt, 1, _MAX))
                st = st * tl.exp((mt - m_new) * inv_T) + tl.reduce(tl.exp((tt - m_new[:, None]) * inv_T), 1, _SUM)
                mt = m_new
            log_st = tl.log(st)

    for k in tl.static_range(K):  # unrolled: exit k's pointer is chosen at compile time
        if EXIT_SPLIT:
            mine = k_prog == k  # one exit per program: a uniform branch skips the other K - 1 bodies
        else:
            mine = True  # folded away
        if mine:
            z_base = (z0, z1, z2, z3, z4, z5, z6, z7)[k]
            k64 = tl.full([], k, tl.int64)  # int64: k * stride_gk may exceed 2**31
            a_ce = tl.load(coef_ptr + 2 * k)
            a_kd = tl.load(coef_ptr + 2 * k + 1)
            if HAS_SW:
                sw = tl.load(s_ptr + rows64 * stride_sb + k64 * stride_sk, mask=row_mask, other=0.0).to(tl.float32)
            else:
                sw = zero_rows + 1.0
            c_ce = sw * (a_ce * inv_N)  # per-row coefficient of CE and of (p - q)
            c_ce_g = tl.where(valid, c_ce, 0.0)  # ... of (p - q): an ignored row gets no CE gradient
            c_kd = sw * (a_kd * inv_D)  # per-row coefficient of KD; (s - r) gets c_kd * T
            z_k = z_base + tl.multiple_of(rows64 * stride_zb, ALIGN)[:, None]
            # Hints on operands that survive constant folding: a hint on k * stride_gk (+ row offset) went
            # with the multiply when k = 0 folded it away, and exit 0's gradient was then stored one element
            # at a time.  tl.cast, not .to: a launch passes a stride equal to 1 as a constant.
            g_k = ((g_ptr + k64 * tl.multiple_of(tl.cast(stride_gk, tl.int64), ALIGN))
                   + tl.multiple_of(rows64 * stride_gb, ALIGN)[:, None])

            if SINGLE_TILE:
                cmask_k = (cols // ALIGN) < C_div
                mask2 = row_mask[:, None] & cmask_k[None, :]
                z = tl.load(z_k + cols[None, :] * stride_zc, mask=mask2, other=0.0)
                z = tl.where(cmask_k[None, :], z.to(tl.float32), _NEG)
                zs = z - tl.reduce(z, 1, _MAX)[:, None]
                e = tl.exp(zs)
                d = tl.reduce(e, 1, _SUM)
                lp = zs - tl.log(d)[:, None]
                q = tl.where(cols[None, :] == y[:, None], q_on, q_off)
                ce = tl.where(valid, tl.reduce(tl.where(cmask_k[None, :], -q * lp, 0.0), 1, _SUM), 0.0)
                grad = c_ce_g[:, None] * (e * (1.0 / d)[:, None] - q)
                row_loss = c_ce * ce
                if HAS_TEACHER:
                    zt = zs * inv_T
                    et_s = tl.exp(zt)
                    d_s = tl.reduce(et_s, 1, _SUM)
                    lps = zt - tl.log(d_s)[:, None]
                    # r, formed here rather than kept beside log r from the teacher pass: with EXIT_SPLIT it is
                    # not live through the student's reductions; unrolled exits share one exp (CSE)
                    pt = tl.exp(lpt_tile)
                    if SOFT_CE:
                        kd_el = -pt * lps
                    else:
                        kd_el = pt * (lpt_tile - lps)
                    kd = tl.reduce(tl.where(cmask_k[None, :], kd_el, 0.0), 1, _SUM) * (T * T)
                    grad += (c_kd * T)[:, None] * (et_s * (1.0 / d_s)[:, None] - pt)
                    row_loss += c_kd * kd
                if WRITE_GRAD:
                    tl.store(g_k + cols[None, :], grad.to(g_ptr.dtype.element_ty), mask=mask2)
            else:
                # pass 1: online max and the two softmax normalisers (T = 1 and T)
                m = zero_rows + _NEG
                d = zero_rows
                d_s = zero_rows
                for c0 in range(0, C, BLOCK_C):
                    cc_k = c0 + cols
                    cmask_k = (cc_k // ALIGN) < C_div
                    z = tl.load(z_k + cc_k[None, :] * stride_zc, mask=row_mask[:, None] & cmask_k[None, :], other=0.0)
                    z = tl.where(cmask_k[None, :], z.to(tl.float32), _NEG)
                    m_k = tl.maximum(m, tl.reduce(z, 1, _MAX))
                    zs = z - m_k[:, None]
                    d = d * tl.exp(m - m_k) + tl.reduce(tl.exp(zs), 1, _SUM)
                    if HAS_TEACHER:
                        d_s = d_s * tl.exp((m - m_k) * inv_T) + tl.reduce(tl.exp(zs * inv_T), 1, _SUM)
                    m = m_k
                lse = tl.log(d)
                if HAS_TEACHER:
                    lse_s = tl.log(d_s)
                # pass 2: loss terms element-wise in the log domain, gradient written chunk by chunk
                ce = zero_rows
                kd = zero_rows
                for c0 in range(0, C, BLOCK_C):
                    cc_k = c0 + cols
                    cmask_k = (cc_k // ALIGN) < C_div
                    mask2 = row_mask[:, None] & cmask_k[None, :]
                    z = tl.load(z_k + cc_k[None, :] * stride_zc, mask=mask2, other=0.0).to(tl.float32)
                    zs = z - m[:, None]
                    lp = zs - lse[:, None]
                    q = tl.where(cc_k[None, :] == y[:, None], q_on, q_off)
                    ce += tl.reduce(tl.where(cmask_k[None, :], -q * lp, 0.0), 1, _SUM)
                    grad = c_ce_g[:, None] * (tl.exp(lp) - q)
                    if HAS_TEACHER:
                        tk = tl.load(t_row + cc_k[None, :] * stride_tc, mask=mask2, other=0.0).to(tl.float32)
                        lpt = (tk - mt[:, None]) * inv_T - log_st[:, None]
                        pt = tl.exp(lpt)
                        lps = zs * inv_T - lse_s[:, None]
                        if SOFT_CE:
                            kd_el = -pt * lps
                        else:
                            kd_el = pt * (lpt - lps)
                        kd += tl.reduce(tl.where(cmask_k[None, :], kd_el, 0.0), 1, _SUM)
                        grad += (c_kd * T)[:, None] * (tl.exp(lps) - pt)
                    if WRITE_GRAD:
                        tl.store(g_k + cc_k[None, :], grad.to(g_ptr.dtype.element_ty), mask=mask2)
                row_loss = c_ce * tl.where(valid, ce, 0.0)
                if HAS_TEACHER:
                    row_loss += c_kd * (kd * (T * T))
            tl.store(loss_ptr + k64 * B + rows64, row_loss, mask=row_mask)


@jit
def _grad_scale_kernel(g_ptr, out_ptr, go_ptr, stride_go, N, SKIP_ONES: tl.constexpr, BLOCK: tl.constexpr):
    """Backward: ``out[k] = go[k] * g[k]`` (fp32 multiply, one rounding) over exit k's ``N = B*C`` elements.

    ``SKIP_ONES`` (in place, ``out is g``): a program whose upstream gradient is exactly 1 -- the plain
    ``loss.backward()`` of a training step -- returns after reading that one scalar, so the common step
    moves no [K, B, C] bytes here.  ``go`` is read on the device: never a host sync."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    go = tl.load(go_ptr + k * stride_go).to(tl.float32)
    offs = k.to(tl.int64) * N + pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < (k.to(tl.int64) + 1) * N
    if SKIP_ONES:
        if go != 1.0:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, (g * go).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (g * go).to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch configurations
MAX_EXITS_PER_LAUNCH = 8  # exits handled by one launch (pointer arguments z0..z7); more -> groups of 8
COUNT_IN_KERNEL_MAX_B = 1024  # up to this batch the kernel may count the rows not ignored itself ...
COUNT_IN_KERNEL_MAX_READS = 1 << 20  # ... as long as all its programs together read <= this many targets
SPLIT_BELOW_TILES = 512  # GPU heuristic: fewer row tiles than this -> one program per (row tile, exit)
AUTOTUNE_ENV = "IMTA_FAST_KERNEL_AUTOTUNE"  # "0"/off/false/no: time no candidates (heuristic, or a cached winner)
MAX_CANDIDATES = 4
_TUNE_REPS = 25  # timed launches per candidate (median), after one untimed launch (compile, warm-up)
_FLUSH_BYTES = 256 << 20  # zeroed before each timed launch (as triton.testing.do_bench): > L2, and ~60 us of
# GPU work that covers the Python launch latency of the next launch
_OVERRIDE: dict = {}  # test hooks: "block_b" / "block_c" (block_sizes), "config" (launch_config)
_TUNED: dict = {}  # tuning key -> the winning (LaunchConfig, number of programs) (GPU, per process)
_TUNE_LOG: dict = {}  # tuning key -> ((candidate, median ms), ...) as measured


class LaunchConfig(NamedTuple):
    """One launch configuration of the fused kernel: a ``block_b x block_c`` tile per program,
    ``num_warps``, and whether each program handles one exit (``exit_split``: K programs per row tile,
    each computing the tile's teacher statistics itself) or loops over all K."""

    block_b: int
    block_c: int
    num_warps: int
    exit_split: bool = False

    def __str__(self) -> str:
        return f"{self.block_b}x{self.block_c} w{self.num_warps}" + (" split" if self.exit_split else "")

    def programs(self, B: int, K: int) -> int:
        return -(-B // self.block_b) * (K if self.exit_split else 1)


@contextlib.contextmanager
def _override(**values) -> Iterator[None]:
    prev = dict(_OVERRIDE)
    _OVERRIDE.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(prev)


def block_sizes(block_b: Optional[int] = None, block_c: Optional[int] = None):
    """Force the tile shape (powers of two; one program per row tile, no tuning) for launches inside the
    block; tests use it to cover the multi-chunk path and to keep interpreter program counts low."""
    return _override(block_b=block_b, block_c=block_c)


def launch_config(config: LaunchConfig):
    """Launch with exactly ``config`` inside the block (no heuristic, no tuning): tests run every
    candidate of :func:`candidate_configs` through the kernel with it."""
    if not isinstance(config, LaunchConfig):
        raise TypeError(f"launch_config expects a LaunchConfig, got {type(config).__name__}")
    return _override(config=config)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _heuristic(B: int, C: int, K: int, on_gpu: bool) -> LaunchConfig:
    """The untuned configuration (and the first candidate).

    GPU: a row of up to 4096 classes stays in registers (one read of the logits), longer rows go in
    1024-wide chunks; small-C problems pack rows into tiles of <= 1024 elements while keeping >= ~256 row
    tiles; num_warps gives 8 elements (16 bytes of bf16) per thread.  From ptxas at sm_90a (``python -m
    benchmarks.kernel_registers``), K = 5 with a teacher: 1 x 1024 at 4 warps uses 72 registers (bf16 and
    fp32), no spills, 7 blocks (28 warps) per SM; the former 2 x 1024 tile at 8 warps 80 / 76, 3 blocks
    (24 warps); for C = 21841 1024-wide chunks at 4 warps 72 (7 blocks), the former 4096 at 16 warps 108
    (1 block).  With fewer than SPLIT_BELOW_TILES row tiles (B = 256: 256 tiles, 2 per SM on a 132-SM
    H100) each program takes one exit: K times the programs, the teacher re-read per exit (L2 hits: the
    K programs of a tile are adjacent).  Interpreter: one big tile, since each program instance costs ~ms
    of Python.
    """
    if on_gpu:
        block_c = min(_next_pow2(C), 4096) if C <= 4096 else 1024
        rows_fit = max(1, 1024 // block_c)
        rows_par = 1 << (max(1, B // 256).bit_length() - 1)  # largest power of two <= B / 256
        block_b = max(1, min(rows_fit, rows_par))
        num_warps = max(1, min(16, block_b * block_c // 256))
        return LaunchConfig(block_b, block_c, num_warps, K > 1 and -(-B // block_b) < SPLIT_BELOW_TILES)
    block_c = min(_next_pow2(C), 32768)
    return LaunchConfig(min(_next_pow2(B), max(1, (1 << 20) // block_c), 64), block_c, 4, False)


@functools.lru_cache(maxsize=512)
def _launch_candidates(B: int, C: int, K: int, on_gpu: bool, block_b_o: Optional[int], block_c_o: Optional[int],
                       forced: Optional[LaunchConfig]) -> Tuple[Tuple[LaunchConfig, int], ...]:
    """``(config, number of programs)`` pairs, cached per shape, device kind and test override.

    The heuristic first, then up to MAX_CANDIDATES - 1 alternatives (GPU only) that a tuner may pick:
    the other grid (exit split or not); for a row in registers the same tile at twice the warps (4
    elements per thread: fewer registers, 8-byte bf16 accesses; at 16 warps half the tile width instead)
    and twice the rows at twice the warps (the 2 x 1024 tile the heuristic used before); for chunked rows
    2048- and 4096-wide chunks at 16 warps (the latter the former default).  Every candidate of the
    shapes in benchmarks/kernel_registers.py compiles for sm_90a without spills (tested)."""
    if forced is not None:
        return ((forced, forced.programs(B, K)),)
    h = _heuristic(B, C, K, on_gpu)
    if block_b_o is not None or block_c_o is not None:
        bb = h.block_b if block_b_o is None else block_b_o
        bc = h.block_c if block_c_o is None else block_c_o
        h = LaunchConfig(bb, bc, max(4, min(16, bb * bc // 256)), False)
        return ((h, h.programs(B, K)),)
    if not on_gpu:
        return ((h, h.programs(B, K)),)
    alts = []
    if K > 1:
        alts.append(h._replace(exit_split=not h.exit_split))
    if C > h.block_c:  # chunked rows: wider chunks at 16 warps (4096: the default before tuning)
        alts += [h._replace(block_c=2048, num_warps=16), h._replace(block_c=4096, num_warps=16)]
    else:
        if h.block_b * h.block_c >= 64 * h.num_warps:  # 4 elements per thread: fewer registers, 8-byte accesses
            alts.append(h._replace(num_warps=2 * h.num_warps) if h.num_warps < 16 else h._replace(block_c=h.block_c // 2))
        if h.block_b * h.block_c <= 2048 and 2 * h.block_b <= _next_pow2(B):  # two rows per tile, 8 per thread
            alts.append(h._replace(block_b=2 * h.block_b, num_warps=min(16, 2 * h.num_warps)))
    out = [h]
    for a in alts:
        if a not in out:
            out.append(a)
    return tuple((c, c.programs(B, K)) for c in out[:MAX_CANDIDATES])


def candidate_configs(B: int, C: int, K: int, on_gpu: bool = True) -> Tuple[LaunchConfig, ...]:
    """The launch configurations tried for a problem of this shape (the first is the heuristic's); the
    same for every dtype, so tuning keys carry the dtype but the candidate list does not."""
    return tuple(c for c, _ in _launch_candidates(int(B), int(C), int(K), bool(on_gpu), None, None, None))


def _autotune_enabled() -> bool:
    """Read on each untuned key only (not per call), so it can be switched within a process."""
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def _may_time(traceable: bool) -> bool:
    """Timing candidates is sound only in a plain eager call: not while tracing (``torch.compile`` bakes
    the configuration into its graph), not while a CUDA graph is captured, not under a dispatch mode
    (which would see the timing launches and the L2-flush buffer), and not when switched off."""
    if traceable or not _autotune_enabled():
        return False
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _time_launch(launch, config: LaunchConfig) -> float:
    """Median device time in ms of ``launch(config)`` from CUDA events.  The kernel writes only its
    outputs, so re-running it is harmless.  The first launch compiles; before each timed one a buffer
    larger than L2 is zeroed, so the kernel reads cold data, and the events are queued behind GPU work
    that hides the Python launch latency from them (otherwise a small B would time the host, not the
    kernel).  The buffer goes back to PyTorch's caching allocator afterwards."""
    launch(config)
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(_TUNE_REPS)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(_TUNE_REPS)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        launch(config)
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def _tune(key: tuple, plans: Tuple[Tuple[LaunchConfig, int], ...], launch) -> Tuple[LaunchConfig, int]:
    """Time every candidate ``(config, programs)`` once per key and process (``launch(config)`` runs one),
    keep the fastest.  A candidate other than the heuristic that fails to compile or launch (e.g. out of
    resources on this GPU) loses with a warning; a failing heuristic raises as an untuned launch would."""
    times = []
    for i, (cfg, _) in enumerate(plans):
        try:
            times.append(_time_launch(launch, cfg))
        except Exception as exc:  # noqa: BLE001 - any compile/launch error disqualifies the candidate
            if i == 0:
                raise
            warnings.warn(f"multi_exit_kd autotune: candidate {cfg} failed ({type(exc).__name__}: {exc}); skipped")
            times.append(float("inf"))
    best = plans[min(range(len(plans)), key=times.__getitem__)]
    _TUNED[key] = best
    _TUNE_LOG[key] = tuple((cfg, ms) for (cfg, _), ms in zip(plans, times))
    return best


def autotune_log() -> List[dict]:
    """What the tuner measured in this process, one record per key: the problem, the heuristic's and the
    chosen configuration (as strings) and each candidate's median time in ms (``inf``: failed)."""
    out = []
    for key, timed in _TUNE_LOG.items():
        B, C, K, dtype, mixed, has_t, has_sw, write_grad, align = key
        out.append(dict(B=B, C=C, K=K, dtype=str(dtype).replace("torch.", ""), mixed_dtypes=mixed, teacher=has_t,
                        sample_weights=has_sw, write_grad=write_grad, align=align, heuristic=str(timed[0][0]),
                        chosen=str(_TUNED[key][0]), times_ms={str(c): round(t, 5) for c, t in timed}))
    return out


def clear_autotune_cache() -> None:
    """Forget every tuned configuration (the next call per key tunes again)."""
    _TUNED.clear()
    _TUNE_LOG.clear()


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Saved-gradient dtype: the logits' own (Liger), except fp16, whose gradient is kept in fp32.
    The gradient is formed before the upstream scale is applied, so an fp16 GradScaler's loss scale
    would come too late: entries ~ gamma / (B C) (KD with 'mean') would underflow in fp16."""
    return torch.float32 if dtype == torch.float16 else dtype


def _common_strides(exits):
    """The exits as [B, C] tensors sharing one (row, column) stride pair: views of a [K, B, C] tensor and
    the heads' contiguous outputs already do; an odd one out is made contiguous (a copy of that exit)."""
    s0 = exits[0].stride()
    if all(e.stride() == s0 for e in exits):
        return exits
    return tuple(e.contiguous() for e in exits)


def _run(kernel, grid, traceable: bool, *args, **kwargs) -> None:
    """The one place a kernel is launched (tests replace it to stub launches out or to mark them)."""
    (torch.library.wrap_triton(kernel) if traceable else kernel)[grid](*args, **kwargs)


def multi_exit_kd_forward(
    logits, target: torch.Tensor, teacher: Optional[torch.Tensor],
    sample_weights: Optional[torch.Tensor], exit_coef: torch.Tensor, temperature: float,
    label_smoothing: float, kl_batchmean: bool, soft_ce: bool, write_grad: bool, ignore_index: int = -100, *,
    traceable: bool = False, check: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on ``logits`` (a [K, B, C] tensor or K tensors [B, C], never stacked).

    Returns ``(row_loss [K, B] fp32, grad [K, B, C])``: ``grad`` is d(sum row_loss)/d(logits), in the
    logits dtype (fp32 for fp16 or mixed fp16/fp32), one buffer; an empty tensor when ``write_grad`` is False.
    ``check=False`` skips the ``exit_coef`` validation (the dispatch layer built it).

    Launch configuration: on a GPU the first call per (B, C, K, dtype, teacher, sample weights, gradient,
    alignment) times the candidates of :func:`candidate_configs` and keeps the fastest (one dict lookup
    afterwards); without tuning (``IMTA_FAST_KERNEL_AUTOTUNE=0``, tracing, CUDA graph capture, dispatch
    modes, the interpreter) the heuristic's, or a winner already cached.
    """
    exits = tuple(logits.unbind(0)) if isinstance(logits, torch.Tensor) else tuple(logits)
    K = len(exits)
    z0 = exits[0]
    B, C = (int(n) for n in z0.shape)  # int(): specialise symbolic sizes when traced
    if check and (exit_coef.shape != (K, 2) or exit_coef.dtype != torch.float32 or not exit_coef.is_contiguous()):
        raise ValueError(f"exit_coef must be a contiguous float32 [K, 2] = [{K}, 2] tensor of (w_k (1 - g_k), "
                         f"w_k g_k), got {exit_coef.dtype} {tuple(exit_coef.shape)}")
    zstride = z0.stride()
    dtype = z0.dtype
    mixed = False
    for e in exits:
        if e.stride() != zstride:
            exits = _common_strides(exits)
            z0, zstride = exits[0], exits[0].stride()
            break
    for e in exits:
        if e.dtype != dtype:
            mixed = True
            dtype = torch.promote_types(dtype, e.dtype)
    device = z0.device
    row_loss = torch.empty((K, B), dtype=torch.float32, device=device)
    grad = torch.empty((K, B, C) if write_grad else (0,), dtype=_grad_dtype(dtype), device=device)
    has_t = teacher is not None
    has_sw = sample_weights is not None
    t = teacher if has_t else z0  # dummy pointers, never read
    on_gpu = z0.is_cuda and not INTERPRET
    g_strides = (B * C, C) if write_grad else (0, 0)
    tstride = t.stride() if has_t else (0, 0)
    align = _row_alignment_cached(zstride, tstride if has_t else None, C, g_strides,
                                  min(e.element_size() for e in exits) if mixed else z0.element_size())
    counted = []  # the ATen count of rows not ignored: made once, and only if a configuration needs it

    def launch(cfg: LaunchConfig, n_prog: int, grp, coef, sw, loss_g, grad_g, Kg: int) -> None:
        count_rows = B <= COUNT_IN_KERNEL_MAX_B and B * n_prog <= COUNT_IN_KERNEL_MAX_READS
        if not count_rows and not counted:
            counted.append((target != ignore_index).sum())  # CE's denominator, on the device
        _run(_multi_exit_kd_kernel, (n_prog,), traceable,
             *grp, zstride[0], zstride[1],
             target, target.stride(0), int(ignore_index), target if count_rows else counted[0],
             t, tstride[0], tstride[1],
             sw, sw.stride(0) if has_sw else 0, sw.stride(1) if has_sw else 0,
             coef, loss_g, grad_g, g_strides[0], g_strides[1],
             B, C,
             1.0 / B if kl_batchmean else 1.0 / (B * C), 1.0 / C,
             float(temperature), 1.0 / float(temperature), float(label_smoothing),
             K=Kg, COUNT_ROWS=count_rows, COUNT_BLOCK=min(_next_pow2(B), 1024),
             HAS_TEACHER=has_t, HAS_SW=has_sw, SOFT_CE=soft_ce, WRITE_GRAD=write_grad,
             SINGLE_TILE=C <= cfg.block_c, ALIGN=align, BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c,
             EXIT_SPLIT=cfg.exit_split, num_warps=cfg.num_warps)

    for g0 in range(0, K, MAX_EXITS_PER_LAUNCH):  # one launch for K <= 8
        g1 = min(K, g0 + MAX_EXITS_PER_LAUNCH)
        Kg = g1 - g0
        grp = exits[g0:g1] + (z0,) * (MAX_EXITS_PER_LAUNCH - Kg)
        whole = g0 == 0 and g1 == K  # no slicing views in the common case
        coef = exit_coef if whole else exit_coef[g0:g1]
        sw = (sample_weights if whole else sample_weights[:, g0:g1]) if has_sw else exit_coef
        loss_g = row_loss if whole else row_loss[g0:g1]
        grad_g = grad if (whole or not write_grad) else grad[g0:g1]
        ov = _OVERRIDE
        plans = (_launch_candidates(B, C, Kg, on_gpu, ov.get("block_b"), ov.get("block_c"), ov.get("config")) if ov
                 else _launch_candidates(B, C, Kg, on_gpu, None, None, None))
        plan = plans[0]
        if len(plans) > 1:
            key = (B, C, Kg, dtype, mixed, has_t, has_sw, write_grad, align)
            tuned = _TUNED.get(key)
            if tuned is not None:
                plan = tuned
            elif _may_time(traceable):
                plan = _tune(key, plans, lambda c: launch(c, c.programs(B, Kg), grp, coef, sw, loss_g, grad_g, Kg))
        launch(*plan, grp, coef, sw, loss_g, grad_g, Kg)
    return row_loss, grad


@functools.lru_cache(maxsize=1024)
def _row_alignment_cached(zstride, tstride, C: int, g_strides, min_itemsize: int) -> int:
    """Largest power of two (<= 16 bytes of the narrowest logits dtype) dividing C and every row stride,
    or 1 when a class dimension is strided.  Passed as a constexpr hint for vectorised row accesses."""
    if zstride[1] != 1 or (tstride is not None and tstride[1] != 1):
        return 1
    vals = [C, zstride[0], *g_strides] + ([tstride[0]] if tstride is not None else [])
    align = max(1, 16 // min_itemsize)
    while align > 1 and any(v % align for v in vals):
        align //= 2
    return align


@functools.lru_cache(maxsize=1024)
def _scale_config(K: int, N: int, on_gpu: bool) -> Tuple[Tuple[int, int], int, int]:
    block = 4096 if on_gpu else min(_next_pow2(N), 1 << 20)
    return (-(-N // block), K), block, 8 if block >= 4096 else 4


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``grad * grad_output`` per exit (``grad_output``: a scalar or [K]) in fp32, rounded once to
    ``out_dtype``.  In place when ``out_dtype`` is the saved gradient's dtype (then a program with
    ``grad_output == 1`` touches nothing); out of place otherwise (fp16 logits, fp32 saved gradient)."""
    K = grad.shape[0]
    N = grad.numel() // max(K, 1)
    in_place = out_dtype == grad.dtype
    out = grad if in_place else torch.empty(grad.shape, dtype=out_dtype, device=grad.device)
    if N == 0:
        return out
    grid, block, num_warps = _scale_config(K, N, grad.is_cuda and not INTERPRET)
    _run(_grad_scale_kernel, grid, False, grad, out, grad_output, 0 if grad_output.dim() == 0 else
         grad_output.stride(0), N, SKIP_ONES=in_place, BLOCK=block, num_warps=num_warps)
    return out


# ----------------------------------------------------------------------------- eager autograd (lean path)
def _dispatch_mode_active() -> bool:
    return _get_current_dispatch_mode() is not None


class _FusedMultiExitLoss(torch.autograd.Function):
    """Eager forward + backward without the ``torch.library`` wrapper (its host cost dominates a
    host-bound step).  Forward: one kernel launch (2K+1 units of [B, C] traffic), the gradient kept in one
    [K, B, C] buffer.  Backward: :func:`scale_grad` in place (0 units when ``grad_output == 1``), the
    exits' gradients are views of that buffer.  Only the logits are tensor arguments of ``apply`` (the
    rest, never differentiated, rides in ``spec``: fewer arguments for autograd to inspect).  Under a
    dispatch mode (``FlopCounterMode``, an op trace) the same work goes through the registered ops so
    that the mode sees them."""

    @staticmethod
    def forward(ctx, spec, *logits):
        target, teacher, sw, coef, (T, eps, bm, soft, ignore_index), write_grad, per_exit_out = spec
        stacked = len(logits) == 1 and logits[0].dim() == 3
        exits = logits[0] if stacked else logits
        if _dispatch_mode_active():
            op = torch.ops.imta_fast.multi_exit_kd if stacked else torch.ops.imta_fast.multi_exit_kd_exits
            row_loss, grad = op(exits if stacked else list(exits), target, teacher, sw, coef, T, eps, bm, soft,
                                write_grad, ignore_index)
        else:
            row_loss, grad = multi_exit_kd_forward(exits, target, teacher, sw, coef, T, eps, bm, soft, write_grad,
                                                   ignore_index, check=False)
        ctx.set_materialize_grads(False)
        ctx.grad = grad if write_grad else None
        ctx.wrote_grad = write_grad
        ctx.n_inputs = len(logits)
        ctx.stacked = stacked
        # the returned gradient's dtype: the logits' (in place unless fp16); mixed exits: the buffer's
        # (autograd then casts each exit's view to that exit's dtype)
        ctx.out_dtype = logits[0].dtype
        for e in logits:
            if e.dtype != ctx.out_dtype:
                ctx.out_dtype = grad.dtype
                break
        return row_loss.sum(1) if per_exit_out else row_loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None:
            return (None,) * (1 + ctx.n_inputs)
        grad = ctx.grad
        if grad is None:
            if ctx.wrote_grad:
                raise RuntimeError("the fused multi-exit loss (impl='triton') supports one backward per forward "
                                   "(retain_graph / double backward: use impl='torch')")
            return (None,) * (1 + ctx.n_inputs)
        ctx.grad = None  # the buffer becomes the returned gradient (and is freed with it)
        if _dispatch_mode_active():
            if ctx.out_dtype == grad.dtype:
                torch.ops.imta_fast.multi_exit_kd_grad_scale_(grad, grad_output)
                out = grad
            else:
                out = torch.ops.imta_fast.multi_exit_kd_grad_cast(grad, grad_output, ctx.out_dtype)
        else:
            out = scale_grad(grad, grad_output, ctx.out_dtype)
        return (None, out) if ctx.stacked else (None, *out.unbind(0))


def fused_multi_exit_loss(logits, target, teacher, sample_weights, exit_coef, opts, per_exit_out: bool):
    """Eager entry point used by ``imta_fast.ops.dispatch``: ``logits`` is ``(z,)`` with z [K, B, C] or the
    K exit tensors; ``opts = (T, eps, kl_batchmean, soft_ce, ignore_index)``.  Returns the summed loss,
    or the [K] per-exit terms when ``per_exit_out``."""
    write_grad = False
    if torch.is_grad_enabled():
        for z in logits:
            if z.requires_grad:
                write_grad = True
                break
    spec = (target, teacher, sample_weights, exit_coef, opts, write_grad, per_exit_out)
    return _FusedMultiExitLoss.apply(spec, *logits)


# ----------------------------------------------------------------------------- op registration (compile, modes)
_OP_NAME = "imta_fast::multi_exit_kd"


def _op_impl(logits: torch.Tensor, target: torch.Tensor, teacher: Optional[torch.Tensor],
             sample_weights: Optional[torch.Tensor], exit_coef: torch.Tensor, temperature: float,
             label_smoothing: float, kl_batchmean: bool, soft_ce: bool,
             write_grad: bool, ignore_index: int = -100) -> Tuple[torch.Tensor, torch.Tensor]:
    return multi_exit_kd_forward(logits, target, teacher, sample_weights, exit_coef, temperature,
                                 label_smoothing, kl_batchmean, soft_ce, write_grad, ignore_index,
                                 traceable=USES_TRITON_OP)


if USES_TRITON_OP:
    multi_exit_kd = torch.library.triton_op(_OP_NAME, mutates_args=())(_op_impl)
else:
    multi_exit_kd = torch.library.custom_op(_OP_NAME, mutates_args=())(_op_impl)


@multi_exit_kd.register_fake
def _(logits, target, teacher, sample_weights, exit_coef, temperature, label_smoothing, kl_batchmean,
      soft_ce, write_grad, ignore_index=-100):
    K, B, C = logits.shape
    row_loss = logits.new_empty((K, B), dtype=torch.float32)
    grad = logits.new_empty((K, B, C) if write_grad else (0,), dtype=_grad_dtype(logits.dtype))
    return row_loss, grad


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])  # only the gradient is saved (not logits, not teacher)
    ctx.logits_dtype = inputs[0].dtype
    ctx.set_materialize_grads(False)  # the unused second output gets no zero [K, B, C] gradient


def _backward(ctx, grad_row_loss: Optional[torch.Tensor], _grad_grad: Optional[torch.Tensor]):
    nones = (None,) * 10
    if grad_row_loss is None:
        return (None,) + nones
    (grad,) = ctx.saved_tensors
    # d loss / d logits was formed in the forward; chain rule with the [K, B] upstream gradient, in fp32
    # and rounded once (inductor fuses this into one pass; never a host read of grad_row_loss).
    dlogits = (grad.float() * grad_row_loss.unsqueeze(-1).float()).to(ctx.logits_dtype)
    return (dlogits,) + nones


multi_exit_kd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("imta_fast::multi_exit_kd_exits", mutates_args=())
def multi_exit_kd_exits(logits: List[torch.Tensor], target: torch.Tensor, teacher: Optional[torch.Tensor],
                        sample_weights: Optional[torch.Tensor], exit_coef: torch.Tensor, temperature: float,
                        label_smoothing: float, kl_batchmean: bool, soft_ce: bool, write_grad: bool,
                        ignore_index: int = -100) -> Tuple[torch.Tensor, torch.Tensor]:
    """``multi_exit_kd`` on K separate exit tensors (the eager path's op under a dispatch mode)."""
    return multi_exit_kd_forward(logits, target, teacher, sample_weights, exit_coef, temperature,
                                 label_smoothing, kl_batchmean, soft_ce, write_grad, ignore_index)


@multi_exit_kd_exits.register_fake
def _(logits, target, teacher, sample_weights, exit_coef, temperature, label_smoothing, kl_batchmean,
      soft_ce, write_grad, ignore_index=-100):
    K, (B, C) = len(logits), logits[0].shape
    dtype = logits[0].dtype
    for e in logits[1:]:
        dtype = torch.promote_types(dtype, e.dtype)
    return (logits[0].new_empty((K, B), dtype=torch.float32),
            logits[0].new_empty((K, B, C) if write_grad else (0,), dtype=_grad_dtype(dtype)))


@torch.library.custom_op("imta_fast::multi_exit_kd_grad_scale_", mutates_args=("grad",))
def multi_exit_kd_grad_scale_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """In-place backward of the eager path: ``grad *= grad_output`` per exit (fp32, rounded once)."""
    scale_grad(grad, grad_output, grad.dtype)


@torch.library.custom_op("imta_fast::multi_exit_kd_grad_cast", mutates_args=())
def multi_exit_kd_grad_cast(grad: torch.Tensor, grad_output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Out-of-place backward (fp32 saved gradient of fp16 logits): ``(grad * grad_output).to(dtype)``."""
    return scale_grad(grad, grad_output, dtype)


@multi_exit_kd_grad_cast.register_fake
def _(grad, grad_output, dtype):
    return grad.new_empty(grad.shape, dtype=dtype)


# ----------------------------------------------------------------------------- FLOP formula
# Element-wise operations of the kernel per logit element (fp32), counted from the code above: CE
# (max, subtract, exp, sum, -q*log p multiply-add, gradient p - q and its scale) = 9; KD per student
# element (scale by 1/T, exp, sum, log-ratio, multiply-add, gradient s - r and its scale) = 10; the
# teacher's softmax once per element (max, subtract, scale, exp, sum, divide) = 6.  No matmul: this is an
# estimate of arithmetic for FlopCounterMode, not a roofline input (the op is bandwidth-bound).
FLOPS_PER_ELEMENT_CE, FLOPS_PER_ELEMENT_KD, FLOPS_PER_TEACHER_ELEMENT = 9, 10, 6


def multi_exit_kd_flops(K: int, B: int, C: int, has_teacher: bool) -> int:
    per = FLOPS_PER_ELEMENT_CE + (FLOPS_PER_ELEMENT_KD if has_teacher else 0)
    return K * B * C * per + (B * C * FLOPS_PER_TEACHER_ELEMENT if has_teacher else 0)


def _register_flops() -> None:
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.imta_fast.multi_exit_kd)
    def _stacked(logits_shape, target_shape, teacher_shape, *args, out_shape=None, **kwargs) -> int:
        K, B, C = logits_shape
        return multi_exit_kd_flops(K, B, C, teacher_shape is not None)

    @register_flop_formula(torch.ops.imta_fast.multi_exit_kd_exits)
    def _exits(logits_shapes, target_shape, teacher_shape, *args, out_shape=None, **kwargs) -> int:
        B, C = logits_shapes[0]
        return multi_exit_kd_flops(len(logits_shapes), B, C, teacher_shape is not None)


_register_flops()
