"""Model registry (timm-style): named MSDNet configurations and ``create_model``.

Names:
- ``msdnet_imagenet_step4`` / ``_step6`` / ``_step7``: the ImageNet networks (IMTA uses step 4).
- ``msdnet_cifar_anytime``: CIFAR 7-block anytime network (base 4, step 2, even).
- ``msdnet_cifar_budget``: CIFAR 5-block budget network (base 1, step 1, lin_grow).
- ``msdnet_mnist``: sized for 28x28 single-channel input (the embedded MNIST demo).
- ``msdnet_tiny``: a few thousand parameters, for CPU tests.

RANet (``imta_fast.models.ranet``; the reference's four published command lines):
- ``ranet_cifar``: train_cifar.sh (step 4 even, scales 1-2-3-3, grFactor/bnFactor 4-2-1-1; 8 exits).
- ``ranet_cifar_lg``: the README's CIFAR line (step 2 lg, scales 1-2-3, 4-2-1; 6 exits).
- ``ranet_imagenet``: train_imagenet.sh (growth 16, step 8 even, scales 1-2-3-4, 4-2-1-1; 8 exits).
- ``ranet_imagenet_c32``: the README's ImageNet line (as above with nChannels 32, 4-2-2-1).
- ``ranet_mnist``: sized for 28x28 single-channel input (scales 28/14/7).
- ``ranet_tiny``: a few thousand parameters, for CPU tests (28x28 or 32x32 input, 3 exits).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, List, Union

from imta_fast.models.msdnet import MSDNet, MSDNetConfig
from imta_fast.models.ranet import RANet, RANetConfig

__all__ = ["MSDNet", "MSDNetConfig", "RANet", "RANetConfig", "create_imta_model", "create_model", "list_models",
           "model_config", "register_model"]

ModelConfig = Union[MSDNetConfig, RANetConfig]
_CONFIGS: Dict[str, Callable[[], ModelConfig]] = {}


def register_model(name: str):
    def wrap(fn: Callable[[], ModelConfig]):
        _CONFIGS[name] = fn
        return fn

    return wrap


def _imagenet(step: int) -> MSDNetConfig:
    return MSDNetConfig(num_classes=1000, n_blocks=5, base=step, step=step, step_mode="even", n_channels=32, growth_rate=16,
                        gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4), stem="imagenet", head="imagenet", image_size=224)


for _step in (4, 6, 7):
    register_model(f"msdnet_imagenet_step{_step}")(lambda s=_step: _imagenet(s))


@register_model("msdnet_cifar_anytime")
def _cifar_anytime() -> MSDNetConfig:
    return MSDNetConfig(num_classes=100, n_blocks=7, base=4, step=2, step_mode="even", n_channels=16, growth_rate=6,
                        gr_factor=(1, 2, 4), bn_factor=(1, 2, 4), stem="cifar", head="cifar", image_size=32)


@register_model("msdnet_cifar_budget")
def _cifar_budget() -> MSDNetConfig:
    return replace(_cifar_anytime(), n_blocks=5, base=1, step=1, step_mode="lin_grow")


@register_model("msdnet_mnist")
def _mnist() -> MSDNetConfig:
    # 28x28x1 -> scales 28/14/7; the CIFAR head takes 7 -> 4 -> 2 -> 1.
    return MSDNetConfig(num_classes=10, n_blocks=4, base=2, step=2, step_mode="even", n_channels=8, growth_rate=4,
                        gr_factor=(1, 2, 4), bn_factor=(1, 2, 4), stem="cifar", head="cifar", in_channels=1,
                        image_size=28, cifar_head_width=32)


@register_model("msdnet_tiny")
def _tiny() -> MSDNetConfig:
    return MSDNetConfig(num_classes=10, n_blocks=3, base=1, step=1, step_mode="even", n_channels=4, growth_rate=2,
                        gr_factor=(1, 2), bn_factor=(1, 2), stem="cifar", head="cifar", image_size=16,
                        cifar_head_width=8)


def _ranet_cifar_script() -> RANetConfig:
    # train_cifar.sh; nChannels 16, growthRate 6, nBlocks 2, block-step 2 are the argparse defaults.
    return RANetConfig(num_classes=100, n_blocks=2, block_step=2, step=4, step_mode="even", scale_list=(1, 2, 3, 3),
                       n_channels=16, growth_rate=6, gr_factor=(4, 2, 1, 1), bn_factor=(4, 2, 1, 1),
                       stem="cifar", head="cifar", image_size=32)


register_model("ranet_cifar")(_ranet_cifar_script)


@register_model("ranet_cifar_lg")
def _ranet_cifar_lg() -> RANetConfig:
    return replace(_ranet_cifar_script(), step=2, step_mode="lg", scale_list=(1, 2, 3), gr_factor=(4, 2, 1),
                   bn_factor=(4, 2, 1))


@register_model("ranet_imagenet")
def _ranet_imagenet() -> RANetConfig:
    # train_imagenet.sh leaves nChannels at its default 16.
    return RANetConfig(num_classes=1000, n_blocks=2, block_step=2, step=8, step_mode="even", scale_list=(1, 2, 3, 4),
                       n_channels=16, growth_rate=16, gr_factor=(4, 2, 1, 1), bn_factor=(4, 2, 1, 1),
                       stem="imagenet", head="imagenet", image_size=224)


@register_model("ranet_imagenet_c32")
def _ranet_imagenet_c32() -> RANetConfig:
    return replace(_ranet_imagenet(), n_channels=32, gr_factor=(4, 2, 2, 1), bn_factor=(4, 2, 2, 1))


@register_model("ranet_mnist")
def _ranet_mnist() -> RANetConfig:
    # 28x28x1 -> sub-networks at 7/14/28; every sub-network ends at 7, the CIFAR head takes 7 -> 4 -> 2 -> 1.
    return RANetConfig(num_classes=10, n_blocks=2, block_step=1, step=2, step_mode="even", scale_list=(1, 2, 3),
                       n_channels=8, growth_rate=4, gr_factor=(4, 2, 1), bn_factor=(4, 2, 1), in_channels=1,
                       image_size=28, cifar_head_width=32)


@register_model("ranet_tiny")
def _ranet_tiny() -> RANetConfig:
    # Three sub-networks (28/14/7 or 32/16/8), one exit each; the lowest resolution must be >= 5 for the head.
    return RANetConfig(num_classes=3, n_blocks=1, block_step=1, step=2, step_mode="even", scale_list=(1, 2, 3),
                       n_channels=4, growth_rate=4, gr_factor=(4, 2, 1), bn_factor=(4, 2, 1), image_size=28,
                       cifar_head_width=8)


def list_models() -> List[str]:
    return sorted(_CONFIGS)


def model_config(name: str, **overrides) -> ModelConfig:
    """The named configuration, with fields overridden (e.g. ``num_classes``, ``in_channels``)."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return replace(_CONFIGS[name](), **overrides)


def create_model(name: str, gradient_equilibrium: bool = False, **overrides) -> Union[MSDNet, RANet]:
    cfg = model_config(name, **overrides)
    if isinstance(cfg, RANetConfig):
        return RANet(cfg, gradient_equilibrium=gradient_equilibrium)
    return MSDNet(cfg, gradient_equilibrium=gradient_equilibrium)


def create_imta_model(backbone: Union[MSDNet, RANet], isc_detach: bool = False, backbone_bn: str = "train"):
    """IMTA stage-2 network (ISC heads + OFA teacher) on a stage-1 backbone."""
    from imta_fast.models.imta import IMTANet

    return IMTANet(backbone, isc_detach=isc_detach, backbone_bn=backbone_bn)
