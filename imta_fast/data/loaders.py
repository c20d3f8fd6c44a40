"""Datasets for one run (train / hold-out / test) and the DataLoaders over them.

``build_data`` ties a dataset builder to the persisted split. ``build_loader`` wraps a dataset in
a DataLoader whose order is a pure function of ``(seed, epoch)`` on every rank; the ``pytorch``
backend of :func:`imta_fast.data.make_loader` (what train.py and eval.py use) is built on it, and
``build_train_loader`` / ``build_eval_loader`` return the bare DataLoaders.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .datasets import DatasetInfo, build_dataset
from .errors import DataError
from .splits import Split, load_or_create_split, make_split


@dataclass(frozen=True)
class DataBundle:
    """The three datasets of a run. All yield ``(float32 [C, H, W], int label)``.

    ``train``: training images minus the hold-out, with train augmentation.
    ``holdout``: the hold-out images (eval transforms by default), or the test set when
    ``split.holdout_size == 0``.
    ``test``: the official test split (or the fixed carved one for the embedded sets).
    """

    train: Dataset
    holdout: Dataset
    test: Dataset
    info: DatasetInfo
    split: Split


def build_data(name: str, data_dir: Optional[str | Path], split_path: Optional[str | Path], holdout_size: Optional[int],
               holdout_transform: Literal["eval", "train"] = "eval", seed: int = 0, *,
               num_classes: Optional[int] = None, image_size: Optional[int] = None, save_split: bool = True) -> DataBundle:
    """Build the train / hold-out / test datasets for dataset ``name``.

    Args:
        split_path: ``split.json`` to reload or create (see :func:`~imta_fast.data.splits.load_or_create_split`);
            ``None`` computes the split in memory without persisting it (throwaway runs only).
        holdout_size: images held out of training to fit early-exit thresholds (the reference used
            5,000 on CIFAR, 50,000 on ImageNet: ``info.default_holdout_size``). ``None`` takes the
            size stored in ``split_path``. **0 means no hold-out: then ``holdout`` is the test set,
            as in the reference without ``--use-valid``, and thresholds are fitted on the very data
            they are evaluated on, which flatters the budgeted curves.**
        holdout_transform: ``'eval'`` (default, deterministic confidences) or ``'train'``, which
            reproduces the reference's use of training augmentation there (docs/method.md §9.1 item 8).
        seed: seeds the split's permutation when the file is created.
        num_classes, image_size: forwarded to :func:`~imta_fast.data.datasets.build_dataset`.
        save_split: False on non-primary ranks, to avoid redundant writes.
    """
    if holdout_transform not in ("eval", "train"):
        raise DataError(f"holdout_transform must be 'eval' or 'train', got {holdout_transform!r}")
    train_full, test, info = build_dataset(name, data_dir, num_classes=num_classes, image_size=image_size)
    if split_path is None:
        if holdout_size is None:
            raise DataError("a hold-out size is needed when no split file is given")
        split = make_split(len(train_full), holdout_size, seed, name)
    else:
        split = load_or_create_split(split_path, len(train_full), holdout_size, seed, name, save=save_split)
    train = Subset(train_full, list(split.train_indices))
    if split.holdout_size == 0:
        holdout = test
    else:
        source = train_full.eval_view() if holdout_transform == "eval" else train_full
        holdout = Subset(source, list(split.holdout_indices))
    return DataBundle(train, holdout, test, info, split)


class EpochSeededSampler(DistributedSampler):
    """A DistributedSampler whose ``set_epoch`` also re-seeds the loader's generator.

    DataLoader workers take their torch seeds from that generator when an epoch's iterator is
    created; seeding it from ``(seed, rank, epoch)`` makes each epoch's augmentations a function of
    the epoch alone, so a run resumed at epoch e replays exactly what an uninterrupted run does
    (with non-persistent workers, which draw fresh seeds every epoch).
    """

    generator: Optional[torch.Generator] = None
    base_seed: int = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed((self.base_seed + 1_000_003 * epoch) % 2**63)


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int = 0, distributed: bool = False,
                 seed: int = 0, drop_last: bool = False, pin_memory: Optional[bool] = None,
                 persistent_workers: bool = True, shard: Optional[Tuple[int, int]] = None,
                 collate_fn=None) -> Tuple[DataLoader, DistributedSampler]:
    """A DataLoader over ``dataset`` and its sampler; call ``sampler.set_epoch(epoch)`` every epoch.

    The sampler is always a ``DistributedSampler`` (with one replica when not distributed), so the
    shuffled order is a function of ``(seed, epoch)`` only: a resumed run sees the same order as an
    uninterrupted one, on one process or many.

    When ``distributed`` (``torch.distributed`` must be initialised), each rank gets a disjoint
    ``1/world_size`` share, padded by repeating samples so all ranks take the same number of
    steps; evaluate on a non-distributed loader (or de-duplicate) for exact test metrics.
    ``batch_size`` is per rank. Yields ``(float32 [B, C, H, W], int64 [B])``. Workers stay alive
    between epochs unless ``persistent_workers=False``. ``shard=(rank, world_size)`` shards like
    ``distributed`` without needing a process group.
    """
    if shard is not None:
        rank, world_size = shard
    elif distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("build_loader(distributed=True) needs torch.distributed to be initialised first")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    sampler = EpochSeededSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    # Augmentation RNG in workers: each worker's torch seed derives from this generator, so a given
    # (seed, rank) reproduces the same augmentations run after run (with workers=0 the augmentations
    # draw from the main process's global RNG, which the trainer seeds).
    generator = torch.Generator().manual_seed((seed * 65537 + rank) % 2**63)
    sampler.generator, sampler.base_seed = generator, (seed * 65537 + rank) % 2**63
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=pin_memory, drop_last=drop_last, persistent_workers=persistent_workers and workers > 0,
                        generator=generator, collate_fn=collate_fn)
    return loader, sampler


def build_train_loader(dataset: Dataset, batch_size: int, workers: int, seed: int, dist) -> Tuple[DataLoader, DistributedSampler]:
    """The training loader of this rank: shuffled by ``(seed, epoch)``, ``batch_size`` per rank.

    ``dist`` is a :class:`~imta_fast.distributed.DistInfo` (anything with ``is_distributed``).
    The last incomplete batch is dropped: a batch of one would break BatchNorm in train mode
    (e.g. IMTA's BatchNorm1d in the ISC links). Call ``sampler.set_epoch(epoch)`` every epoch.
    """
    # Non-persistent workers: each epoch's workers are seeded from (seed, rank, epoch), see EpochSeededSampler.
    return build_loader(dataset, batch_size, shuffle=True, workers=workers, distributed=dist.is_distributed,
                        seed=seed, drop_last=True, persistent_workers=False)


def build_eval_loader(dataset: Dataset, batch_size: int, workers: int, dist) -> DataLoader:
    """An in-order loader over this rank's contiguous share of ``dataset``, without padding.

    Rank ``r`` of ``w`` reads indices ``[n*r//w, n*(r+1)//w)``, so concatenating every rank's
    outputs in rank order (``all_gather_cat``) gives each sample exactly once, in dataset order:
    exact metrics and threshold fits, unlike a padded ``DistributedSampler``. ``dist`` is a
    :class:`~imta_fast.distributed.DistInfo` (anything with ``rank`` and ``world_size``); needs
    ``len(dataset) >= world_size`` so that no rank is left empty.
    """
    n, r, w = len(dataset), dist.rank, dist.world_size
    shard = Subset(dataset, range(n * r // w, n * (r + 1) // w)) if w > 1 else dataset
    loader, _ = build_loader(shard, batch_size, shuffle=False, workers=workers, persistent_workers=False)
    return loader
