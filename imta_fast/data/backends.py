"""One entry point for every input pipeline: ``make_loader(dataset, backend=..., train=...)``.

Backends (``--data-backend``):

=========  ==============================================  ======================  =====================
backend    what                                            datasets                batches live on
=========  ==============================================  ======================  =====================
pytorch    DataLoader + workers (PIL / tensor transforms)  all                     CPU (pinned on CUDA)
dali       NVIDIA DALI: decode + augment (nvJPEG on CUDA)  image folders           ``dist.device``
device     uint8 dataset held on the device, batched aug   mnist, digits, cifar*   ``dist.device``
auto       dali for image folders on CUDA when DALI        all                     as chosen
           imports, else pytorch
=========  ==============================================  ======================  =====================

Every loader has ``len()`` (batches per epoch on this rank), iterates ``(x float32 [B, C, H, W]
normalised, y int64 [B])``, and has ``set_epoch(epoch)``; train.py calls ``loader.set_epoch(epoch)``
before every epoch whatever the backend (eval loaders ignore it). ``loader.device`` says where the
batches are; ``loader.skipped`` lists the files skipped by ``skip_corrupt`` (one-line messages).

Sharding (``dist`` = :class:`~imta_fast.distributed.DistInfo`; only ``rank``, ``world_size`` and
``device`` are used, so no process group is needed to build a loader):

* train: every backend draws the epoch's order as ``DistributedSampler(shuffle=True,
  drop_last=True, seed=seed)`` with ``set_epoch(epoch)`` does: one permutation per epoch, the same on
  every rank, cut to a multiple of ``world_size`` (the last ``n % world_size`` of the permutation
  sit the epoch out, a different few each epoch), rank r takes every w-th sample from r. Each rank
  gets ``n // world_size`` samples and drops its last incomplete batch, so every rank takes the same
  ``n // world_size // batch_size`` steps and no sample is seen twice in an epoch.
* eval: rank r reads the contiguous shard ``[n*r//w, n*(r+1)//w)`` in dataset order; its last batch
  is kept even when partial and nothing is padded, so ranks may differ by one sample.
  ``imta_fast.inference.predict`` concatenates the ranks' outputs in rank order with
  ``distributed.all_gather_cat`` (which pads to the longest shard for the collective and trims the
  padding with the gathered lengths): every sample exactly once, in dataset order. Needs
  ``len(dataset) >= world_size``.

Unreadable images (image folders; in-memory sets cannot have any): by default the first one stops
the run with ``DataError: unreadable image file '<path>': <reason>`` (one line, also through
DataLoader workers); with ``skip_corrupt=True`` (CLI ``--skip-corrupt``) the sample is dropped from
its batch (which is then smaller, or gone when all its images were bad), the message appended to
``loader.skipped``, and the epoch goes on. Labels always come from the same ``(path, label)`` list
as the images, so a skip can never shift a label onto another image.
"""
from __future__ import annotations

import re
from typing import Iterator, List, Optional, Protocol, Tuple

import torch
from torch.utils.data import Dataset, Subset
from torch.utils.data._utils.collate import default_collate

from .dali_loader import DaliShardLoader, has_dali, parse_image_transform, samples_of, transform_of
from .device_loader import DeviceLoader
from .errors import DataError
from .loaders import EpochSeededSampler, build_loader

BACKENDS = ("auto", "pytorch", "dali", "device")

__all__ = ["BACKENDS", "Loader", "TorchLoader", "make_loader", "resolve_backend"]


class Loader(Protocol):
    """What train.py / eval.py / predict need from a loader of any backend."""

    device: torch.device
    num_samples: int
    skipped: List[str]

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]: ...

    def set_epoch(self, epoch: int) -> None: ...


def _is_image_folder(dataset: Dataset) -> bool:
    try:
        samples_of(dataset)
        return True
    except DataError:
        return False


def resolve_backend(backend: str, dataset: Dataset, device: torch.device) -> str:
    """The concrete backend for ``backend``: ``auto`` is dali for image folders on CUDA when DALI imports, else pytorch."""
    if backend not in BACKENDS:
        raise DataError(f"unknown data backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if torch.device(device).type == "cuda" and has_dali() and _is_image_folder(dataset):
        return "dali"
    return "pytorch"


# --- pytorch ---------------------------------------------------------------------------------------

class _Skipped:
    """Stands in for a sample whose image could not be read (picklable, crosses worker processes)."""

    def __init__(self, message: str):
        self.message = message


class _SkipCorrupt(Dataset):
    """``dataset`` with DataError samples replaced by :class:`_Skipped` markers."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except DataError as exc:
            return _Skipped(str(exc))


def _collate_skipping(batch):
    """``(x, y, skipped messages)``; ``x`` and ``y`` are None when every sample of the batch was bad."""
    good = [b for b in batch if not isinstance(b, _Skipped)]
    skipped = [b.message for b in batch if isinstance(b, _Skipped)]
    if not good:
        return None, None, skipped
    x, y = default_collate(good)
    return x, y, skipped


_WRAPPED = re.compile(r"(?:^|\.)DataError: (.+)$", re.M)


def one_line(exc: DataError) -> str:
    """The DataError's own message, without the worker traceback PyTorch appends to it."""
    text = str(exc)
    if "\n" not in text:
        return text
    found = _WRAPPED.findall(text)
    return found[-1].strip() if found else text.splitlines()[0]


class TorchLoader:
    """A DataLoader with this module's sharding and error handling (``backend='pytorch'``).

    Train: :class:`~imta_fast.data.loaders.EpochSeededSampler` built with explicit
    ``num_replicas`` / ``rank`` (no process group needed), ``drop_last``, non-persistent workers
    re-seeded from ``(seed, rank, epoch)`` so a resumed epoch reproduces its augmentations (with
    ``workers=0`` they come from the main process's RNG, which the trainer seeds). Eval: the
    contiguous shard in order. Batches are on the CPU (pinned when ``pin_memory``).
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, train: bool, workers: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False, skip_corrupt: bool = False,
                 persistent_workers: bool = False):
        self.train, self.skip_corrupt = train, skip_corrupt
        self.device = torch.device("cpu")
        self.skipped: List[str] = []
        self.sampler: Optional[EpochSeededSampler] = None
        if not train:
            n = len(dataset)
            dataset = Subset(dataset, range(n * rank // world_size, n * (rank + 1) // world_size))
        self.num_samples = len(dataset) // world_size if train else len(dataset)
        source = _SkipCorrupt(dataset) if skip_corrupt else dataset
        common = dict(workers=workers, pin_memory=pin_memory, persistent_workers=persistent_workers,
                      collate_fn=_collate_skipping if skip_corrupt else None)
        if train:
            self.loader, self.sampler = build_loader(source, batch_size, shuffle=True, seed=seed, drop_last=True,
                                                     shard=(rank, world_size), **common)
        else:
            # In order, with its own generator (seed 0): creating an iterator then never draws from the
            # global RNG, which the training augmentations use with workers=0.
            self.loader, _ = build_loader(source, batch_size, shuffle=False, **common)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DataError as exc:  # re-raised from a worker with its traceback appended
                raise DataError(one_line(exc)) from None
            if self.skip_corrupt:
                x, y, skipped = batch
                self.skipped.extend(skipped)
                if x is None:
                    continue
                yield x, y
            else:
                yield batch


# --- the one entry point ---------------------------------------------------------------------------

def make_loader(dataset: Dataset, *, backend: str, train: bool, batch_size: int, workers: int, seed: int, dist,
                channels_last: bool = False, skip_corrupt: bool = False, output_dtype: torch.dtype = torch.float32,
                dali_threads: Optional[int] = None) -> Loader:
    """A loader over ``dataset`` (``data.train`` / ``data.holdout`` / ``data.test`` of :func:`build_data`).

    Args:
        backend: ``auto`` | ``pytorch`` | ``dali`` | ``device`` (see the module docstring).
        train: shuffle per epoch + drop the last partial batch + shard by striding (the train split);
            otherwise the in-order contiguous eval shard with the last batch kept. Augmentation is
            whatever transform ``dataset`` carries (a ``holdout_transform='train'`` hold-out is
            augmented but not shuffled).
        batch_size: per rank. workers: DataLoader workers (pytorch); DALI threads default to
            ``max(workers, 2)``; ignored by ``device``.
        seed: shuffle and augmentation seed; the epoch's order and draws are functions of
            ``(seed, epoch, rank)`` (call ``set_epoch``).
        dist: a :class:`~imta_fast.distributed.DistInfo` (``rank``, ``world_size``, ``device``).
        channels_last: ``device`` and ``dali`` hand out ``channels_last`` tensors (no extra copy for
            DALI); ``pytorch`` leaves it to the consumer (the engine converts after ``.to(device)``).
        skip_corrupt: skip and count unreadable images instead of stopping (``--skip-corrupt``).
        output_dtype: DALI only (float32, float16, bfloat16).

    Raises DataError (one line) for a backend that cannot serve ``dataset`` (dali on in-memory data,
    device on image folders) and for unreadable images.
    """
    device = torch.device(getattr(dist, "device", "cpu"))
    rank, world_size = int(dist.rank), int(dist.world_size)
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    if not train and len(dataset) < world_size:
        raise DataError(f"{len(dataset)} evaluation images cannot be shared by {world_size} processes")
    kind = resolve_backend(backend, dataset, device)
    if kind == "pytorch":
        return TorchLoader(dataset, batch_size=batch_size, train=train, workers=workers, seed=seed, rank=rank,
                           world_size=world_size, pin_memory=device.type == "cuda", skip_corrupt=skip_corrupt)
    if kind == "device":
        return DeviceLoader(dataset, batch_size=batch_size, train=train, seed=seed, rank=rank, world_size=world_size,
                            device=device, channels_last=channels_last)
    settings = parse_image_transform(transform_of(dataset))
    return DaliShardLoader(samples_of(dataset), batch_size=batch_size, train=train, seed=seed, rank=rank,
                           world_size=world_size, device_id=(device.index or 0) if device.type == "cuda" else None,
                           num_threads=dali_threads or max(workers, 2), output_dtype=output_dtype,
                           channels_last=channels_last, skip_corrupt=skip_corrupt, **settings)
