"""Device-resident loader for in-memory datasets (MNIST, digits, CIFAR): ``--data-backend device``.

The whole ``uint8`` subset is copied once to the training device as one tensor (for training with
augmentation: zero-padded, ``[N, C, H+2p, W+2p]``, stacked with its mirror image when flipping,
i.e. 2 x (1 + 2p/H)^2 the raw size: 3.1x for CIFAR, 2.6x for MNIST's 1-channel 28x28 with p = 2
and no flip = 1.3x). Every batch is then one uint8 gather through a strided view of all crops,
which performs the random crop and the horizontal flip at once, followed by the float conversion
and normalisation, all on that device. No workers, no per-sample Python.

Equivalence with the torchvision path (``transforms.tensor_train_transform`` / ``tensor_eval_transform``):

* eval: ``x.float() / 255`` then ``(x - mean) / std`` in float32, exactly what ``ConvertImageDtype``
  + ``Normalize`` compute, so eval batches are bit-identical (tests/data/test_device_loader.py).
* train: ``RandomCrop(S, padding=p)`` pads with 0 and draws the top-left corner uniformly from
  ``[0, 2p]^2``; ``RandomHorizontalFlip`` mirrors with probability 1/2. Same distributions here, but
  drawn from this loader's own generator, so individual draws differ from torchvision's.

Order and randomness are pure functions of ``(seed, epoch, rank)``: the shuffle is exactly the one
``torch.utils.data.DistributedSampler(shuffle=True, drop_last=True, seed=seed)`` makes (so the
device and pytorch backends see the same samples in the same order), and the crop / flip draws come
from a CPU generator seeded with ``(seed, epoch, rank)``, so a resumed run (same epoch, same seed)
replays the same batches bit for bit, on CPU and on CUDA alike.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torchvision.transforms as T
from torch.utils.data import Dataset, Subset

from .errors import DataError
from .sharding import ShardBatchLoader


@dataclass(frozen=True)
class TensorTransform:
    """What a ``tensor_train_transform`` / ``tensor_eval_transform`` does, as numbers.

    ``padding``: zero padding of the random crop (None: no crop); ``flip``: random horizontal flip.
    """

    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    padding: Optional[int] = None
    flip: bool = False

    @property
    def augments(self) -> bool:
        return self.padding is not None or self.flip


def parse_tensor_transform(transform) -> TensorTransform:
    """Read a torchvision ``Compose`` built by :mod:`~imta_fast.data.transforms` for uint8 tensors.

    Accepts ``[RandomCrop(S, padding=p)] [RandomHorizontalFlip(0.5)] ConvertImageDtype(float32)
    Normalize(mean, std)``; anything else raises DataError (use the pytorch backend for it).
    """
    steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    padding, flip, mean, std, converted = None, False, None, None, False
    for step in steps:
        if isinstance(step, T.RandomCrop) and step.padding_mode == "constant" and step.fill == 0 \
                and isinstance(step.padding, int) and not step.pad_if_needed:
            padding = step.padding
        elif isinstance(step, T.RandomHorizontalFlip) and step.p == 0.5:
            flip = True
        elif isinstance(step, T.ConvertImageDtype) and step.dtype == torch.float32:
            converted = True
        elif isinstance(step, T.Normalize) and converted:
            mean, std = tuple(float(m) for m in step.mean), tuple(float(s) for s in step.std)
        else:
            raise DataError(f"the device data backend cannot run the transform step {step!r}; "
                            "use --data-backend pytorch for this dataset")
    if mean is None:
        raise DataError("the device data backend needs a transform ending in ConvertImageDtype + Normalize; "
                        "use --data-backend pytorch for this dataset")
    return TensorTransform(mean, std, padding, flip)


def tensor_source(dataset: Dataset) -> Tuple[torch.Tensor, torch.Tensor, TensorTransform]:
    """``(uint8 images [N, C, H, W], int64 labels [N], transform)`` behind ``dataset``, in its index order.

    Follows ``Subset`` wrappers down to a ``TransformedDataset`` over in-memory ``TensorImages``
    (what :func:`~imta_fast.data.build_data` returns for mnist, digits and CIFAR); image folders
    raise DataError. The images are gathered (copied) only for the subset's indices.
    """
    from .datasets import TensorImages, TransformedDataset  # local: datasets imports nothing from here

    indices: Optional[torch.Tensor] = None
    while isinstance(dataset, Subset):
        inner = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        indices = inner if indices is None else inner[indices]
        dataset = dataset.dataset
    if not (isinstance(dataset, TransformedDataset) and isinstance(dataset.base, TensorImages)):
        raise DataError(f"the device data backend needs an in-memory dataset (mnist, digits, cifar10, cifar100); "
                        f"{type(dataset).__name__} is not one (use --data-backend pytorch or dali)")
    images, labels = dataset.base.images, dataset.base.labels.long()
    if indices is not None:
        images, labels = images[indices], labels[indices]
    return images, labels, parse_tensor_transform(dataset.transform)


def shard_bounds(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Contiguous eval shard ``[n*r//w, n*(r+1)//w)``: the same bounds as ``build_eval_loader`` and DALI."""
    return n * rank // world_size, n * (rank + 1) // world_size


def train_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's sample indices for ``epoch``: exactly ``DistributedSampler(shuffle=True, drop_last=True)``.

    A permutation seeded by ``seed + epoch`` (the same on every rank), cut to a multiple of
    ``world_size`` (the tail ``n % world_size`` samples of the permutation sit this epoch out),
    then strided: rank r takes positions r, r + w, r + 2w, ...
    """
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)
    total = (n // world_size) * world_size
    return perm[rank:total:world_size]


def augment_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the crop / flip draws of one (seed, epoch, rank)."""
    return (seed * 1_000_003 + epoch * 65_537 + rank * 257 + 12_345) % 2**63


@contextmanager
def _one_cpu_thread(device: torch.device):
    """On CPU, build the batch with one intra-op thread (restored before the batch is handed out).

    A batch is a few element-wise passes over ~10^5 elements: one thread assembles 30,000-100,000
    images/s, far more than a CPU training step consumes, whereas torch's default multi-threading of
    these ops collapsed by 10-100x on a shared, oversubscribed machine (benchmarks/NOTES.md, Loaders).
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


class DeviceLoader(ShardBatchLoader):
    """Batches of an in-memory dataset held on ``device``; see the module docstring.

    Yields ``(float32 [B, C, H, W] normalised, int64 [B])``, both on ``device``. Train
    (``train=True``): a fresh shuffle per epoch (call :meth:`set_epoch`), this rank's share of
    ``n // world_size`` samples, the last incomplete batch dropped. Eval: this rank's contiguous
    shard :func:`shard_bounds` in dataset order, the last batch may be smaller, nothing padded, so
    concatenating the ranks' outputs in rank order (``all_gather_cat``) gives every sample once.
    An eval loader over a dataset carrying train augmentation (``holdout_transform='train'``)
    augments too, with draws seeded by ``(seed, rank)`` only.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", channels_last: bool = False):
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        images, labels, self.transform = tensor_source(dataset)
        self.device = torch.device(device)
        self.n_total = len(labels)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.channels_last = rank, world_size, channels_last
        self.epoch = 0
        self.skipped: list = []  # in-memory data has no unreadable files; kept for the Loader interface
        if train:
            held_images, held_labels = images, labels  # every rank keeps the whole set: the shuffle is global
            self.num_samples = self.n_total // world_size
        else:
            lo, hi = shard_bounds(self.n_total, rank, world_size)
            held_images, held_labels = images[lo:hi], labels[lo:hi]
            self.num_samples = hi - lo
        self.labels = held_labels.to(self.device)
        n, c, h, w = held_images.shape
        self.image_shape = (c, h, w)
        p = self.transform.padding or 0
        if self.transform.augments:
            # Stored zero-padded, plus a mirrored copy when flipping, so that one strided view
            # ``windows[flip, sample, top, left] -> [C, H, W]`` holds every crop of every image and a
            # batch is one advanced-indexing gather of uint8 (no masks, no index arithmetic per pixel).
            padded = torch.nn.functional.pad(held_images, (p, p, p, p)) if p else held_images
            store = torch.stack([padded, padded.flip(-1)]) if self.transform.flip else padded[None]
            self.images = store.contiguous().to(self.device)
            sf, sn, sc, hp_stride, _ = self.images.stride()
            k = 2 * p + 1
            self._windows = self.images.as_strided((self.images.shape[0], n, k, k, c, h, w),
                                                   (sf, sn, hp_stride, 1, sc, hp_stride, 1))
        else:
            self.images = held_images.contiguous().to(self.device)
        self.mean = torch.tensor(self.transform.mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(self.transform.std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)

    def _order(self) -> torch.Tensor:
        if self.train:
            return train_order(self.n_total, self.seed, self.epoch, self.rank, self.world_size)
        return torch.arange(self.num_samples)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        t = self.transform
        n_used = len(self) * self.batch_size if self.train else len(order)
        draws = None
        if t.augments:  # all draws of the epoch at once, on the CPU (same numbers on every device)
            g = torch.Generator().manual_seed(augment_seed(self.seed, self.epoch if self.train else 0, self.rank))
            p = t.padding or 0
            offsets = torch.randint(0, 2 * p + 1, (n_used, 2), generator=g)
            flips = torch.rand(n_used, generator=g) < 0.5 if t.flip else torch.zeros(n_used, dtype=torch.bool)
            draws = (offsets.to(self.device), flips.to(self.device))
        order = order[:n_used].to(self.device)
        for start in range(0, n_used, self.batch_size):
            idx = order[start:start + self.batch_size]
            with _one_cpu_thread(self.device):
                if draws is None:
                    x = self.images.index_select(0, idx)
                else:
                    x = self._augmented(idx, draws[0][start:start + self.batch_size],
                                        draws[1][start:start + self.batch_size])
                x = (x.float() / 255.0 - self.mean) / self.std
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = self.labels.index_select(0, idx)
            yield x, y

    def _augmented(self, idx: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """One gather: the zero-padded random crop at ``offsets`` (in [0, 2p]) of images ``idx``, mirrored where ``flips``.

        The mirror of the crop at column j of the padded image is the crop at column 2p - j of the
        mirrored padded image.
        """
        p = self.transform.padding or 0
        flips = flips.long()
        left = torch.where(flips.bool(), 2 * p - offsets[:, 1], offsets[:, 1])
        return self._windows[flips, idx, offsets[:, 0], left]
