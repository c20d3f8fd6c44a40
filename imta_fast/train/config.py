"""Training / evaluation configuration: argparse (grouped, timm names) -> frozen dataclass.

Config flows one way: ``build_train_parser()`` -> ``TrainConfig.from_args()`` -> explicit
arguments into library functions.  The resolved config is saved as ``args.yaml`` in the run dir.
Defaults that depend on the dataset (hold-out size, LR milestones, OFA T/gamma) are resolved in
``from_args`` so that the saved file shows the values actually used.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Sequence, Tuple

import yaml

__all__ = ["TrainConfig", "build_train_parser", "DATASET_DEFAULTS"]

# Per-dataset defaults: (model, hold-out images, OFA temperature, OFA gamma).
# ImageNet T/gamma are run_IMTA.sh's; the others are IMTA's argparse defaults (spec §4).
DATASET_DEFAULTS = {
    "mnist": ("msdnet_mnist", 500, 3.0, 0.9),
    "digits": ("msdnet_mnist", 200, 3.0, 0.9),
    "cifar10": ("msdnet_cifar_anytime", 5000, 3.0, 0.9),
    "cifar100": ("msdnet_cifar_anytime", 5000, 3.0, 0.9),
    "imagenet": ("msdnet_imagenet_step4", 50000, 1.0, 0.1),
}
METHODS = ("ce", "ge", "imta")


@dataclass(frozen=True)
class TrainConfig:
    # data
    dataset: str = "mnist"
    data_dir: Optional[str] = None
    holdout_size: int = 500
    holdout_transform: str = "train"  # reference: the hold-out reuses the training augmentation
    workers: int = 0
    data_backend: str = "pytorch"  # 'pytorch' | 'dali' (ImageFolder JPEGs, training loader)
    image_size: Optional[int] = None  # ImageFolder crop size (dataset default: 224)
    # model / method
    model: str = "msdnet_mnist"
    method: str = "ce"
    teacher: Optional[str] = None  # stage-1 (GE) checkpoint for --method imta
    isc_detach: bool = False
    backbone_bn: str = "train"
    temperature: float = 3.0
    gamma: float = 0.9
    kl_reduction: str = "mean"
    loss_impl: str = "auto"
    # optimisation
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    lr_schedule: str = "step"
    lr_milestones: Tuple[float, ...] = (0.5, 0.75)  # fractions of the epochs (CIFAR rule) or epochs (>= 1)
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    # engine
    amp: bool = False
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    sync_bn: bool = False
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    output: str = "runs/default"
    resume: Optional[str] = None
    log_interval: int = 50
    max_steps_per_epoch: int = 0  # 0: the whole epoch (a smaller number is for smoke tests)
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"--method must be one of {METHODS}, got {self.method!r}")
        _check(self.method != "imta" or self.teacher, "--method imta needs --teacher PATH (a stage-1 GE checkpoint)")
        _check(self.lr_schedule in ("step", "cosine"), f"--lr-schedule must be step or cosine, got {self.lr_schedule!r}")
        _check(self.kl_reduction in ("mean", "batchmean"), f"--kl-reduction must be mean or batchmean")
        _check(self.holdout_transform in ("train", "eval"), "--holdout-transform must be train or eval")
        _check(self.backbone_bn in ("train", "eval"), "--backbone-bn must be train or eval")
        _check(self.epochs > 0 and self.batch_size > 0, "--epochs and --batch-size must be positive")
        _check(self.amp_dtype in ("bfloat16", "float16"), "--amp-dtype must be bfloat16 or float16")
        _check(self.data_backend == "pytorch" or self.dataset == "imagenet",
               f"--data-backend dali reads ImageFolder JPEGs: use it with --dataset imagenet, not {self.dataset!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        model, holdout, temperature, gamma = DATASET_DEFAULTS[args.dataset]
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        defaults = {"model": model, "holdout_size": holdout, "temperature": temperature, "gamma": gamma}
        for key, default in defaults.items():
            if values.get(key) is None:
                values[key] = default
        if values.get("lr_milestones") is None:
            values["lr_milestones"] = (30, 60) if args.dataset == "imagenet" else (0.5, 0.75)
        values["lr_milestones"] = tuple(values["lr_milestones"])
        return cls(**values)

    def milestone_epochs(self) -> Tuple[int, ...]:
        """Epoch indices where the step schedule decays (fractions are of ``epochs``)."""
        # The reference decays when epoch >= 0.5*E (and 0.75*E): the first such epoch is the ceiling.
        return tuple(math.ceil(m * self.epochs) if m < 1 else int(m) for m in self.lr_milestones)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


class ConfigError(ValueError):
    """A bad flag combination; the CLI prints it as one line."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a multi-exit MSDNet: baseline (ce), GE (stage 1) or IMTA (stage 2).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", help="YAML file of defaults (keys = flag names with underscores)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mnist", choices=sorted(DATASET_DEFAULTS))
    g.add_argument("--data-dir", help="dataset root (CIFAR pickles / ImageNet ImageFolder); not needed for mnist/digits")
    g.add_argument("--holdout-size", type=int, help="training images held out to fit exit thresholds (dataset default)")
    g.add_argument("--holdout-transform", default="train", choices=["train", "eval"],
                   help="augmentation of the hold-out split; 'train' reproduces the reference, 'eval' is cleaner")
    g.add_argument("-j", "--workers", type=int, default=0)
    g.add_argument("--data-backend", default="pytorch", choices=["pytorch", "dali"],
                   help="training loader: torchvision, or NVIDIA DALI (GPU JPEG decode; CPU mode without CUDA)")
    g.add_argument("--image-size", type=int, help="ImageFolder crop size (default 224)")
    g = p.add_argument_group("model and method")
    g.add_argument("--model", help="named config (see imta_fast.models.list_models()); dataset default")
    g.add_argument("--method", default="ce", choices=METHODS,
                   help="ce: MSDNet baseline; ge: IMTA stage 1 (Gradient Equilibrium); imta: stage 2 (ISC + OFA)")
    g.add_argument("--teacher", help="stage-1 checkpoint for --method imta (frozen backbone and OFA teacher)")
    g.add_argument("--isc-detach", action="store_true", help="detach the ISC prior (the paper); default: no detach (the code)")
    g.add_argument("--backbone-bn", default="train", choices=["train", "eval"],
                   help="stage-2 frozen backbone BN: 'train' (the code: batch stats) or 'eval' (the paper's frozen net)")
    g.add_argument("--temperature", "-T", type=float, help="OFA KD temperature (dataset default)")
    g.add_argument("--gamma", type=float, help="OFA KD weight (dataset default)")
    g.add_argument("--kl-reduction", default="mean", choices=["mean", "batchmean"],
                   help="'mean' divides the KL by B*C as the reference does; 'batchmean' is the textbook KL")
    g.add_argument("--loss-impl", default="auto", choices=["auto", "torch", "triton"],
                   help="multi-exit loss implementation (auto: triton on CUDA)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("-b", "--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--lr-schedule", default="step", choices=["step", "cosine"])
    g.add_argument("--lr-milestones", type=float, nargs="+",
                   help="step decay points: fractions of --epochs (<1) or epoch numbers (default: 0.5 0.75; ImageNet 30 60)")
    g.add_argument("--lr-decay", type=float, default=0.1)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", "--wd", type=float, default=1e-4)
    g.add_argument("--nesterov", action="store_true")
    g = p.add_argument_group("engine")
    g.add_argument("--amp", action="store_true", help="autocast (bf16 by default)")
    g.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--sync-bn", action="store_true", help="nn.SyncBatchNorm across GPUs under torchrun (CUDA only)")
    g.add_argument("--compile", "--torchcompile", dest="compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output", default="runs/default", help="run directory (checkpoints, logs, summary.csv)")
    g.add_argument("--resume", help="checkpoint path, or 'auto' for the newest valid one in --output")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--max-steps-per-epoch", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--no-progress", dest="progress", action="store_false", help="plain log lines, no progress bars")
    return p


def parse_train_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    parser = build_train_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        with open(pre.config) as f:
            parser.set_defaults(**(yaml.safe_load(f) or {}))
    return TrainConfig.from_args(parser.parse_args(argv))
