"""Training configuration: one frozen dataclass whose fields declare their own flags.

Config flows one way: ``build_train_parser()`` (generated from the fields below, so every default is
written once) -> ``TrainConfig`` -> explicit arguments into library functions.  Fields whose default is
``None`` and that depend on the dataset (model, hold-out size, LR milestones, OFA T/gamma) are resolved
in ``__post_init__``, so the saved ``args.yaml`` shows the values actually used.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Optional, Sequence, Tuple

import yaml

__all__ = ["TrainConfig", "ConfigError", "build_train_parser", "parse_train_args", "DATASET_DEFAULTS", "METHODS"]

# Per-dataset defaults: (model, hold-out images, OFA temperature, OFA gamma).
# ImageNet T/gamma are run_IMTA.sh's; the others are IMTA's argparse defaults (docs/method.md §4).
DATASET_DEFAULTS = {
    "mnist": ("msdnet_mnist", 500, 3.0, 0.9),
    "digits": ("msdnet_mnist", 200, 3.0, 0.9),
    "cifar10": ("msdnet_cifar_anytime", 5000, 3.0, 0.9),
    "cifar100": ("msdnet_cifar_anytime", 5000, 3.0, 0.9),
    "imagenet": ("msdnet_imagenet_step4", 50000, 1.0, 0.1),
}
METHODS = ("ce", "ge", "imta", "distill", "l2w")  # distill / l2w: docs/method.md §10, §11
DATA_BACKENDS = ("auto", "pytorch", "dali", "device")


def flag(default: Any, help: str, *names: str, group: str = "engine", **argparse_kwargs) -> Any:
    """A dataclass field that also declares its command-line flag (``--field-name`` unless ``names``)."""
    return field(default=default, metadata={"flags": names, "help": help, "group": group, **argparse_kwargs})


@dataclass(frozen=True)
class TrainConfig:
    # data
    dataset: str = flag("mnist", "dataset", group="data", choices=sorted(DATASET_DEFAULTS))
    data_dir: Optional[str] = flag(None, "dataset root (CIFAR pickles / ImageNet ImageFolder); not needed for "
                                         "mnist/digits", group="data")
    holdout_size: Optional[int] = flag(None, "training images held out to fit exit thresholds (dataset default)",
                                       group="data", type=int)
    holdout_transform: str = flag("train", "augmentation of the hold-out split; 'train' reproduces the reference, "
                                           "'eval' is cleaner", group="data", choices=["train", "eval"])
    workers: int = flag(0, "data loading worker processes", "-j", "--workers", group="data", type=int)
    data_backend: str = flag("pytorch", "loader for every split: pytorch (DataLoader), dali (NVIDIA DALI: nvJPEG "
                                        "on CUDA, CPU mode without), device (uint8 dataset held on the device, "
                                        "batched augmentation; in-memory datasets), auto (dali for image folders "
                                        "on CUDA, else pytorch)", group="data", choices=list(DATA_BACKENDS))
    skip_corrupt: bool = flag(False, "skip and count unreadable images instead of stopping with an error",
                              group="data", action="store_true")
    image_size: Optional[int] = flag(None, "ImageFolder crop size (default 224)", group="data", type=int)
    # model / method
    model: Optional[str] = flag(None, "named config (see imta_fast.models.list_models()); dataset default",
                                group="model and method")
    method: str = flag("ce", "ce: MSDNet baseline; ge: IMTA stage 1 (Gradient Equilibrium); imta: stage 2 "
                             "(ISC + OFA); distill: Phuong & Lampert (annealed T); l2w: meta-learned sample "
                             "weights", group="model and method", choices=list(METHODS))
    teacher: Optional[str] = flag(None, "stage-1 checkpoint for --method imta (frozen backbone and OFA teacher)",
                                  group="model and method")
    isc_detach: bool = flag(False, "detach the ISC prior (the paper); default: no detach (the code)",
                            group="model and method", action="store_true")
    backbone_bn: str = flag("train", "stage-2 frozen backbone BN: 'train' (the code: batch stats) or 'eval' (cleaner: "
                                     "frozen statistics)", group="model and method", choices=["train", "eval"])
    temperature: Optional[float] = flag(None, "OFA KD temperature (dataset default)", "--temperature", "-T",
                                        group="model and method", type=float)
    gamma: Optional[float] = flag(None, "OFA KD weight (dataset default)", group="model and method", type=float)
    kl_reduction: str = flag("mean", "'mean' divides the KL by B*C as the reference does; 'batchmean' is the "
                                     "textbook KL", group="model and method", choices=["mean", "batchmean"])
    loss_impl: str = flag("auto", "multi-exit loss / GE implementation (auto: triton on CUDA)",
                          group="model and method", choices=["auto", "torch", "triton"])
    # optimisation
    epochs: int = flag(10, "training epochs", group="optimisation", type=int)
    batch_size: int = flag(64, "batch size per process", "-b", "--batch-size", group="optimisation", type=int)
    lr: float = flag(0.1, "initial learning rate", group="optimisation", type=float)
    lr_schedule: str = flag("step", "step (x lr-decay at milestones) or cosine (per iteration)",
                            group="optimisation", choices=["step", "cosine"])
    lr_milestones: Optional[Tuple[float, ...]] = flag(
        None, "step decay points: fractions of --epochs (<1) or epoch numbers (default: 0.5 0.75; ImageNet 30 60)",
        group="optimisation", type=float, nargs="+")
    lr_decay: float = flag(0.1, "step schedule decay factor", group="optimisation", type=float)
    momentum: float = flag(0.9, "SGD momentum", group="optimisation", type=float)
    weight_decay: float = flag(1e-4, "SGD weight decay", "--weight-decay", "--wd", group="optimisation", type=float)
    nesterov: bool = flag(False, "Nesterov momentum", group="optimisation", action="store_true")
    # engine
    amp: bool = flag(False, "autocast (bf16 by default)", action="store_true")
    amp_dtype: str = flag("bfloat16", "autocast dtype", choices=["bfloat16", "float16"])
    channels_last: bool = flag(False, "channels_last memory format", action="store_true")
    sync_bn: bool = flag(False, "nn.SyncBatchNorm across GPUs under torchrun (CUDA only)", action="store_true")
    compile: bool = flag(False, "torch.compile the model", "--compile", "--torchcompile", action="store_true")
    device: str = flag("auto", "auto | cpu | cuda | cuda:N")
    seed: int = flag(0, "random seed", type=int)
    output: str = flag("runs/default", "run directory (checkpoints, logs, summary.csv)")
    resume: Optional[str] = flag(None, "checkpoint path, or 'auto' for the newest valid one in --output")
    log_interval: int = flag(50, "steps between loss checks / progress updates", type=int)
    max_steps_per_epoch: int = flag(0, argparse.SUPPRESS, type=int)  # 0: whole epoch (smaller: smoke tests)
    progress: bool = flag(True, "plain log lines, no progress bars", "--no-progress", action="store_false")
    # --- distill / l2w (docs/method.md §10, §11; owned by the distill/l2w methods) ---
    distill_c: float = flag(0.5, "distill: weight C; early exits (1-C) CE + C T^2 soft-CE, last exit (1-C) CE",
                            group="distill / l2w", type=float)
    distill_temperature: Optional[float] = flag(None, "distill: a fixed temperature T; default: annealed from 1",
                                                group="distill / l2w", type=float)
    distill_anneal_factor: float = flag(1.05, "distill: T is multiplied by this after each step while the "
                                              "teacher's batch-mean top probability at T exceeds the threshold",
                                        group="distill / l2w", type=float)
    distill_anneal_threshold: float = flag(0.5, "distill: teacher top-probability threshold of the annealing",
                                           group="distill / l2w", type=float)
    meta_interval: int = flag(1, "l2w: a meta step every N loaded batches (CIFAR reference 1, ImageNet 100)",
                              group="distill / l2w", type=int)
    meta_lr: float = flag(1e-4, "l2w: Adam lr of the weight network (scaled by the backbone's schedule factor)",
                          group="distill / l2w", type=float)
    meta_weight_decay: float = flag(1e-4, "l2w: Adam weight decay of the weight network", group="distill / l2w",
                                    type=float)
    meta_net_hidden: int = flag(500, "l2w: hidden units of the weight network (one hidden layer)",
                                group="distill / l2w", type=int)
    l2w_target_index: int = flag(15, "l2w: target exit distribution pi_k ~ q^k with q = index/20 (1..39)",
                                 group="distill / l2w", type=int)
    l2w_constraint: str = flag("sample", "l2w: centre the weight-network output per sample (CIFAR reference), over "
                                         "the whole matrix (ImageNet reference) or per exit",
                               group="distill / l2w", choices=["sample", "matrix", "exit"])
    l2w_epsilon: float = flag(0.8, "l2w: weights w = 1 + eps (u - mean u) (CIFAR reference 0.8, ImageNet 0.3)",
                              group="distill / l2w", type=float)
    l2w_meta_grad: str = flag("jvp", "l2w: meta gradient by one forward-mode JVP (fast) or by double backward "
                                     "(the reference's way); the same gradient",
                              group="distill / l2w", choices=["jvp", "double-backward"])
    dump_weights: bool = flag(False, "l2w: save every epoch's per-sample losses, confidences and weights to "
                                     "OUTPUT/l2w/epochNNNN.pt", group="distill / l2w", action="store_true")
    # --- end distill / l2w ---

    def __post_init__(self) -> None:
        _check(self.dataset in DATASET_DEFAULTS, f"--dataset must be one of {sorted(DATASET_DEFAULTS)}, "
                                                 f"got {self.dataset!r}")
        model, holdout, temperature, gamma = DATASET_DEFAULTS[self.dataset]
        milestones = (30, 60) if self.dataset == "imagenet" else (0.5, 0.75)
        for name, default in (("model", model), ("holdout_size", holdout), ("temperature", temperature),
                              ("gamma", gamma), ("lr_milestones", milestones)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))
        _check(self.method in METHODS, f"--method must be one of {METHODS}, got {self.method!r}")
        _check(self.method != "imta" or self.teacher, "--method imta needs --teacher PATH (a stage-1 GE checkpoint)")
        _check(self.lr_schedule in ("step", "cosine"), f"--lr-schedule must be step or cosine, got {self.lr_schedule!r}")
        _check(self.kl_reduction in ("mean", "batchmean"), "--kl-reduction must be mean or batchmean")
        _check(self.holdout_transform in ("train", "eval"), "--holdout-transform must be train or eval")
        _check(self.backbone_bn in ("train", "eval"), "--backbone-bn must be train or eval")
        _check(self.epochs > 0 and self.batch_size > 0, "--epochs and --batch-size must be positive")
        _check(self.amp_dtype in ("bfloat16", "float16"), "--amp-dtype must be bfloat16 or float16")
        _check(self.data_backend in DATA_BACKENDS, f"--data-backend must be one of {DATA_BACKENDS}")
        _check(self.data_backend != "dali" or self.dataset == "imagenet",
               f"--data-backend dali reads ImageFolder JPEGs: use it with --dataset imagenet, not {self.dataset!r}")
        _check(self.data_backend != "device" or self.dataset != "imagenet",
               "--data-backend device holds an in-memory dataset on the device (mnist, digits, cifar10/100); "
               "for ImageFolder JPEGs use dali or pytorch")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def milestone_epochs(self) -> Tuple[int, ...]:
        """Epoch indices where the step schedule decays (fractions are of ``epochs``)."""
        # The reference decays when epoch >= 0.5*E (and 0.75*E): the first such epoch is the ceiling.
        return tuple(math.ceil(m * self.epochs) if m < 1 else int(m) for m in self.lr_milestones)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    def save(self, path: str) -> None:
        from imta_fast.fileio import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


class ConfigError(ValueError):
    """A bad flag combination; the CLI prints it as one line."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def build_train_parser() -> argparse.ArgumentParser:
    """argparse from the dataclass fields: names, defaults, help and choices come from ``TrainConfig``."""
    p = argparse.ArgumentParser(description="Train a multi-exit network: baseline (ce), GE (IMTA stage 1), IMTA "
                                            "stage 2 (imta), Phuong & Lampert distillation (distill) or L2W (l2w).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", help="YAML file of defaults (keys = flag names with underscores)")
    groups = {}
    for f in fields(TrainConfig):
        meta = dict(f.metadata)
        names = meta.pop("flags") or ("--" + f.name.replace("_", "-"),)
        group = meta.pop("group")
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        default = f.default if f.default is not MISSING else None
        groups[group].add_argument(*names, dest=f.name, default=default, **meta)
    return p


def parse_train_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    parser = build_train_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        with open(pre.config) as f:
            parser.set_defaults(**(yaml.safe_load(f) or {}))
    return TrainConfig.from_args(parser.parse_args(argv))
