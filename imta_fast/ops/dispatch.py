"""Functional API with implementation dispatch (``torch.nn.functional`` style).

``multi_exit_loss(..., impl='auto'|'torch'|'triton')`` computes the loss defined in
:mod:`imta_fast.ops.losses` either with the plain-PyTorch reference or with the fused Triton kernel
``torch.ops.imta_fast.multi_exit_kd`` (``imta_fast.kernels.multi_exit_kd``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from imta_fast.ops import losses as _losses
from imta_fast.ops.losses import Logits, WeightSpec

__all__ = ["gradient_equilibrium_split", "multi_exit_loss", "multi_exit_kd_loss", "triton_available"]


def _kernels():
    """The Triton kernel module (registers ``torch.ops.imta_fast.multi_exit_kd``), or None without Triton.

    Imported lazily: importing Triton fixes its compiled/interpreted mode (``TRITON_INTERPRET``), so a
    plain ``import imta_fast.ops.dispatch`` must not do it.  A local import statement is also what
    ``torch.compile`` can trace once the module is loaded (it is, after one eager call or an import).
    """
    try:
        from imta_fast.kernels import multi_exit_kd
    except ImportError:  # Triton not installed: the PyTorch path still works
        return None
    return multi_exit_kd


def triton_available() -> bool:
    """True when the Triton kernel module imports (Triton installed)."""
    return _kernels() is not None


def _wants_higher_order(*tensors) -> bool:
    """The fused op gives no gradient to weights (sample/exit/kd weights are constants to it)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _resolve_impl(impl: str, device: torch.device, weights) -> str:
    if impl == "torch":
        return "torch"
    if impl == "auto":
        if device.type == "cuda" and not _wants_higher_order(*weights) and triton_available():
            return "triton"
        return "torch"
    if impl != "triton":
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    mod = _kernels()
    if mod is None:
        raise RuntimeError("impl='triton' needs Triton, which failed to import; use impl='torch'")
    if device.type != "cuda" and not mod.INTERPRET:
        raise RuntimeError(f"impl='triton' got {device.type} tensors on a machine with a GPU: the kernels run CUDA "
                           "tensors (CPU tensors only through Triton's interpreter, used when no GPU is present or "
                           "TRITON_INTERPRET=1 is set before Triton is imported); use impl='torch' or 'auto'")
    if _wants_higher_order(*weights):
        raise ValueError("impl='triton' treats sample_weights / exit_weights / kd_weight as constants, but one "
                         "of them requires grad (e.g. the L2W meta step); use impl='torch' or 'auto'")
    return "triton"


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
    meta step (differentiable ``sample_weights``) to PyTorch.  Double backward (``create_graph``)
    through it is not supported; use ``impl='torch'`` for that.

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
    which = _resolve_impl(impl, device, (sample_weights, exit_weights, kd_weight))
    kwargs = dict(temperature=temperature, kd_weight=kd_weight, exit_weights=exit_weights,
                  sample_weights=sample_weights, label_smoothing=label_smoothing, kl_reduction=kl_reduction,
                  kd_form=kd_form, kd_exits=kd_exits, reduction=reduction)
    if which == "torch":
        return _losses.multi_exit_loss(logits, target, teacher, **kwargs)
    return _triton_multi_exit_loss(logits, target, teacher, **kwargs)


def _triton_multi_exit_loss(logits, target, teacher, *, temperature, kd_weight, exit_weights, sample_weights,
                            label_smoothing, kl_reduction, kd_form, kd_exits, reduction) -> torch.Tensor:
    z = _losses.stack_logits(logits)  # a list costs one stacking copy; a [K, B, C] tensor none
    _losses.check_inputs(z, target, teacher, sample_weights, temperature, label_smoothing, kl_reduction, kd_form,
                         reduction)
    K = z.shape[0]
    coefs, kd_active = _losses.exit_coefficients(K, teacher is not None, kd_weight, exit_weights, kd_exits)
    if isinstance(coefs, list):
        exit_coef = _losses.device_constant(coefs, z.device)
    else:
        exit_coef = coefs.detach().to(device=z.device, dtype=torch.float32).contiguous()
    t = teacher.detach() if teacher is not None and any(kd_active) else None
    sw = sample_weights.detach() if sample_weights is not None else None
    write_grad = torch.is_grad_enabled() and z.requires_grad
    row_loss, _ = torch.ops.imta_fast.multi_exit_kd(
        z, target, t, sw, exit_coef, float(temperature), float(label_smoothing),
        kl_reduction == "batchmean", kd_form == "soft_ce", write_grad)
    per_exit = row_loss.sum(1)
    return per_exit if reduction == "none" else per_exit.sum()


multi_exit_kd_loss = multi_exit_loss  # the name used by the design notes


def gradient_equilibrium_split(x: torch.Tensor, s_head: float, s_next: float, impl: str = "auto"):
    """GE split (``imta_fast.ops.gradient_equilibrium``) with the fused Triton backward on CUDA.

    ``impl='auto'`` uses Triton for CUDA tensors when it imports, the plain-PyTorch reference otherwise.
    """
    from imta_fast.ops.gradient_equilibrium import gradient_equilibrium_split as reference

    if impl == "torch" or (impl == "auto" and not (x.is_cuda and triton_available())):
        return reference(x, s_head, s_next)
    if impl not in ("auto", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    from imta_fast.kernels.gradient_equilibrium import gradient_equilibrium_split_triton

    return gradient_equilibrium_split_triton(x, s_head, s_next)
