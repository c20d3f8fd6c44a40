"""MSDNet (Huang et al., ICLR 2018) exactly as the reference code builds it.

See ``docs/method.md`` §1 (architecture) and §2 (Gradient Equilibrium placement).

The network is a stem plus ``K`` blocks of multi-scale dense layers; block ``k`` is followed
by classifier ``k`` that reads only the coarsest scale.  Besides ``forward`` the model runs
one *stage* at a time (``forward_stem`` then ``forward_stage(k, state)``), which is what the
batched early-exit evaluator needs: the state between stages is a plain list of scale tensors,
so it can be indexed (compacted) along the batch dimension.

Faithfulness notes
- Weight init: the reference's He-normal init is dead code (it is applied to container
  modules, never to convs), so the effective init is PyTorch's default; we keep the default.
- The ImageNet stem 7x7 conv keeps its bias (it is counted in the published parameter totals).
- Gradient Equilibrium (``gradient_equilibrium=True``) rescales only the coarsest scale, with
  ``1/(K-k)`` on the head's input and ``(K-k-1)/(K-k)`` on what flows to block ``k+1``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from imta_fast.models.staged import StagedMultiExit
from imta_fast.ops.dispatch import gradient_equilibrium_split

__all__ = ["MSDNetConfig", "MSDNet", "ClassifierHead", "layer_plan"]


@dataclass(frozen=True)
class MSDNetConfig:
    """Architecture hyper-parameters, named as in the reference's argparse (docs/method.md §1.1)."""

    num_classes: int
    n_blocks: int = 5
    base: int = 4
    step: int = 4
    step_mode: str = "even"  # 'even' | 'lin_grow'
    n_channels: int = 32
    growth_rate: int = 16
    gr_factor: Tuple[int, ...] = (1, 2, 4, 4)
    bn_factor: Tuple[int, ...] = (1, 2, 4, 4)
    prune: str = "max"  # 'max' | 'min'
    reduction: float = 0.5
    bottleneck: bool = True
    stem: str = "imagenet"  # 'imagenet' (7x7/2 conv + maxpool) | 'cifar' (3x3/1 conv)
    head: str = "imagenet"  # 'imagenet' (C_k wide) | 'cifar' (128 wide)
    in_channels: int = 3
    image_size: int = 224
    cifar_head_width: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "gr_factor", tuple(self.gr_factor))
        object.__setattr__(self, "bn_factor", tuple(self.bn_factor))
        if len(self.gr_factor) != len(self.bn_factor):
            raise ValueError(f"gr_factor {self.gr_factor} and bn_factor {self.bn_factor} differ in length")
        if self.step_mode not in ("even", "lin_grow"):
            raise ValueError(f"step_mode must be 'even' or 'lin_grow', got {self.step_mode!r}")
        if self.prune not in ("max", "min"):
            raise ValueError(f"prune must be 'max' or 'min', got {self.prune!r}")
        if self.stem not in ("imagenet", "cifar") or self.head not in ("imagenet", "cifar"):
            raise ValueError(f"stem/head must be 'imagenet' or 'cifar', got {self.stem!r}/{self.head!r}")

    @property
    def n_scales(self) -> int:
        return len(self.gr_factor)

    def layers_per_block(self) -> List[int]:
        """Block 1 has ``base`` layers; block b>=2 has ``step`` (even) or ``step*(b-1)+1`` (lin_grow)."""
        return [
            self.base if b == 0 else (self.step if self.step_mode == "even" else self.step * b + 1)
            for b in range(self.n_blocks)
        ]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gr_factor"] = list(self.gr_factor)
        d["bn_factor"] = list(self.bn_factor)
        return d


@dataclass(frozen=True)
class LayerSpec:
    """One MSD layer of the global schedule (docs/method.md §1.3)."""

    index: int  # global 1-based layer index
    in_scales: int
    out_scales: int
    transition: bool  # a 1x1 compression follows this layer


def layer_plan(cfg: MSDNetConfig) -> List[List[LayerSpec]]:
    """Per block, the list of layers with their in/out scale counts and transitions."""
    per_block = cfg.layers_per_block()
    total, n_scales = sum(per_block), cfg.n_scales
    plan, ell = [], 0
    for n_layers in per_block:
        block = []
        for _ in range(n_layers):
            ell += 1
            if cfg.prune == "max":
                interval = math.ceil(total / n_scales)
                in_s = n_scales - math.floor(max(0, ell - 2) / interval)
                out_s = n_scales - math.floor((ell - 1) / interval)
                transition = in_s > out_s and cfg.reduction > 0
            else:
                in_s = min(n_scales, total - ell + 2)
                out_s = min(n_scales, total - ell + 1)
                transition = cfg.reduction > 0 and ell in (math.floor(total / 3), math.floor(2 * total / 3))
            block.append(LayerSpec(ell, in_s, out_s, transition))
        plan.append(block)
    return plan


# ----------------------------------------------------------------------------- primitive units
class ConvBNReLU(nn.Sequential):
    """Conv (no bias) -> BN -> ReLU: the reference's ConvBasic."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class BottleneckUnit(nn.Sequential):
    """1x1 bottleneck to ``min(c_in, width*c_out)`` then 3x3 (stride 1 'normal' / 2 'down')."""

    def __init__(self, c_in: int, c_out: int, down: bool, bottleneck: bool, width: int):
        layers: List[nn.Module] = []
        c_inner = c_in
        if bottleneck:
            c_inner = min(c_in, width * c_out)
            layers.append(ConvBNReLU(c_in, c_inner, kernel=1, stride=1, padding=0))
        layers.append(ConvBNReLU(c_inner, c_out, kernel=3, stride=2 if down else 1, padding=1))
        super().__init__(*layers)


class NormalUnit(nn.Module):
    """Dense unit within one scale: ``[x, U(x)]``."""

    def __init__(self, c_in: int, growth: int, bottleneck: bool, width: int):
        super().__init__()
        self.conv_normal = BottleneckUnit(c_in, growth, False, bottleneck, width)

    def forward(self, finer: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv_normal(x)], dim=1)


class DownNormalUnit(nn.Module):
    """Dense unit fed by the finer scale too: ``[x, U_down(finer), U_normal(x)]``, each half-width."""

    def __init__(self, c_finer: int, c_in: int, growth: int, bottleneck: bool, width_finer: int, width: int):
        super().__init__()
        self.conv_down = BottleneckUnit(c_finer, growth // 2, True, bottleneck, width_finer)
        self.conv_normal = BottleneckUnit(c_in, growth // 2, False, bottleneck, width)

    def forward(self, finer: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv_down(finer), self.conv_normal(x)], dim=1)


class Stem(nn.Module):
    """One tensor per scale: finest from the image, each coarser by a stride-2 CBR (docs/method.md §1.2)."""

    def __init__(self, cfg: MSDNetConfig):
        super().__init__()
        widths = [cfg.n_channels * g for g in cfg.gr_factor]
        if cfg.stem == "imagenet":
            first = nn.Sequential(
                nn.Conv2d(cfg.in_channels, widths[0], 7, 2, 3),  # bias kept, as in the reference
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            first = ConvBNReLU(cfg.in_channels, widths[0], 3, 1, 1)
        self.scales = nn.ModuleList([first] + [ConvBNReLU(widths[s - 1], widths[s], 3, 2, 1) for s in range(1, cfg.n_scales)])

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        out = []
        for layer in self.scales:
            x = layer(x)
            out.append(x)
        return out


class MSDLayer(nn.Module):
    """One multi-scale dense layer; drops at most the finest scale (docs/method.md §1.3)."""

    def __init__(self, cfg: MSDNetConfig, c: int, spec: LayerSpec):
        super().__init__()
        n_scales, gr, bn, g = cfg.n_scales, cfg.gr_factor, cfg.bn_factor, cfg.growth_rate
        self.out_scales = spec.out_scales
        self.discard = spec.in_scales - spec.out_scales
        if self.discard not in (0, 1):
            raise ValueError(f"layer {spec.index} drops {self.discard} scales; MSDNet drops at most one per layer")
        offset = n_scales - spec.out_scales
        units: List[nn.Module] = []
        if self.discard:
            units.append(DownNormalUnit(c * gr[offset - 1], c * gr[offset], g * gr[offset], cfg.bottleneck, bn[offset - 1], bn[offset]))
        else:
            units.append(NormalUnit(c * gr[offset], g * gr[offset], cfg.bottleneck, bn[offset]))
        for s in range(offset + 1, n_scales):
            units.append(DownNormalUnit(c * gr[s - 1], c * gr[s], g * gr[s], cfg.bottleneck, bn[s - 1], bn[s]))
        self.units = nn.ModuleList(units)

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        # Input holds out_scales + discard tensors; unit i reads (finer, current) = xs[i-1+discard], xs[i+discard].
        out = []
        for i, unit in enumerate(self.units):
            j = i + self.discard
            out.append(unit(xs[j - 1] if j > 0 else None, xs[j]))
        return out


class Transition(nn.Module):
    """1x1 CBR compression per kept scale (the reference's ParallelModule)."""

    def __init__(self, cfg: MSDNetConfig, c_in: int, c_out: int, out_scales: int):
        super().__init__()
        offset = cfg.n_scales - out_scales
        self.convs = nn.ModuleList(
            [ConvBNReLU(c_in * cfg.gr_factor[s], c_out * cfg.gr_factor[s], 1, 1, 0) for s in range(offset, cfg.n_scales)]
        )

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.convs, xs)]


class ClassifierHead(nn.Module):
    """Exit head on the coarsest scale; returns ``(logits, pooled_features)`` (docs/method.md §1.4)."""

    def __init__(self, c_in: int, num_classes: int, kind: str, cifar_width: int = 128):
        super().__init__()
        width = cifar_width if kind == "cifar" else c_in
        self.features = nn.Sequential(ConvBNReLU(c_in, width, 3, 2, 1), ConvBNReLU(width, width, 3, 2, 1), nn.AvgPool2d(2))
        self.linear = nn.Linear(width, num_classes)
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feat = self.features(x).flatten(1)
        return self.linear(feat), feat


# ----------------------------------------------------------------------------- the network
class MSDNet(StagedMultiExit, nn.Module):
    """Multi-scale dense network with ``K = cfg.n_blocks`` exits.

    Args:
        cfg: architecture (see :class:`MSDNetConfig` and the named configs in ``imta_fast.models``).
        gradient_equilibrium: apply IMTA's GE gradient rescaling on the coarsest scale (docs/method.md §2).
        ge_impl: 'auto' (fused one-pass torch.lerp backward on CUDA), 'torch' (reference) or 'triton'.

    Shape:
        input ``[B, in_channels, H, W]``; ``forward`` returns ``(logits, features)``, two lists of
        ``K`` tensors ``[B, num_classes]`` and ``[B, feature_dim_k]``.

    Example:
        >>> from imta_fast.models import create_model
        >>> net = create_model("msdnet_tiny", num_classes=10)
        >>> logits, feats = net(torch.randn(2, 3, 32, 32))
        >>> len(logits), logits[0].shape
        (3, torch.Size([2, 10]))
    """

    def __init__(self, cfg: MSDNetConfig, gradient_equilibrium: bool = False, ge_impl: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.gradient_equilibrium = gradient_equilibrium
        self.ge_impl = ge_impl
        self.stem = Stem(cfg)
        self.blocks = nn.ModuleList()
        self.heads = nn.ModuleList()
        c = cfg.n_channels
        for block_plan in layer_plan(cfg):
            layers: List[nn.Module] = []
            for spec in block_plan:
                layers.append(MSDLayer(cfg, c, spec))
                c += cfg.growth_rate
                if spec.transition:
                    c_new = math.floor(cfg.reduction * c)
                    layers.append(Transition(cfg, c, c_new, spec.out_scales))
                    c = c_new
            self.blocks.append(nn.Sequential(*layers))
            self.heads.append(ClassifierHead(c * cfg.gr_factor[-1], cfg.num_classes, cfg.head, cfg.cifar_head_width))

    @property
    def num_exits(self) -> int:
        return self.cfg.n_blocks

    def forward_stem(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Image -> list of per-scale tensors (finest first)."""
        return self.stem(x)

    def forward_block(self, k: int, xs: List[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Block ``k`` (0-based). Returns (scale tensors for block k+1, input of head k).

        With GE on, the coarsest output ``h`` reaches head ``k`` with gradient scale ``1/(K-k)`` and
        block ``k+1`` with ``(K-k-1)/(K-k)``; forward values are unchanged.
        """
        xs = list(self.blocks[k](xs))
        head_in = xs[-1]
        remaining = self.num_exits - k
        if self.gradient_equilibrium and remaining > 1:
            # The last block (remaining == 1) has scale 1 on its head and nothing after it: no op.
            head_in, xs[-1] = gradient_equilibrium_split(head_in, 1.0 / remaining, (remaining - 1) / remaining,
                                                                 impl=self.ge_impl)
        return xs, head_in
