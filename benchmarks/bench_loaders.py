"""Input pipelines: images/s of each loader alone, and a training step fed by DALI vs synthetic data.

    pytest benchmarks/bench_loaders.py --benchmark-only        # (benchmarks/conftest.py skips all without CUDA)
    python -m benchmarks.bench_loaders [--images 64] [--workers 2]   # CPU quick run: prints the ratios

Cases (``extra_info``: ``images_per_s``, ``loader``, ``transform``, ``data``, ``workers``):

* photos: DALI (``make_loader(backend='dali')``: nvJPEG on CUDA, DALI's CPU mode otherwise) vs the
  torchvision baseline (plain ``ImageFolder`` + PIL, ``pin_memory`` on CUDA, persistent workers),
  train (RandomResizedCrop 224 + flip) and eval (Resize 256 + CenterCrop 224) transforms, on a
  folder of real photos re-encoded at ImageNet-like sizes: 500x375 (a fifth portrait 375x500),
  JPEG quality 90, cut from scikit-learn's two sample photos (china.jpg, flower.jpg; 427x640; the
  venv has no scikit-image) at random positions and scales, so every file differs. Set
  ``IMTA_BENCH_PHOTOS=<folder of .jpg>`` to cut from other photos instead.
* in-memory: ``backend='device'`` vs ``DataLoader`` (tensor transforms) on CIFAR-shaped uint8 data
  (random, 3x32x32, crop 4 + flip) and on the embedded MNIST subset (crop 2), train transforms.
* GPU only: one MSDNet-ImageNet (step 4) bf16 training step per batch fed by DALI vs the same steps
  on a fixed on-device batch (``train_step_fraction`` = synthetic time / DALI-fed time).

Every timed call is one epoch; batches are moved to the device (``non_blocking``) and the device
synchronised at the end, so the time includes the host-to-device copy of the CPU loaders.
Targets (GPU box, 16 cores): DALI >= 3x torchvision on photos; DALI-fed step >= 95% of synthetic.
Sizes: ``IMTA_BENCH_LOADER_IMAGES`` photos (default 2048 on CUDA, 64 on CPU).
"""
from __future__ import annotations

import os
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from imta_fast.data import build_data, has_dali, make_loader
from imta_fast.data.datasets import TensorImages, TransformedDataset
from imta_fast.data.transforms import (CIFAR10_MEAN, CIFAR10_STD, imagenet_eval_transform, imagenet_train_transform,
                                       tensor_train_transform)
from imta_fast.distributed import DistInfo

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda", 0) if CUDA else torch.device("cpu")
WORKERS = int(os.environ.get("IMTA_BENCH_WORKERS", min(16, os.cpu_count() or 1)))
N_PHOTOS = int(os.environ.get("IMTA_BENCH_LOADER_IMAGES", 2048 if CUDA else 64))
ROUNDS = int(os.environ.get("IMTA_BENCH_LOADER_ROUNDS", 2))
PHOTO_BATCH = 128 if CUDA else 16
N_CIFAR = 50_000 if CUDA else 10_000
PHOTO_SIZE = (500, 375)  # width, height


# --- the photo folder ------------------------------------------------------------------------------

def source_photos() -> list:
    """Real photos as RGB PIL images: ``IMTA_BENCH_PHOTOS`` or scikit-learn's two sample images."""
    folder = os.environ.get("IMTA_BENCH_PHOTOS")
    if folder:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise SystemExit(f"IMTA_BENCH_PHOTOS={folder!r} holds no .jpg/.jpeg/.png")
        return [Image.open(p).convert("RGB") for p in files]
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("bench_loaders needs scikit-learn's sample photos or IMTA_BENCH_PHOTOS=<folder>") from exc
    return [Image.fromarray(a) for a in load_sample_images().images]


def _cut(photos: list, i: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed * 100_003 + i)
    src = photos[i % len(photos)]
    w, h = PHOTO_SIZE if i % 5 else PHOTO_SIZE[::-1]
    scale = rng.uniform(0.45, 1.0)  # crop side relative to the largest window of the target aspect
    cw = min(src.width, src.height * w / h) * scale
    ch = cw * h / w
    x0, y0 = rng.uniform(0, src.width - cw), rng.uniform(0, src.height - ch)
    img = src.crop((int(x0), int(y0), int(x0 + cw), int(y0 + ch))).resize((w, h), Image.BICUBIC)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.rand() < 0.5 else img


def write_photo_folder(root: Path, n_images: int, n_classes: int = 4, seed: int = 0, unique: int = 512) -> Path:
    """``root/train/class_k/i.jpg`` (``val`` links to the same files): random crops of real photos,
    resized to 500x375 (1 in 5 portrait), JPEG quality 90. ``unique`` different images are encoded
    (in threads: PIL releases the GIL) and repeated byte for byte up to ``n_images`` files."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    photos = source_photos()
    for k in range(n_classes):
        (root / "train" / f"class_{k}").mkdir(parents=True, exist_ok=True)

    def path(i: int) -> Path:
        return root / "train" / f"class_{i % n_classes}" / f"{i:05d}.jpg"

    def encode(i: int) -> None:
        _cut(photos, i, seed).save(path(i), quality=90)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(encode, range(min(unique, n_images))))
    for i in range(unique, n_images):
        shutil.copyfile(path(i % unique), path(i))
    (root / "val").symlink_to("train")
    return root


@lru_cache(maxsize=None)
def photo_root() -> Path:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="imta_bench_photos_"))
    return write_photo_folder(root, N_PHOTOS)


# --- loaders ---------------------------------------------------------------------------------------

def torchvision_loader(train: bool, workers: int = WORKERS, batch_size: int = PHOTO_BATCH) -> DataLoader:
    """The baseline: ImageFolder + PIL + torchvision transforms, pinned, persistent workers."""
    from torchvision.datasets import ImageFolder

    tf = imagenet_train_transform(224) if train else imagenet_eval_transform(224)
    ds = ImageFolder(str(photo_root() / "train"), transform=tf)
    return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
                      pin_memory=CUDA, persistent_workers=workers > 0)


def dali_loader(train: bool, workers: int = WORKERS, batch_size: int = PHOTO_BATCH):
    data = build_data("imagenet", photo_root(), None, holdout_size=0, image_size=224)
    ds = data.train if train else data.train.dataset.eval_view()
    return make_loader(ds, backend="dali", train=train, batch_size=batch_size, workers=workers, seed=0,
                       dist=DistInfo(device=DEVICE), dali_threads=workers)


def cifar_like(n: int = N_CIFAR) -> TransformedDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    tf = tensor_train_transform(32, padding=4, flip=True, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    return TransformedDataset(TensorImages(images, labels), tf, tf)


def mnist_train():
    return build_data("mnist", None, None, holdout_size=500).train


def tensor_loaders(ds, batch_size: int, workers: int) -> Dict[str, object]:
    dist = DistInfo(device=DEVICE)
    return {
        "device": make_loader(ds, backend="device", train=True, batch_size=batch_size, workers=0, seed=0, dist=dist),
        f"dataloader_j{workers}": DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                                             num_workers=workers, pin_memory=CUDA, persistent_workers=workers > 0),
    }


def run_epoch(loader: Iterable) -> int:
    """Consume one epoch, moving each batch to DEVICE; returns the number of images."""
    n = 0
    for x, y in loader:
        x = x.to(DEVICE, non_blocking=True)
        y = y.to(DEVICE, non_blocking=True)
        n += len(y)
    if CUDA:
        torch.cuda.synchronize()
    return n


def images_per_s(loader, rounds: int = 2, warmup: int = 1) -> float:
    for _ in range(warmup):  # worker start-up, DALI pipeline build, allocator
        run_epoch(loader)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        n = run_epoch(loader)
        best = max(best, n / (time.perf_counter() - t0))
    return best


# --- pytest-benchmark cases -------------------------------------------------------------------------

def _bench(benchmark, batches, group: str, **extra):
    n = run_epoch(batches)  # warm-up epoch (workers, DALI build, allocator); counts the images
    benchmark.group = group
    benchmark.pedantic(run_epoch, args=(batches,), rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(extra, bench="loaders", images=n, device=str(DEVICE))
    if getattr(benchmark, "stats", None) is not None:
        benchmark.extra_info["images_per_s"] = round(n / benchmark.stats.stats.median, 1)


@pytest.mark.cpu_bench
@pytest.mark.parametrize("transform", ["train", "eval"])
@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_photos(benchmark, loader, transform):
    if loader == "dali" and not has_dali():
        pytest.skip("nvidia-dali is not installed (see benchmarks/README.md: carrying the wheel)")
    make = torchvision_loader if loader == "torchvision" else dali_loader
    _bench(benchmark, make(transform == "train"), f"photos-{transform}", loader=loader, transform=transform,
           data=f"{N_PHOTOS} photos 500x375 q90", workers=WORKERS)


@pytest.mark.cpu_bench
@pytest.mark.parametrize("loader", ["device", "dataloader"])
@pytest.mark.parametrize("data", ["cifar", "mnist"])
def test_in_memory_loader(benchmark, data, loader):
    ds, batch = (cifar_like(), 128) if data == "cifar" else (mnist_train(), 64)
    loaders = tensor_loaders(ds, batch, WORKERS)
    chosen = loaders["device"] if loader == "device" else loaders[f"dataloader_j{WORKERS}"]
    _bench(benchmark, chosen, f"in-memory-{data}", loader=loader, transform="train", data=data, workers=WORKERS)


@pytest.mark.skipif(not CUDA, reason="GPU benchmark: needs CUDA")
@pytest.mark.parametrize("feed", ["synthetic", "dali"])
def test_train_step(benchmark, feed):
    """MSDNet-ImageNet step 4, bf16 autocast, channels_last, SGD, sum of the exits' CE."""
    if feed == "dali" and not has_dali():
        pytest.skip("nvidia-dali is not installed")
    from imta_fast.models import create_model

    torch.backends.cudnn.benchmark = True
    model = create_model("msdnet_imagenet_step4").cuda().to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = PHOTO_BATCH

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(x)
            loss = sum(torch.nn.functional.cross_entropy(z.float(), y) for z in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if feed == "synthetic":
        x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 4, (batch,), device="cuda")
        steps = N_PHOTOS // batch

        def epoch():
            for _ in range(steps):
                step(x, y)
            torch.cuda.synchronize()
            return steps * batch
    else:
        data = build_data("imagenet", photo_root(), None, holdout_size=0, image_size=224)
        loader = make_loader(data.train, backend="dali", train=True, batch_size=batch, workers=WORKERS, seed=0,
                             dist=DistInfo(device=DEVICE), channels_last=True, dali_threads=WORKERS)

        first = []  # seconds to the first batch of each epoch: the per-epoch DALI pipeline build

        def epoch():
            n, t0 = 0, time.perf_counter()
            for x, y in loader:
                if n == 0:
                    first.append(time.perf_counter() - t0)
                step(x, y)
                n += len(y)
            torch.cuda.synchronize()
            return n

    epoch()  # warm-up: cudnn autotuning, DALI build
    benchmark.group = "train-step"
    benchmark.pedantic(epoch, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(bench="loaders", feed=feed, model="msdnet_imagenet_step4", batch=batch, images=N_PHOTOS // batch * batch)
    if feed == "dali":  # included in the timed epochs; amortised over ~5,000 steps in an ImageNet epoch
        benchmark.extra_info["first_batch_s_median"] = round(sorted(first)[len(first) // 2], 4)
    if getattr(benchmark, "stats", None) is not None:
        benchmark.extra_info["images_per_s"] = round(N_PHOTOS // batch * batch / benchmark.stats.stats.median, 1)


# --- CPU quick run: python -m benchmarks.bench_loaders ------------------------------------------------

def mnist_epoch_profile(batch_size: int = 64, workers: int = 0) -> Dict[str, float]:
    """One ``train.py --dataset mnist`` style epoch (msdnet_mnist, SGD, CE over exits, batch 64):
    seconds with the pytorch loader vs the device loader, and the loaders alone."""
    from imta_fast.models import create_model

    ds = mnist_train()
    out: Dict[str, float] = {}
    for name, loader in (("pytorch", make_loader(ds, backend="pytorch", train=True, batch_size=batch_size,
                                                 workers=workers, seed=0, dist=DistInfo(device=DEVICE))),
                         ("device", make_loader(ds, backend="device", train=True, batch_size=batch_size, workers=0,
                                                seed=0, dist=DistInfo(device=DEVICE)))):
        torch.manual_seed(0)
        model = create_model("msdnet_mnist").to(DEVICE).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loader.set_epoch(0)
        t0 = time.perf_counter()
        n = run_epoch(loader)
        out[f"{name}_loader_s"] = time.perf_counter() - t0
        t_data, t0 = 0.0, time.perf_counter()
        it = iter(loader)
        while True:
            t1 = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            t_data += time.perf_counter() - t1
            x, y = x.to(DEVICE), y.to(DEVICE)
            logits, _ = model(x)
            loss = sum(torch.nn.functional.cross_entropy(z, y) for z in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out[f"{name}_epoch_s"] = time.perf_counter() - t0
        out[f"{name}_data_in_epoch_s"] = t_data
        out["images"] = n
    return out


def main(argv: Optional[list] = None) -> int:
    import argparse

    global N_PHOTOS, WORKERS
    p = argparse.ArgumentParser(description="CPU quick run of the loader benchmarks; prints images/s and ratios")
    p.add_argument("--images", type=int, default=N_PHOTOS)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--cifar", type=int, default=N_CIFAR)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip-profile", action="store_true")
    p.add_argument("--only-profile", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave the default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    N_PHOTOS, WORKERS = args.images, args.workers
    print(f"device {DEVICE}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"workers/DALI threads {WORKERS}, {N_PHOTOS} photos 500x375 q90", flush=True)
    if args.only_profile:
        prof = mnist_epoch_profile()
        print("mnist epoch (msdnet_mnist, batch 64, -j 0): " + ", ".join(f"{k} {v:.2f}" for k, v in prof.items()))
        return 0
    rows: Dict[Tuple[str, str], float] = {}
    for transform in ("train", "eval"):
        rows[("torchvision", transform)] = images_per_s(torchvision_loader(transform == "train"), args.rounds)
        if has_dali():
            rows[("dali", transform)] = images_per_s(dali_loader(transform == "train"), args.rounds)
        for k in (("torchvision", transform), ("dali", transform)):
            if k in rows:
                print(f"photos {transform:5s} {k[0]:12s} {rows[k]:9.1f} img/s", flush=True)
        if ("dali", transform) in rows:
            print(f"photos {transform:5s} DALI / torchvision = {rows[('dali', transform)] / rows[('torchvision', transform)]:.2f}x")
    for data, ds, batch in (("cifar", cifar_like(args.cifar), 128), ("mnist", mnist_train(), 64)):
        for j in sorted({0, WORKERS}):
            loaders = tensor_loaders(ds, batch, j)
            dl = images_per_s(loaders[f"dataloader_j{j}"], args.rounds)
            print(f"{data:5s} DataLoader -j {j}  {dl:9.1f} img/s", flush=True)
            rows[(data, f"dataloader_j{j}")] = dl
        dev = images_per_s(loaders["device"], args.rounds)
        rows[(data, "device")] = dev
        print(f"{data:5s} device          {dev:9.1f} img/s; device / DataLoader -j0 = "
              f"{dev / rows[(data, 'dataloader_j0')]:.1f}x, / -j{WORKERS} = {dev / rows[(data, f'dataloader_j{WORKERS}')]:.1f}x",
              flush=True)
    if not args.skip_profile:
        prof = mnist_epoch_profile()
        print("mnist epoch (msdnet_mnist, batch 64, -j 0): " + ", ".join(f"{k} {v:.2f}" for k, v in prof.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
