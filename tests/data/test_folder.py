"""imta_fast/data/folder.py: ImageFolder layout checks and the image decoder's errors."""
import pytest
from PIL import Image

from imta_fast.data import folder
from imta_fast.data.errors import DataError
from imta_fast.data.fake import write_fake_image_folder


def test_a_valid_tree_loads_with_sorted_class_labels(tmp_path):
    write_fake_image_folder(tmp_path, classes=("zebra", "ant"), n_train=3, n_val=1)
    ds = folder.image_folder(folder.split_dir(tmp_path, "train"))
    assert ds.classes == ["ant", "zebra"] and ds.targets == [0, 0, 0, 1, 1, 1]
    img, label = ds[4]
    assert img.mode == "RGB" and img.size == (48, 40) and label == 1


def test_grayscale_files_are_converted_to_rgb(tmp_path):
    path = tmp_path / "g.png"
    Image.new("L", (5, 4), 128).save(path)
    assert folder.load_rgb(str(path)).mode == "RGB"


def test_layout_errors_name_the_problem_and_the_path(tmp_path):
    with pytest.raises(DataError, match=f"dataset folder not found: '{tmp_path / 'missing'}'"):
        folder.split_dir(tmp_path / "missing", "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=f"wrong layout: no 'val/' subfolder in '{tmp_path}'"):
        folder.split_dir(tmp_path, "val")
    (tmp_path / "train" / "stray.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=f"wrong layout: no class subfolders in '{tmp_path / 'train'}'"):
        folder.image_folder(tmp_path / "train")
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(DataError, match=f"empty split: no image files in '{tmp_path / 'train'}'"):
        folder.image_folder(tmp_path / "train")


def test_an_empty_class_folder_is_an_error(tmp_path):
    write_fake_image_folder(tmp_path, n_train=1, n_val=1)
    (tmp_path / "train" / "emu").mkdir()
    with pytest.raises(DataError, match=f"empty class folder\\(s\\) in '{tmp_path / 'train'}': emu"):
        folder.image_folder(tmp_path / "train")


@pytest.mark.parametrize("content", [b"", b"not a jpeg at all", "truncated"])
def test_unreadable_image_raises_data_error_naming_the_file(tmp_path, content):
    write_fake_image_folder(tmp_path, n_train=1, n_val=1)
    bad = tmp_path / "train" / "cat" / "0.jpg"
    if content == "truncated":
        content = bad.read_bytes()[: len(bad.read_bytes()) // 2]
    bad.write_bytes(content)
    ds = folder.image_folder(tmp_path / "train")  # listing works; decoding fails on access
    with pytest.raises(DataError, match=f"unreadable image file '{bad}'"):
        ds[0]
