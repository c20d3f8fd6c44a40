"""Evaluation options: one dataclass, the command line generated from it (defaults written once).

Each field's ``metadata`` holds its help text and, where needed, ``flags`` (extra short flags),
``choices``, ``positional``; :func:`build_parser` turns the fields into ``argparse`` arguments and
:func:`parse_eval_config` returns an :class:`EvalConfig`.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

from imta_fast.inference.buckets import parse_buckets

__all__ = ["EvalConfig", "build_parser", "parse_eval_config", "parse_micro_batch"]


def parse_micro_batch(text) -> Union[None, int, str]:
    """Command-line form of ``micro_batch``: ``auto``, ``none`` or a positive number of rows."""
    t = str(text).strip().lower()
    if t in ("auto", "none"):
        return None if t == "none" else "auto"
    try:
        rows = int(t)
    except ValueError:
        rows = 0
    if rows < 1:
        raise ValueError(f"bad --micro-batch {text!r}: use auto, none or a positive number of rows")
    return rows


def _opt(default, help: str, **meta):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class EvalConfig:
    """What ``eval.py`` does; see each field's help (``python eval.py -h``)."""

    runs: List[str] = _opt([], "train.py --output directories", positional=True)
    labels: Optional[List[str]] = _opt(None, "legend labels, one per run (default: directory names)")
    output: Optional[str] = _opt(None, "where CSV/JSON/PNG go (default: the single run's dir, else ./eval)")
    checkpoint: str = _opt("best", "which checkpoint of each run", choices=("best", "last"))
    data_dir: Optional[str] = _opt(None, "override the dataset root saved in the run")
    holdout_transform: Optional[str] = _opt(None, "override the run's hold-out augmentation", choices=("train", "eval"))
    budget_points: int = _opt(40, "q = p/20 for p = 1..N (IMTA 40, MSDNet 39)")
    batch_size: int = _opt(256, "batch size of the logits pass (anytime / budgeted)", flags=("-b",))
    workers: int = _opt(0, "data loader workers", flags=("-j",))
    data_backend: str = _opt("pytorch", "loader for the hold-out and test splits: pytorch, dali (image folders; "
                                        "nvJPEG on CUDA, CPU mode without), device (in-memory datasets held on "
                                        "the device) or auto (dali for image folders on CUDA, else pytorch)",
                             choices=("auto", "pytorch", "dali", "device"))
    skip_corrupt: bool = _opt(False, "skip and count unreadable images instead of stopping with an error")
    amp: bool = _opt(False, "bf16 autocast")
    mode: str = _opt("budgeted", "wallclock: also run the real early-exit evaluator and time it on --device",
                     choices=("budgeted", "wallclock"))
    wallclock_points: int = _opt(10, "budgets timed in wallclock mode")
    wallclock_batch_size: int = _opt(1024, "batch size of the timed early-exit runs (wallclock mode)")
    repeats: int = _opt(3, "timed rounds per contender, interleaved; the median is reported with the spread")
    latency_budget: Optional[float] = _opt(None, "also fit thresholds for this many ms per image with the measured "
                                                 "latency model and time them")
    buckets: str = _opt("auto", "row buckets of the early-exit stages: none, pow2, stepN (multiples of N), a list "
                                "like 32,128,512, or auto (none eager; step64 with --compile / --cuda-graphs)")
    compile: bool = _opt(False, "torch.compile each stage (one graph per bucket)")
    cuda_graphs: bool = _opt(False, "CUDA graph per (stage, bucket)")
    channels_last: Optional[bool] = _opt(None, "channels_last model and input in wallclock mode (default: on; "
                                               "about 1.9x faster on CPU for the CIFAR MSDNet)")
    fold_bn: Optional[bool] = _opt(None, "fold each Conv2d+BatchNorm2d pair in wallclock mode (default: on; "
                                         "logits change in the last bits, exit agreement is reported)")
    micro_batch: str = _opt("auto", "early-exit stages run in chunks of at most this many rows: auto (CPU: sized "
                                    "so each state tensor stays ~16 MB, avoiding fresh mmap pages per op; CUDA: "
                                    "whole stages), none, or a number")
    streaming: bool = _opt(False, "wallclock mode at batch size 1 without padding rows (exit agreement reported)")
    threads: Optional[int] = _opt(None, "torch.set_num_threads before timing (e.g. 1)")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")

    def __post_init__(self):
        for name in ("budget_points", "batch_size", "wallclock_points", "wallclock_batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.latency_budget is not None and self.latency_budget <= 0:
            raise ValueError(f"latency_budget must be positive ms per image, got {self.latency_budget}")
        if self.labels is not None and len(self.labels) != len(self.runs):
            raise ValueError(f"{len(self.labels)} labels for {len(self.runs)} runs")
        if self.streaming and self.latency_budget is not None:
            raise ValueError("--latency-budget needs batched timing; drop --streaming")
        self.bucket_spec()  # validates
        self.micro_batch_spec()

    def micro_batch_spec(self):
        """The executor's ``micro_batch``: None, 'auto' or a positive int, from ``--micro-batch``."""
        return parse_micro_batch(self.micro_batch)

    def bucket_spec(self):
        """The executor's buckets: parsed ``--buckets``, with ``auto`` resolved."""
        if self.buckets == "auto":
            return 64 if (self.compile or self.cuda_graphs) else None
        return parse_buckets(self.buckets)

    @property
    def run_labels(self) -> List[str]:
        from pathlib import Path

        return list(self.labels) if self.labels else [Path(r).name for r in self.runs]


def _base_type(tp):
    """(scalar type, is_list) of an annotation such as ``Optional[List[str]]``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union:
        return _base_type(args[0])
    if typing.get_origin(tp) in (list, List):
        return args[0], True
    return tp, False


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """``argparse`` parser generated from :class:`EvalConfig` (names, types, defaults, help)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        meta = dict(f.metadata)
        tp, is_list = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = {"help": meta["help"] + (f" (default: {default})" if default not in (None, False, []) else "")}
        if meta.get("choices"):
            kw["choices"] = list(meta["choices"])
        if meta.get("positional"):
            p.add_argument(f.name, nargs="+", **kw)
            continue
        flags = list(meta.get("flags", ())) + ["--" + f.name.replace("_", "-")]
        if tp is bool and default is None:
            kw.update(action=argparse.BooleanOptionalAction, default=None)
        elif tp is bool:
            kw.update(action="store_true", default=default)
        else:
            kw.update(type=tp, default=default)
            if is_list:
                kw["nargs"] = "+"
        p.add_argument(*flags, dest=f.name, **kw)
    return p


def parse_eval_config(argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> EvalConfig:
    """Parse a command line into an :class:`EvalConfig` (``ValueError`` for inconsistent values)."""
    ns = build_parser(description).parse_args(argv)
    return EvalConfig(**vars(ns))
