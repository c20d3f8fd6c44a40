"""make_loader(backend='dali') in DALI's CPU mode: every split, sharding, corrupt files.

The GPU path differs only in the decoder device ('mixed', nvJPEG) and where the tensors live.
"""
import pytest
import torch
import torchvision.transforms as T

from imta_fast.data import DataError, build_data, has_dali, make_loader, samples_of
from imta_fast.data.dali_loader import DaliShardLoader, parse_image_transform
from imta_fast.data.fake import write_fake_image_folder
from imta_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from imta_fast.distributed import DistInfo
from tests.helpers import broken_image_folder

SIZE = 32  # eval resizes the shorter side to round(32 * 256 / 224) = 37, then centre-crops 32


def _dali_or_skip():
    if not has_dali():
        pytest.skip("nvidia-dali is not installed")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    _dali_or_skip()
    root = write_fake_image_folder(tmp_path_factory.mktemp("jpegs"), classes=("cat", "dog", "eel"), n_train=5,
                                   n_val=3, size=(45, 60))
    return build_data("imagenet", root, None, holdout_size=4, image_size=SIZE)  # 11 train / 4 hold-out / 9 test


def _loader(ds, **kw):
    opts = dict(backend="dali", train=False, batch_size=4, workers=1, seed=0, dist=DistInfo())
    opts.update(kw)
    return make_loader(ds, **opts)


def _epoch(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def _assert_close_to_torchvision(x, ds):
    """DALI's eval images against the pytorch path's (PIL decode, Resize(37), CenterCrop(32)), pixel for pixel.

    The geometry is the same (resized long side truncated, crop offset rounded half to even: see
    dali_loader.py); what is left is the two decoders' and bilinear resamplers' rounding.
    """
    for i in range(len(ds)):
        err = (x[i] - ds[i][0]).abs()
        assert err.mean() < 0.01 and err.max() < 0.25, (i, err.mean().item(), err.max().item())  # ~0.003 mean


def samples_pil(ds, i):
    from imta_fast.data.folder import load_rgb
    return load_rgb(samples_of(ds)[i][0])


@pytest.mark.parametrize("split", ["holdout", "test"])
def test_eval_splits_match_torchvision(folder, split):
    ds = getattr(folder, split)
    loader = _loader(ds)
    ref = make_loader(ds, backend="pytorch", train=False, batch_size=4, workers=0, seed=0, dist=DistInfo())
    assert len(loader) == len(ref) and loader.device.type == "cpu"
    x, y = _epoch(loader)
    _, y_ref = _epoch(ref)
    assert x.shape == (len(ds), 3, SIZE, SIZE) and x.dtype == torch.float32
    assert torch.equal(y, y_ref)
    _assert_close_to_torchvision(x, ds)
    x2, y2 = _epoch(loader)  # a second pass (the next evaluation) is identical
    assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("size", [(45, 60), (38, 51), (51, 38), (40, 40), (37, 50)])
def test_eval_geometry_is_torchvisions_for_every_aspect(tmp_path, size):
    """(45, 60) -> 37 x 49: odd excesses 5 and 17, offsets 2 and 8 (halves to even; DALI alone says 3, 9);
    (38, 51) -> 37 x 49 (49.66 truncated; DALI's resize_shorter alone gives 50); portrait; square; no resize."""
    _dali_or_skip()
    root = write_fake_image_folder(tmp_path, classes=("a", "b"), n_train=1, n_val=2, size=size)
    data = build_data("imagenet", root, None, holdout_size=1, image_size=SIZE)
    x, _ = _epoch(_loader(data.test))
    _assert_close_to_torchvision(x, data.test)


def test_train_split_as_eval_data_uses_the_eval_pipeline_only_when_asked(folder):
    assert parse_image_transform(folder.train.dataset.transform)["augment"] is True
    assert parse_image_transform(folder.train.dataset.eval_transform) == dict(
        resize_size=37, augment=False, image_size=SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with pytest.raises(DataError, match="DALI data backend cannot run the transform step"):
        parse_image_transform(T.Compose([T.Grayscale(), T.ToTensor()]))


def test_train_order_is_the_pytorch_order_and_replays_per_epoch(folder):
    dali = _loader(folder.train, train=True, batch_size=3, seed=2)
    ref = make_loader(folder.train, backend="pytorch", train=True, batch_size=3, workers=0, seed=2, dist=DistInfo())
    runs = {}
    for epoch in (0, 1, 0):
        dali.set_epoch(epoch)
        ref.set_epoch(epoch)
        x, y = _epoch(dali)
        assert len(dali) == 3 and x.shape == (9, 3, SIZE, SIZE)  # 11 // 3 batches, the last 2 dropped
        assert torch.equal(y, _epoch(ref)[1])
        if epoch in runs:  # the same epoch again (a resumed run): the same crops
            assert torch.equal(x, runs[epoch])
        runs[epoch] = x
    assert not torch.equal(runs[0], runs[1])


def _unique_samples(folder):
    """The training files labelled by position, so a label identifies a file."""
    return [(path, i) for i, (path, _) in enumerate(samples_of(folder.train))]


@pytest.mark.parametrize("train", [True, False])
def test_two_shards_cover_each_file_once_per_epoch(folder, train):
    samples = _unique_samples(folder)  # 11 files
    shards = [DaliShardLoader(samples, batch_size=2, train=train, augment=train, seed=0, rank=r, world_size=2,
                              image_size=SIZE, num_threads=1) for r in range(2)]
    seen_epochs = []
    for epoch in range(2):
        seen, sizes = [], []
        for s in shards:
            s.set_epoch(epoch)
            batches = [y.tolist() for _, y in s]
            sizes.append([len(b) for b in batches])
            seen += sum(batches, [])
        if train:  # 5 per rank (one file sits out): 2 batches of 2, the fifth dropped
            assert sizes == [[2, 2], [2, 2]] and len(set(seen)) == 8
        else:  # contiguous shards 5 + 6, last batches partial, in order
            assert sizes == [[2, 2, 1], [2, 2, 2]] and seen == list(range(11))
        seen_epochs.append(seen)
    assert (seen_epochs[0] != seen_epochs[1]) == train


@pytest.fixture()
def broken(tmp_path):
    """val/: 3 JPEGs per class, a truncated JPEG (dog/1.jpg) and a text file named cat/x.JPEG."""
    _dali_or_skip()
    return broken_image_folder(tmp_path, n_train=3)


@pytest.mark.parametrize("name", ["x.JPEG", "1.jpg"])
def test_an_unreadable_file_stops_with_a_one_line_error_naming_it(broken, name):
    samples = samples_of(broken.test)
    if name == "1.jpg":  # the truncated JPEG alone (DALI names it itself)
        samples = [s for s in samples if not s[0].endswith("x.JPEG")]
    loader = DaliShardLoader(samples, batch_size=2, train=False, augment=False, image_size=16, num_threads=1)
    with pytest.raises(DataError, match=rf"^unreadable image file '[^\n]*{name}': [^\n]*$"):
        list(loader)
    # The train pipeline (shuffled: either bad file may come first when both are there).
    with pytest.raises(DataError, match=r"^unreadable image file '[^\n]*(x\.JPEG|dog/1\.jpg)': [^\n]*$"):
        list(DaliShardLoader(samples, batch_size=2, train=True, augment=True, image_size=16, num_threads=1))


def test_skip_corrupt_skips_and_counts_without_shifting_labels(broken):
    loader = _loader(broken.test, batch_size=2, skip_corrupt=True)
    x, y = _epoch(loader)
    assert y.tolist() == [0, 0, 0, 1, 1]  # cat 0-2, dog 0 and 2
    assert len(loader.skipped) == 2 and "x.JPEG" in loader.skipped[0] and "dog/1.jpg" in loader.skipped[1]
    good = make_loader(broken.test, backend="pytorch", train=False, batch_size=8, workers=0, seed=0, dist=DistInfo(),
                       skip_corrupt=True)
    x_ref, y_ref = _epoch(good)
    assert torch.equal(y, y_ref)
    # The same images in the same order: each DALI image is nearest to its torchvision twin (the
    # centre crops may sit a pixel apart, see _assert_close_to_torchvision).
    dist = (x[:, None] - x_ref[None]).abs().flatten(2).mean(-1)
    assert dist.argmin(1).tolist() == list(range(5))
    train = _loader(broken.test, train=True, batch_size=2, skip_corrupt=True)
    ys = _epoch(train)[1].tolist()
    # 7 files, 2 bad: the 5 good ones in shuffled order, the last partial batch dropped.
    assert len(train.skipped) == 2 and len(ys) == 4 and ys.count(0) <= 3 and ys.count(1) <= 2


def test_culprit_search_is_bounded_and_only_for_data_errors(broken, tmp_path):
    from imta_fast.data.dali_loader import find_unreadable, is_data_error

    files = [p for p, _ in samples_of(broken.test)]  # cat/0-2.jpg, cat/x.JPEG, dog/...
    msg = "Error in CPU operator `nvidia.dali.fn.decoders.image`\nencountered:\n\nnvImageCodec failure: '#4'\n"
    assert is_data_error(msg) and not is_data_error("CUDA error: out of memory")
    assert find_unreadable(msg, files, limit=3) == (None, "nvImageCodec failure: '#4'")  # x.JPEG is 4th
    path, reason = find_unreadable(msg, files)
    assert path.endswith("x.JPEG") and "cannot identify image file" in reason and "nvImageCodec" in reason


def test_a_file_missing_since_the_listing_is_named(broken):
    samples = samples_of(broken.test)
    gone = samples[1][0]
    import os
    os.rename(gone, gone + ".moved")
    try:
        loader = DaliShardLoader(samples[:3], batch_size=2, train=False, augment=False, image_size=16, num_threads=1)
        with pytest.raises(DataError, match=r"^unreadable image file '[^\n]*cat/1\.jpg'"):
            list(loader)
    finally:
        os.rename(gone + ".moved", gone)


def test_an_abandoned_eval_pass_does_not_shift_the_next_one(folder):
    loader = _loader(folder.test, batch_size=2)
    full = _epoch(loader)[1]
    next(iter(loader))  # e.g. an interrupted evaluation: one batch taken, the rest left in DALI
    assert torch.equal(_epoch(loader)[1], full)
