"""Accuracy plots for multi-exit networks (matplotlib, Agg backend, no pyplot global state).

- :func:`plot_anytime`: per-exit top-1 against cumulative MACs (anytime protocol, docs/method.md §6).
- :func:`plot_budgeted`: test accuracy against expected MACs over the budget sweep (docs/method.md §6).
- :func:`plot_wallclock`: accuracy against measured ms/image next to accuracy against MACs.

PNGs are written atomically (:func:`imta_fast.fileio.atomic_write`).

Each takes ``runs: {label: (x values, accuracy values)}``, overlays the runs with a legend (e.g.
``'MSDNet (ce)'`` vs ``'IMTA'``), writes a PNG and returns the :class:`~matplotlib.figure.Figure`
(one ``Line2D`` per run per panel, so callers and tests can inspect it).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from imta_fast.fileio import atomic_write

__all__ = ["plot_anytime", "plot_budgeted", "plot_wallclock", "plot_exit_weights"]

Curve = Tuple[Sequence[float], Sequence[float]]


def _title(base: str, dataset: Optional[str], device: Optional[str]) -> str:
    extra = ", ".join(s for s in (dataset, device) if s)
    return f"{base} ({extra})" if extra else base


def _draw(ax, runs: Mapping[str, Curve], marker: str, xlabel: str, ylabel: str) -> None:
    for label, (xs, ys) in runs.items():
        if len(xs) != len(ys):
            raise ValueError(f"run {label!r}: {len(xs)} x values but {len(ys)} accuracies")
        ax.plot(list(xs), list(ys), marker=marker, markersize=4, linewidth=1.5, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if runs:
        ax.legend(loc="lower right")


def _save(fig: Figure, path: str) -> Figure:
    FigureCanvasAgg(fig)
    atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    return fig


def plot_anytime(runs: Mapping[str, Curve], path: str, *, dataset: Optional[str] = None,
                 device: Optional[str] = None, metric: str = "top-1") -> Figure:
    """Per-exit accuracy vs cumulative MACs; ``runs[label] = (macs per exit in millions, accuracy % per exit)``."""
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    _draw(ax, runs, "o", "cumulative MACs per exit (millions)", f"{metric} accuracy (%)")
    ax.set_title(_title("Anytime prediction", dataset, device))
    return _save(fig, path)


def plot_budgeted(runs: Mapping[str, Curve], path: str, *, dataset: Optional[str] = None,
                  device: Optional[str] = None) -> Figure:
    """Budgeted-batch accuracy vs expected MACs; ``runs[label] = (expected MACs (M) per budget, accuracy %)``."""
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    _draw(ax, runs, ".", "expected MACs per image (millions)", "top-1 accuracy (%)")
    ax.set_title(_title("Budgeted batch classification", dataset, device))
    return _save(fig, path)


def plot_wallclock(runs_ms: Mapping[str, Curve], path: str, runs_macs: Optional[Mapping[str, Curve]] = None, *,
                   dataset: Optional[str] = None, device: Optional[str] = None,
                   batch_size: Optional[int] = None) -> Figure:
    """Two panels: accuracy vs measured latency (``runs_ms[label] = (ms per image, accuracy %)``) and,
    when ``runs_macs`` is given, accuracy vs expected MACs for the same runs."""
    fig = Figure(figsize=(11, 4.5) if runs_macs is not None else (6, 4.5), layout="constrained")
    axes = fig.subplots(1, 2 if runs_macs is not None else 1, squeeze=False)[0]
    xlabel = "measured latency (ms per image" + (f", batch {batch_size})" if batch_size else ")")
    _draw(axes[0], runs_ms, ".", xlabel, "top-1 accuracy (%)")
    axes[0].set_title("Accuracy vs wall clock")
    if runs_macs is not None:
        _draw(axes[1], runs_macs, ".", "expected MACs per image (millions)", "top-1 accuracy (%)")
        axes[1].set_title("Accuracy vs MACs")
    fig.suptitle(_title("Early-exit inference", dataset, device))
    return _save(fig, path)


def plot_exit_weights(epochs: Sequence[float], weights: Sequence[Sequence[float]], path: str, *,
                      dataset: Optional[str] = None) -> Figure:
    """L2W: mean predicted sample weight per exit over training; ``weights[k]`` = exit k's value per epoch."""
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    _draw(ax, {f"exit {k + 1}": (epochs, w) for k, w in enumerate(weights)}, "o", "epoch", "mean sample weight")
    ax.set_title(_title("L2W: learned weight per exit", dataset, None))
    return _save(fig, path)
