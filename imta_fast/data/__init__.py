"""Data layer: datasets, the persisted hold-out split, DataLoaders, and the DALI pipeline.

Typical use::

    from imta_fast.data import build_data, build_eval_loader, build_train_loader
    data = build_data("cifar100", "/data", run_dir / "split.json", holdout_size=5000, seed=0)
    train_loader, sampler = build_train_loader(data.train, 64, workers=4, seed=0, dist=dist_info)
    test_loader = build_eval_loader(data.test, 128, workers=4, dist=dist_info)

or, for any backend (pytorch DataLoader, NVIDIA DALI, device-resident tensors; see ``backends``)::

    loader = make_loader(data.train, backend="auto", train=True, batch_size=64, workers=4, seed=0, dist=dist_info)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader: ...

Bad input raises :class:`DataError` with a one-line message. DALI (``dali_loader``) is imported
lazily, only when a DALI loader is built.
"""
from .backends import BACKENDS, Loader, make_loader, resolve_backend
from .dali_loader import build_dali_loader, has_dali, samples_of
from .device_loader import DeviceLoader
from .datasets import DATASETS, DatasetInfo, TransformedDataset, build_dataset
from .errors import DataError
from .loaders import DataBundle, build_data, build_eval_loader, build_loader, build_train_loader
from .splits import Split, load_or_create_split, load_split, make_split, save_split

__all__ = [
    "BACKENDS", "DeviceLoader", "Loader", "make_loader", "resolve_backend",
    "DATASETS", "DataBundle", "DataError", "DatasetInfo", "Split", "TransformedDataset", "build_dali_loader",
    "build_data", "build_dataset", "build_eval_loader", "build_loader", "build_train_loader", "has_dali",
    "load_or_create_split", "load_split", "make_split", "samples_of", "save_split",
]
