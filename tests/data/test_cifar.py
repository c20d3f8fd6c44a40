"""imta_fast/data/cifar.py: the python-pickle CIFAR reader and its errors."""
import os
import pickle

import numpy as np
import pytest
import torch

from imta_fast.data import cifar
from imta_fast.data.errors import DataError
from imta_fast.data.fake import write_fake_cifar


@pytest.mark.parametrize("name, key", [("cifar10", "labels"), ("cifar100", "fine_labels")])
def test_reads_back_exactly_what_was_written(tmp_path, name, key):
    folder = write_fake_cifar(tmp_path, name, n_train=23, n_test=7)
    assert cifar.find_root(tmp_path, name) == folder
    assert cifar.find_root(folder, name) == folder  # the cifar-* folder itself is accepted too
    assert len(cifar.read_classes(folder, name)) == cifar.LAYOUTS[name].num_classes
    x, y = cifar.read_split(folder, name, train=True)
    assert x.shape == (23, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    raw = [pickle.load(open(folder / f, "rb")) for f in cifar.LAYOUTS[name].train_files]
    np.testing.assert_array_equal(x.numpy().reshape(23, -1), np.concatenate([r["data"] for r in raw]))
    assert y.tolist() == sum((r[key] for r in raw), [])
    xt, yt = cifar.read_split(folder, name, train=False)
    assert xt.shape == (7, 3, 32, 32) and yt.tolist() == [i % cifar.LAYOUTS[name].num_classes for i in range(7)]


def test_python2_style_pickles_with_bytes_keys_and_numpy_core_names_load(tmp_path):
    folder = write_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=3)
    batch = pickle.load(open(folder / "test_batch", "rb"))
    body = pickle.dumps({k.encode(): v for k, v in batch.items()}, protocol=2)
    # Python 2 / NumPy 1 files name numpy.core (protocol-2 GLOBAL opcodes are plain text lines).
    (folder / "test_batch").write_bytes(body.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    x, y = cifar.read_split(folder, "cifar10", train=False)
    np.testing.assert_array_equal(x.numpy().reshape(3, -1), batch["data"])
    assert y.tolist() == batch["labels"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _corrupt(folder, fname, how):
    path = folder / fname
    if how == "garbage":
        path.write_bytes(b"\x80\x02this is not a pickle")
    elif how == "code":
        path.write_bytes(pickle.dumps({"data": _Evil()}, protocol=2))
    elif how == "not_dict":
        path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    elif how == "shape":
        path.write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, protocol=2))
    elif how == "labels":
        path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, protocol=2))
    elif how == "range":
        path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, protocol=2))
    return path


@pytest.mark.parametrize("how, problem", [
    ("garbage", "corrupt CIFAR file"), ("code", "disallowed global"), ("not_dict", "expected a dict"),
    ("shape", "uint8 [N, 3072]"), ("labels", "2 images but 1"), ("range", "labels outside 0..9"),
])
def test_corrupt_batch_files_raise_data_error_naming_the_file(tmp_path, how, problem):
    folder = write_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=3)
    path = _corrupt(folder, "data_batch_2", how)
    with pytest.raises(DataError, match="corrupt CIFAR file") as exc:
        cifar.read_split(folder, "cifar10", train=True)
    assert str(path) in str(exc.value) and problem in str(exc.value)


def test_layout_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=f"dataset folder not found: '{tmp_path / 'nope'}'"):
        cifar.find_root(tmp_path / "nope", "cifar10")
    with pytest.raises(DataError, match=f"wrong layout: no cifar-10-batches-py/batches.meta in '{tmp_path}'"):
        cifar.find_root(tmp_path, "cifar10")
    folder = write_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=3)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=f"wrong layout: missing file '{folder / 'data_batch_3'}'"):
        cifar.read_split(folder, "cifar10", train=True)


def test_meta_with_the_wrong_class_count_is_a_class_count_mismatch(tmp_path):
    folder = write_fake_cifar(tmp_path, "cifar100", n_train=10, n_test=3)
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["a"] * 10}, protocol=2))
    with pytest.raises(DataError, match=f"class count mismatch: '{folder / 'meta'}' lists 10 classes, cifar100 has 100"):
        cifar.read_classes(folder, "cifar100")


def test_empty_split_is_an_error(tmp_path):
    folder = write_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=0)
    with pytest.raises(DataError, match=f"empty split: no test images in '{folder}'"):
        cifar.read_split(folder, "cifar10", train=False)
