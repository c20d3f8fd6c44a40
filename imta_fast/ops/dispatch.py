"""Implementation dispatch for the two fused ops (``torch.nn.functional`` style).

``multi_exit_loss(..., impl='auto'|'torch'|'triton')`` computes the loss defined in
:mod:`imta_fast.ops.losses` with the plain-PyTorch reference or with the fused Triton kernel
(``imta_fast.kernels.multi_exit_kd``); ``gradient_equilibrium_split(..., impl=...)`` runs the GE split of
:mod:`imta_fast.ops.gradient_equilibrium` with its reference backward or with the fused one-pass backward
(``torch.lerp``, see below).  Both choose through the one :func:`resolve_impl`.

Imports run one way: models / engine -> this module -> {``imta_fast.ops.losses``,
``imta_fast.ops.gradient_equilibrium``, ``imta_fast.kernels``}; the references import nothing from the
package and the kernels only the references.
"""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from imta_fast.ops import gradient_equilibrium as _ge
from imta_fast.ops import losses as _losses
from imta_fast.ops.losses import IGNORE_INDEX, Logits, WeightSpec

__all__ = ["resolve_impl", "multi_exit_loss", "multi_exit_kd_loss", "MultiExitLoss", "MultiExitKDLoss",
           "gradient_equilibrium_split", "triton_available", "IMPLS"]

IMPLS = ("auto", "torch", "triton")


_KERNELS = []  # the imported kernel module once found (a cache: the import statement costs ~1 us a call)


def _kernels():
    """The Triton kernel module (registers ``torch.ops.imta_fast.multi_exit_kd``), or None without Triton.

    Imported lazily: importing Triton fixes its compiled/interpreted mode (``TRITON_INTERPRET``), so a
    plain ``import imta_fast.ops.dispatch`` must not do it.  A local import statement is also what
    ``torch.compile`` can trace once the module is loaded (it is, after one eager call or an import).
    """
    if _KERNELS and not torch.compiler.is_compiling():
        return _KERNELS[0]
    try:
        from imta_fast.kernels import multi_exit_kd
    except ImportError:  # Triton not installed: the PyTorch path still works
        return None
    if not _KERNELS:
        _KERNELS.append(multi_exit_kd)
    return multi_exit_kd


def triton_available() -> bool:
    """True when the Triton kernel module imports (Triton installed)."""
    return _kernels() is not None


def _any_requires_grad(tensors) -> bool:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return torch.is_grad_enabled()
    return False


def resolve_impl(impl: str, device: torch.device, weights: Sequence = (), *, needs_triton: bool = True) -> str:
    """``'auto'|'torch'|'triton'`` -> ``'torch'`` or ``'triton'`` (the fused path), or a one-line error.

    ``'auto'`` picks the fused path for CUDA tensors (when ``needs_triton``: and Triton imports) unless
    one of ``weights`` requires grad (the fused loss treats weights as constants; an L2W meta step
    differentiates through them), else the reference.  ``'triton'`` insists on the fused path.
    ``needs_triton=False`` is for a fused path that is plain ATen (the GE backward), which runs anywhere.
    """
    if impl == "torch":
        return "torch"
    if impl not in IMPLS:
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    higher_order = _any_requires_grad(weights)
    if impl == "auto":
        fused_ok = device.type == "cuda" and not higher_order and (not needs_triton or triton_available())
        return "triton" if fused_ok else "torch"
    if needs_triton:
        mod = _kernels()
        if mod is None:
            raise RuntimeError("impl='triton' needs Triton, which failed to import; use impl='torch'")
        if device.type != "cuda" and not mod.INTERPRET:
            raise RuntimeError(f"impl='triton' got {device.type} tensors on a machine with a GPU: the kernels run "
                               "CUDA tensors (CPU tensors only through Triton's interpreter, used when no GPU is "
                               "present or TRITON_INTERPRET=1 is set before Triton is imported); use impl='torch' "
                               "or 'auto'")
    if higher_order:
        raise ValueError("impl='triton' treats sample_weights / exit_weights / kd_weight as constants, but one "
                         "of them requires grad (e.g. the L2W meta step); use impl='torch' or 'auto'")
    return "triton"


# ----------------------------------------------------------------------------- multi-exit loss
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
    impl: str = "auto",
) -> torch.Tensor:
    """Multi-exit CE + KD loss; arguments and formula as :func:`imta_fast.ops.losses.multi_exit_loss`.

    ``loss = sum_k w_k [(1-g_k) mean_b(s_bk CE_kb) + g_k R_kd(s_bk T^2 KD_kb)]``

    Args:
        impl: ``'torch'`` (plain PyTorch), ``'triton'`` (fused kernel: CUDA, or CPU under
            ``TRITON_INTERPRET=1``) or ``'auto'``: Triton for CUDA tensors when Triton imports and no
            weight tensor requires grad, else PyTorch.

    The Triton path is first-order in the logits only: the teacher never gets a gradient (same as
    the reference) and weight tensors are constants to it, which is why ``'auto'`` routes an L2W
    meta step (differentiable ``sample_weights``) to PyTorch.  Double backward (``create_graph``) or a
    second backward through one forward (``retain_graph``) is not supported by it; use ``impl='torch'``.

    Shape:
        logits ``K x [B, C]`` or ``[K, B, C]``; target ``[B]``; teacher ``[B, C]``; sample_weights
        ``[B, K]``; returns a float32 scalar (``[K]`` per-exit terms with ``reduction='none'``).

    Example:
        >>> z = torch.randn(5, 8, 100, requires_grad=True)          # K=5 exits, B=8, C=100
        >>> y = torch.randint(0, 100, (8,))
        >>> loss = multi_exit_loss(z, y, teacher=torch.randn(8, 100), temperature=1.0, kd_weight=0.1)
        >>> loss.backward()
    """
    device = logits.device if isinstance(logits, torch.Tensor) else logits[0].device
    which = resolve_impl(impl, device, (sample_weights, exit_weights, kd_weight))
    kwargs = dict(temperature=temperature, kd_weight=kd_weight, exit_weights=exit_weights,
                  sample_weights=sample_weights, label_smoothing=label_smoothing, kl_reduction=kl_reduction,
                  kd_form=kd_form, kd_exits=kd_exits, reduction=reduction, ignore_index=ignore_index)
    if which == "torch":
        return _losses.multi_exit_loss(logits, target, teacher, **kwargs)
    return _fused_multi_exit_loss(logits, target, teacher, **kwargs)


multi_exit_kd_loss = multi_exit_loss  # the name used by the design notes (the only alias)


def _hashable(spec):
    """A cache key for a weight spec made of Python numbers, or None (tensors are not cached)."""
    if spec is None or isinstance(spec, numbers.Number):
        return spec
    if isinstance(spec, torch.Tensor):
        return None
    try:
        vals = tuple(spec)
    except TypeError:
        return None
    return vals if all(isinstance(v, numbers.Number) for v in vals) else None


_COEF_CACHE: Dict[Tuple, Tuple[torch.Tensor, Tuple[bool, ...]]] = {}
_UNCACHEABLE = object()


def _exit_coef(K: int, has_teacher: bool, kd_weight, exit_weights, kd_exits, device) -> Tuple[torch.Tensor, list]:
    """``([K, 2]`` float32 device tensor of ``(w_k (1-g_k), w_k g_k)``, ``kd_active)``, cached per
    configuration in eager mode (a steady-state step does no Python loop over exits and no host-to-device
    copy for them)."""
    key = None
    if not torch.compiler.is_compiling():
        parts = (_hashable(kd_weight), _hashable(exit_weights), _hashable(kd_exits))
        if all(p is not None or s is None for p, s in zip(parts, (kd_weight, exit_weights, kd_exits))):
            key = (K, has_teacher, *parts, str(device))
            hit = _COEF_CACHE.get(key)
            if hit is not None:
                return hit
    coefs, kd_active = _losses.exit_coefficients(K, has_teacher, kd_weight, exit_weights, kd_exits)
    if isinstance(coefs, list):
        coef = _losses.device_constant(coefs, device)
    else:
        coef = coefs.detach().to(device=device, dtype=torch.float32).contiguous()
    out = (coef, kd_active)
    if key is not None and isinstance(coefs, list):
        if len(_COEF_CACHE) > 256:
            _COEF_CACHE.clear()
        _COEF_CACHE[key] = out
    return out


def _fused_multi_exit_loss(logits, target, teacher, *, temperature, kd_weight, exit_weights, sample_weights,
                           label_smoothing, kl_reduction, kd_form, kd_exits, reduction, ignore_index):
    mod = _kernels()
    if isinstance(logits, torch.Tensor):
        exits = None
        z = _losses.stack_logits(logits)  # validates [K, B, C]; no copy
        shape = tuple(z.shape)
    else:
        exits = tuple(logits)
        if not exits:
            raise ValueError("logits is an empty sequence")
        z = exits[0]
        B_C = z.shape
        for e in exits:
            if e.shape != B_C or len(B_C) != 2:
                raise ValueError(f"logits must be K tensors [B, C] of one shape, got "
                                 f"{[tuple(e.shape) for e in exits]}")
        shape = (len(exits), B_C[0], B_C[1])
    _losses.check_inputs(z if exits is None else _ShapeOnly(shape, z), target, teacher, sample_weights, temperature,
                         label_smoothing, kl_reduction, kd_form, reduction)
    K = shape[0]
    coef, kd_active = _exit_coef(K, teacher is not None, kd_weight, exit_weights, kd_exits, z.device)
    t = teacher.detach() if teacher is not None and any(kd_active) else None
    sw = sample_weights.detach() if sample_weights is not None else None
    opts = (float(temperature), float(label_smoothing), kl_reduction == "batchmean", kd_form == "soft_ce",
            int(ignore_index))
    if torch.compiler.is_compiling():
        # The registered op (triton_op on GPU: inductor sees the kernel).  The stack is one graph node
        # that inductor can plan away (heads writing into the [K, B, C] buffer).
        zz = z if exits is None else torch.stack(exits, 0)
        write_grad = torch.is_grad_enabled() and zz.requires_grad
        row_loss, _ = torch.ops.imta_fast.multi_exit_kd(zz, target, t, sw, coef, *opts[:4], write_grad, opts[4])
        per_exit = row_loss.sum(1)
        return per_exit if reduction == "none" else per_exit.sum()
    inputs = (z,) if exits is None else exits
    return mod.fused_multi_exit_loss(inputs, target, t, sw, coef, opts, reduction == "none")


class _ShapeOnly:
    """What :func:`imta_fast.ops.losses.check_inputs` reads of the logits (shape, dtype, device) for a
    list of exits, without stacking them."""

    def __init__(self, shape, first: torch.Tensor):
        self.shape, self.dtype, self.device = torch.Size(shape), first.dtype, first.device

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


class MultiExitLoss(nn.Module):
    """Module form of :func:`multi_exit_loss` (docs/method.md §4, §10.1, §11).

    ``loss = sum_k w_k [(1-g_k) mean_b(s_bk CE_kb) + g_k R_kd(s_bk T^2 KD_kb)]``

    Args:
        temperature, kd_weight, exit_weights, label_smoothing, kl_reduction, kd_form, kd_exits,
        reduction, ignore_index: as in :func:`multi_exit_loss` (fixed at construction).
        impl: ``'auto'`` (Triton on CUDA when available, else PyTorch), ``'torch'`` or ``'triton'``.

    Shape:
        ``forward(logits, target, teacher=None, sample_weights=None)`` with logits ``K x [B, C]`` or
        ``[K, B, C]``, target ``[B]``, teacher ``[B, C]``, sample_weights ``[B, K]``; returns a float32
        scalar (``[K]`` with ``reduction='none'``).

    Example:
        >>> crit = MultiExitLoss(temperature=1.0, kd_weight=0.1, kl_reduction="mean")  # IMTA ImageNet
        >>> z = [torch.randn(4, 10, requires_grad=True) for _ in range(5)]
        >>> loss = crit(z, torch.randint(0, 10, (4,)), teacher=torch.randn(4, 10))
        >>> loss.backward()
    """

    def __init__(self, *, temperature: float = 1.0, kd_weight: WeightSpec = 0.5, exit_weights: WeightSpec = None,
                 label_smoothing: float = 0.0, kl_reduction: str = "mean", kd_form: str = "kl",
                 kd_exits: Optional[Sequence[int]] = None, reduction: str = "sum", ignore_index: int = IGNORE_INDEX,
                 impl: str = "auto"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
        self.temperature = float(temperature)
        self.kd_weight = kd_weight
        self.exit_weights = exit_weights
        self.label_smoothing = float(label_smoothing)
        self.kl_reduction = kl_reduction
        self.kd_form = kd_form
        self.kd_exits = None if kd_exits is None else tuple(int(k) for k in kd_exits)
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.impl = impl

    def forward(self, logits: Logits, target: torch.Tensor, teacher: Optional[torch.Tensor] = None,
                sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        return multi_exit_loss(logits, target, teacher, temperature=self.temperature, kd_weight=self.kd_weight,
                               exit_weights=self.exit_weights, sample_weights=sample_weights,
                               label_smoothing=self.label_smoothing, kl_reduction=self.kl_reduction,
                               kd_form=self.kd_form, kd_exits=self.kd_exits, reduction=self.reduction,
                               ignore_index=self.ignore_index, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, kd_weight={self.kd_weight}, kl_reduction={self.kl_reduction!r}, "
                f"kd_form={self.kd_form!r}, label_smoothing={self.label_smoothing}, impl={self.impl!r}")


MultiExitKDLoss = MultiExitLoss  # module name used by the design notes (the only alias)


# ----------------------------------------------------------------------------- gradient equilibrium
def _lerp_combine(g_head: torch.Tensor, g_next: torch.Tensor, s_head: float, s_next: float) -> torch.Tensor:
    """``s_head g_head + s_next g_next`` as one ATen pass: ``torch.lerp(g_next, g_head, s_head)`` =
    ``g_next + s_head (g_head - g_next)``, equal to it when ``s_head + s_next = 1`` -- always so for GE
    (``1/(K-k) + (K-k-1)/(K-k)``, docs/method.md §2).  Reads 2 units, writes 1, computes in the op-math
    type (fp32 for bf16/fp16) and rounds once.  Other scale pairs take the reference expression."""
    if torch.compiler.is_compiling():
        # Inductor fuses this into one pass by itself; and it miscompiles lerp / add(alpha=) next to a
        # matmul's gradient on CPU (torch 2.14, wrong values), so the compiled graph gets the plain form.
        return g_head * s_head + g_next * s_next
    if abs(s_head + s_next - 1.0) > 1e-12:
        return _ge.split_backward(g_head, g_next, s_head, s_next)
    return torch.lerp(g_next, g_head, s_head)


class _FusedGradientEquilibriumSplit(_ge.GradientEquilibriumSplit):
    """The reference split (two views of ``x``, no copy) whose two-gradient backward is one lerp."""

    @staticmethod
    def backward(ctx, g_head: Optional[torch.Tensor], g_next: Optional[torch.Tensor]):
        return _ge.split_backward(g_head, g_next, ctx.s_head, ctx.s_next, combine=_lerp_combine), None, None


def gradient_equilibrium_split(x: torch.Tensor, s_head: float, s_next: float, impl: str = "auto"):
    """GE split (``imta_fast.ops.gradient_equilibrium``); ``impl='triton'`` (or ``'auto'`` on CUDA) uses
    the fused one-pass backward (``torch.lerp``; no Triton kernel is needed for one elementwise pass),
    ``'torch'`` the reference.

    Returns ``(head_input, next_input)``, two views of ``x`` with gradient scales ``s_head``, ``s_next``.
    """
    if resolve_impl(impl, x.device, needs_triton=False) == "torch":
        return _ge.gradient_equilibrium_split(x, s_head, s_next)
    return _FusedGradientEquilibriumSplit.apply(x, float(s_head), float(s_next))
