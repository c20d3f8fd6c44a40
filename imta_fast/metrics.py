"""Meters, per-exit top-k, ``summary.csv``, environment info and logging setup (timm style).

Accumulators that see per-batch GPU tensors stay on the device and are read once per epoch, so
metric bookkeeping never forces a host sync inside the training loop.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import platform
import socket
import sys
from importlib import metadata
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from imta_fast.distributed import all_reduce_sum, get_rank
from imta_fast.fileio import atomic_write_text

__all__ = ["AverageMeter", "MultiExitMeter", "SummaryWriterCSV", "environment_info", "setup_logging", "topk_correct"]

PathLike = Union[str, "os.PathLike[str]"]


class AverageMeter:
    """Running average of host-side scalars (batch time, data time, images/s).

    ``update(val, n)`` adds ``val`` observed ``n`` times; ``val`` is converted with ``float()``, so pass
    Python numbers, not GPU tensors, inside hot loops.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.val = self.sum = self.avg = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = float(val)
        self.sum += self.val * n
        self.count += n
        self.avg = self.sum / self.count if self.count else 0.0


def topk_correct(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the k highest logits, for each k.

    Args:
        logits: ``(B, C)``.
        target: ``(B,)`` class indices.
        topk: the k values; each is clipped to C, so top-5 with C=3 counts every sample.

    Returns:
        ``(len(topk),)`` int64 counts on ``logits.device`` (counts, not percentages, so they sum across
        batches and ranks exactly).
    """
    num_classes = logits.shape[1]
    maxk = min(max(topk), num_classes)
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk), best first
    hit = pred.eq(target.view(-1, 1))  # (B, maxk); at most one True per row
    return torch.stack([hit[:, : min(k, num_classes)].any(dim=1).sum() for k in topk]).to(torch.int64)


class MultiExitMeter:
    """Per-exit sums of loss and top-k hits over an epoch, reduced across ranks at the end.

    Args:
        num_exits: E, the number of classifiers.
        topk: k values to track (default top-1/top-5).

    Example::

        meter = MultiExitMeter(num_exits=len(logits_list))
        meter.update(logits_list, target, losses)   # per batch; losses: (E,) batch means
        meter.all_reduce()                           # once, on every rank
        meter.compute()  # {'count': N, 'loss': [E], 'top1': [E], 'top5': [E]} (percent)
    """

    def __init__(self, num_exits: int, topk: Sequence[int] = (1, 5)):
        self.num_exits = int(num_exits)
        self.topk = tuple(topk)
        self.reset()

    def reset(self) -> None:
        # Created lazily on the first batch's device; float64 keeps integer counts exact up to 2**53.
        self._loss: Optional[torch.Tensor] = None  # (E,) sum of per-sample loss
        self._correct: Optional[torch.Tensor] = None  # (E, K) hit counts
        self._count: Optional[torch.Tensor] = None  # () samples seen
        self._has_loss = False
        self._reduced = False

    def update(self, logits: Sequence[torch.Tensor], target: torch.Tensor,
               losses: Union[torch.Tensor, Sequence[Any], None] = None) -> None:
        """Add one batch.

        Args:
            logits: E tensors of shape ``(B, C)``, one per exit.
            target: ``(B,)`` class indices.
            losses: optional ``(E,)`` per-exit batch-mean losses (tensor or list of scalars).
        """
        if self._reduced:
            raise RuntimeError("MultiExitMeter.update() after all_reduce(); call reset() first")
        if len(logits) != self.num_exits:
            raise ValueError(f"expected {self.num_exits} exits, got {len(logits)}")
        device, batch = target.device, target.shape[0]
        if self._count is None:
            self._loss = torch.zeros(self.num_exits, dtype=torch.float64, device=device)
            self._correct = torch.zeros(self.num_exits, len(self.topk), dtype=torch.float64, device=device)
            self._count = torch.zeros((), dtype=torch.float64, device=device)
        with torch.no_grad():
            self._correct += torch.stack([topk_correct(z, target, self.topk) for z in logits]).to(torch.float64)
            self._count += batch
            if losses is not None:
                # Stacking (not float()) keeps GPU losses on the device: no sync per batch.
                per_exit = (losses.detach() if isinstance(losses, torch.Tensor) else torch.stack(
                    [torch.as_tensor(l, device=device).detach().reshape(()) for l in losses]))
                per_exit = per_exit.to(device=device, dtype=torch.float64)
                self._loss += per_exit * batch  # batch mean -> batch sum, so ranks/batches weigh by size
                self._has_loss = True

    def all_reduce(self) -> None:
        """Sum the accumulators over ranks in one collective. Call once on every rank; idempotent."""
        if self._reduced or self._count is None:
            self._reduced = True
            return
        packed = torch.cat([self._loss, self._correct.flatten(), self._count.view(1)])
        packed = all_reduce_sum(packed)
        e, k = self.num_exits, len(self.topk)
        self._loss, self._correct, self._count = packed[:e], packed[e:e + e * k].view(e, k), packed[-1]
        self._reduced = True

    def compute(self) -> Dict[str, Any]:
        """Averages: ``{'count': int, 'loss': [E] (if losses were given), 'top{k}': [E] percent}``.

        Reads the device once. Without ``all_reduce()`` these are this rank's numbers only.
        """
        if self._count is None:
            return {"count": 0}
        n = self._count.item()
        out: Dict[str, Any] = {"count": int(n)}
        denom = max(n, 1.0)
        if self._has_loss:
            out["loss"] = (self._loss / denom).tolist()
        for j, k in enumerate(self.topk):
            out[f"top{k}"] = (self._correct[:, j] * (100.0 / denom)).tolist()
        return out

    def flat(self, prefix: str = "") -> Dict[str, float]:
        """``compute()`` flattened for a CSV row: ``{prefix}loss_exit{i}``, ``{prefix}top1_exit{i}``, ..."""
        out = {}
        for name, values in self.compute().items():
            if name != "count":
                out.update({f"{prefix}{name}_exit{i}": v for i, v in enumerate(values)})
        return out


def _plain(value: Any) -> Any:
    # 0-d tensors / numpy scalars would otherwise be written as "tensor(0.5)".
    return value.item() if isinstance(value, (torch.Tensor, np.generic)) else value


class SummaryWriterCSV:
    """Appends one row per epoch to a CSV file (timm's ``summary.csv``).

    The header is the first row's keys and is written once; every later row must have the same keys.
    Resuming onto an existing file keeps its header (no duplicate) and appends. Call on rank 0 only.
    """

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        self.fieldnames: Optional[List[str]] = self._read_header()

    def _read_header(self) -> Optional[List[str]]:
        if not os.path.isfile(self.path) or os.path.getsize(self.path) == 0:
            return None
        with open(self.path, newline="") as f:
            return next(csv.reader(f), None)

    def _read_rows(self) -> List[Dict[str, str]]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def write(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` (header first if the file is new or empty).

        Raises:
            ValueError: the keys differ from the existing header (would misalign columns).
        """
        row = {k: _plain(v) for k, v in row.items()}
        buf = io.StringIO()
        if self.fieldnames is None:
            self.fieldnames = list(row)
            csv.writer(buf, lineterminator="\n").writerow(self.fieldnames)
        elif set(row) != set(self.fieldnames):
            extra, lacking = sorted(set(row) - set(self.fieldnames)), sorted(set(self.fieldnames) - set(row))
            raise ValueError(f"{self.path}: row columns differ from the header (extra {extra}, missing {lacking})")
        csv.DictWriter(buf, fieldnames=self.fieldnames, lineterminator="\n").writerow(row)
        # One write per row: a crash leaves the row either absent or whole.
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()

    def rewind(self, epoch: int, key: str = "epoch") -> None:
        """Drop rows with ``row[key] >= epoch`` (call on resume at ``epoch``, so re-run epochs don't repeat)."""
        if self.fieldnames is None:
            return
        kept = [r for r in self._read_rows() if int(float(r[key])) < epoch]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.fieldnames, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(self.path, buf.getvalue())  # the old summary survives a crash here


def _pkg_version(name: str) -> Optional[str]:
    # metadata, not import: importing triton/torchvision just to log a version costs seconds.
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _git_commit(start: Optional[str] = None) -> Optional[str]:
    """HEAD commit of the git checkout containing ``start`` (default: this package), read from .git files.

    Reading the files (loose ref, then packed-refs; worktrees via ``gitdir:``/``commondir``) avoids
    needing a git binary or spawning a process. Returns None outside a checkout.
    """
    d = os.path.abspath(start or os.path.dirname(__file__))
    while not os.path.exists(os.path.join(d, ".git")):
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent
    try:
        gitdir = os.path.join(d, ".git")
        if os.path.isfile(gitdir):  # worktree or submodule: the file says where the real git dir is
            gitdir = os.path.join(d, _read(gitdir).split(":", 1)[1].strip())
        common = gitdir
        if os.path.isfile(os.path.join(gitdir, "commondir")):
            common = os.path.join(gitdir, _read(os.path.join(gitdir, "commondir")))
        head = _read(os.path.join(gitdir, "HEAD"))
        if not head.startswith("ref:"):
            return head  # detached HEAD holds the sha itself
        ref = head[4:].strip()
        for base in (gitdir, common):
            if os.path.isfile(os.path.join(base, ref)):
                return _read(os.path.join(base, ref))
        packed = os.path.join(common, "packed-refs")
        if os.path.isfile(packed):
            for line in _read(packed).splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    except (OSError, IndexError):
        pass
    return None


def environment_info() -> Dict[str, Any]:
    """Versions and hardware for logs and benchmark files (a flat, JSON-ready dict).

    Keys: python, platform, torch, torch_cuda, cudnn, triton, torchvision, numpy, cpu_count, hostname,
    git_commit, cuda_available and, with CUDA, cuda_device_count / cuda_device_name / cuda_capability /
    cuda_memory_gib of the current device. Missing packages map to None.
    """
    info: Dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _pkg_version("triton"),
        "torchvision": _pkg_version("torchvision"),
        "numpy": np.__version__,
        # Usable cores can be fewer than installed ones (cgroups/taskset); report both.
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "hostname": socket.gethostname(),
        "git_commit": _git_commit(),
        "cuda_available": torch.cuda.is_available(),
    }
    if info["cuda_available"]:
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(cuda_device_count=torch.cuda.device_count(), cuda_device_name=props.name,
                    cuda_capability=f"{props.major}.{props.minor}",
                    cuda_memory_gib=round(props.total_memory / 2**30, 1))
    return info


_HANDLER_TAG = "_imta_fast_handler"


def setup_logging(output_dir: Optional[PathLike], primary: bool) -> logging.Logger:
    """Configure the root logger: INFO to stdout and ``output_dir/log.txt`` on rank 0, WARNING-only elsewhere.

    Non-primary ranks print only warnings/errors, prefixed with their rank, and write no file.
    Idempotent: handlers from an earlier call are replaced, never duplicated. Returns the root logger.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(handler)
        handler.close()
    prefix = "" if primary else f"[rank{get_rank()}] "
    formatter = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if primary and output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(os.fspath(output_dir), "log.txt"), mode="a"))
    for handler in handlers:
        setattr(handler, _HANDLER_TAG, True)
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO if primary else logging.WARNING)
    return root
