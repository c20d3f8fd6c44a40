"""Boring, atomic checkpoints (timm saver / torchtitan auto-load style).

A checkpoint is a plain dict that loads with ``torch.load(..., weights_only=True)``, so resuming never
unpickles arbitrary code::

    {model, optimizer, scheduler, epoch, step, rng, config, split_sha256, metrics, model_kwargs,
     format_version, scaler?, method?, ema?}

The schema has one owner, this module: the trainer hands :func:`payload_from_states` a mapping of
*stateful* objects (anything with ``state_dict``/``load_state_dict``: model, optimiser, schedule,
grad scaler, training method) plus a :class:`TrainState` (epoch, step, hold-out metrics), and
:func:`restore_states` loads a payload back into the same objects (torchtitan's ``states`` pattern).

Writes go to a temp file in the target directory, are fsynced, then ``os.replace``d onto the target:
a crash leaves either the old file or the new one, never a truncated one. ``CheckpointManager`` keeps
``last.pt``, ``best.pt`` and optionally the last k ``checkpoint-epochE-stepS.pt`` files, and resolves
``--resume auto`` to the newest *valid* one, which is what torchrun ``--max-restarts`` needs.

Only rank 0 should save (``distributed.is_primary()``); every rank may resolve and load.
"""
from __future__ import annotations

import logging
import os
import random
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from imta_fast.fileio import atomic_copy, atomic_torch_save

__all__ = [
    "FORMAT_VERSION", "REQUIRED_KEYS", "CheckpointError", "CheckpointManager", "ModelState", "TrainState",
    "build_payload", "capture_rng_state", "payload_from_states", "restore_states",
    "check_resume_compatible", "clean_state_dict", "load_checkpoint", "load_model_state", "model_state_dict",
    "restore_rng_state", "save_checkpoint", "unwrap_model",
]

_log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "rng", "config", "split_sha256", "metrics",
                 "format_version")
PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, foreign, or incompatible with this run (one-line message)."""


# ----------------------------------------------------------------------------------------------------------------
# Model unwrapping: DDP adds ``module.``, torch.compile adds ``_orig_mod.`` (anywhere, when compiled per block).
# ----------------------------------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user model inside any DDP (``.module``) / torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Strip a leading DDP ``module.`` and every ``_orig_mod.`` segment from the keys.

    ``_orig_mod`` is torch.compile's reserved attribute, so removing it anywhere is safe and handles
    per-block compilation (``blocks.0._orig_mod.conv.weight``). ``module.`` is only stripped as a prefix,
    because a submodule may legitimately be called ``module``.
    """
    out = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module."):]
        out[key.replace("_orig_mod.", "")] = value
    return out


def model_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Clean (wrapper-free) state dict of a possibly DDP-wrapped / compiled model."""
    return clean_state_dict(unwrap_model(model).state_dict())


def load_model_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load a clean or wrapped state dict into a clean or wrapped model (keys are matched after cleaning).

    Returns ``load_state_dict``'s ``(missing_keys, unexpected_keys)`` result.
    """
    target = unwrap_model(model)
    # Map clean names back to the target's own names, which may still hold per-block ``_orig_mod.``.
    names = list(target.state_dict())
    own = dict(zip(clean_state_dict(dict.fromkeys(names)), names))
    renamed = {own.get(k, k): v for k, v in clean_state_dict(state_dict).items()}
    return target.load_state_dict(renamed, strict=strict)


# ----------------------------------------------------------------------------------------------------------------
# RNG state as tensors / ints / lists, so that weights_only=True can load it.
# ----------------------------------------------------------------------------------------------------------------
def capture_rng_state() -> Dict[str, Any]:
    """Snapshot python ``random``, numpy's global RNG, torch CPU and every CUDA generator of this process.

    Returns a dict of tensors / ints / floats / lists: python's 625-word Mersenne state and numpy's
    ``uint32[624]`` key become int64 tensors (pickled numpy arrays are refused by weights_only loads).
    Under DDP gather one per rank (``distributed.all_gather_object``) and store the list.
    """
    py_version, py_words, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "python": {"version": int(py_version), "state": torch.tensor(py_words, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"bit_generator": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Union[Dict[str, Any], Sequence[Dict[str, Any]]], rank: int = 0) -> bool:
    """Restore a ``capture_rng_state()`` snapshot, or entry ``rank`` of a per-rank list of them.

    Returns False (and restores nothing) when a per-rank list has no entry for ``rank``, e.g. after
    resuming on more processes; the caller should then re-seed (``distributed.seed_everything``).
    """
    if isinstance(state, (list, tuple)):
        if rank >= len(state):
            return False
        state = state[rank]
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["bit_generator"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        # A different GPU count on resume: restore the generators both runs have.
        for device, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Payload, atomic save, validated load
# ----------------------------------------------------------------------------------------------------------------
def build_payload(*, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int, step: int,
                  config: Mapping[str, Any], split_sha256: str = "", metrics: Optional[Mapping[str, Any]] = None,
                  rng: Any = None, scaler: Any = None, ema: Optional[nn.Module] = None,
                  model_kwargs: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Assemble the standard payload.

    Args:
        model: possibly DDP-wrapped / compiled; its clean state dict is saved.
        scheduler: an LR scheduler (``.state_dict()``) or None.
        epoch: index of the epoch just finished (train.py resumes at ``epoch + 1``); the manager only
            uses (epoch, step) to name kept files and to order fallbacks.
        step: optimizer steps completed.
        config: the resolved run config as plain types (``TrainConfig.to_dict()``).
        rng: defaults to ``capture_rng_state()`` of this process; pass a per-rank list under DDP.
        scaler / ema: optional fp16 GradScaler and EMA model, saved under ``scaler`` / ``ema``.
        model_kwargs: what rebuilding the network needs besides ``config`` (num_classes, in_channels,
            image_size): eval.py reads it.
    """
    payload = {
        "model": model_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "rng": capture_rng_state() if rng is None else rng,
        "config": dict(config),
        "split_sha256": str(split_sha256),
        "metrics": dict(metrics or {}),
        "model_kwargs": dict(model_kwargs or {}),
        "format_version": FORMAT_VERSION,
    }
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    if ema is not None:
        payload["ema"] = model_state_dict(ema)
    return payload


@dataclass
class TrainState:
    """Progress of a run: the last finished epoch, optimiser steps, hold-out top-1 (per exit, best last exit)."""

    epoch: int = -1
    step: int = 0
    holdout_top1: List[float] = field(default_factory=list)
    best_holdout_top1: float = -1.0

    @property
    def next_epoch(self) -> int:
        return self.epoch + 1


class ModelState:
    """Adapts a (possibly DDP-wrapped / compiled) model to the stateful protocol with clean keys."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return model_state_dict(self.model)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        load_model_state(self.model, state)


# Stateful entries saved when present; model, optimizer and scheduler are required.
_REQUIRED_STATES = ("model", "optimizer", "scheduler")
_OPTIONAL_STATES = ("scaler", "method")


def payload_from_states(states: Mapping[str, Any], train: TrainState, *, config: Mapping[str, Any],
                        split_sha256: str, model_kwargs: Mapping[str, Any], rng: Any) -> Dict[str, Any]:
    """The checkpoint payload of a run: ``states[name].state_dict()`` for each stateful object, plus
    progress, config, data split, model kwargs and per-rank RNG.  A disabled GradScaler and a method
    without state are left out (so a ce run's file has exactly the keys it always had)."""
    unknown = set(states) - set(_REQUIRED_STATES) - set(_OPTIONAL_STATES)
    if unknown:
        raise TypeError(f"unknown checkpoint states {sorted(unknown)}")
    scaler = states.get("scaler")
    payload = build_payload(model=states["model"].model if isinstance(states["model"], ModelState) else states["model"],
                            optimizer=states["optimizer"], scheduler=states["scheduler"], epoch=train.epoch,
                            step=train.step, config=config, split_sha256=split_sha256, rng=rng,
                            scaler=scaler if scaler is not None and scaler.is_enabled() else None,
                            metrics={"holdout_top1": list(train.holdout_top1),
                                     "best_holdout_top1": train.best_holdout_top1},
                            model_kwargs=model_kwargs)
    method_state = states["method"].state_dict() if "method" in states else {}
    if method_state:
        payload["method"] = method_state
    return payload


def restore_states(payload: Mapping[str, Any], states: Mapping[str, Any]) -> TrainState:
    """Load a payload into ``states`` (same names as saved); returns the run's :class:`TrainState`."""
    for name in _REQUIRED_STATES:
        states[name].load_state_dict(payload[name])
    if "scaler" in payload and "scaler" in states:
        states["scaler"].load_state_dict(payload["scaler"])
    if "method" in states:
        states["method"].load_state_dict(payload.get("method", {}))
    metrics = payload["metrics"]
    return TrainState(epoch=int(payload["epoch"]), step=int(payload["step"]),
                      holdout_top1=list(metrics.get("holdout_top1", [])),
                      best_holdout_top1=float(metrics["best_holdout_top1"]))


# Types torch's weights_only unpickler accepts without extra allow-listing.
_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.Size, torch.dtype,
                 torch.device)


def _check_plain(obj: Any, where: str = "payload") -> None:
    """Raise TypeError naming the first value a weights_only load would refuse (numpy, Path, dataclass...)."""
    if type(obj) in (dict, OrderedDict):  # subclasses such as defaultdict are refused
        for k, v in obj.items():
            _check_plain(k, f"{where} key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):  # namedtuples are not plain
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN_LEAVES) or isinstance(obj, np.generic):
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which torch.load("
                        f"weights_only=True) refuses; convert it to plain python types or tensors")


def save_checkpoint(path: PathLike, payload: Mapping[str, Any]) -> None:
    """Atomically write ``payload`` to ``path`` (temp file + fsync + ``os.replace``).

    Raises TypeError before writing anything when a key is missing or a value would not load with
    ``weights_only=True``: better to fail now than at resume time.
    """
    path = os.fspath(path)
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise TypeError(f"checkpoint payload for {path} lacks keys {missing}")
    _check_plain(dict(payload))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_torch_save(path, dict(payload))


def _one_line(exc: BaseException) -> str:
    """``Type: reason`` on one line; torch's multi-paragraph weights_only errors are cut to their reason."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    text = " ".join(text.split()).split(". ")[0]  # first sentence, whitespace collapsed
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load and validate a checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, truncated/corrupted, holds non-plain objects, is not an
            imta_fast checkpoint, or was written by a newer format. The message is one line naming the path.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; checking the header first gives a clearer error than the unpickler.
    if not magic:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{path} is not a torch zip checkpoint (bad header {magic!r}: corrupted or foreign)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip/pickle/EOF/weights_only errors all mean "unusable file"
        raise CheckpointError(f"cannot read checkpoint {path} (corrupted, truncated or unsafe): {_one_line(exc)}") \
            from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not an imta_fast checkpoint (holds a {type(payload).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path} is not an imta_fast checkpoint (missing keys: {', '.join(missing)})")
    version = payload["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version={version!r}; this imta_fast reads <= {FORMAT_VERSION}")
    return payload


_MISSING = object()


def _normalize(value: Any) -> Any:
    # YAML and our own dict round trips turn tuples into lists; that is not a real config change.
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    return value


def check_resume_compatible(saved_config: Mapping[str, Any], current_config: Mapping[str, Any],
                            keys: Sequence[str]) -> None:
    """Raise CheckpointError listing every key in ``keys`` whose value differs between the two configs.

    Example message: ``cannot resume: checkpoint was trained with model='msdnet_tiny', this run has
    model='msdnet_mnist'; checkpoint was trained with num_classes=10, this run has num_classes=100``.
    """
    def show(key: str, value: Any) -> str:
        return f"{key}=<missing>" if value is _MISSING else f"{key}={value!r}"

    diffs = []
    for key in keys:
        old, new = saved_config.get(key, _MISSING), current_config.get(key, _MISSING)
        if (old is _MISSING) != (new is _MISSING) or _normalize(old) != _normalize(new):
            diffs.append(f"checkpoint was trained with {show(key, old)}, this run has {show(key, new)}")
    if diffs:
        raise CheckpointError("cannot resume: " + "; ".join(diffs))


# ----------------------------------------------------------------------------------------------------------------
# Run-directory manager: last.pt, best.pt, last k, --resume auto
# ----------------------------------------------------------------------------------------------------------------
_KEEP_RE = re.compile(r"^checkpoint-epoch(\d+)-step(\d+)\.pt$")


class CheckpointManager:
    """Owns the checkpoints of one run directory.

    Files: ``last.pt`` (every save), ``best.pt`` (when ``is_best``) and, with ``keep_last=k > 0``, the k
    newest ``checkpoint-epoch{E:04d}-step{S:09d}.pt``. best/kept files are independent copies of last.pt,
    so each is a real fallback when another is damaged.

    Args:
        output_dir: run directory (created).
        keep_last: how many per-epoch checkpoints to keep besides last/best (0 = none).
    """

    def __init__(self, output_dir: PathLike, keep_last: int = 0):
        self.output_dir = os.fspath(output_dir)
        self.keep_last = int(keep_last)
        os.makedirs(self.output_dir, exist_ok=True)

    @property
    def last_path(self) -> str:
        return os.path.join(self.output_dir, "last.pt")

    @property
    def best_path(self) -> str:
        return os.path.join(self.output_dir, "best.pt")

    def _kept(self, directory: Optional[str] = None) -> List[Tuple[Tuple[int, int], str]]:
        """Kept per-epoch checkpoints as ``((epoch, step), path)``, newest first."""
        directory = directory or self.output_dir
        found = []
        for name in os.listdir(directory):
            m = _KEEP_RE.match(name)
            if m:
                found.append(((int(m.group(1)), int(m.group(2))), os.path.join(directory, name)))
        return sorted(found, reverse=True)

    def save(self, payload: Mapping[str, Any], is_best: bool = False) -> str:
        """Write ``last.pt`` atomically, then copy it to ``best.pt`` / a kept file; prune old kept ones.

        Call on rank 0 only. Returns the path of ``last.pt``.
        """
        save_checkpoint(self.last_path, payload)
        if is_best:
            atomic_copy(self.last_path, self.best_path)
        if self.keep_last > 0:
            name = f"checkpoint-epoch{int(payload['epoch']):04d}-step{int(payload['step']):09d}.pt"
            atomic_copy(self.last_path, os.path.join(self.output_dir, name))
            for _, old in self._kept()[self.keep_last:]:
                os.remove(old)
        return self.last_path

    def resolve_resume(self, resume: Optional[str]) -> Optional[str]:
        """Turn a ``--resume`` value into a checkpoint path, or None for a fresh start.

        Args:
            resume: None/'' (fresh start), a file path (must exist), a run directory or 'auto' (this
                manager's directory): the newest *valid* checkpoint there — ``last.pt`` when it loads, otherwise
                the valid kept/best file with the largest (epoch, step).

        Raises:
            CheckpointError: an explicit file is missing, or checkpoints exist but none is valid (silently
                starting over would overwrite a run's progress; delete them or drop ``--resume``).
        """
        if not resume:
            return None
        if resume != "auto" and not os.path.isdir(resume):
            if not os.path.isfile(resume):
                raise CheckpointError(f"--resume {resume}: no such checkpoint file")
            return resume
        directory = self.output_dir if resume == "auto" else resume
        if not os.path.isdir(directory):
            return None
        last = os.path.join(directory, "last.pt")
        if os.path.isfile(last):
            try:
                load_checkpoint(last)
                return last
            except CheckpointError as exc:
                errors = [str(exc)]
        else:
            errors = []
        others = [p for _, p in self._kept(directory)] + [os.path.join(directory, "best.pt")]
        valid = []
        for path in filter(os.path.isfile, others):
            try:
                payload = load_checkpoint(path)
                valid.append(((payload["epoch"], payload["step"]), path))
            except CheckpointError as exc:
                errors.append(str(exc))
        if not valid and not errors:
            return None
        if not valid:
            raise CheckpointError(f"--resume {resume}: no valid checkpoint in {directory} ({'; '.join(errors)})")
        best_key, path = max(valid)
        if errors:
            _log.warning("resume: skipped unusable checkpoint(s) [%s]; using %s (epoch %d, step %d)",
                         "; ".join(errors), path, *best_key)
        return path
