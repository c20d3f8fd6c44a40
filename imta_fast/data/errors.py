"""The one exception the data layer raises for bad input.

Every problem a user can cause by pointing ``--data-dir`` (or ``--dataset``, ``--num-classes``,
``--holdout-size``, a split file) at the wrong thing raises :class:`DataError` with a one-line
message that names the problem and the path involved. The CLIs catch it, print ``error: <msg>``
and exit with status 2, so users see a plain sentence instead of a traceback.
"""
from __future__ import annotations

import os


class DataError(Exception):
    """Bad data input: missing folder, wrong layout, unreadable file, class-count mismatch, ..."""


def describe(path: str | os.PathLike) -> str:
    """Quote a path for a message (``'/data/cifar'``), so spaces in it stay visible."""
    return repr(os.fspath(path))
