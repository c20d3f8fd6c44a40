"""NVIDIA DALI input pipeline for ImageNet-style JPEG folders (``--data-backend dali``).

Decodes on the GPU (nvJPEG, ``device='mixed'``) and runs the augmentations there, replacing the
CPU-bound PIL path; with ``device_id=None`` the same graph runs on the CPU (CI, tests).

* train: a fixed seeded global shuffle of the file list (the same on every shard), the reader's
  buffer shuffle on top, then ``decoders.image_random_crop`` (the fused decode + RandomResizedCrop,
  area 0.08-1, ratio 3/4-4/3: it only decodes the crop window), resize to S x S, random mirror,
  normalise. The last incomplete batch of an epoch is dropped.
* eval: ``decoders.image``, resize the shorter side to S * 256/224 (256 for S = 224), centre crop
  S x S, normalise. Every image is seen exactly once (``pad_last_batch`` + ``LastBatchPolicy.PARTIAL``).

Shards (one per rank) are contiguous, non-overlapping slices of the file list. Labels come from the
``(path, label)`` samples given, so they match torchvision's ImageFolder and the persisted split
exactly: build the list with :func:`samples_of` on a dataset from :func:`~imta_fast.data.build_data`.

DALI is imported lazily; a missing install raises :class:`~imta_fast.data.errors.DataError`.
"""
from __future__ import annotations

import importlib.util
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .datasets import TransformedDataset
from .errors import DataError
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


class DaliLoader:
    """Iterable over ``(images, labels)`` batches from a DALI pipeline.

    ``images``: ``[B, 3, S, S]`` normalised, ``output_dtype``, on ``cuda:device_id`` (CPU when
    ``device_id`` is None); with ``channels_last`` the tensor is a zero-copy NCHW view of DALI's
    NHWC output, i.e. already in ``torch.channels_last`` memory format. ``labels``: ``int64 [B]``.
    ``len()`` is the number of batches per epoch on this shard. The iterator resets itself at
    each epoch end, so ``for epoch ...: for images, labels in loader`` works like a DataLoader.
    """

    def __init__(self, iterator, output_dtype: torch.dtype, channels_last: bool, num_samples: int):
        self._it, self._dtype, self._channels_last = iterator, output_dtype, channels_last
        self.num_samples = num_samples  # on this shard

    def __len__(self) -> int:
        return len(self._it)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._it:
            images, labels = batch[0]["images"], batch[0]["labels"]
            if self._channels_last:
                images = images.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW = channels_last
            if images.dtype != self._dtype:  # bf16: DALI has no bf16 output type, cast here
                images = images.to(self._dtype)
            yield images, labels.reshape(-1).long()


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
    fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy = _import_dali()

    files, labels = [p for p, _ in samples], [y for _, y in samples]
    if train:
        # ImageFolder lists files class by class and DALI shuffles only within a small buffer of
        # each contiguous shard, so without this global shuffle a batch would hold a few classes.
        order = np.random.RandomState(seed).permutation(len(files))
        files, labels = [files[i] for i in order], [labels[i] for i in order]
    on_gpu = device_id is not None
    # DALI's normaliser works in 0..255 pixel units.
    mean255, std255 = [255.0 * m for m in mean], [255.0 * s for s in std]
    dali_dtype = types.FLOAT16 if output_dtype == torch.float16 else types.FLOAT
    layout = "HWC" if channels_last else "CHW"
    # nvJPEG scratch hints from NVIDIA's ImageNet examples: avoid reallocations in the first epochs.
    decode_kwargs = dict(device="mixed", device_memory_padding=211025920, host_memory_padding=140544512) \
        if on_gpu else dict(device="cpu")

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=seed * 1009 + shard_id, prefetch_queue_depth=prefetch_queue_depth)
    def pipeline():
        jpegs, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                       random_shuffle=train, pad_last_batch=not train, stick_to_shard=not train,
                                       name="Reader")
        if train:
            images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=[0.08, 1.0],
                                                   random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
                                                   **decode_kwargs)
            images = fn.resize(images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR)
            extra = dict(mirror=fn.random.coin_flip(probability=0.5))
        else:
            images = fn.decoders.image(jpegs, output_type=types.RGB, **decode_kwargs)
            images = fn.resize(images, resize_shorter=resize_size or imagenet_resize_size(image_size),
                               interp_type=types.INTERP_LINEAR)
            extra = dict(crop=(image_size, image_size))  # crop_pos defaults to the centre
        images = fn.crop_mirror_normalize(images, dtype=dali_dtype, output_layout=layout, mean=mean255,
                                          std=std255, **extra)
        if on_gpu:
            label = label.gpu()
        return images, label

    policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
    iterator = DALIGenericIterator([pipeline()], ["images", "labels"], reader_name="Reader",
                                   last_batch_policy=policy, auto_reset=True)
    n = len(files)
    shard_size = n * (shard_id + 1) // num_shards - n * shard_id // num_shards  # DALI's shard bounds
    return DaliLoader(iterator, output_dtype, channels_last, shard_size)
