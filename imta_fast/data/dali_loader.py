"""NVIDIA DALI input pipeline for ImageNet-style JPEG folders (``--data-backend dali``).

Decodes on the GPU (nvJPEG, ``device='mixed'``) and runs the augmentations there, replacing the
CPU-bound PIL path; with ``device_id=None`` the same graph runs on the CPU (CI, tests).

* train: a fixed seeded global shuffle of the file list (the same on every shard), the reader's
  buffer shuffle on top, then ``decoders.image_random_crop`` (the fused decode + RandomResizedCrop,
  area 0.08-1, ratio 3/4-4/3: it only decodes the crop window), resize to S x S, random mirror,
  normalise. The last incomplete batch of an epoch is dropped.
* eval: ``decoders.image``, resize the shorter side to S * 256/224 (256 for S = 224), centre crop
  S x S, normalise. Every image is seen exactly once (``pad_last_batch`` + ``LastBatchPolicy.PARTIAL``).

Eval outputs equal torchvision's ``Resize(r) + CenterCrop(S)`` up to the decoder's and the
bilinear resampler's rounding (~0.003 mean abs in normalised units, ~0.2/255 in pixels;
tests/data/test_dali_backend.py): the geometry is torchvision's, computed per sample from the JPEG
header -- the resized long side ``int(r * long / short)`` (truncated, where DALI's ``resize_shorter``
rounds) and the crop offset ``round((H - S) / 2)`` with halves to even (where DALI's centred crop
rounds halves up, which used to put the crop one pixel lower / further right).

Shards (one per rank) are contiguous, non-overlapping slices of the file list. Labels come from the
``(path, label)`` samples given, so they match torchvision's ImageFolder and the persisted split
exactly: build the list with :func:`samples_of` on a dataset from :func:`~imta_fast.data.build_data`.

DALI is imported lazily; a missing install raises :class:`~imta_fast.data.errors.DataError`.
"""
from __future__ import annotations

import importlib.util
import re
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .datasets import TransformedDataset
from .errors import DataError, describe
from .sharding import ShardBatchLoader
from .transforms import IMAGENET_MEAN, IMAGENET_STD, imagenet_resize_size

Sample = Tuple[str, int]


def has_dali() -> bool:
    """True when ``nvidia.dali`` is importable."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # find_spec raises when "nvidia" itself is a broken namespace
        return False


def _import_dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as exc:
        raise DataError("the DALI data backend needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                        f"(or imta_fast[dali]), or use --data-backend pytorch ({exc})") from exc
    return fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy


def samples_of(dataset: Dataset) -> List[Sample]:
    """The ``(path, label)`` pairs behind ``dataset``, in its index order.

    Follows ``Subset`` (e.g. the train / hold-out split) and ``TransformedDataset`` wrappers down
    to an ImageFolder; datasets without image files (MNIST, CIFAR) raise DataError.
    """
    indices: Optional[List[int]] = None  # maps the outer dataset's indices to the current one's
    while True:
        if isinstance(dataset, Subset):
            inner = list(dataset.indices)
            indices = inner if indices is None else [inner[i] for i in indices]
            dataset = dataset.dataset
        elif isinstance(dataset, TransformedDataset):
            dataset = dataset.base
        elif hasattr(dataset, "samples"):
            samples = [(str(p), int(y)) for p, y in dataset.samples]
            return samples if indices is None else [samples[i] for i in indices]
        else:
            raise DataError(f"the DALI backend reads image folders; {type(dataset).__name__} has no image files "
                            "(use --data-backend pytorch for this dataset)")


def _to_torch(batch, dtype: torch.dtype, channels_last: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    images, labels = batch[0]["images"], batch[0]["labels"]
    if channels_last:
        images = images.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW = channels_last
    if images.dtype != dtype:  # bf16: DALI has no bf16 output type, cast here
        images = images.to(dtype)
    return images, labels.reshape(-1).long()


class DaliLoader:
    """Iterable over ``(images, labels)`` batches from a DALI pipeline.

    ``images``: ``[B, 3, S, S]`` normalised, ``output_dtype``, on ``cuda:device_id`` (CPU when
    ``device_id`` is None); with ``channels_last`` the tensor is a zero-copy NCHW view of DALI's
    NHWC output, i.e. already in ``torch.channels_last`` memory format. ``labels``: ``int64 [B]``.
    ``len()`` is the number of batches per epoch on this shard. The iterator resets itself at
    each epoch end, so ``for epoch ...: for images, labels in loader`` works like a DataLoader.
    An undecodable file raises DataError naming it (see :func:`find_unreadable`).
    """

    def __init__(self, iterator, output_dtype: torch.dtype, channels_last: bool, num_samples: int,
                 files: Sequence[str] = ()):
        self._it, self._dtype, self._channels_last = iterator, output_dtype, channels_last
        self.num_samples = num_samples  # on this shard
        self._files = list(files)

    def __len__(self) -> int:
        return len(self._it)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        it = iter(self._it)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as exc:  # DALI reports decode failures as RuntimeError
                if not is_data_error(str(exc)):
                    raise
                # The reader shuffles, so the culprit may be anywhere: check at most 10,000 files.
                raise _unreadable_error(*find_unreadable(str(exc), self._files, limit=10_000),
                                        "the DALI input") from None
            yield _to_torch(batch, self._dtype, self._channels_last)


def _dali_iterator(files: Sequence[str], labels: Sequence[int], *, batch_size: int, augment: bool, reader_shuffle: bool,
                   keep_partial: bool, device_id: Optional[int], shard_id: int, num_shards: int, image_size: int,
                   resize_size: Optional[int], mean: Sequence[float], std: Sequence[float], seed: int,
                   num_threads: int, output_dtype: torch.dtype, channels_last: bool, prefetch_queue_depth: int,
                   random_area: Sequence[float] = (0.08, 1.0), random_aspect_ratio: Sequence[float] = (3 / 4, 4 / 3)):
    """The DALI graph shared by both loaders, wrapped in a ``DALIGenericIterator`` (outputs "images", "labels").

    ``augment``: RandomResizedCrop-style fused decode + crop, resize to S x S, random mirror; else
    resize shorter side + centre crop. ``reader_shuffle``: the file reader's buffer shuffle.
    ``keep_partial``: pad the last batch and let the iterator trim it (every file exactly once);
    else the last incomplete batch is dropped. Nothing runs before the first ``next()``.
    """
    fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy = _import_dali()
    on_gpu = device_id is not None
    # DALI's normaliser works in 0..255 pixel units.
    mean255, std255 = [255.0 * m for m in mean], [255.0 * s for s in std]
    dali_dtype = types.FLOAT16 if output_dtype == torch.float16 else types.FLOAT
    layout = "HWC" if channels_last else "CHW"
    # nvJPEG scratch hints from NVIDIA's ImageNet examples: avoid reallocations in the first epochs.
    decode_kwargs = dict(device="mixed", device_memory_padding=211025920, host_memory_padding=140544512) \
        if on_gpu else dict(device="cpu")

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed % 2**31,
                  prefetch_queue_depth=prefetch_queue_depth)
    def pipeline():
        jpegs, label = fn.readers.file(files=list(files), labels=list(labels), shard_id=shard_id, num_shards=num_shards,
                                       random_shuffle=reader_shuffle, pad_last_batch=keep_partial,
                                       stick_to_shard=keep_partial, name="Reader")
        if augment:
            images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=list(random_area),
                                                   random_aspect_ratio=list(random_aspect_ratio), num_attempts=10,
                                                   **decode_kwargs)
            images = fn.resize(images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR)
            extra = dict(mirror=fn.random.coin_flip(probability=0.5))
        else:
            images = fn.decoders.image(jpegs, output_type=types.RGB, **decode_kwargs)
            images = _torchvision_resize_centre_crop(fn, types, jpegs, images, resize_size or
                                                     imagenet_resize_size(image_size), image_size)
            extra = {}
        images = fn.crop_mirror_normalize(images, dtype=dali_dtype, output_layout=layout, mean=mean255,
                                          std=std255, **extra)
        if on_gpu:
            label = label.gpu()
        return images, label

    policy = LastBatchPolicy.PARTIAL if keep_partial else LastBatchPolicy.DROP
    return DALIGenericIterator([pipeline()], ["images", "labels"], reader_name="Reader", last_batch_policy=policy,
                               auto_reset=True, prepare_first_batch=False)


def _torchvision_resize_centre_crop(fn, types, jpegs, images, resize: int, size: int):
    """``Resize(resize)`` + ``CenterCrop(size)`` with torchvision's exact output geometry, per sample.

    From the encoded image's shape (``peek_image_shape``, no decode): the shorter side becomes
    ``resize`` and the longer ``int(resize * long / short)`` (torchvision truncates, DALI's
    ``resize_shorter`` would round), then the crop starts at ``round((H - size) / 2)`` with Python's
    round-half-to-even (DALI's centred crop would round halves up). Integer DALI arithmetic only.
    """
    import nvidia.dali.math as dmath

    shape = fn.peek_image_shape(jpegs)  # HWC, int64
    h, w = shape[0], shape[1]
    new_long = (dmath.max(h, w) * resize) // dmath.min(h, w)
    landscape = fn.cast(h <= w, dtype=types.INT64)
    new_h = landscape * resize + (1 - landscape) * new_long
    new_w = landscape * new_long + (1 - landscape) * resize
    images = fn.resize(images, resize_x=fn.cast(new_w, dtype=types.FLOAT), resize_y=fn.cast(new_h, dtype=types.FLOAT),
                       interp_type=types.INTERP_LINEAR)

    def centre(excess):  # round(excess / 2), halves to even
        half = excess // 2
        odd = excess - 2 * half
        return half + odd * (half - 2 * (half // 2))

    start = fn.cast(fn.stack(centre(new_h - size), centre(new_w - size)), dtype=types.INT64)
    return fn.slice(images, start, fn.constant(idata=[size, size], dtype=types.INT64), axis_names="HW",
                    normalized_anchor=False, normalized_shape=False)


_DECODE_FAILURE = re.compile(r"Failed to decode sample #\d+ : (.+?)\s*$", re.M)


def _dali_reason(message: str) -> str:
    """The one informative line of a DALI pipeline error (the line after ``encountered:``)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln == "encountered:" and i + 1 < len(lines):
            return lines[i + 1]
    return lines[-1] if lines else "unknown DALI error"


def is_data_error(message: str) -> bool:
    """Whether a DALI pipeline error comes from reading or decoding a file (not, say, CUDA out of memory)."""
    return any(k in message for k in ("fn.decoders", "fn.readers", "Failed to decode", "nvImageCodec", "decode"))


def find_unreadable(message: str, candidates: Sequence[str], limit: Optional[int] = None) -> Tuple[Optional[str], str]:
    """``(path, one-line reason)`` of the file behind a DALI decode error, or ``(None, reason)``.

    DALI names the file for some failures ("Failed to decode sample #k : <path>", e.g. a truncated
    JPEG) but not for others (a text file named .JPEG: "nvImageCodec failure"); then the
    ``candidates`` (the files DALI was about to read, in reading order) are decoded with PIL until
    one fails, at most ``limit`` of them (the batches DALI had in flight), on the error path only.
    """
    reason = _dali_reason(message)
    m = _DECODE_FAILURE.search(message)
    if m:
        return m.group(1), reason
    from .folder import load_rgb  # PIL decode with the same error wording as the pytorch backend

    for path in list(candidates)[:limit]:
        try:
            load_rgb(path)
        except DataError as exc:
            return path, str(exc).split(": ", 1)[-1] + f" (DALI: {reason})"
    return None, reason


def _unreadable_error(path: Optional[str], reason: str, where: str) -> DataError:
    if path is None:
        return DataError(f"DALI could not decode an image in {where} and no file could be blamed: {reason}")
    return DataError(f"unreadable image file {describe(path)}: {reason}")


def build_dali_loader(samples: Sequence[Sample], *, batch_size: int, train: bool, device_id: Optional[int] = None,
                      shard_id: int = 0, num_shards: int = 1, image_size: int = 224, resize_size: Optional[int] = None,
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, seed: int = 0,
                      num_threads: int = 4, output_dtype: torch.dtype = torch.float32, channels_last: bool = False,
                      prefetch_queue_depth: int = 2) -> DaliLoader:
    """A :class:`DaliLoader` over ``samples`` (``(path, label)`` pairs, e.g. :func:`samples_of`).

    Args:
        train: training augmentation, shuffling and drop-last; otherwise the deterministic eval path.
        device_id: CUDA device for decoding (nvJPEG ``'mixed'``) and augmentation; None = CPU only.
        shard_id, num_shards: this rank and the world size.
        image_size: side S of the output; ``resize_size`` is the eval shorter-side resize
            (default ``round(S * 256 / 224)``).
        mean, std: per-channel normalisation in [0, 1] pixel units (scaled by 255 for DALI).
        seed: the file-list shuffle and (plus ``shard_id``) DALI's augmentation seed.
        output_dtype: float32, float16 (produced by DALI) or bfloat16 (cast after DALI).
        channels_last: return ``torch.channels_last`` tensors (no copy; see :class:`DaliLoader`).
    """
    if not samples:
        raise DataError("the DALI loader got an empty list of image files")
    if output_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"output_dtype must be float32, float16 or bfloat16, got {output_dtype}")
    _import_dali()

    files, labels = [p for p, _ in samples], [y for _, y in samples]
    if train:
        # ImageFolder lists files class by class and DALI shuffles only within a small buffer of
        # each contiguous shard, so without this global shuffle a batch would hold a few classes.
        order = np.random.RandomState(seed).permutation(len(files))
        files, labels = [files[i] for i in order], [labels[i] for i in order]
    iterator = _dali_iterator(files, labels, batch_size=batch_size, augment=train, reader_shuffle=train,
                              keep_partial=not train, device_id=device_id, shard_id=shard_id, num_shards=num_shards,
                              image_size=image_size, resize_size=resize_size, mean=mean, std=std,
                              seed=seed * 1009 + shard_id, num_threads=num_threads, output_dtype=output_dtype,
                              channels_last=channels_last, prefetch_queue_depth=prefetch_queue_depth)
    n = len(files)
    shard_size = n * (shard_id + 1) // num_shards - n * shard_id // num_shards  # DALI's shard bounds
    return DaliLoader(iterator, output_dtype, channels_last, shard_size, files)


# --- the make_loader(backend="dali") loader: our own per-epoch order, exact shards, skip-and-count ---

def parse_image_transform(transform) -> dict:
    """Read an ImageNet-style torchvision ``Compose`` (see :mod:`~imta_fast.data.transforms`) as DALI settings.

    Eval ``Resize(r) CenterCrop(S) ToTensor Normalize`` -> ``augment=False, image_size=S, resize_size=r``;
    train ``RandomResizedCrop(S) RandomHorizontalFlip ToTensor Normalize`` -> ``augment=True`` with
    its scale / ratio ranges. Anything else raises DataError.
    """
    import torchvision.transforms as T

    steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    out: dict = {}
    for step in steps:
        if isinstance(step, T.Resize) and isinstance(step.size, int) or \
                isinstance(step, T.Resize) and len(step.size) == 1:
            out["resize_size"] = step.size if isinstance(step.size, int) else step.size[0]
        elif isinstance(step, T.CenterCrop) and step.size[0] == step.size[1]:
            out.update(augment=False, image_size=step.size[0])
        elif isinstance(step, T.RandomResizedCrop) and step.size[0] == step.size[1]:
            out.update(augment=True, image_size=step.size[0], random_area=tuple(step.scale),
                       random_aspect_ratio=tuple(step.ratio))
        elif isinstance(step, T.RandomHorizontalFlip) and step.p == 0.5 and out.get("augment"):
            pass
        elif isinstance(step, T.ToTensor):
            pass
        elif isinstance(step, T.Normalize):
            out.update(mean=tuple(float(m) for m in step.mean), std=tuple(float(s) for s in step.std))
        else:
            raise DataError(f"the DALI data backend cannot run the transform step {step!r}; "
                            "use --data-backend pytorch")
    if "image_size" not in out or "mean" not in out:
        raise DataError("the DALI data backend needs a (Random)Resized/Center crop and a Normalize in the transform; "
                        "use --data-backend pytorch")
    return out


def transform_of(dataset: Dataset):
    """The image transform ``dataset`` applies (through ``Subset`` wrappers to a ``TransformedDataset``)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, TransformedDataset):
        return dataset.transform
    raise DataError(f"the DALI backend reads image folders; {type(dataset).__name__} has no image files "
                    "(use --data-backend pytorch for this dataset)")


class DaliShardLoader(ShardBatchLoader):
    """DALI batches of one rank's shard, in an order this loader controls (``make_loader(backend='dali')``).

    Unlike :func:`build_dali_loader` (a fixed shuffle plus DALI's buffer shuffle), the file order is
    set here and fed to DALI's reader unshuffled:

    * train (``train=True``): per epoch, exactly ``DistributedSampler(shuffle=True, drop_last=True,
      seed)``'s order (the same samples per rank and step as the pytorch backend); the last
      incomplete batch is dropped; the pipeline is rebuilt each epoch with augmentation seed
      ``(seed, epoch, rank)``, so a resumed epoch replays the same crops (DALI is deterministic for
      a given seed). Call :meth:`set_epoch` every epoch.
    * eval: the contiguous shard ``[n*r//w, n*(r+1)//w)`` in dataset order, the last batch kept
      partial (DALI pads it, the iterator trims the padding), every file exactly once; the
      pipeline is built once and reused.

    An unreadable file raises DataError naming it; with ``skip_corrupt`` it is appended to
    :attr:`skipped` (one-line messages) instead, the pipeline is rebuilt over the files not yet
    read, and the epoch continues (so that epoch may yield one batch fewer than ``len()``).
    """

    def __init__(self, samples: Sequence[Sample], *, batch_size: int, train: bool, augment: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device_id: Optional[int] = None, image_size: int = 224,
                 resize_size: Optional[int] = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, random_area: Sequence[float] = (0.08, 1.0),
                 random_aspect_ratio: Sequence[float] = (3 / 4, 4 / 3), num_threads: int = 4,
                 output_dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 prefetch_queue_depth: int = 2, skip_corrupt: bool = False):
        if not samples:
            raise DataError("the DALI loader got an empty list of image files")
        _import_dali()
        self.samples = list(samples)
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, augment, seed
        self.rank, self.world_size, self.skip_corrupt = rank, world_size, skip_corrupt
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        self.epoch = 0
        self.skipped: List[str] = []
        n = len(self.samples)
        if train:
            self.num_samples = n // world_size
        else:
            lo, hi = n * rank // world_size, n * (rank + 1) // world_size
            self._eval_samples = self.samples[lo:hi]
            self.num_samples = hi - lo
        self._options = dict(batch_size=batch_size, augment=augment, reader_shuffle=False, keep_partial=not train,
                             device_id=device_id, shard_id=0, num_shards=1, image_size=image_size,
                             resize_size=resize_size, mean=mean, std=std, num_threads=num_threads,
                             output_dtype=output_dtype, channels_last=channels_last,
                             prefetch_queue_depth=prefetch_queue_depth, random_area=random_area,
                             random_aspect_ratio=random_aspect_ratio)
        self._dtype, self._channels_last = output_dtype, channels_last
        self._cached = None  # (files, iterator) of the eval pipeline, reused across complete passes
        self._finished = True

    def _epoch_samples(self) -> List[Sample]:
        if not self.train:
            return list(self._eval_samples)
        from .device_loader import train_order

        order = train_order(len(self.samples), self.seed, self.epoch, self.rank, self.world_size).tolist()
        return [self.samples[i] for i in order]

    def _iterator(self, samples: List[Sample], restart: int):
        from .device_loader import augment_seed

        files, labels = [p for p, _ in samples], [y for _, y in samples]
        if not self.train and restart == 0 and self._cached is not None and self._cached[0] == files:
            return self._cached[1]
        self._cached = None  # free the previous pipeline before building another
        seed = augment_seed(self.seed, self.epoch if self.train else 0, self.rank) + 7919 * restart
        it = _dali_iterator(files, labels, seed=seed, **self._options)
        if not self.train and restart == 0:
            self._cached = (files, it)
        return it

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        samples = self._epoch_samples()
        if self.train:
            samples = samples[:len(self) * self.batch_size]
        if not self._finished:  # the last pass was abandoned midway: its pipeline sits mid-epoch
            self._cached = None
        self._finished = False
        pos, restarts = 0, 0  # samples yielded so far; pipeline rebuilds after skipped files
        while pos < len(samples):
            rest = samples[pos:]
            if self.train and len(rest) < self.batch_size:
                return
            it = iter(self._iterator(rest, restarts))
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    self._finished = True
                    return
                except RuntimeError as exc:  # DALI reports decode failures as RuntimeError
                    self._cached = None  # "Current pipeline object is no longer valid"
                    if not is_data_error(str(exc)):
                        raise
                    # The reader is sequential: the bad file is among the batches DALI had in flight.
                    unread = samples[pos:]
                    in_flight = (self._options["prefetch_queue_depth"] + 2) * self.batch_size
                    path, reason = find_unreadable(str(exc), [p for p, _ in unread], limit=in_flight)
                    error = _unreadable_error(path, reason, f"shard {self.rank} of {self.world_size}")
                    if not self.skip_corrupt or path is None:
                        raise error from None
                    self.skipped.append(str(error))
                    samples = samples[:pos] + [s for s in unread if s[0] != path]
                    restarts += 1
                    break
                x, y = _to_torch(batch, self._dtype, self._channels_last)
                pos += len(y)
                yield x, y
