"""RANet (Yang et al., "Resolution Adaptive Networks for Efficient Inference", CVPR 2020).

Built as the reference (yangle15/RANet-pytorch, ``models/RANet.py``) builds it; the architecture
is summarised in ``docs/method.md §12``.

Structure
- A stem turns the image into one tensor per sub-network: the first conv (3x3/1 on CIFAR, 7x7/2 +
  max-pool on ImageNet) at the highest resolution, then one 3x3 CBR per further entry, stride 2
  where ``scale_list`` changes and stride 1 where it repeats. Sub-network ``i`` reads tensor ``i``
  (``n_channels * gr_factor[i]`` wide); sub-network 0 has the lowest resolution.
- Sub-network ``i`` has ``n_blocks + block_step * i`` dense blocks; block ``j`` (0-based) has
  ``step`` layers (``even``) or ``step * (j + 1)`` (``lg``), growth ``growth_rate * gr_factor[i]``.
  Its first ``n_blocks + block_step * (i - 1)`` blocks (as many as sub-network ``i-1`` has) are
  *fusion* blocks: layer ``l`` of fusion block ``j`` concatenates ``[x, U(up(x_low)), N(x)]`` where
  ``x_low`` is the ``l``-th tensor of block ``j`` of the previous sub-network, ``U`` a bottleneck
  to ``floor(g * compress_factor)`` channels and ``N`` one to the rest, everything resized
  (bilinear, ``align_corners=True``) to ``N``'s output size. The last layer of some fusion blocks
  has a stride-2 ``N`` (and its ``x`` is resized down too): the reference's rule is "block number
  (1-based) is in the last ``scale_list[i] - 1`` entries of ``[0, B_0, ..., B_{i-1}]``", with
  Python's ``[-0:]`` quirk kept. After its layers, a fusion block appends a 1x1 CBR of the last
  dense feature of the previous sub-network's block ``j`` (before that block's transition), resized. The remaining ``block_step`` blocks (all of them for
  sub-network 0) are plain dense blocks, each followed by an exit head.
- A 1x1 CBR transition (``reduction``) closes block ``j`` when ``j + 1 == floor(m * B_i / s_i)``
  for some ``m`` in ``1 .. s_i - 1`` (``s_i = scale_list[i]``, ``B_i`` its block count).
- Exit heads: two 3x3/2 CBRs (128 wide on CIFAR, input-wide on ImageNet), ``AvgPool2d(2)``, Linear.

Staged execution (for the early-exit evaluator)
Stage ``k`` runs the blocks up to exit ``k`` and the head. The state between stages is a pytree
``(x, feats, pending)`` of batch-major tensors: ``x`` the tensor the next block reads, ``feats``
the per-block dense features of the sub-network being run (or just finished), which the next
sub-network's fusion blocks read, and ``pending`` the stem outputs of the sub-networks not started
yet. Row-gathering every leaf compacts a batch exactly. Features nobody will read are dropped (the
last sub-network keeps none; a finished sub-network's continuation is replaced by the next stem
tensor; a sub-network's features are dropped once the next one's fusion blocks have run). When a
plain block has no transition its output is both ``x`` and the last entry of its features: the same
tensor, gathered twice by the evaluator (harmless; a small memory-traffic cost).

Gradient Equilibrium (``gradient_equilibrium=True``; ``docs/method.md §2``, rule for RANet ours)
RANet's trunk is not a single stream: after exit ``k`` later exits depend on the continuation of
the current sub-network, on every dense feature of that sub-network (through the next
sub-network's fusion blocks) and on the stem outputs not yet used. The boundary state is exactly
the set of tensors through which later exits depend on anything computed so far, so the split is
placed there: with ``r = K - k`` exits left, head ``k``'s input gets gradient scale ``1/r`` and
*every leaf of the state handed to stage k+1* gets ``(r - 1)/r`` (the head input and the
continuation are one tensor split in two when they coincide). By induction over stages, the
gradient reaching any tensor computed in stage ``k`` is then the *mean* of the gradients of the
losses of exits ``k .. K-1`` (the exits that can depend on it), which is what GE's
``1/(K-k)``, ``(K-k-1)/(K-k)`` rule achieves on a chain; for a single-stream trunk the rule is
MSDNet's. (The MSDNet reference rescales only the coarsest scale and leaves its finer scales
unscaled; RANet has no reference GE, so we take the rule that keeps the mean property exact.)
Equivalently: every backbone parameter used in stage ``k`` (the stem: stage 0) receives exactly
``1/(K-k)`` of its plain (sum-of-exit-losses) gradient, and heads receive their full gradient
(``tests/models/test_ranet.py`` checks this in float64). Forward values are unchanged; the last stage
has ``r = 1`` and no split.

Faithfulness notes
- Weight init: the reference re-initialises convs He-normal (fan-out), BN to (1, 0) and Linear
  biases to 0 in the sub-networks and heads (not the stem); ``reference_init=True`` (default) does
  the same; PyTorch's default init otherwise.
- The ImageNet stem 7x7 conv keeps its bias (counted in parameters, not in ops, as the reference).
- Resizes to the same size are skipped (bilinear with ``align_corners=True`` is then the identity).
- A fusion block of one layer crashes the reference (``NameError``); here its only layer is the
  last layer (possibly stride 2).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from imta_fast.models.msdnet import BottleneckUnit, ClassifierHead, ConvBNReLU
from imta_fast.models.staged import StagedMultiExit
from imta_fast.ops.dispatch import gradient_equilibrium_split

__all__ = ["RANetConfig", "RANet", "BlockSpec", "block_plan"]

Feats = Tuple[Tuple[torch.Tensor, ...], ...]
State = Tuple[torch.Tensor, Feats, Tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class RANetConfig:
    """Architecture hyper-parameters, named after the reference's argparse flags (``args.py``).

    ``gr_factor``/``bn_factor``/``scale_list`` are ordered from the first (lowest-resolution)
    sub-network to the last, as the reference's ``--grFactor 4-2-1`` etc.
    """

    num_classes: int
    n_blocks: int = 2  # --nBlocks: blocks of sub-network 0
    block_step: int = 2  # --block-step: extra blocks (= exits) per further sub-network
    step: int = 4  # --step: layers per block (even) or increment (lg)
    step_mode: str = "even"  # 'even' | 'lg'
    scale_list: Tuple[int, ...] = (1, 2, 3)
    n_channels: int = 16
    growth_rate: int = 6
    gr_factor: Tuple[int, ...] = (4, 2, 1)
    bn_factor: Tuple[int, ...] = (4, 2, 1)
    compress_factor: float = 0.25
    reduction: float = 0.5
    stem: str = "cifar"  # 'cifar' (3x3/1 conv) | 'imagenet' (7x7/2 conv with bias + max-pool)
    head: str = "cifar"  # 'cifar' (cifar_head_width wide) | 'imagenet' (input-wide)
    in_channels: int = 3
    image_size: int = 32
    cifar_head_width: int = 128

    def __post_init__(self) -> None:
        for name in ("scale_list", "gr_factor", "bn_factor"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        n = len(self.scale_list)
        if n < 1 or len(self.gr_factor) != n or len(self.bn_factor) != n:
            raise ValueError(f"scale_list {self.scale_list}, gr_factor {self.gr_factor} and bn_factor "
                             f"{self.bn_factor} must be non-empty and of equal length")
        if self.scale_list[0] < 1 or any(b < a for a, b in zip(self.scale_list, self.scale_list[1:])):
            raise ValueError(f"scale_list must be positive and non-decreasing, got {self.scale_list}")
        if self.step_mode not in ("even", "lg"):
            raise ValueError(f"step_mode must be 'even' or 'lg', got {self.step_mode!r}")
        if self.stem not in ("imagenet", "cifar") or self.head not in ("imagenet", "cifar"):
            raise ValueError(f"stem/head must be 'imagenet' or 'cifar', got {self.stem!r}/{self.head!r}")
        if self.n_blocks < 1 or self.step < 1 or (n > 1 and self.block_step < 1):
            raise ValueError(f"n_blocks and step must be >= 1 and block_step >= 1 with several sub-networks, got "
                             f"n_blocks={self.n_blocks}, step={self.step}, block_step={self.block_step}")
        if min(self.gr_factor + self.bn_factor) < 1 or self.n_channels < 1 or self.growth_rate < 1:
            raise ValueError("n_channels, growth_rate, gr_factor and bn_factor must be positive")
        if not 0.0 < self.reduction <= 1.0:
            raise ValueError(f"reduction must be in (0, 1], got {self.reduction}")
        for i in range(1, n):
            g = self.growth_rate * self.gr_factor[i]
            if not 1 <= math.floor(g * self.compress_factor) < g:
                raise ValueError(f"compress_factor {self.compress_factor} leaves sub-network {i} (growth {g}) with "
                                 f"{math.floor(g * self.compress_factor)} up-sampled channels per layer; "
                                 f"need 1 .. {g - 1}")

    @property
    def n_scales(self) -> int:
        return len(self.scale_list)

    def blocks_per_subnet(self) -> List[int]:
        """``B_i = n_blocks + block_step * i`` (the reference's ``nBlocks[1:]``)."""
        return [self.n_blocks + self.block_step * i for i in range(self.n_scales)]

    def layers_in_block(self, j: int) -> int:
        """Layers of block ``j`` (0-based) in any sub-network: ``step`` or ``step * (j + 1)`` (lg)."""
        return self.step if self.step_mode == "even" else self.step * (j + 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("scale_list", "gr_factor", "bn_factor"):
            d[name] = list(d[name])
        return d


@dataclass(frozen=True)
class BlockSpec:
    """One block of one sub-network, with its channel arithmetic."""

    subnet: int
    index: int  # 0-based within the sub-network
    n_layers: int
    c_in: int
    growth: int
    fusion: bool  # reads the previous sub-network's block ``index``
    down: bool  # last layer is stride 2 (fusion blocks only)
    transition: bool
    c_low: Tuple[int, ...]  # channels of the previous sub-network's block features (fusion only)
    c_feats: Tuple[int, ...]  # channels of this block's features [input, after layer 1, ...]
    c_out: int  # channels of the block output (after the fusion concat and the transition)
    exit: bool  # an exit head follows


def block_plan(cfg: RANetConfig) -> List[List[BlockSpec]]:
    """Per sub-network, its blocks in order (reference ``RANet.__init__``)."""
    B = cfg.blocks_per_subnet()
    cum = [0] + B  # the reference's self.nBlocks
    plan: List[List[BlockSpec]] = []
    prev: List[BlockSpec] = []
    for i in range(cfg.n_scales):
        c, g, s = cfg.n_channels * cfg.gr_factor[i], cfg.growth_rate * cfg.gr_factor[i], cfg.scale_list[i]
        down_at = cum[: i + 1][-(s - 1):]  # the reference's slice, [-0:] (whole list) included
        blocks = []
        for j in range(B[i]):
            n_layers = cfg.layers_in_block(j)
            fusion = j + 1 <= cum[i]
            transition = any(j + 1 == math.floor((m + 1) * B[i] / s) for m in range(s - 1))
            feats = tuple(c + l * g for l in range(n_layers + 1))
            c_out = feats[-1]
            if fusion:
                c_out += math.floor(c_out * cfg.compress_factor)
            if transition:
                c_out = math.floor(cfg.reduction * c_out)
            low = prev[j].c_feats if fusion else ()
            if fusion and len(low) != n_layers + 1:
                raise AssertionError("fusion block and its source block differ in depth")  # unreachable
            blocks.append(BlockSpec(i, j, n_layers, c, g, fusion, fusion and (j + 1) in down_at, transition,
                                    low, feats, c_out, not fusion))
            c = c_out
        plan.append(blocks)
        prev = blocks
    return plan


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The reference's bilinear ``align_corners=True`` resize; the identity when sizes match."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


# ----------------------------------------------------------------------------- layers and blocks
class DenseLayer(nn.Module):
    """``[x, N(x)]`` with a bottleneck ``N`` (the reference's ConvNormal)."""

    def __init__(self, c_in: int, growth: int, width: int):
        super().__init__()
        self.conv_normal = BottleneckUnit(c_in, growth, False, True, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv_normal(x)], dim=1)


class FusionLayer(nn.Module):
    """``[x, U(x_low), N(x)]``, all at ``N``'s output size (the reference's ConvUpNormal)."""

    def __init__(self, c_in: int, c_low: int, growth: int, compress_factor: float, down: bool,
                 width: int, width_low: int):
        super().__init__()
        c_up = math.floor(growth * compress_factor)
        self.conv_up = BottleneckUnit(c_low, c_up, False, True, width_low)
        self.conv_normal = BottleneckUnit(c_in, growth - c_up, down, True, width)

    def forward(self, low: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        res = self.conv_normal(x)
        size = res.shape[-2:]
        return torch.cat([_resize(x, size), _resize(self.conv_up(low), size), res], dim=1)


class DenseBlock(nn.Module):
    """Dense block of plain layers; returns (output, features ``[input, after layer 1, ...]``)."""

    def __init__(self, cfg: RANetConfig, spec: BlockSpec):
        super().__init__()
        bn = cfg.bn_factor[spec.subnet]
        self.layers = nn.ModuleList([DenseLayer(spec.c_feats[l], spec.growth, bn) for l in range(spec.n_layers)])
        self.trans = ConvBNReLU(spec.c_feats[-1], spec.c_out, 1, 1, 0) if spec.transition else None

    def forward(self, x: torch.Tensor, low: Optional[Tuple[torch.Tensor, ...]] = None):
        feats = [x]
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        if self.trans is not None:
            x = self.trans(x)
        return x, tuple(feats)


class FusionBlock(nn.Module):
    """Dense block of fusion layers + the compressed previous-block output (the reference's _BlockUpNormal)."""

    def __init__(self, cfg: RANetConfig, spec: BlockSpec):
        super().__init__()
        i, L = spec.subnet, spec.n_layers
        bn, bn_low = cfg.bn_factor[i], cfg.bn_factor[i - 1]
        self.layers = nn.ModuleList([
            FusionLayer(spec.c_feats[l], spec.c_low[l], spec.growth, cfg.compress_factor,
                        spec.down and l == L - 1, bn, bn_low)
            for l in range(L)
        ])
        c_dense = spec.c_feats[-1]
        self.conv_last = ConvBNReLU(spec.c_low[L], math.floor(c_dense * cfg.compress_factor), 1, 1, 0)
        c_cat = c_dense + math.floor(c_dense * cfg.compress_factor)
        self.trans = ConvBNReLU(c_cat, spec.c_out, 1, 1, 0) if spec.transition else None

    def forward(self, x: torch.Tensor, low: Tuple[torch.Tensor, ...]):
        feats = [x]
        for layer, x_low in zip(self.layers, low):
            x = layer(x_low, x)
            feats.append(x)
        x = torch.cat([x, _resize(self.conv_last(low[-1]), x.shape[-2:])], dim=1)
        if self.trans is not None:
            x = self.trans(x)
        return x, tuple(feats)


class Stem(nn.Module):
    """The reference's RAFirstLayer: one tensor per sub-network, returned lowest resolution first."""

    def __init__(self, cfg: RANetConfig):
        super().__init__()
        widths = [cfg.n_channels * g for g in cfg.gr_factor[::-1]]  # highest resolution first
        scales = cfg.scale_list[::-1]
        if cfg.stem == "imagenet":
            first: nn.Module = nn.Sequential(
                nn.Conv2d(cfg.in_channels, widths[0], 7, 2, 3),  # bias kept, as in the reference
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            first = ConvBNReLU(cfg.in_channels, widths[0], 3, 1, 1)
        layers = [first]
        for s in range(1, cfg.n_scales):
            stride = 1 if scales[s] == scales[s - 1] else 2
            layers.append(ConvBNReLU(widths[s - 1], widths[s], 3, stride, 1))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out[::-1]


@dataclass(frozen=True)
class _Stage:
    subnet: int
    first_block: int
    last_block: int  # inclusive; exit head follows it
    starts_subnet: bool
    ends_subnet: bool


# ----------------------------------------------------------------------------- the network
class RANet(StagedMultiExit, nn.Module):
    """Resolution adaptive network with ``K = n_blocks + block_step * (S - 1)`` exits (one per plain block).

    Args:
        cfg: architecture (see :class:`RANetConfig` and the ``ranet_*`` configs in ``imta_fast.models``).
        gradient_equilibrium: GE gradient rescaling at every stage boundary (module docstring).
        ge_impl: 'auto' (fused one-pass torch.lerp backward on CUDA), 'torch' (reference) or 'triton'.
        reference_init: the reference's He-normal conv init (module docstring).

    Shape:
        input ``[B, in_channels, H, W]``; ``forward`` returns ``(logits, features)``, two lists of
        ``K`` tensors ``[B, num_classes]`` and ``[B, feature_dim_k]``.

    Example:
        >>> from imta_fast.models import create_model
        >>> net = create_model("ranet_tiny", num_classes=3)
        >>> logits, feats = net(torch.randn(2, 3, 28, 28))
        >>> len(logits), logits[0].shape
        (3, torch.Size([2, 3]))
    """

    def __init__(self, cfg: RANetConfig, gradient_equilibrium: bool = False, ge_impl: str = "auto",
                 reference_init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.gradient_equilibrium = gradient_equilibrium
        self.ge_impl = ge_impl
        self.plan = block_plan(cfg)
        self.stem = Stem(cfg)
        self.subnets = nn.ModuleList(
            nn.ModuleList(FusionBlock(cfg, b) if b.fusion else DenseBlock(cfg, b) for b in blocks)
            for blocks in self.plan
        )
        self.heads = nn.ModuleList(
            ClassifierHead(b.c_out, cfg.num_classes, cfg.head, cfg.cifar_head_width)
            for blocks in self.plan for b in blocks if b.exit
        )
        stages = []
        for i, blocks in enumerate(self.plan):
            start = 0
            exits = [b.index for b in blocks if b.exit]
            for e in exits:
                stages.append(_Stage(i, start, e, start == 0, e == exits[-1]))
                start = e + 1
        self._stages = tuple(stages)
        if reference_init:
            for m in list(self.subnets.modules()) + list(self.heads.modules()):
                if isinstance(m, nn.Conv2d):
                    n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def forward_stem(self, x: torch.Tensor) -> State:
        """Image -> state ``(x_0, (), (stem tensors of sub-networks 1..S-1))``."""
        inp = self.stem(x)
        return inp[0], (), tuple(inp[1:])

    def forward_block(self, k: int, state: State) -> Tuple[State, torch.Tensor]:
        """The blocks of stage ``k`` (0-based). Returns (state for stage k+1, input of head k)."""
        st = self._stages[k]
        x, feats, pending = state
        low: Feats = feats if (st.starts_subnet and st.subnet > 0) else ()
        own: List[Tuple[torch.Tensor, ...]] = [] if st.starts_subnet else list(feats)
        keep = st.subnet < self.cfg.n_scales - 1  # the last sub-network's features feed nobody
        blocks = self.subnets[st.subnet]
        for j in range(st.first_block, st.last_block + 1):
            x, block_feats = blocks[j](x, low[j] if j < len(low) else None)
            if keep:
                own.append(block_feats)
        head_in = x
        continues = not (st.ends_subnet and len(pending) > 0)  # else the next stage starts from the next stem tensor
        if not continues:
            x, pending = pending[0], pending[1:]
        new_state: State = (x, tuple(own), pending)
        remaining = self.num_exits - k
        if self.gradient_equilibrium and remaining > 1:
            head_in, new_state = self._ge_split(head_in, new_state, continues, remaining)
        return new_state, head_in

    def _ge_split(self, head_in: torch.Tensor, state: State, continues: bool,
                  remaining: int) -> Tuple[torch.Tensor, State]:
        """Head input at ``1/r``, every state leaf at ``(r-1)/r`` (module docstring)."""
        s_head, s_next = 1.0 / remaining, (remaining - 1) / remaining
        x, feats, pending = state

        def nxt(t: torch.Tensor) -> torch.Tensor:
            return gradient_equilibrium_split(t, s_head, s_next, impl=self.ge_impl)[1]

        if continues:  # x is head_in: one split, two aliases
            head_in, x = gradient_equilibrium_split(head_in, s_head, s_next, impl=self.ge_impl)
        else:
            head_in = gradient_equilibrium_split(head_in, s_head, s_next, impl=self.ge_impl)[0]
            x = nxt(x)
        feats = tuple(tuple(nxt(t) for t in block) for block in feats)
        return head_in, (x, feats, tuple(nxt(t) for t in pending))
