"""ImageNet-style ImageFolder trees with checked layout and one-line errors.

Expected layout (class names are the sub-folder names, labels their sorted order, as in
``torchvision.datasets.ImageFolder``)::

    <data_dir>/train/<class>/<image>.jpg
    <data_dir>/val/<class>/<image>.jpg
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import List

from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import DataError, describe

LAYOUT_HINT = "expected train/<class>/<image> and val/<class>/<image>"


def load_rgb(path: str) -> Image.Image:
    """Decode one image file to RGB; a missing, truncated or non-image file raises DataError.

    Runs inside DataLoader workers, which re-raise the DataError in the main process (with the
    worker's traceback appended to the message).
    """
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # convert() forces the full decode while the file is open
    except (OSError, SyntaxError, ValueError) as exc:  # PIL signals bad data with all three
        raise DataError(f"unreadable image file {describe(path)}: {exc}") from exc


def split_dir(data_dir: str | Path, split: str) -> Path:
    """``data_dir/split`` after checking that both exist."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"dataset folder not found: {describe(data_dir)}")
    root = data_dir / split
    if not root.is_dir():
        raise DataError(f"wrong layout: no '{split}/' subfolder in {describe(data_dir)} ({LAYOUT_HINT})")
    return root


def class_names(root: Path) -> List[str]:
    """Sorted class sub-folder names of ``root``; none at all is a layout error."""
    names = sorted(e.name for e in root.iterdir() if e.is_dir())
    if not names:
        raise DataError(f"wrong layout: no class subfolders in {describe(root)} ({LAYOUT_HINT})")
    return names


def image_folder(root: Path, transform=None) -> ImageFolder:
    """An ``ImageFolder`` over ``root`` that decodes with :func:`load_rgb`.

    Raises DataError when a class folder holds no image file (its label would silently have no
    samples) or the whole split is empty.
    """
    class_names(root)  # clearer message than ImageFolder's when there are no class folders
    ds = ImageFolder(str(root), transform=transform, loader=load_rgb, allow_empty=True)
    if not ds.samples:
        raise DataError(f"empty split: no image files in {describe(root)} (extensions {', '.join(IMG_EXTENSIONS)})")
    counts = Counter(ds.targets)
    empty = [c for c, i in ds.class_to_idx.items() if counts[i] == 0]
    if empty:
        raise DataError(f"empty class folder(s) in {describe(root)}: {', '.join(empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''} (no image files)")
    return ds
