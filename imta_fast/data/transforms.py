"""Per-dataset normalisation constants and train / eval transforms (docs/method.md §5 "Data").

Two kinds of input reach these transforms:

* in-memory datasets (MNIST, digits, CIFAR) hand over ``uint8`` tensors ``[C, H, W]``; the tensor
  path avoids a PIL round trip per sample and gives bit-identical results to the reference's
  PIL path (``ConvertImageDtype`` divides by 255 exactly like ``ToTensor``; ``RandomCrop`` pads
  with 0 in both);
* ImageNet-style folders hand over PIL images decoded from JPEG files.

Every transform returns a ``float32`` tensor ``[C, H, W]`` normalised with the dataset's mean/std.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torchvision.transforms as T

Transform = Callable[[object], torch.Tensor]

# docs/method.md §5 (dataloader.py of both reference repositories).
CIFAR10_MEAN = (0.4914, 0.4824, 0.4467)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Measured on the 4,000 training images of the embedded MNIST subset (after carving off the fixed
# 1,000-image test split, see embedded.py); tests/data/test_embedded.py re-measures them. They are
# essentially the usual full-MNIST constants (0.1307, 0.3081).
MNIST_MEAN = (0.1311,)
MNIST_STD = (0.3083,)
# Measured the same way on the 1,497 training images of scikit-learn's digits, after upsampling
# 8x8 -> 28x28 (bilinear) and rescaling the 0..16 gray levels to 0..255.
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3246,)


def tensor_train_transform(size: int, padding: int, flip: bool, mean: Sequence[float], std: Sequence[float]) -> Transform:
    """Train transform for ``uint8 [C, size, size]`` tensors: random shift by up to ``padding``
    pixels (zero-padded crop), optional horizontal flip, then scale to [0, 1] and normalise.

    CIFAR uses ``padding=4, flip=True`` (the reference recipe); digit sets use a 2-pixel shift and
    no flip, because a mirrored digit is a different (or no) digit.
    """
    steps: list = [T.RandomCrop(size, padding=padding)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ConvertImageDtype(torch.float32), T.Normalize(mean, std)]
    return T.Compose(steps)


def tensor_eval_transform(mean: Sequence[float], std: Sequence[float]) -> Transform:
    """Deterministic eval transform for ``uint8 [C, H, W]`` tensors: scale to [0, 1], normalise."""
    return T.Compose([T.ConvertImageDtype(torch.float32), T.Normalize(mean, std)])


def imagenet_train_transform(image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Transform:
    """PIL image -> ``float32 [3, image_size, image_size]``: RandomResizedCrop with the library
    defaults (scale 0.08-1, ratio 3/4-4/3, bilinear), horizontal flip, ToTensor, Normalize."""
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def imagenet_resize_size(image_size: int) -> int:
    """Shorter-side resize used before the eval centre crop: 256 for 224, same 256/224 ratio otherwise."""
    return int(round(image_size * 256 / 224))


def imagenet_eval_transform(image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Transform:
    """PIL image -> ``float32 [3, image_size, image_size]``: Resize(shorter side 256), CenterCrop(224),
    ToTensor, Normalize (other sizes keep the 256/224 ratio)."""
    return T.Compose([T.Resize(imagenet_resize_size(image_size)), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])
