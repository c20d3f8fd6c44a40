"""Batch-size buckets: the one rounding rule for "how many rows does a stage compute" (docs/method.md §13).

The stage executor pads the active batch to :func:`resolve_bucket`'s answer, and the latency model
(:mod:`imta_fast.inference.latency`) predicts stage times for exactly the same row counts, so the two
cannot drift apart.

Bucket specifications (:data:`Buckets`):

- ``None``: compute exactly the active rows (at least ``min_rows``);
- ``'pow2'``: the next power of two;
- an ``int`` s: the next multiple of s, capped at the batch size when it is known;
- a list of sizes: the smallest listed size that fits; beyond the largest one, the next multiple of
  the largest (capped at the batch size) when the batch size is known, so the number of shapes stays
  bounded (``len(buckets) + ceil(B / max(buckets))``), else the active count itself.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

__all__ = ["Buckets", "normalize_buckets", "parse_buckets", "resolve_bucket", "bucket_shapes"]

Buckets = Union[None, str, int, Sequence[int]]


def normalize_buckets(buckets: Buckets) -> Union[None, str, int, Tuple[int, ...]]:
    """Validate a bucket specification: ``None``, ``'pow2'``, a positive int step, or a sorted tuple
    of distinct positive sizes.  Raises ``ValueError`` with a one-line message otherwise."""
    if buckets is None or buckets == "pow2":
        return buckets
    if isinstance(buckets, str):
        raise ValueError(f"unknown buckets {buckets!r}: use None, 'pow2', a step (int) or a list of sizes")
    if isinstance(buckets, bool):
        raise ValueError(f"buckets must be None, 'pow2', an int step or a list of sizes, got {buckets!r}")
    if isinstance(buckets, int):
        if buckets < 1:
            raise ValueError(f"bucket step must be a positive number of rows, got {buckets}")
        return int(buckets)
    sizes = tuple(sorted({int(b) for b in buckets}))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"buckets must be positive sizes, got {list(buckets)}")
    return sizes


def parse_buckets(text: str) -> Buckets:
    """Command-line form: ``none``, ``pow2``, ``stepN`` (multiples of N, e.g. ``step64``) or ``N,N,...``."""
    t = text.strip().lower()
    if t in ("none", ""):
        return None
    if t == "pow2":
        return "pow2"
    try:
        if t.startswith("step"):
            return normalize_buckets(int(t[4:]))
        return normalize_buckets([int(v) for v in t.split(",") if v])
    except ValueError:
        raise ValueError(f"bad --buckets {text!r}: use none, pow2, stepN (e.g. step64) or a list like 32,128,512") from None


def resolve_bucket(n: int, buckets: Buckets, min_rows: int = 1, batch_size: Optional[int] = None) -> int:
    """Rows computed for ``n`` active samples (0 stays 0); at least ``min_rows``.

    ``batch_size`` (the batch the survivors come from) bounds the shapes of the step and list forms
    (see the module docstring); ``None`` and ``'pow2'`` do not depend on it.
    """
    if n == 0:
        return 0
    m = max(int(n), int(min_rows))
    if buckets is None:
        return m
    if buckets == "pow2":
        return 1 << (m - 1).bit_length()
    cap = None if batch_size is None else max(int(batch_size), m)
    if isinstance(buckets, int):
        r = -(-m // buckets) * buckets
        return r if cap is None else min(r, cap)
    fitting = [b for b in buckets if b >= m]
    if fitting:
        return min(fitting)
    if cap is None:
        return m
    top = max(buckets)
    return min(-(-m // top) * top, cap)


def bucket_shapes(batch_size: int, buckets: Buckets, min_rows: int = 1) -> list:
    """Every row count a batch of ``batch_size`` can produce (the shapes to warm up or capture)."""
    return sorted({resolve_bucket(n, buckets, min_rows, batch_size) for n in range(1, batch_size + 1)})
