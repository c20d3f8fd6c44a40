"""imta_fast/data/backends.py: make_loader for every backend; DDP sharding simulated with DistInfo ranks.

The loaders read only ``rank`` / ``world_size`` / ``device`` from DistInfo (no process group), so
two ranks are two loaders in one process; ``predict`` concatenates eval shards in rank order
(``all_gather_cat``), which is what ``torch.cat`` over the ranks does here.
"""
import sys

import pytest
import torch
from torch._utils import ExceptionWrapper

from imta_fast.data import BACKENDS, DataError, build_data, make_loader, resolve_backend
from imta_fast.data.backends import one_line
from imta_fast.data.datasets import TensorImages, TransformedDataset
from imta_fast.data.fake import write_fake_cifar, write_fake_image_folder
from imta_fast.data.transforms import tensor_eval_transform, tensor_train_transform
from imta_fast.distributed import DistInfo
from tests.helpers import broken_image_folder

IN_MEMORY = ["pytorch", "device"]  # dali: tests/data/test_dali_backend.py


def _ids_dataset(n, augment):
    """n random 3x8x8 images whose label is their index, so a label identifies the sample."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    ev = tensor_eval_transform((0.5,) * 3, (0.25,) * 3)
    tr = tensor_train_transform(8, padding=2, flip=True, mean=(0.5,) * 3, std=(0.25,) * 3) if augment else ev
    return TransformedDataset(TensorImages(images, torch.arange(n)), tr, ev)


def _labels(loader):
    return [y.tolist() for _, y in loader]


@pytest.mark.parametrize("backend", IN_MEMORY)
def test_train_shards_are_disjoint_drop_their_last_partial_batch_and_reshuffle_per_epoch(backend):
    n, batch = 23, 4  # 11 samples per rank (one of the 23 sits the epoch out): 2 full batches, 3 dropped
    ds = _ids_dataset(n, augment=True)
    loaders = [make_loader(ds, backend=backend, train=True, batch_size=batch, workers=0, seed=1,
                           dist=DistInfo(rank=r, world_size=2)) for r in range(2)]
    epochs = []
    for epoch in range(8):
        seen = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = _labels(loader)
            assert len(loader) == 2 and [len(b) for b in batches] == [batch, batch]
            seen += sum(batches, [])
        assert len(seen) == len(set(seen)) == 16  # no sample twice in an epoch, across both ranks
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    # Over the epochs (8 here; a given sample sits out with probability 7/23 per epoch) the dropped samples change, so every sample gets trained on.
    assert set(sum(epochs, [])) == set(range(n))


@pytest.mark.parametrize("backend", IN_MEMORY)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_shards_give_every_sample_once_in_order_with_partial_last_batches(backend, world_size):
    n, batch = 23, 4
    ds = _ids_dataset(n, augment=False)
    gathered, sizes = [], []
    for r in range(world_size):
        loader = make_loader(ds, backend=backend, train=False, batch_size=batch, workers=0, seed=0,
                             dist=DistInfo(rank=r, world_size=world_size))
        loader.set_epoch(5)  # a no-op for eval
        batches = _labels(loader)
        shard = n * (r + 1) // world_size - n * r // world_size
        assert loader.num_samples == shard and len(loader) == len(batches) == -(-shard // batch)
        assert [len(b) for b in batches[:-1]] == [batch] * (len(batches) - 1)  # only the last may be partial
        gathered += sum(batches, [])
        sizes.append(shard)
    assert gathered == list(range(n))  # what all_gather_cat assembles in predict
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("backend", IN_MEMORY)
def test_labels_match_the_persisted_split(tmp_path, backend):
    write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=21)
    data = build_data("cifar10", tmp_path, tmp_path / "split.json", holdout_size=11, seed=0)
    targets = data.train.dataset.targets
    holdout = []
    for r in range(2):
        loader = make_loader(data.holdout, backend=backend, train=False, batch_size=4, workers=0, seed=0,
                             dist=DistInfo(rank=r, world_size=2))
        holdout += sum(_labels(loader), [])
    assert holdout == [targets[i] for i in data.split.holdout_indices]
    train = make_loader(data.train, backend=backend, train=True, batch_size=39, workers=0, seed=0, dist=DistInfo())
    train.set_epoch(0)
    (got,) = _labels(train)
    counts = torch.bincount(torch.tensor(got), minlength=10) - torch.bincount(
        torch.tensor([targets[i] for i in data.split.train_indices]), minlength=10)
    assert len(got) == 39 and not counts.any()  # all 39 training images, labels intact


def test_auto_backend_and_unknown_backend(tmp_path):
    write_fake_image_folder(tmp_path, n_train=2, n_val=1)
    folder = build_data("imagenet", tmp_path, None, holdout_size=1, image_size=16)
    ids = _ids_dataset(4, augment=False)
    cpu = torch.device("cpu")
    assert resolve_backend("auto", folder.test, cpu) == "pytorch" == resolve_backend("auto", ids, cpu)
    assert resolve_backend("device", ids, cpu) == "device" and set(BACKENDS) == {"auto", "pytorch", "dali", "device"}
    with pytest.raises(DataError, match="unknown data backend 'gpu'; choose one of auto, pytorch, dali, device"):
        make_loader(ids, backend="gpu", train=False, batch_size=2, workers=0, seed=0, dist=DistInfo())
    with pytest.raises(DataError, match="4 evaluation images cannot be shared by 5 processes"):
        make_loader(ids, backend="pytorch", train=False, batch_size=2, workers=0, seed=0,
                    dist=DistInfo(rank=0, world_size=5))


@pytest.fixture()
def broken_folder(tmp_path):
    """val/ with 3 good JPEGs per class, a truncated JPEG (dog/1.jpg) and a text file named cat/x.JPEG."""
    return broken_image_folder(tmp_path, n_train=2)


def test_pytorch_backend_stops_on_an_unreadable_image_naming_it(broken_folder):
    loader = make_loader(broken_folder.test, backend="pytorch", train=False, batch_size=2, workers=0, seed=0,
                         dist=DistInfo())
    with pytest.raises(DataError, match=r"^unreadable image file '.*val/cat/x\.JPEG': cannot identify image file"):
        list(loader)


def test_pytorch_backend_skips_and_counts_with_skip_corrupt(broken_folder):
    loader = make_loader(broken_folder.test, backend="pytorch", train=False, batch_size=2, workers=0, seed=0,
                         dist=DistInfo(), skip_corrupt=True)
    labels = sum(_labels(loader), [])
    assert labels == [0, 0, 0, 1, 1]  # cat 0-2, dog 0 and 2: the two bad files gone, no label shifted
    assert len(loader.skipped) == 2
    assert "x.JPEG" in loader.skipped[0] and "dog/1.jpg" in loader.skipped[1]
    assert "truncated" in loader.skipped[1]


def test_worker_errors_come_back_as_one_line(broken_folder):
    try:
        broken_folder.test[3]  # cat/x.JPEG
    except DataError:
        wrapped = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    try:
        wrapped.reraise()
    except DataError as exc:
        assert "\n" in str(exc)
        line = one_line(exc)
    assert "\n" not in line and line.startswith("unreadable image file '") and "x.JPEG" in line


@pytest.mark.parametrize("train", [False, True])
def test_a_loader_pass_never_draws_from_the_global_rng(train):
    """Iterating a loader (deterministic transforms) leaves torch's global RNG untouched: with workers=0
    the training augmentations draw from it, so an evaluation pass that consumed it would change every
    later training batch (and break bit-identity with earlier releases)."""
    data = build_data("digits", None, None, 64, holdout_transform="eval", seed=0)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_distributed=False)
    loader = make_loader(data.holdout, backend="pytorch", train=train, batch_size=16, workers=0, seed=0, dist=dist)
    loader.set_epoch(1)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for _ in loader:
        pass
    assert torch.equal(torch.rand(3), expected)
