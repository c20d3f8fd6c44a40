"""imta_fast/data/dali_loader.py, run in DALI's CPU mode (``device_id=None``) on a tiny JPEG folder.

The GPU path differs only in the decoder device ('mixed', nvJPEG) and where the tensors live.
"""
import sys

import pytest
import torch
import torchvision.transforms as T

from imta_fast.data import DataError, build_dali_loader, build_data, has_dali, samples_of
from imta_fast.data.fake import write_fake_cifar, write_fake_image_folder
from imta_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SIZE = 32  # network input side; eval resizes the shorter side to round(32 * 256 / 224) = 37 first


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = write_fake_image_folder(tmp_path_factory.mktemp("jpegs"), classes=("cat", "dog"), n_train=5, n_val=3,
                                   size=(45, 60))
    return build_data("imagenet", root, None, holdout_size=2, image_size=SIZE)


@pytest.fixture(scope="module")
def dali_cpu(folder):
    """Skip (with the reason) unless DALI is installed and its CPU-only mode runs here."""
    if not has_dali():
        pytest.skip("nvidia-dali is not installed")
    try:
        next(iter(build_dali_loader(samples_of(folder.test), batch_size=2, train=False, image_size=SIZE,
                                    num_threads=1)))
    except DataError:
        raise
    except Exception as exc:  # e.g. a DALI build without CPU operators
        pytest.skip(f"DALI CPU mode does not run here: {type(exc).__name__}: {exc}")


def _epoch(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_eval_matches_torchvision_up_to_centre_crop_rounding(folder, dali_cpu):
    samples = samples_of(folder.test)
    loader = build_dali_loader(samples, batch_size=4, train=False, image_size=SIZE, num_threads=1)
    assert len(loader) == 2 and loader.num_samples == 6  # 6 images: a full batch, then a partial one
    x, y = _epoch(loader)
    assert x.shape == (6, 3, SIZE, SIZE) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.dtype == torch.int64 and y.tolist() == [label for _, label in samples] == folder.test.targets
    x2, y2 = _epoch(loader)  # the next epoch is identical: no wrap-around into other samples
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # torchvision's Resize(37) + CenterCrop(32) on the PIL decode. The decoders and resamplers differ
    # slightly, and CenterCrop rounds a half-pixel offset to even while DALI rounds it up, so the
    # crop may sit one pixel off: compare against the best of the crops within one pixel of centre.
    resize = T.Compose([T.Resize(37), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for i in range(6):
        big = resize(folder.test.base[i][0])  # [3, 37, 49]
        top, left = (big.shape[1] - SIZE) // 2, (big.shape[2] - SIZE) // 2
        err = min((x[i] - big[:, top + dy:top + dy + SIZE, left + dx:left + dx + SIZE]).abs().mean().item()
                  for dy in (0, 1) for dx in (0, 1))
        assert err < 0.05, (i, err)  # measured ~0.01 (normalised units, i.e. ~0.6/255 in pixels)
        torch.testing.assert_close(x[i].mean(), folder.test[i][0].mean(), atol=0.05, rtol=0)


def test_two_eval_shards_split_the_files_contiguously_and_exactly_once(folder, dali_cpu):
    samples = samples_of(folder.test)
    full, _ = _epoch(build_dali_loader(samples, batch_size=2, train=False, image_size=SIZE, num_threads=1))
    shards = [build_dali_loader(samples, batch_size=2, train=False, image_size=SIZE, num_threads=1,
                                shard_id=r, num_shards=2) for r in range(2)]
    assert [s.num_samples for s in shards] == [3, 3]
    torch.testing.assert_close(torch.cat([_epoch(s)[0] for s in shards]), full, rtol=0, atol=0)


def test_train_pipeline_shapes_drop_last_and_seeded_order(folder, dali_cpu):
    samples = samples_of(folder.train)  # 8 training images after the 2-image hold-out
    assert len(samples) == 8

    def first_epoch(seed):
        return _epoch(build_dali_loader(samples, batch_size=3, train=True, image_size=SIZE, seed=seed,
                                        num_threads=1))

    loader = build_dali_loader(samples, batch_size=3, train=True, image_size=SIZE, num_threads=1)
    assert len(loader) == 2  # 8 // 3: the incomplete batch is dropped
    x, y = first_epoch(0)
    assert x.shape == (6, 3, SIZE, SIZE) and set(y.tolist()) <= {0, 1}
    x_again, y_again = first_epoch(0)
    assert torch.equal(x, x_again) and torch.equal(y, y_again)
    assert not torch.equal(x, first_epoch(1)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channels_last_and_half_precision_outputs(folder, dali_cpu, dtype):
    samples = samples_of(folder.test)
    ref, _ = _epoch(build_dali_loader(samples, batch_size=6, train=False, image_size=SIZE, num_threads=1))
    x, y = _epoch(build_dali_loader(samples, batch_size=6, train=False, image_size=SIZE, num_threads=1,
                                    channels_last=True, output_dtype=dtype))
    assert x.dtype == dtype and x.shape == (6, 3, SIZE, SIZE)
    torch.testing.assert_close(x.float(), ref, atol=0.02, rtol=0.01)
    loader = build_dali_loader(samples, batch_size=6, train=False, image_size=SIZE, num_threads=1,
                               channels_last=True, output_dtype=dtype)
    batch, _ = next(iter(loader))
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_samples_of_follows_the_split(folder, tmp_path):
    holdout = samples_of(folder.holdout)
    all_train = folder.train.dataset.base.samples
    assert holdout == [all_train[i] for i in folder.split.holdout_indices]
    write_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=2)
    cifar = build_data("cifar10", tmp_path, None, holdout_size=2)
    with pytest.raises(DataError, match="TensorImages has no image files"):
        samples_of(cifar.train)


def test_missing_dali_and_empty_input_are_clear_errors(folder, monkeypatch):
    with pytest.raises(DataError, match="empty list of image files"):
        build_dali_loader([], batch_size=2, train=False)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # what an install without DALI looks like
    assert not has_dali()
    with pytest.raises(DataError, match="the DALI data backend needs NVIDIA DALI: pip install nvidia-dali-cuda130"):
        build_dali_loader(samples_of(folder.test), batch_size=2, train=False)
