"""The network a run trains or evaluates, built from its saved config (method -> model variant)."""
from __future__ import annotations

from typing import Dict, Optional

import torch.nn as nn

from imta_fast.models import create_imta_model, create_model

__all__ = ["build_model"]


def build_model(config: Dict, num_classes: int, in_channels: int, teacher_state: Optional[Dict] = None) -> nn.Module:
    """The network a run trains or evaluates, from its (saved) config dict.

    ``ce`` -> MSDNet; ``ge`` -> MSDNet with Gradient Equilibrium; ``imta`` -> IMTA heads on a GE
    backbone (the reference wraps msdnet_ge, so GE stays on; it has no effect on a frozen backbone).
    ``teacher_state`` is the stage-1 model state dict, loaded into the backbone for ``imta``.
    """
    method = config["method"]
    backbone = create_model(config["model"], gradient_equilibrium=method in ("ge", "imta"),
                            num_classes=num_classes, in_channels=in_channels)
    backbone.ge_impl = config.get("loss_impl", "auto")  # one flag for both fused kernels
    if method != "imta":
        return backbone
    if teacher_state is not None:
        backbone.load_state_dict(teacher_state)
    return create_imta_model(backbone, isc_detach=config["isc_detach"], backbone_bn=config["backbone_bn"])
