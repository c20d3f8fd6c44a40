"""imta_fast/data/fake.py: the fake sets are in the real formats (cross-checked with torchvision's readers)."""
import pytest
import torchvision
from PIL import Image

from imta_fast.data.fake import write_fake_cifar, write_fake_image_folder


@pytest.mark.parametrize("name, cls", [("cifar10", torchvision.datasets.CIFAR10),
                                       ("cifar100", torchvision.datasets.CIFAR100)])
def test_fake_cifar_reads_with_torchvision_apart_from_its_md5_check(tmp_path, monkeypatch, name, cls):
    write_fake_cifar(tmp_path, name, n_train=15, n_test=4)
    # torchvision md5-checks every file against the real archive; skip only that check.
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    train, test = cls(str(tmp_path), train=True), cls(str(tmp_path), train=False)
    assert (len(train), len(test), len(train.classes)) == (15, 4, 10 if name == "cifar10" else 100)
    img, label = test[3]
    assert img.size == (32, 32) and label == 3


def test_fake_image_folder_writes_jpegs_per_class_and_split(tmp_path):
    root = write_fake_image_folder(tmp_path, classes=("x", "y", "z"), n_train=2, n_val=1, size=(20, 30))
    ds = torchvision.datasets.ImageFolder(str(root / "train"))
    assert ds.classes == ["x", "y", "z"] and len(ds) == 6
    assert len(torchvision.datasets.ImageFolder(str(root / "val"))) == 3
    with Image.open(ds.samples[0][0]) as img:
        assert img.format == "JPEG" and img.size == (30, 20) and img.mode == "RGB"
