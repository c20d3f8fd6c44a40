"""Multi-exit classification loss: per-exit cross entropy plus optional distillation (plain PyTorch).

This module is the reference ("twin") of the fused Triton kernel in ``imta_fast.kernels.multi_exit_kd``,
the implementation the trainer runs with ``--loss-impl torch``, and the CPU fallback of
:func:`imta_fast.ops.dispatch.multi_exit_loss`.  One definition covers every method of the project:

- MSDNet baseline / GE stage 1 (docs/method.md §2): no teacher -> ``sum_k CE(z_k, y)``.
- IMTA one-for-all KD (docs/method.md §4): ``teacher`` = the frozen GE net's last exit,
  ``kd_form='kl'``, ``kl_reduction='mean'`` (the reference's legacy ``nn.KLDivLoss()`` default,
  i.e. the summed KL divided by ``B*C``), defaults ``kd_exits`` = all but the last exit.
- Phuong & Lampert (docs/method.md §10.1): ``teacher = z_K.detach()``, ``kd_form='soft_ce'``,
  ``kl_reduction='batchmean'``, ``kd_weight=C``, ``exit_weights=[g]*(K-1) + [g*(1-C)]``.
- L2W (docs/method.md §11.3): ``sample_weights`` = the ``[B, K]`` weight matrix.

The formula (the contract shared with the kernel)::

    loss = sum_k w_k * [ (1 - g_k) * R_ce( s_bk * CE_kb ) + g_k * R_kd( s_bk * KD_kb ) ]

    CE_kb = -sum_c q_bc log softmax(z_kb)_c,      q_b = (1 - eps) * onehot(y_b) + eps / C
    KD_kb = T^2 * sum_c p_bc (log p_bc - log softmax(z_kb / T)_c)     (kd_form='kl')
          = T^2 * sum_c -p_bc log softmax(z_kb / T)_c                 (kd_form='soft_ce')
    p_b   = softmax(t_b / T)                                          (teacher, never differentiated)
    R_ce  = (1/N) sum_{b: y_b != ignore_index},  N = #{b: y_b != ignore_index}   (F.cross_entropy 'mean')
    R_kd  = (1/B) sum_b ('batchmean')  or  (1/(B*C)) sum_b ('mean')         (every row, see below)
    g_k   = kd_weight[k] if k in kd_exits (and a teacher is given) else 0
    s_bk  = sample_weights[b, k] (1 if absent),  w_k = exit_weights[k] (1 if absent)

Both KD forms have the same gradient, ``T * (softmax(z/T) - p)``; they differ by the teacher entropy.

``ignore_index`` (default -100) follows ``F.cross_entropy(reduction='mean')``: an ignored row adds 0
to CE (label smoothing included) and is left out of CE's denominator ``N`` (all rows ignored: 0/0 =
NaN, as PyTorch).  KD is *still applied* to ignored rows and keeps its denominator (B or B*C): the
teacher's soft targets need no label, which is what the L2W / semi-supervised distillation paths
use unlabeled rows for.
"""
from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["multi_exit_loss", "check_inputs", "exit_coefficients", "resolve_kd_exits", "device_constant",
           "stack_logits", "IGNORE_INDEX"]

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]
WeightSpec = Union[float, Sequence[float], torch.Tensor, None]

_KL_REDUCTIONS = ("mean", "batchmean")
_KD_FORMS = ("kl", "soft_ce")
_REDUCTIONS = ("sum", "none")
IGNORE_INDEX = -100  # F.cross_entropy's default


# ----------------------------------------------------------------------------- shared helpers
def stack_logits(logits: Logits) -> torch.Tensor:
    """A list/tuple of ``K`` tensors ``[B, C]`` -> ``[K, B, C]`` (a stacked tensor passes through)."""
    if isinstance(logits, torch.Tensor):
        if logits.dim() != 3:
            raise ValueError(f"stacked logits must be [K, B, C], got shape {tuple(logits.shape)}")
        return logits
    logits = list(logits)
    if not logits:
        raise ValueError("logits is an empty sequence")
    dtypes = {t.dtype for t in logits}
    if len(dtypes) > 1:  # mixed precision across exits: compute in fp32 (rare)
        logits = [t.float() for t in logits]
    return torch.stack(logits, 0)


def check_inputs(z: torch.Tensor, target: torch.Tensor, teacher: Optional[torch.Tensor],
                 sample_weights: Optional[torch.Tensor], temperature: float, label_smoothing: float,
                 kl_reduction: str, kd_form: str, reduction: str) -> None:
    """Shape/option validation on host-known metadata only (never reads tensor values: no sync)."""
    K, B, C = z.shape
    if K < 1 or B < 1 or C < 1:
        raise ValueError(f"logits must have K, B, C >= 1, got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"logits must be floating point, got {z.dtype}")
    others = [t for t in (target, teacher, sample_weights) if t is not None]
    if any(t.device != z.device for t in others):
        raise ValueError(f"logits, target, teacher and sample_weights must be on one device, got "
                         f"{[str(t.device) for t in (z, *others)]}")
    if target.shape != (B,):
        raise ValueError(f"target must be [B]={B}, got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64/int32 class indices, got {target.dtype}")
    if teacher is not None and teacher.shape != (B, C):
        raise ValueError(f"teacher must be [B, C]=({B}, {C}), got {tuple(teacher.shape)}")
    if sample_weights is not None and sample_weights.shape != (B, K):
        raise ValueError(f"sample_weights must be [B, K]=({B}, {K}), got {tuple(sample_weights.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if kl_reduction not in _KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {_KL_REDUCTIONS}, got {kl_reduction!r}")
    if kd_form not in _KD_FORMS:
        raise ValueError(f"kd_form must be one of {_KD_FORMS}, got {kd_form!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _per_exit(spec: WeightSpec, K: int, default: float, name: str) -> Union[List[float], torch.Tensor]:
    """Scalar / length-K sequence / [K] tensor -> list of K floats, or a float [K] tensor."""
    if spec is None:
        return [float(default)] * K
    if isinstance(spec, torch.Tensor):
        if spec.dim() == 0:
            return spec.reshape(1).expand(K)
        if spec.shape != (K,):
            raise ValueError(f"{name} must be a scalar or have K={K} entries, got shape {tuple(spec.shape)}")
        return spec
    if isinstance(spec, numbers.Number):
        return [float(spec)] * K
    vals = [float(v) for v in spec]
    if len(vals) != K:
        raise ValueError(f"{name} must be a scalar or have K={K} entries, got {len(vals)}")
    return vals


def resolve_kd_exits(kd_exits: Optional[Sequence[int]], K: int) -> List[bool]:
    """Mask of exits that receive the KD term; default: all but the last (IMTA's last exit is CE only)."""
    if kd_exits is None:
        return [k < K - 1 for k in range(K)]
    mask = [False] * K
    for k in kd_exits:
        k = int(k)
        if not -K <= k < K:
            raise ValueError(f"kd_exits entry {k} out of range for K={K}")
        mask[k % K] = True
    return mask


def exit_coefficients(K: int, has_teacher: bool, kd_weight: WeightSpec, exit_weights: WeightSpec,
                      kd_exits: Optional[Sequence[int]]):
    """Per-exit ``(a_ce, a_kd) = (w_k (1 - g_k), w_k g_k)``.

    Returns ``(values, kd_active)``: ``values`` is a Python list of ``K`` pairs when every weight is a
    Python number, else a float32 ``[K, 2]`` tensor computed with device ops (no host sync);
    ``kd_active[k]`` tells whether exit ``k`` may have a non-zero KD coefficient.
    """
    w = _per_exit(exit_weights, K, 1.0, "exit_weights")
    mask = resolve_kd_exits(kd_exits, K) if has_teacher else [False] * K
    g = _per_exit(kd_weight, K, 0.0, "kd_weight") if any(mask) else [0.0] * K
    if isinstance(g, list):
        g = [gk if m else 0.0 for gk, m in zip(g, mask)]
        kd_active = [gk != 0.0 for gk in g]
    else:
        kd_active = list(mask)
    if isinstance(w, list) and isinstance(g, list):
        return [(wk * (1.0 - gk), wk * gk) for wk, gk in zip(w, g)], kd_active
    dev = next(t.device for t in (w, g) if isinstance(t, torch.Tensor))
    w_t = w.float() if isinstance(w, torch.Tensor) else device_constant([w], dev)[0]
    if isinstance(g, torch.Tensor):
        g_t = g.float() * device_constant([[float(m) for m in mask]], dev)[0]
    else:
        g_t = device_constant([g], dev)[0]
    return torch.stack([w_t * (1.0 - g_t), w_t * g_t], dim=1), kd_active


_CONST_CACHE: Dict[Tuple, torch.Tensor] = {}


def device_constant(values: Sequence[Sequence[float]], device: torch.device) -> torch.Tensor:
    """Python numbers -> float32 device tensor, cached in eager mode.

    The cache means a steady-state training step does no host-to-device copy for its per-exit
    weights (so it stays CUDA-graph capturable); under ``torch.compile`` the tensor is a graph
    constant instead.
    """
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float32, device=device)
    key = (tuple(tuple(v) for v in values), str(device))
    t = _CONST_CACHE.get(key)
    if t is None:
        if len(_CONST_CACHE) > 256:
            _CONST_CACHE.clear()
        t = _CONST_CACHE[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return t


# ----------------------------------------------------------------------------- the reference loss
def multi_exit_loss(
    logits: Logits,
    target: torch.Tensor,
    teacher: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    kd_weight: WeightSpec = 0.5,
    exit_weights: WeightSpec = None,
    sample_weights: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    kl_reduction: str = "mean",
    kd_form: str = "kl",
    kd_exits: Optional[Sequence[int]] = None,
    reduction: str = "sum",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Multi-exit CE + distillation loss in plain PyTorch (fp32 math for any input dtype).

    ``loss = sum_k w_k [(1-g_k) mean_b(s_bk CE_kb) + g_k R_kd(s_bk KD_kb)]``; see the module docstring
    for every term.

    Args:
        logits: ``K`` tensors ``[B, C]`` or one ``[K, B, C]`` tensor (fp32/bf16/fp16, any strides).
        target: ``[B]`` int64 class indices.
        teacher: optional ``[B, C]`` teacher logits; always detached.  Without it (or with
            ``kd_weight=0``) the loss is the plain weighted sum of per-exit CE.
        temperature: KD temperature ``T`` (> 0); CE uses the raw logits.
        kd_weight: ``gamma``, a scalar or ``K`` per-exit values (entries outside ``kd_exits`` are ignored).
        exit_weights: per-exit ``w_k`` (scalar, ``K`` floats or a ``[K]`` tensor); default 1.
        sample_weights: optional ``[B, K]`` per-sample per-exit weights (L2W).  Not detached here,
            so the L2W meta step can differentiate through them.
        label_smoothing: ``eps`` of the smoothed CE targets (as ``F.cross_entropy``).
        kl_reduction: ``'mean'`` divides the summed KD by ``B*C`` (IMTA's legacy ``nn.KLDivLoss()``),
            ``'batchmean'`` by ``B``.
        kd_form: ``'kl'`` = KL(p_t || p_s); ``'soft_ce'`` = -sum p_t log p_s (Phuong & Lampert).
        kd_exits: exits that get the KD term; default all but the last.
        reduction: ``'sum'`` -> scalar; ``'none'`` -> the ``K`` per-exit terms.
        ignore_index: rows whose target equals it get no CE and leave CE's mean (as
            ``F.cross_entropy``); KD still applies to them (module docstring).

    Shape:
        returns a float32 scalar, or ``[K]`` with ``reduction='none'``.

    Example:
        >>> z = [torch.randn(8, 10, requires_grad=True) for _ in range(3)]
        >>> y = torch.randint(0, 10, (8,))
        >>> loss = multi_exit_loss(z, y, teacher=z[-1].detach(), temperature=3.0, kd_weight=0.9)
        >>> loss.backward()
    """
    z = stack_logits(logits)
    check_inputs(z, target, teacher, sample_weights, temperature, label_smoothing, kl_reduction, kd_form, reduction)
    K, B, C = z.shape
    coefs, kd_active = exit_coefficients(K, teacher is not None, kd_weight, exit_weights, kd_exits)
    coefs = device_constant(coefs, z.device) if isinstance(coefs, list) else coefs.to(z.device)
    a_ce, a_kd = coefs[:, 0], coefs[:, 1]

    zf = z.float()
    logp = zf.log_softmax(-1)  # [K, B, C]
    valid = target != ignore_index  # [B]; device ops only (no sync)
    idx = torch.where(valid, target, 0).long()
    nll = -logp.gather(-1, idx.view(1, B, 1).expand(K, B, 1)).squeeze(-1)  # [K, B]
    eps = float(label_smoothing)
    ce = (1.0 - eps) * nll - eps * logp.mean(-1) if eps > 0.0 else nll
    s = None if sample_weights is None else sample_weights.float().t()  # [K, B]
    if s is not None:
        ce = ce * s
    ce = ce * valid  # an ignored row: 0 (F.cross_entropy)
    per_exit = a_ce * (ce.sum(-1) / valid.sum())  # mean over the rows not ignored

    kd_idx = [k for k in range(K) if kd_active[k]]
    if kd_idx:
        # Slice the KD exits when they are a contiguous range (the default: all but the last), else
        # evaluate every exit and let a_kd = 0 drop the rest; list indexing would copy host->device.
        k0, k1 = (kd_idx[0], kd_idx[-1] + 1) if kd_idx == list(range(kd_idx[0], kd_idx[-1] + 1)) else (0, K)
        T = float(temperature)
        lpt = (teacher.detach().float() / T).log_softmax(-1)  # [B, C]
        pt = lpt.exp()
        lps = (zf[k0:k1] / T).log_softmax(-1)  # [Kd, B, C]
        if kd_form == "kl":
            kd = (pt * (lpt - lps)).sum(-1)
        else:
            kd = -(pt * lps).sum(-1)
        kd = kd * (T * T)
        if s is not None:
            kd = kd * s[k0:k1]
        denom = B * C if kl_reduction == "mean" else B
        kd_term = F.pad(kd.sum(-1) / denom, (k0, K - k1))
        per_exit = per_exit + a_kd * kd_term
    return per_exit if reduction == "none" else per_exit.sum()
