"""imta_fast/data/device_loader.py: the device-resident loader against the torchvision tensor path (on CPU)."""
import pytest
import torch
import torchvision.transforms.functional as TF

from imta_fast.data import DataError, build_data, make_loader
from imta_fast.data.device_loader import DeviceLoader, parse_tensor_transform, train_order
from imta_fast.data.fake import write_fake_cifar, write_fake_image_folder
from imta_fast.data.transforms import CIFAR10_MEAN, CIFAR10_STD, tensor_eval_transform, tensor_train_transform
from imta_fast.distributed import DistInfo


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=50, n_test=23)
    return build_data("cifar10", root, None, holdout_size=10, seed=0)  # 40 train / 10 hold-out / 23 test


def _epoch(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("split", ["test", "holdout"])
def test_eval_batches_equal_the_torchvision_path_bit_for_bit(cifar, split):
    ds = getattr(cifar, split)
    dev = make_loader(ds, backend="device", train=False, batch_size=4, workers=0, seed=0, dist=DistInfo())
    ref = make_loader(ds, backend="pytorch", train=False, batch_size=4, workers=0, seed=0, dist=DistInfo())
    assert len(dev) == len(ref) == -(-len(ds) // 4)
    x, y = _epoch(dev)
    x_ref, y_ref = _epoch(ref)
    assert x.dtype == torch.float32 and x.shape == (len(ds), 3, 32, 32)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_eval_equality_one_channel_digits():
    data = build_data("digits", None, None, holdout_size=300)
    dev = _epoch(make_loader(data.test, backend="device", train=False, batch_size=64, workers=0, seed=0, dist=DistInfo()))
    ref = _epoch(make_loader(data.test, backend="pytorch", train=False, batch_size=64, workers=0, seed=0, dist=DistInfo()))
    assert dev[0].shape == (300, 1, 28, 28) and torch.equal(dev[0], ref[0]) and torch.equal(dev[1], ref[1])


def _candidates(img_u8, padding, flip):
    """Every output torchvision's RandomCrop(padding) [+ flip] + normalise can give for one uint8 image."""
    padded = TF.pad(img_u8, [padding] * 4, fill=0)
    norm = tensor_eval_transform(CIFAR10_MEAN, CIFAR10_STD)
    out = {}
    size = img_u8.shape[-1]
    for i in range(2 * padding + 1):
        for j in range(2 * padding + 1):
            crop = padded[:, i:i + size, j:j + size]
            out[(i, j, False)] = norm(crop)
            if flip:
                out[(i, j, True)] = norm(TF.hflip(crop))
    return out


def test_train_batches_are_torchvision_crops_and_flips_with_uniform_draws(cifar):
    loader = make_loader(cifar.train, backend="device", train=True, batch_size=8, workers=0, seed=3, dist=DistInfo())
    base = cifar.train.dataset.base
    indices = list(cifar.train.indices)
    draws = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        order = train_order(len(indices), 3, epoch, 0, 1)
        x, y = _epoch(loader)
        assert len(loader) == 5 and x.shape == (40, 3, 32, 32)
        for k in range(40):
            raw, label = base[indices[int(order[k])]]
            assert int(y[k]) == label
            match = [key for key, cand in _candidates(raw, 4, True).items() if torch.equal(cand, x[k])]
            assert len(match) == 1, k  # exactly one zero-padded crop / flip of the right image
            draws.append(match[0])
    rows = {d[0] for d in draws} | {d[1] for d in draws}
    assert rows == set(range(9))  # every offset in [0, 2p] occurs (120 draws; P(miss) ~ 1e-5)
    flips = sum(d[2] for d in draws) / len(draws)
    assert 0.3 < flips < 0.7


def test_same_seed_and_epoch_replay_bit_exactly_and_resume(cifar):
    def run(epochs, seed=0):
        loader = make_loader(cifar.train, backend="device", train=True, batch_size=8, workers=0, seed=seed,
                             dist=DistInfo())
        out = []
        for e in epochs:
            loader.set_epoch(e)
            out.append(_epoch(loader))
        return out

    full = run([0, 1, 2])
    resumed = run([2])  # a run restarted at epoch 2
    assert torch.equal(full[2][0], resumed[0][0]) and torch.equal(full[2][1], resumed[0][1])
    assert not torch.equal(full[0][0], full[1][0])
    assert not torch.equal(full[0][0], run([0], seed=1)[0][0])
    again = run([0, 1, 2])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again))


def test_train_order_is_the_pytorch_backends_order(cifar):
    for rank in range(2):
        dist = DistInfo(rank=rank, world_size=2)
        dev = make_loader(cifar.train, backend="device", train=True, batch_size=8, workers=0, seed=5, dist=dist)
        ref = make_loader(cifar.train, backend="pytorch", train=True, batch_size=8, workers=0, seed=5, dist=dist)
        for epoch in (0, 4):
            dev.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert torch.equal(_epoch(dev)[1], _epoch(ref)[1])


def test_digit_sets_shift_without_flipping_and_channels_last():
    data = build_data("digits", None, None, holdout_size=300)
    t = parse_tensor_transform(data.train.dataset.transform)
    assert (t.padding, t.flip, t.mean) == (2, False, data.info.mean)
    loader = make_loader(data.train, backend="device", train=True, batch_size=32, workers=0, seed=0, dist=DistInfo(),
                         channels_last=True)
    x, _ = next(iter(loader))
    assert x.shape == (32, 1, 28, 28) and x.is_contiguous(memory_format=torch.channels_last)


def test_clear_errors_for_what_the_device_backend_cannot_serve(tmp_path):
    write_fake_image_folder(tmp_path, n_train=2, n_val=1)
    folder = build_data("imagenet", tmp_path, None, holdout_size=1, image_size=16)
    with pytest.raises(DataError, match="device data backend needs an in-memory dataset"):
        make_loader(folder.test, backend="device", train=False, batch_size=2, workers=0, seed=0, dist=DistInfo())
    import torchvision.transforms as T
    with pytest.raises(DataError, match="cannot run the transform step"):
        parse_tensor_transform(T.Compose([T.RandomRotation(10), tensor_eval_transform((0.5,), (0.5,))]))
    assert parse_tensor_transform(tensor_train_transform(32, 4, True, (0.5,), (0.2,))).augments
    with pytest.raises(DataError, match="batch size must be >= 1"):
        DeviceLoader(folder.test, batch_size=0, train=False)


def test_eval_loader_over_train_augmented_holdout_is_augmented_but_repeatable(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", n_train=30, n_test=5)
    data = build_data("cifar10", tmp_path, None, holdout_size=10, holdout_transform="train", seed=0)
    loaders = [make_loader(data.holdout, backend="device", train=False, batch_size=4, workers=0, seed=0,
                           dist=DistInfo(rank=r, world_size=2)) for r in range(2)]
    x = torch.cat([_epoch(loader)[0] for loader in loaders])
    again = torch.cat([_epoch(loader)[0] for loader in loaders])
    plain = torch.stack([data.train.dataset.eval_view()[i][0] for i in data.split.holdout_indices])
    assert x.shape == (10, 3, 32, 32) and torch.equal(x, again)
    assert not torch.equal(x, plain)  # cropped / flipped, not the eval view
