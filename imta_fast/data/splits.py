"""The persisted train / hold-out split of the training set (docs/method.md §5 ``--use-valid``, §9.1 item 7).

A seeded random permutation of ``range(num_train)``; its last ``holdout_size`` entries are the
hold-out (used to fit early-exit thresholds), the rest are trained on. Unlike the reference, the
permutation comes from a local ``torch.Generator`` (so building a different model first cannot
change it), and it is written to ``split.json`` together with a SHA-256 of its content. Every later
run (resume, stage 2, evaluation) reloads that file instead of recomputing, so the split survives
changes of code, torch version or seed, and a hold-out image can never leak into training.

File format (JSON, one object)::

    {"format": "imta_fast.split/v1", "dataset": "cifar100", "num_train": 50000, "holdout_size": 5000,
     "seed": 0, "train_indices": [...], "holdout_indices": [...], "sha256": "<hex>"}

``sha256`` hashes the canonical JSON (sorted keys, no spaces) of every other field.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Tuple

import torch

from imta_fast.fileio import atomic_write_text

from .errors import DataError, describe

FORMAT = "imta_fast.split/v1"


@dataclass(frozen=True)
class Split:
    """Disjoint train / hold-out index lists covering ``range(num_train)``."""

    train_indices: Tuple[int, ...]
    holdout_indices: Tuple[int, ...]
    sha256: str
    dataset: str
    num_train: int
    holdout_size: int
    seed: int


def _payload(split: Split) -> dict:
    return {"format": FORMAT, "dataset": split.dataset, "num_train": split.num_train,
            "holdout_size": split.holdout_size, "seed": split.seed,
            "train_indices": list(split.train_indices), "holdout_indices": list(split.holdout_indices)}


def _digest(payload: dict) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _check_sizes(num_train: int, holdout_size: int, where: str) -> None:
    if num_train <= 0:
        raise DataError(f"empty split: no training images for {where}")
    if not 0 <= holdout_size < num_train:
        raise DataError(f"hold-out size {holdout_size} must be in [0, {num_train}) "
                        f"(the training set of {where} has {num_train} images)")


def make_split(num_train: int, holdout_size: int, seed: int, dataset: str = "") -> Split:
    """Compute (without saving) the split: ``torch.randperm(num_train)`` from a generator seeded with
    ``seed``; the last ``holdout_size`` indices are the hold-out. Global RNG state is untouched."""
    _check_sizes(num_train, holdout_size, dataset or "the dataset")
    perm = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = num_train - holdout_size
    draft = Split(tuple(perm[:cut]), tuple(perm[cut:]), "", dataset, num_train, holdout_size, seed)
    return replace(draft, sha256=_digest(_payload(draft)))


def save_split(split: Split, path: str | Path) -> None:
    """Write ``split`` to ``path`` atomically (temp file + ``os.replace``), so a concurrent reader
    (another rank) sees either no file or a complete one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({**_payload(split), "sha256": split.sha256})
    atomic_write_text(path, body)


def load_split(path: str | Path) -> Split:
    """Read and verify a split file: format, hash, and that the indices partition ``range(num_train)``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"split file not found: {describe(path)}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"corrupt split file {describe(path)}: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"corrupt split file {describe(path)}: not an {FORMAT} file")
    stored = raw.pop("sha256", None)
    if stored != _digest(raw):
        raise DataError(f"corrupt split file {describe(path)}: sha256 does not match its content")
    try:
        split = Split(tuple(raw["train_indices"]), tuple(raw["holdout_indices"]), stored, raw["dataset"],
                      int(raw["num_train"]), int(raw["holdout_size"]), int(raw["seed"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"corrupt split file {describe(path)}: bad field {exc}") from exc
    # The hash only proves the file is unchanged since it was written; check it also makes sense.
    if (len(split.holdout_indices) != split.holdout_size
            or sorted(split.train_indices + split.holdout_indices) != list(range(split.num_train))):
        raise DataError(f"corrupt split file {describe(path)}: indices do not partition range({split.num_train})")
    return split


def load_or_create_split(path: str | Path, num_train: int, holdout_size: Optional[int], seed: int,
                         dataset: str = "", save: bool = True) -> Split:
    """Reload ``path`` if it exists, otherwise create the split (and save it unless ``save=False``).

    A reloaded split must match the request: same ``dataset`` (when both are named) and
    ``num_train``, and the same ``holdout_size`` unless that is ``None`` ("take the file's", for
    evaluation). ``seed`` only matters at creation: a reloaded file wins over a new seed, as stage 2
    must reuse stage 1's split. Any mismatch raises DataError naming the path.

    Safe to call on every rank at once: the split is a pure function of the arguments and the
    file is replaced atomically; pass ``save=False`` on non-primary ranks to skip redundant writes.
    """
    path = Path(path)
    if path.exists():
        split = load_split(path)
        problems = []
        if dataset and split.dataset and dataset != split.dataset:
            problems.append(f"dataset {split.dataset!r} != {dataset!r}")
        if split.num_train != num_train:
            problems.append(f"num_train {split.num_train} != {num_train}")
        if holdout_size is not None and split.holdout_size != holdout_size:
            problems.append(f"holdout_size {split.holdout_size} != {holdout_size}")
        if problems:
            raise DataError(f"split file {describe(path)} is for another setup ({'; '.join(problems)}); "
                            f"delete it or point to the right run directory")
        return split
    if holdout_size is None:
        raise DataError(f"split file not found: {describe(path)} (and no hold-out size given to create one)")
    split = make_split(num_train, holdout_size, seed, dataset)
    if save:
        save_split(split, path)
    return split
