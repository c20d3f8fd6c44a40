"""Tiny datasets in the real on-disk formats, for smoke tests and CLI demos without downloads.

``write_fake_cifar`` writes the official python-pickle layout (readable by this package and by
torchvision's reader apart from its md5 check); ``write_fake_image_folder`` writes an
ImageNet-style ``train/``/``val/`` tree of JPEGs. Content is random but seeded. The JPEGs are
smooth (upsampled noise) so that two decoders/resizers give close results.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
from PIL import Image

from .cifar import LAYOUTS


def _dump(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the official (Python 2) files


def write_fake_cifar(root: str | Path, name: str = "cifar10", n_train: int = 50, n_test: int = 20,
                     seed: int = 0) -> Path:
    """Write ``root/<cifar-10-batches-py | cifar-100-python>`` with random uint8 images.

    Labels cycle through all classes (so every class occurs once there are enough images).
    Returns the folder written.
    """
    layout = LAYOUTS[name]
    rng = np.random.RandomState(seed)
    folder = Path(root) / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    k = layout.num_classes

    def batch(n: int, offset: int, tag: str) -> dict:
        labels = [(offset + i) % k for i in range(n)]
        d = {"batch_label": tag, "data": rng.randint(0, 256, size=(n, 3072), dtype=np.uint8),
             "filenames": [f"img_{offset + i}.png" for i in range(n)], layout.label_key: labels}
        if name == "cifar100":
            d["coarse_labels"] = [y // 5 for y in labels]
        return d

    bounds = np.linspace(0, n_train, len(layout.train_files) + 1).astype(int)
    for fname, lo, hi in zip(layout.train_files, bounds[:-1], bounds[1:]):
        _dump(batch(int(hi - lo), int(lo), fname), folder / fname)
    _dump(batch(n_test, 0, "test"), folder / layout.test_files[0])
    meta = {layout.names_key: [f"class_{i}" for i in range(k)]}
    if name == "cifar100":
        meta["coarse_label_names"] = [f"super_{i}" for i in range(20)]
    _dump(meta, folder / layout.meta_file)
    return folder


def smooth_image(rng: np.random.RandomState, size: Tuple[int, int]) -> Image.Image:
    """A random RGB image of ``size = (height, width)`` with only low spatial frequencies."""
    coarse = rng.randint(0, 256, size=(4, 5, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size[1], size[0]), Image.BICUBIC)


def write_fake_image_folder(root: str | Path, classes: Sequence[str] = ("cat", "dog"), n_train: int = 4,
                            n_val: int = 2, size: Tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """Write ``root/{train,val}/<class>/<i>.jpg`` (``n_train`` / ``n_val`` JPEGs per class). Returns ``root``."""
    rng = np.random.RandomState(seed)
    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                smooth_image(rng, size).save(d / f"{i}.jpg", quality=95)
    return root
