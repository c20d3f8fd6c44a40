"""Reader for the official python-pickle CIFAR-10 / CIFAR-100 files, in torchvision's layout.

::

    <data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <data_dir>/cifar-100-python/{train, test, meta}

``data_dir`` may also be the ``cifar-*`` folder itself. Why not ``torchvision.datasets.CIFAR10``:
it md5-checks every file against the official archive, so a subset or a re-packed copy (and the
tiny fake sets the tests write) is rejected with a vague "not found or corrupted" message; this
reader validates the content instead and names the offending file.

The files are pickles. Unpickling can run arbitrary code, so :class:`_SafeUnpickler` resolves only
the handful of globals a NumPy-array pickle needs and rejects anything else as corrupt.
"""
from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from .errors import DataError, describe

try:  # NumPy >= 2 moved the implementation to numpy._core; old pickles still name numpy.core.
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core import multiarray as _multiarray


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and which keys hold labels and class names."""

    folder: str
    train_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int


LAYOUTS = {
    "cifar10": CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                           "batches.meta", "labels", "label_names", 10),
    "cifar100": CifarLayout("cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names", 100),
}

# Everything a dict of NumPy arrays / lists / strings needs, under both NumPy 1 and 2 module names.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles written by Python 3 store bytes
    ("__builtin__", "bytes"): bytes,  # ... and empty bytes (an empty array's buffer)
    ("builtins", "bytes"): bytes,
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"disallowed global {module}.{name}") from None


def _unpickle(path: Path) -> dict:
    """Load one CIFAR pickle as a dict with ``str`` keys (Python-2 files decode as latin1, like torchvision)."""
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except OSError as exc:
        raise DataError(f"unreadable file {describe(path)}: {exc.strerror or exc}") from exc
    except Exception as exc:  # any unpickling failure means the file is not a CIFAR pickle
        raise DataError(f"corrupt CIFAR file {describe(path)}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"corrupt CIFAR file {describe(path)}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def find_root(data_dir: str | Path, name: str) -> Path:
    """The folder that holds the pickles: ``data_dir/<layout.folder>`` or ``data_dir`` itself."""
    layout = LAYOUTS[name]
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"dataset folder not found: {describe(data_dir)}")
    for root in (data_dir / layout.folder, data_dir):
        if (root / layout.meta_file).is_file():
            return root
    raise DataError(f"wrong layout: no {layout.folder}/{layout.meta_file} in {describe(data_dir)} "
                    f"(expected the python-pickle {name} files, torchvision layout)")


def read_classes(root: Path, name: str) -> List[str]:
    """Class names from the meta file; their count must match the variant (10 or 100)."""
    layout = LAYOUTS[name]
    meta_path = root / layout.meta_file
    meta = _unpickle(meta_path)
    names = meta.get(layout.names_key)
    if not isinstance(names, (list, tuple)):
        raise DataError(f"corrupt CIFAR file {describe(meta_path)}: no '{layout.names_key}' list")
    if len(names) != layout.num_classes:
        raise DataError(f"class count mismatch: {describe(meta_path)} lists {len(names)} classes, "
                        f"{name} has {layout.num_classes}")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def read_split(root: Path, name: str, train: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read the train (all batches concatenated) or test split.

    Returns ``uint8 [N, 3, 32, 32]`` images (RGB planes, as stored) and ``int64 [N]`` labels.
    """
    layout = LAYOUTS[name]
    images, labels = [], []
    for fname in layout.train_files if train else layout.test_files:
        path = root / fname
        if not path.is_file():
            raise DataError(f"wrong layout: missing file {describe(path)}")
        batch = _unpickle(path)
        data, lab = batch.get("data"), batch.get(layout.label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"corrupt CIFAR file {describe(path)}: 'data' must be uint8 [N, 3072], got {got}")
        lab = np.asarray(lab if lab is not None else [], dtype=np.int64)
        if lab.shape != (data.shape[0],):
            raise DataError(f"corrupt CIFAR file {describe(path)}: {data.shape[0]} images but "
                            f"{lab.size} '{layout.label_key}'")
        if lab.size and (lab.min() < 0 or lab.max() >= layout.num_classes):
            raise DataError(f"corrupt CIFAR file {describe(path)}: labels outside 0..{layout.num_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    x = torch.from_numpy(np.concatenate(images))
    y = torch.from_numpy(np.concatenate(labels))
    if len(y) == 0:
        raise DataError(f"empty split: no {'train' if train else 'test'} images in {describe(root)}")
    return x, y
