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

    row loss  = s_bk [ a_ce_k / B * CE + a_kd_k / D * KD ],   D = B ('batchmean') or B*C ('mean')
    row grad  = s_bk [ a_ce_k / B * (p - q) + a_kd_k * T / D * (s - r) ]

with ``(a_ce_k, a_kd_k) = (w_k (1-g_k), w_k g_k)`` from ``exit_coef``.  One program owns a tile of
``BLOCK_B`` samples and loops over the K exits, so the teacher statistics are computed once per
sample.  When a row fits in one ``BLOCK_C`` chunk (C <= 4096 on GPU: C = 10/100/1000) the row is read
once and kept in registers; otherwise an online-softmax pass (running max, rescaled sums) is followed
by a second pass that writes the gradient.  The loss terms are accumulated element-wise in the log
domain (no ``sum(p z) - m`` cancellation), so logits of magnitude 1e4 are safe.  When C and the row
strides are multiples of 16 bytes' worth of elements (C = 1000 in bf16), an ``ALIGN`` hint gives
16-byte vector loads and stores.

Liger-style autograd: the forward writes ``d(loss)/d(logits)`` (in the logits dtype; fp32 for fp16
logits so that a GradScaler's scale, applied afterwards, cannot meet underflowed values) and saves
only that; backward is ``grad * grad_output`` (a multiply, never a host read of ``grad_output``).  No host synchronisation
anywhere (T, eps are runtime float arguments, per-exit weights a small device tensor).

Registration: ``torch.ops.imta_fast.multi_exit_kd`` is a ``torch.library.triton_op`` (inductor sees
the kernel) when available and Triton runs on a GPU; in Triton's interpreter (no GPU, or
``TRITON_INTERPRET=1``: the CPU tests) or on torch without ``triton_op`` it is an opaque
``torch.library.custom_op``, because ``wrap_triton`` cannot trace an interpreted kernel.  Both have ``register_fake`` and ``register_autograd``, so
``torch.compile(fullgraph=True)`` has no graph break either way.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from imta_fast.kernels._runtime import INTERPRET, USES_TRITON_OP, jit

__all__ = ["multi_exit_kd", "multi_exit_kd_forward", "block_sizes", "INTERPRET", "USES_TRITON_OP"]

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
    z_ptr, stride_zk, stride_zb, stride_zc,  # student logits [K, B, C], any strides
    y_ptr, stride_y,  # target [B]
    t_ptr, stride_tb, stride_tc,  # teacher logits [B, C] (dummy when HAS_TEACHER is False)
    s_ptr, stride_sb, stride_sk,  # sample weights [B, K] (dummy when HAS_SW is False)
    coef_ptr,  # [K, 2] fp32: (w_k (1 - g_k), w_k g_k)
    loss_ptr,  # [K, B] fp32 out: weighted per-row loss
    g_ptr, stride_gk, stride_gb,  # grad [K, B, C] out, unit stride over C
    K, B, C,
    inv_B, inv_D, inv_C, T, inv_T, eps,
    HAS_TEACHER: tl.constexpr, HAS_SW: tl.constexpr, SOFT_CE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    SINGLE_TILE: tl.constexpr, ALIGN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    zero_rows = tl.full([BLOCK_B], 0.0, tl.float32)
    # ALIGN divides C and every row stride (host-checked): with the hints below the compiler can use
    # 16-byte vector loads/stores (C = 1000 bf16 -> 8 per access); the column mask is written as
    # cols // ALIGN < C // ALIGN (equal to cols < C) so that it is constant over each vector.
    C_div = C // ALIGN
    y = tl.load(y_ptr + rows64 * stride_y, mask=row_mask, other=0).to(tl.int32)
    q_off = eps * inv_C  # label-smoothing mass on every class
    q_on = 1.0 - eps + q_off  # ... and on the true class
    t_row = t_ptr + tl.multiple_of(rows64 * stride_tb, ALIGN)[:, None]

    # ---- teacher: log r = (t - max t)/T - log sum exp((t - max t)/T), once per sample for all K exits.
    # The max is subtracted before scaling by 1/T and log-sum kept apart from it: with |t| ~ 1e4 the
    # rounding of t/T or of (max + log sum) alone would perturb r by ~1e-4 relative.
    if HAS_TEACHER:
        if SINGLE_TILE:
            cmask = (cols // ALIGN) < C_div
            tt = tl.load(t_row + cols[None, :] * stride_tc, mask=row_mask[:, None] & cmask[None, :], other=0.0)
            tt = tl.where(cmask[None, :], tt.to(tl.float32), _NEG)
            ts = (tt - tl.reduce(tt, 1, _MAX)[:, None]) * inv_T
            et = tl.exp(ts)
            st = tl.reduce(et, 1, _SUM)
            lpt_tile = ts - tl.log(st)[:, None]
            pt_tile = et / st[:, None]
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

    for k in range(0, K):
        kk = tl.full([BLOCK_B], 0, tl.int64) + k  # int64: k * stride_zk may exceed 2**31
        a_ce = tl.load(coef_ptr + 2 * k)
        a_kd = tl.load(coef_ptr + 2 * k + 1)
        if HAS_SW:
            sw = tl.load(s_ptr + rows64 * stride_sb + kk * stride_sk, mask=row_mask, other=0.0).to(tl.float32)
        else:
            sw = zero_rows + 1.0
        c_ce = sw * (a_ce * inv_B)  # per-row coefficient of CE and of (p - q)
        c_kd = sw * (a_kd * inv_D)  # per-row coefficient of KD; (s - r) gets c_kd * T
        z_k = z_ptr + tl.multiple_of(kk * stride_zk + rows64 * stride_zb, ALIGN)[:, None]
        g_k = g_ptr + tl.multiple_of(kk * stride_gk + rows64 * stride_gb, ALIGN)[:, None]

        if SINGLE_TILE:
            cmask = (cols // ALIGN) < C_div
            mask2 = row_mask[:, None] & cmask[None, :]
            z = tl.load(z_k + cols[None, :] * stride_zc, mask=mask2, other=0.0)
            z = tl.where(cmask[None, :], z.to(tl.float32), _NEG)
            zs = z - tl.reduce(z, 1, _MAX)[:, None]
            e = tl.exp(zs)
            d = tl.reduce(e, 1, _SUM)
            lp = zs - tl.log(d)[:, None]
            q = tl.where(cols[None, :] == y[:, None], q_on, q_off)
            ce = tl.reduce(tl.where(cmask[None, :], -q * lp, 0.0), 1, _SUM)
            grad = c_ce[:, None] * (e / d[:, None] - q)
            row_loss = c_ce * ce
            if HAS_TEACHER:
                zt = zs * inv_T
                et_s = tl.exp(zt)
                d_s = tl.reduce(et_s, 1, _SUM)
                lps = zt - tl.log(d_s)[:, None]
                if SOFT_CE:
                    kd_el = -pt_tile * lps
                else:
                    kd_el = pt_tile * (lpt_tile - lps)
                kd = tl.reduce(tl.where(cmask[None, :], kd_el, 0.0), 1, _SUM) * (T * T)
                grad += (c_kd * T)[:, None] * (et_s / d_s[:, None] - pt_tile)
                row_loss += c_kd * kd
            if WRITE_GRAD:
                tl.store(g_k + cols[None, :], grad.to(g_ptr.dtype.element_ty), mask=mask2)
        else:
            # pass 1: online max and the two softmax normalisers (T = 1 and T)
            m = zero_rows + _NEG
            d = zero_rows
            d_s = zero_rows
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + cols
                cmask = (cc // ALIGN) < C_div
                z = tl.load(z_k + cc[None, :] * stride_zc, mask=row_mask[:, None] & cmask[None, :], other=0.0)
                z = tl.where(cmask[None, :], z.to(tl.float32), _NEG)
                m_new = tl.maximum(m, tl.reduce(z, 1, _MAX))
                zs = z - m_new[:, None]
                d = d * tl.exp(m - m_new) + tl.reduce(tl.exp(zs), 1, _SUM)
                if HAS_TEACHER:
                    d_s = d_s * tl.exp((m - m_new) * inv_T) + tl.reduce(tl.exp(zs * inv_T), 1, _SUM)
                m = m_new
            lse = tl.log(d)
            if HAS_TEACHER:
                lse_s = tl.log(d_s)
            # pass 2: loss terms element-wise in the log domain, gradient written chunk by chunk
            ce = zero_rows
            kd = zero_rows
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + cols
                cmask = (cc // ALIGN) < C_div
                mask2 = row_mask[:, None] & cmask[None, :]
                z = tl.load(z_k + cc[None, :] * stride_zc, mask=mask2, other=0.0).to(tl.float32)
                zs = z - m[:, None]
                lp = zs - lse[:, None]
                q = tl.where(cc[None, :] == y[:, None], q_on, q_off)
                ce += tl.reduce(tl.where(cmask[None, :], -q * lp, 0.0), 1, _SUM)
                grad = c_ce[:, None] * (tl.exp(lp) - q)
                if HAS_TEACHER:
                    tt = tl.load(t_row + cc[None, :] * stride_tc, mask=mask2, other=0.0).to(tl.float32)
                    lpt = (tt - mt[:, None]) * inv_T - log_st[:, None]
                    pt = tl.exp(lpt)
                    lps = zs * inv_T - lse_s[:, None]
                    if SOFT_CE:
                        kd_el = -pt * lps
                    else:
                        kd_el = pt * (lpt - lps)
                    kd += tl.reduce(tl.where(cmask[None, :], kd_el, 0.0), 1, _SUM)
                    grad += (c_kd * T)[:, None] * (tl.exp(lps) - pt)
                if WRITE_GRAD:
                    tl.store(g_k + cc[None, :], grad.to(g_ptr.dtype.element_ty), mask=mask2)
            row_loss = c_ce * ce
            if HAS_TEACHER:
                row_loss += c_kd * (kd * (T * T))
        tl.store(loss_ptr + kk * B + rows64, row_loss, mask=row_mask)


# ----------------------------------------------------------------------------- launcher
_BLOCK_OVERRIDE: dict = {}


@contextlib.contextmanager
def block_sizes(block_b: Optional[int] = None, block_c: Optional[int] = None) -> Iterator[None]:
    """Force the tile shape (powers of two) for launches inside the block; tests use it to cover the
    multi-chunk path and to keep interpreter program counts low."""
    prev = dict(_BLOCK_OVERRIDE)
    _BLOCK_OVERRIDE.update({k: v for k, v in (("block_b", block_b), ("block_c", block_c)) if v is not None})
    try:
        yield
    finally:
        _BLOCK_OVERRIDE.clear()
        _BLOCK_OVERRIDE.update(prev)


def _launch_config(B: int, C: int, on_gpu: bool) -> Tuple[int, int, int]:
    """(BLOCK_B, BLOCK_C, num_warps).

    GPU: a row of up to 4096 classes stays in registers (one read of the logits); small-C problems
    pack several samples per program (tile <= 2048 elements) while keeping >= ~256 programs, and
    num_warps gives ~8 elements per thread.  From ptxas on sm_90a: a 1 x 1024 tile with a teacher
    uses 72 registers at 4 warps, no spills.  (Not yet tuned on a GPU: see benchmarks/.)
    Interpreter: one big tile, since each program instance costs ~ms of Python.
    """
    if on_gpu:
        block_c = min(triton.next_power_of_2(C), 4096)
        rows_fit = max(1, 2048 // block_c)
        rows_par = 1 << (max(1, B // 256).bit_length() - 1)  # largest power of two <= B / 256
        block_b = max(1, min(rows_fit, rows_par))
    else:
        block_c = min(triton.next_power_of_2(C), 32768)
        block_b = min(triton.next_power_of_2(B), max(1, (1 << 20) // block_c), 64)
    block_b = _BLOCK_OVERRIDE.get("block_b", block_b)
    block_c = _BLOCK_OVERRIDE.get("block_c", block_c)
    num_warps = max(4, min(16, block_b * block_c // 256))
    return block_b, block_c, num_warps


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Saved-gradient dtype: the logits' own (Liger), except fp16, whose gradient is kept in fp32.
    The gradient is formed before the upstream scale is applied, so an fp16 GradScaler's loss scale
    would come too late: entries ~ gamma / (B C) (KD with 'mean') would underflow in fp16."""
    return torch.float32 if dtype == torch.float16 else dtype


def _row_alignment(logits: torch.Tensor, teacher: Optional[torch.Tensor], C: int, g_strides) -> int:
    """Largest power of two (<= 16 bytes of the logits dtype) dividing C and every row stride, or 1
    when a class dimension is strided.  Passed as a constexpr hint for vectorised row accesses."""
    if logits.stride(2) != 1 or (teacher is not None and teacher.stride(1) != 1):
        return 1
    vals = [C, logits.stride(0), logits.stride(1), *g_strides]
    if teacher is not None:
        vals.append(teacher.stride(0))
    align = max(1, 16 // logits.element_size())
    while align > 1 and any(v % align for v in vals):
        align //= 2
    return align


def _launch(kernel, traceable: bool):
    return torch.library.wrap_triton(kernel) if traceable else kernel


def multi_exit_kd_forward(
    logits: torch.Tensor, target: torch.Tensor, teacher: Optional[torch.Tensor],
    sample_weights: Optional[torch.Tensor], exit_coef: torch.Tensor, temperature: float,
    label_smoothing: float, kl_batchmean: bool, soft_ce: bool, write_grad: bool, *, traceable: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel. Returns ``(row_loss [K, B] fp32, grad [K, B, C])``; ``grad`` is an empty tensor
    when ``write_grad`` is False."""
    K, B, C = (int(n) for n in logits.shape)  # int(): specialise symbolic sizes when traced
    if exit_coef.shape != (K, 2) or exit_coef.dtype != torch.float32 or not exit_coef.is_contiguous():
        raise ValueError(f"exit_coef must be a contiguous float32 [K, 2] = [{K}, 2] tensor of (w_k (1 - g_k), "
                         f"w_k g_k), got {exit_coef.dtype} {tuple(exit_coef.shape)}")
    row_loss = torch.empty((K, B), dtype=torch.float32, device=logits.device)
    grad = torch.empty((K, B, C) if write_grad else (0,), dtype=_grad_dtype(logits.dtype), device=logits.device)
    has_t = teacher is not None
    has_sw = sample_weights is not None
    t = teacher if has_t else logits  # dummy pointers, never read
    sw = sample_weights if has_sw else exit_coef
    block_b, block_c, num_warps = _launch_config(B, C, logits.is_cuda and not INTERPRET)
    g_strides = (B * C, C) if write_grad else (0, 0)
    align = _row_alignment(logits, t if has_t else None, C, g_strides)
    grid = (triton.cdiv(B, block_b),)
    _launch(_multi_exit_kd_kernel, traceable)[grid](
        logits, logits.stride(0), logits.stride(1), logits.stride(2),
        target, target.stride(0),
        t, t.stride(0) if has_t else 0, t.stride(1) if has_t else 0,
        sw, sw.stride(0) if has_sw else 0, sw.stride(1) if has_sw else 0,
        exit_coef, row_loss, grad, g_strides[0], g_strides[1],
        K, B, C,
        1.0 / B, 1.0 / B if kl_batchmean else 1.0 / (B * C), 1.0 / C,
        float(temperature), 1.0 / float(temperature), float(label_smoothing),
        HAS_TEACHER=has_t, HAS_SW=has_sw, SOFT_CE=soft_ce, WRITE_GRAD=write_grad,
        SINGLE_TILE=C <= block_c, ALIGN=align, BLOCK_B=block_b, BLOCK_C=block_c, num_warps=num_warps,
    )
    return row_loss, grad


# ----------------------------------------------------------------------------- op registration
_OP_NAME = "imta_fast::multi_exit_kd"


def _op_impl(logits: torch.Tensor, target: torch.Tensor, teacher: Optional[torch.Tensor],
             sample_weights: Optional[torch.Tensor], exit_coef: torch.Tensor, temperature: float,
             label_smoothing: float, kl_batchmean: bool, soft_ce: bool,
             write_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return multi_exit_kd_forward(logits, target, teacher, sample_weights, exit_coef, temperature,
                                 label_smoothing, kl_batchmean, soft_ce, write_grad, traceable=USES_TRITON_OP)


if USES_TRITON_OP:
    multi_exit_kd = torch.library.triton_op(_OP_NAME, mutates_args=())(_op_impl)
else:
    multi_exit_kd = torch.library.custom_op(_OP_NAME, mutates_args=())(_op_impl)


@multi_exit_kd.register_fake
def _(logits, target, teacher, sample_weights, exit_coef, temperature, label_smoothing, kl_batchmean,
      soft_ce, write_grad):
    K, B, C = logits.shape
    row_loss = logits.new_empty((K, B), dtype=torch.float32)
    grad = logits.new_empty((K, B, C) if write_grad else (0,), dtype=_grad_dtype(logits.dtype))
    return row_loss, grad


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])  # only the gradient is saved (not logits, not teacher)
    ctx.logits_dtype = inputs[0].dtype


def _backward(ctx, grad_row_loss: torch.Tensor, _grad_grad: Optional[torch.Tensor]):
    (grad,) = ctx.saved_tensors
    # d loss / d logits was formed in the forward; chain rule with the [K, B] upstream gradient.
    # (A multiply rather than an "if grad_output == 1" test, which would need a host sync.)
    dlogits = (grad * grad_row_loss.unsqueeze(-1).to(grad.dtype)).to(ctx.logits_dtype)
    return dlogits, None, None, None, None, None, None, None, None, None


multi_exit_kd.register_autograd(_backward, setup_context=_setup_context)
