"""Run-directory I/O for evaluation: the model of a ``train.py --output`` directory, and the logits
cache keyed on the checkpoint (docs/method.md §9.1 item 9).

The reference caches the logits and reuses the cache blindly even after the checkpoint changed;
:func:`cached_logits` keys the cache on :func:`cache_key` (checkpoint hash + split/transform context)
and recomputes on mismatch.  Files are written through :mod:`imta_fast.fileio` (atomic).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, Tuple, Union

import torch
import torch.nn as nn

from imta_fast.fileio import atomic_torch_save

__all__ = ["cache_key", "cached_logits", "LoadedRun", "load_run"]


def _stack(x: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.stack(list(x))


def cache_key(checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]], **context) -> str:
    """SHA-256 over a checkpoint (file bytes, or a state_dict's names, dtypes, shapes and bytes) and
    the sorted ``context`` items (split name, transforms, model name ...)."""
    h = hashlib.sha256()
    if isinstance(checkpoint, (str, os.PathLike)):
        with open(checkpoint, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        for name in sorted(checkpoint):
            t = checkpoint[name].detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(repr(sorted(context.items())).encode())
    return h.hexdigest()


def cached_logits(
    path: Union[str, os.PathLike], key: str, compute: Callable[[], Tuple[torch.Tensor, torch.Tensor]],
    write: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits [K, N, C], labels [N])`` from ``path`` if it was written with the same ``key``,
    else ``compute()`` them and (if ``write``: rank 0 only under DDP) write ``{key, logits, labels}``
    atomically.  An unreadable cache file is recomputed, not an error."""
    if os.path.exists(path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # truncated / foreign file: the cache is only a cache
            blob = {}
        if isinstance(blob, dict) and blob.get("key") == key:
            return blob["logits"], blob["labels"]
    logits, labels = compute()
    logits, labels = _stack(logits).detach().cpu(), labels.detach().cpu()
    if not write:
        return logits, labels
    atomic_torch_save(path, {"key": key, "logits": logits, "labels": labels})
    return logits, labels


@dataclass
class LoadedRun:
    """A run directory's model (eval mode, on the device) and what was saved with it."""

    model: nn.Module
    checkpoint_path: str
    config: dict
    model_kwargs: dict


def load_run(run_dir: Union[str, os.PathLike], which: str, device: torch.device) -> LoadedRun:
    """Load ``<run_dir>/<which>.pt`` (``which`` = best | last) with the training layer's
    ``load_checkpoint`` and rebuild the model with ``build_model`` from the saved config and
    ``model_kwargs``.  Raises ``CheckpointError`` (one line) when the file is missing or bad."""
    from imta_fast.models.build import build_model
    from imta_fast.train.checkpoint import CheckpointError, load_checkpoint

    path = Path(run_dir) / f"{which}.pt"
    if not path.is_file():
        raise CheckpointError(f"no {which}.pt in {run_dir}: is it a train.py --output directory?")
    payload = load_checkpoint(str(path))
    config, kwargs = payload["config"], payload["model_kwargs"]
    model = build_model(config, kwargs["num_classes"], kwargs["in_channels"])
    model.load_state_dict(payload["model"])
    return LoadedRun(model.to(device).eval(), str(path), config, kwargs)
