"""imta_fast.inference.buckets: the one row-rounding rule of the executor and the latency model."""
import pytest

from imta_fast.inference.buckets import bucket_shapes, normalize_buckets, parse_buckets, resolve_bucket


def test_step_buckets_round_up_and_cap_at_batch():
    assert [resolve_bucket(n, 64) for n in (1, 64, 65, 1000)] == [64, 64, 128, 1024]
    assert [resolve_bucket(n, 64, 2, 1000) for n in (1, 64, 65, 999, 1000)] == [64, 64, 128, 1000, 1000]
    assert resolve_bucket(0, 64, 2, 1000) == 0


def test_min_rows_applies_to_every_form():
    assert resolve_bucket(1, None, 2) == 2
    assert resolve_bucket(1, "pow2", 2) == 2
    assert resolve_bucket(1, [1, 8], 2) == 8
    assert resolve_bucket(1, None, 1) == 1  # streaming: no padding


def test_list_beyond_largest_bucket_is_bounded_by_batch():
    # without a batch size: the old rule (n itself)
    assert resolve_bucket(300, [32, 128]) == 300
    # with one: multiples of the largest bucket, capped at the batch
    assert [resolve_bucket(n, [32, 128], 2, 1000) for n in (20, 100, 129, 300, 999)] == [32, 128, 256, 384, 1000]
    shapes = bucket_shapes(1000, [32, 128], 2)
    assert len(shapes) <= 2 + -(-1000 // 128) + 1 and max(shapes) == 1000


def test_bucket_shapes_counts():
    assert bucket_shapes(1024, 64, 2) == list(range(64, 1025, 64))
    assert bucket_shapes(10, None, 2) == list(range(2, 11))
    assert bucket_shapes(100, "pow2", 2) == [2, 4, 8, 16, 32, 64, 128]


def test_parse_and_normalize():
    assert parse_buckets("none") is None and parse_buckets("pow2") == "pow2"
    assert parse_buckets("step64") == 64 and parse_buckets("128,32,32") == (32, 128)
    for bad in ("step0", "x", "1,-3", "step"):
        with pytest.raises(ValueError, match="--buckets"):
            parse_buckets(bad)
    with pytest.raises(ValueError):
        normalize_buckets([])
    with pytest.raises(ValueError):
        normalize_buckets("pow3")
