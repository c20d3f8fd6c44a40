"""imta_fast/data/loaders.py: build_data (train / hold-out / test) and build_loader."""
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch._utils import ExceptionWrapper
from torch.utils.data import DistributedSampler

from imta_fast.data import DataError, build_data, build_eval_loader, build_loader, build_train_loader, load_split
from imta_fast.data.fake import write_fake_cifar, write_fake_image_folder


@pytest.fixture()
def cifar_dir(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=20)
    return tmp_path


def test_build_data_holds_out_the_split_tail_with_eval_transforms(cifar_dir):
    split_path = cifar_dir / "run" / "split.json"
    data = build_data("cifar10", cifar_dir, split_path, holdout_size=10, seed=0)
    assert (len(data.train), len(data.holdout), len(data.test)) == (40, 10, 20)
    assert data.split == load_split(split_path) and data.info.num_classes == 10
    assert set(data.train.indices).isdisjoint(data.holdout.indices)
    x1, y1 = data.holdout[0]
    x2, y2 = data.holdout[0]
    assert torch.equal(x1, x2) and y1 == y2  # deterministic confidences for threshold fitting
    assert x1.shape == (3, 32, 32)
    # A later run (resume, stage 2, eval) with another seed reuses the file.
    again = build_data("cifar10", cifar_dir, split_path, holdout_size=10, seed=7)
    assert again.split == data.split


def test_holdout_with_train_transforms_reproduces_the_reference(cifar_dir):
    data = build_data("cifar10", cifar_dir, None, holdout_size=10, holdout_transform="train", seed=0)
    torch.manual_seed(0)
    draws = [data.holdout[0][0] for _ in range(6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def test_zero_holdout_means_holdout_is_the_test_set(cifar_dir):
    data = build_data("cifar10", cifar_dir, cifar_dir / "split.json", holdout_size=0)
    assert data.holdout is data.test and len(data.train) == 50


def test_build_data_errors(cifar_dir):
    with pytest.raises(DataError, match="holdout_transform must be 'eval' or 'train'"):
        build_data("cifar10", cifar_dir, None, holdout_size=10, holdout_transform="augmented")
    with pytest.raises(DataError, match="hold-out size 50 must be in \\[0, 50\\)"):
        build_data("cifar10", cifar_dir, None, holdout_size=50)
    with pytest.raises(DataError, match=f"dataset folder not found: '{cifar_dir / 'nope'}'"):
        build_data("cifar10", cifar_dir / "nope", None, holdout_size=10)


def _order(loader):
    return torch.cat([y for _, y in loader]).tolist()


def test_loader_order_is_a_function_of_seed_and_epoch(cifar_dir):
    data = build_data("cifar10", cifar_dir, None, holdout_size=10)
    loader, sampler = build_loader(data.train, batch_size=8, shuffle=True, seed=0)
    assert isinstance(sampler, DistributedSampler) and len(loader) == 5
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    sampler.set_epoch(0)
    epoch0 = list(iter(sampler))
    sampler.set_epoch(1)
    assert list(iter(sampler)) != epoch0 and sorted(epoch0) == list(range(40))
    other, other_sampler = build_loader(data.train, batch_size=8, shuffle=True, seed=0)
    other_sampler.set_epoch(0)
    assert list(iter(other_sampler)) == epoch0  # a resumed run sees the same order
    seq, _ = build_loader(data.test, batch_size=6, shuffle=False)
    assert _order(seq) == [i % 10 for i in range(20)] and len(seq) == 4
    dropped, _ = build_loader(data.test, batch_size=6, shuffle=False, drop_last=True)
    assert len(dropped) == 3


def test_distributed_loader_needs_an_initialised_process_group(cifar_dir):
    data = build_data("cifar10", cifar_dir, None, holdout_size=10)
    with pytest.raises(RuntimeError, match="torch.distributed to be initialised"):
        build_loader(data.train, batch_size=8, shuffle=True, distributed=True)


def test_distributed_loader_with_a_one_process_gloo_group(cifar_dir, tmp_path):
    data = build_data("cifar10", cifar_dir, None, holdout_size=10)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader, sampler = build_loader(data.train, batch_size=8, shuffle=True, distributed=True, seed=3)
        assert sampler.num_replicas == 1 and sampler.rank == 0 and sampler.seed == 3
        sampler.set_epoch(2)
        assert sorted(_order(loader)) == sorted(data.train.dataset.targets[i] for i in data.train.indices)
    finally:
        dist.destroy_process_group()


def test_worker_errors_reach_the_main_process_as_data_error(tmp_path):
    # DataLoader workers ship exceptions back through ExceptionWrapper, which rebuilds the same
    # class from one message string; exercised here directly, because a real worker that raised
    # takes PyTorch about 5 s to shut down.
    write_fake_image_folder(tmp_path, n_train=2, n_val=1)
    (tmp_path / "val" / "dog" / "0.jpg").write_bytes(b"broken")
    data = build_data("imagenet", tmp_path, None, holdout_size=1, image_size=16)
    try:
        data.test[1]
    except DataError:
        wrapped = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    with pytest.raises(DataError, match="unreadable image file .*val/dog/0.jpg"):
        wrapped.reraise()


def test_train_loader_shuffles_and_drops_the_last_partial_batch(cifar_dir):
    data = build_data("cifar10", cifar_dir, None, holdout_size=10)  # 40 training images
    loader, sampler = build_train_loader(data.train, 16, workers=0, seed=0, dist=SimpleNamespace(is_distributed=False))
    sampler.set_epoch(0)
    assert len(loader) == 2 and [len(y) for _, y in loader] == [16, 16]


@pytest.mark.parametrize("world_size", [1, 3])
def test_eval_loader_shards_cover_the_dataset_once_in_order(cifar_dir, world_size):
    data = build_data("cifar10", cifar_dir, None, holdout_size=10)  # 20 test images, labels i % 10
    labels = []
    for rank in range(world_size):
        loader = build_eval_loader(data.test, 4, workers=0, dist=SimpleNamespace(rank=rank, world_size=world_size))
        labels += _order(loader)  # what all_gather_cat assembles, in rank order
    assert labels == data.test.targets
