"""IMTA stage 2: Inline Subnetwork Collaboration heads on a frozen GE MSDNet (docs/method.md §3, §5).

For exit k with pooled backbone feature f_k (width d_k) and new logits z_k:

    z_1 = New_1(f_1)
    z_k = New_k( cat[f_k, ISC_{k-1}(z_{k-1})] ),   ISC_{k-1} = Linear(C -> d_k) -> BN1d -> ReLU

The prior passed from exit k-1 is its *raw new logits*.  The reference does not detach it, so
exit k's loss also trains the earlier new heads; ``isc_detach=True`` follows the paper's text
instead.  The OFA teacher is the frozen GE network's own last-exit Linear output, detached.

Stage-2 backbone BN mode: the reference keeps the frozen backbone in train() mode, so its BN
layers use batch statistics and keep updating running stats (``backbone_bn='train'``, default);
``backbone_bn='eval'`` freezes them.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from imta_fast.models.msdnet import MSDNet

__all__ = ["IMTANet"]

State = Tuple[List[torch.Tensor], Optional[torch.Tensor]]


class IMTANet(nn.Module):
    """ISC + new classifiers on top of a (GE-trained) MSDNet.

    Args:
        backbone: the stage-1 network; its parameters are frozen here.
        isc_detach: stop exit k's gradient at the prior from exit k-1 (paper) instead of the code.
        backbone_bn: 'train' (reference: batch statistics, running stats drift) or 'eval'.

    Shape:
        ``forward(x)`` returns ``(logits, teacher)``: a list of K tensors ``[B, C]`` (new exits)
        and the GE network's last-exit logits ``[B, C]`` (detached).
    """

    def __init__(self, backbone: MSDNet, isc_detach: bool = False, backbone_bn: str = "train"):
        super().__init__()
        if backbone_bn not in ("train", "eval"):
            raise ValueError(f"backbone_bn must be 'train' or 'eval', got {backbone_bn!r}")
        self.backbone = backbone
        self.isc_detach = isc_detach
        self.backbone_bn = backbone_bn
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        d, n_classes = backbone.feature_dims, backbone.cfg.num_classes
        self.classifiers = nn.ModuleList(
            [nn.Linear(d[0], n_classes)] + [nn.Linear(2 * d[k], n_classes) for k in range(1, len(d))]
        )
        self.isc = nn.ModuleList(
            [nn.Sequential(nn.Linear(n_classes, d[k + 1]), nn.BatchNorm1d(d[k + 1]), nn.ReLU(inplace=True))
             for k in range(len(d) - 1)]
        )

    @property
    def num_exits(self) -> int:
        return self.backbone.num_exits

    @property
    def cfg(self):
        return self.backbone.cfg

    def train(self, mode: bool = True) -> "IMTANet":
        super().train(mode)
        if mode and self.backbone_bn == "eval":
            self.backbone.eval()
        return self

    def _new_logits(self, k: int, feat: torch.Tensor, prior: Optional[torch.Tensor]) -> torch.Tensor:
        if k == 0:
            return self.classifiers[0](feat)
        if self.isc_detach:
            prior = prior.detach()
        return self.classifiers[k](torch.cat([feat, self.isc[k - 1](prior)], dim=1))

    def forward_stem(self, x: torch.Tensor) -> State:
        return self.backbone.forward_stem(x), None

    def forward_stage(self, k: int, state: State) -> Tuple[State, torch.Tensor]:
        """Backbone block k, head k's pooled feature (the GE Linear is skipped), new exit k."""
        xs, prior = state
        xs, head_in = self.backbone.forward_block(k, xs)
        feat = self.backbone.heads[k].features(head_in).flatten(1)
        z = self._new_logits(k, feat, prior)
        return (xs, z), z

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        # The backbone is frozen, so it runs without autograd: nothing of it is kept for backward and
        # only the new heads and ISC modules build a graph (values are bit-identical either way; with
        # backbone_bn='train' its BN layers still use batch statistics and update running stats).
        with torch.no_grad():
            xs = self.backbone.forward_stem(x)
        new_logits: List[torch.Tensor] = []
        prior: Optional[torch.Tensor] = None
        teacher = None
        for k in range(self.num_exits):
            with torch.no_grad():
                xs, head_in = self.backbone.forward_block(k, xs)
                if k == self.num_exits - 1:
                    teacher, feat = self.backbone.heads[k](head_in)
                else:
                    feat = self.backbone.heads[k].features(head_in).flatten(1)
            prior = self._new_logits(k, feat, prior)
            new_logits.append(prior)
        return new_logits, teacher
