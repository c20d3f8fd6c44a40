"""imta_fast/data/transforms.py: docs/method.md §5 transforms on the tensor and PIL paths."""
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from imta_fast.data import transforms as tf


def _uint8(c=3, h=32, w=32, seed=0):
    return torch.randint(0, 256, (c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_tensor_eval_matches_the_reference_pil_totensor_path_exactly():
    img = _uint8()
    ours = tf.tensor_eval_transform(tf.CIFAR10_MEAN, tf.CIFAR10_STD)(img)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    ref = T.Compose([T.ToTensor(), T.Normalize(tf.CIFAR10_MEAN, tf.CIFAR10_STD)])(pil)
    assert ours.dtype == torch.float32 and ours.shape == (3, 32, 32)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_cifar_train_transform_is_a_zero_padded_shift_of_up_to_4_px_plus_optional_flip():
    img = _uint8(seed=1)
    mean, std = tf.CIFAR100_MEAN, tf.CIFAR100_STD
    normed_pad = tf.tensor_eval_transform(mean, std)(torch.nn.functional.pad(img, (4, 4, 4, 4)))
    # Each output must equal one of the 9 x 9 shifts x 2 flips of the zero-padded image.
    candidates = [c for dy in range(9) for dx in range(9)
                  for c in (normed_pad[:, dy:dy + 32, dx:dx + 32], normed_pad[:, dy:dy + 32, dx:dx + 32].flip(-1))]
    train = tf.tensor_train_transform(32, padding=4, flip=True, mean=mean, std=std)
    torch.manual_seed(0)
    outs = [train(img) for _ in range(8)]
    for out in outs:
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert any(torch.equal(out, c) for c in candidates)
    assert len({o.sum().item() for o in outs}) > 1  # it is random


@pytest.mark.parametrize("size, resize", [(224, 256), (32, 37), (64, 73)])
def test_imagenet_transforms_give_square_crops_and_keep_the_256_over_224_ratio(size, resize):
    assert tf.imagenet_resize_size(size) == resize
    pil = Image.fromarray(_uint8(h=90, w=120).permute(1, 2, 0).numpy())
    for transform in (tf.imagenet_train_transform(size), tf.imagenet_eval_transform(size)):
        out = transform(pil)
        assert out.shape == (3, size, size) and out.dtype == torch.float32
    eval_tf = tf.imagenet_eval_transform(size)
    torch.testing.assert_close(eval_tf(pil), eval_tf(pil), rtol=0, atol=0)  # deterministic
