"""Per-exit cumulative MACs and parameters in the MSDNet/IMTA op_counter convention (docs/method.md §8).

The convention counts, per image:
- Conv2d: c_in * c_out * k_h * k_w * H_out * W_out / groups multiply-adds (bias ignored);
- Linear: weight numel + bias numel;
- ReLU: the number of input elements;  Max/AvgPool2d: C * H_out * W_out * k^2 (H_out from the
  input height for both dimensions, as op_counter does);  AdaptiveAvgPool2d: input numel;
- BatchNorm and Dropout: 0.

Convolutions and matrix products are counted with ``torch.utils.flop_counter.FlopCounterMode``
(which reports 2 FLOPs per MAC and nothing for bias, ReLU or pooling); forward pre-hooks add the
remaining terms.  Costs are attributed to the stage that runs them, the stem to the first, and
accumulated so that exit ``k`` includes blocks and heads ``1..k`` — every earlier head must run
to test its confidence.  Parameters are counted the first time a module runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["ExitCosts", "count_exit_costs"]

_CONV_OPS = {torch.ops.aten.convolution, torch.ops.aten._convolution, torch.ops.aten.conv2d}


@dataclass(frozen=True)
class ExitCosts:
    """Cumulative per-exit costs (one value per exit, in exit order)."""

    macs: List[float]  # op_counter convention: conv + linear + ReLU + pool
    conv_macs: List[float]  # convolutions only
    params: List[int]

    @property
    def macs_m(self) -> List[float]:
        return [m / 1e6 for m in self.macs]

    @property
    def params_m(self) -> List[float]:
        return [p / 1e6 for p in self.params]

    def to_dict(self) -> Dict[str, List[float]]:
        return {"macs": list(self.macs), "conv_macs": list(self.conv_macs), "params": list(self.params)}


def _pool_ops(module: nn.Module, x: torch.Tensor) -> int:
    k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
    s = module.stride if isinstance(module.stride, int) else module.stride[0]
    p = module.padding if isinstance(module.padding, int) else module.padding[0]
    out = int((x.size(2) + 2 * p - k) / s + 1)  # op_counter uses the input height for both sides
    return x.size(1) * out * out * k * k


class _ExtraOpCounter:
    """Forward pre-hooks for the terms FlopCounterMode does not count, plus parameter ownership."""

    def __init__(self, model: nn.Module):
        self.ops = 0
        self.params = 0
        self._seen: set = set()
        self._handles = [m.register_forward_pre_hook(self._hook) for m in model.modules() if not list(m.children())]

    def _hook(self, module: nn.Module, inputs) -> None:
        x = inputs[0] if inputs else None
        if isinstance(module, nn.ReLU):
            self.ops += x[0].numel()
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            self.ops += _pool_ops(module, x)
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            self.ops += x[0].numel()
        elif isinstance(module, nn.Linear) and module.bias is not None:
            self.ops += module.bias.numel()  # FlopCounterMode counts only the weight's MACs
        if id(module) not in self._seen:
            self._seen.add(id(module))
            self.params += sum(p.numel() for p in module.parameters(recurse=False))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def count_exit_costs(model: nn.Module, input_shape: Sequence[int]) -> ExitCosts:
    """Cumulative per-exit MACs, conv-only MACs and parameters of a staged multi-exit model.

    Args:
        model: anything with ``num_exits``, ``forward_stem(x)`` and ``forward_stage(k, state)``
            (MSDNet, the IMTA network).
        input_shape: one image, ``(C, H, W)`` or ``(1, C, H, W)``.

    Returns:
        :class:`ExitCosts`, each list of length ``model.num_exits``.
    """
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if shape[0] != 1:
        raise ValueError(f"count per image: batch must be 1, got input_shape {tuple(input_shape)}")
    param = next(model.parameters())
    x = torch.zeros(shape, dtype=param.dtype, device=param.device)  # values do not matter for counting
    was_training = model.training
    model.eval()
    extra = _ExtraOpCounter(model)
    macs, conv_macs, params = [], [], []
    total = conv_total = 0.0
    try:
        with torch.no_grad():
            state = None
            for k in range(model.num_exits):
                with FlopCounterMode(display=False) as counter:
                    if k == 0:
                        state = model.forward_stem(x)
                    state, _ = model.forward_stage(k, state)
                counts = counter.get_flop_counts().get("Global", {})
                conv = sum(v for op, v in counts.items() if op in _CONV_OPS) / 2
                conv_total += conv
                total += counter.get_total_flops() / 2
                macs.append(total + extra.ops)
                conv_macs.append(conv_total)
                params.append(extra.params)
    finally:
        extra.remove()
        model.train(was_training)
    return ExitCosts(macs=macs, conv_macs=conv_macs, params=params)
