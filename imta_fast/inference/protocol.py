"""Budgeted (dynamic) early-exit protocol of MSDNet/IMTA, vectorised (docs/method.md §6, §8, §9.1 items 9/14/17).

The reference (``adaptive_inference.py``) simulates adaptive inference from stored outputs of the
full network: it fits one confidence threshold per exit on a hold-out split so that the exits
receive geometric target fractions, then applies the thresholds to the test split and reports
accuracy against *expected* cumulative MACs.  It loops over samples in Python; here every step is
a tensor op over samples (a Python loop over the K exits and over the budget sweep remains).

Protocol, with K exits, N samples and confidences ``c_k(x)`` = max softmax probability at exit k:

- target fractions ``π_k ∝ q^k`` (k = 1..K), for ``q = p/20`` with p = 1..40 (IMTA) or 1..39 (MSD);
- fitting, for k = 1..K-1 in order: ``n_k = floor(N·π_k)``; among samples not yet exited, sorted by
  descending ``c_k``, the ``n_k``-th confidence is ``τ_k`` (``+1e8`` if ``n_k = 0`` or fewer than
  ``n_k`` remain); then every sample with ``c_k ≥ τ_k`` is marked exited.  ``τ_K = -1e8``;
- application: a sample exits at the first k with ``c_k ≥ τ_k``; accuracy is over all N samples and
  the expected cost is ``Σ_k (n_exit_k / N) · F_k`` with ``F_k`` the *cumulative* MACs of exit k
  (blocks 1..k and heads 1..k, docs/method.md §8).

Neighbours: the latency model (stage costs, wall-clock budgets) is :mod:`imta_fast.inference.latency`;
the logits cache and run directories are :mod:`imta_fast.inference.rundir`.

Conventions: confidences are float32 (as the reference's stored softmax); thresholds are compared in
the confidences' dtype; exit indices are 0-based (exit k ↔ ``exit_index == k-1``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "EXIT_NEVER",
    "EXIT_ALWAYS",
    "exit_fractions",
    "budget_sweep",
    "max_softmax",
    "confidences_and_predictions",
    "fit_thresholds",
    "exit_indices",
    "score_exits",
    "apply_thresholds",
    "ExitResult",
    "BudgetRow",
    "budgeted_evaluation",
    "anytime_accuracy",
]

#: Threshold that nothing reaches (a softmax probability is <= 1): the reference's "no exit here".
EXIT_NEVER = 1e8
#: Threshold that everything reaches: the reference's last exit.
EXIT_ALWAYS = -1e8

LogitsLike = Union[torch.Tensor, Sequence[torch.Tensor]]


# ----------------------------------------------------------------------------- budgets
def exit_fractions(q: float, num_exits: int) -> torch.Tensor:
    """Geometric target exit fractions ``π_k = q^k / Σ_j q^j`` for k = 1..K.

    Computed in float32 as ``exp(log(q)·k)`` exactly like the reference (which used the deprecated,
    inclusive ``torch.range``; docs/method.md §9.1 item 14), so that ``floor(N·π_k)`` agrees with it at the
    boundaries.  Returns a float32 tensor ``[K]`` summing to 1.
    """
    if q <= 0:
        raise ValueError(f"q must be positive, got {q}")
    q32 = torch.tensor([q], dtype=torch.float32)
    probs = torch.exp(torch.log(q32) * torch.arange(1, num_exits + 1, dtype=torch.float32))
    return probs / probs.sum()


def budget_sweep(num_exits: int, points: int = 40) -> List[float]:
    """The reference's q grid ``q = p/20``, p = 1..points (IMTA: 40 points up to 2.0; MSD: 39).

    ``num_exits`` is accepted for symmetry with :func:`exit_fractions` (the grid does not depend on it).
    """
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    del num_exits
    return [p / 20 for p in range(1, points + 1)]


# ----------------------------------------------------------------------------- confidences
def max_softmax(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[..., C]`` logits -> (max softmax probability (float32), argmax (int64)), both ``[...]``.

    The one definition of confidence shared by the simulated protocol and the real evaluator, so
    that both see bit-identical confidences for identical logits.
    """
    return torch.softmax(logits.float(), dim=-1).max(dim=-1)


def _stack(x: LogitsLike) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.stack(list(x))


@torch.no_grad()
def confidences_and_predictions(
    logits: LogitsLike, *, from_probs: bool = False, chunk_size: int = 16384
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-exit confidence and prediction.

    Args:
        logits: ``[K, N, C]`` tensor or a list of K ``[N, C]`` tensors (logits, or probabilities
            when ``from_probs``; the reference caches softmax probabilities, docs/method.md §6 step 1).
        from_probs: inputs are already probabilities: confidence = their max.
        chunk_size: rows per softmax call, to bound the float32 temporary to ``chunk_size × C``.

    Returns:
        ``(conf [K, N] float32, pred [K, N] int64)`` on the inputs' device.
    """
    per_exit = list(logits) if not isinstance(logits, torch.Tensor) else list(logits.unbind(0))
    confs, preds = [], []
    for z in per_exit:
        c_parts, p_parts = [], []
        for start in range(0, z.shape[0], chunk_size):
            chunk = z[start : start + chunk_size]
            c, p = chunk.float().max(dim=-1) if from_probs else max_softmax(chunk)
            c_parts.append(c)
            p_parts.append(p)
        confs.append(torch.cat(c_parts) if c_parts else z.new_zeros(0, dtype=torch.float32))
        preds.append(torch.cat(p_parts) if p_parts else z.new_zeros(0, dtype=torch.long))
    return torch.stack(confs), torch.stack(preds)


# ----------------------------------------------------------------------------- fitting
def _sample_counts(num_samples: int, fractions: torch.Tensor) -> List[int]:
    # floor(N·π_k) in the fractions' dtype (float32 from exit_fractions), as the reference's
    # `math.floor(n_sample * p[k])` with p a FloatTensor.
    return [int(v) for v in torch.floor(num_samples * fractions.detach().cpu()).tolist()]


def _fit_sorted(
    conf: torch.Tensor, sorted_conf: torch.Tensor, order: torch.Tensor, fractions: torch.Tensor
) -> torch.Tensor:
    """:func:`fit_thresholds` given each exit's descending sort (reused across a budget sweep)."""
    num_exits, n = conf.shape
    counts = _sample_counts(n, fractions)
    thresholds = torch.full((num_exits,), EXIT_NEVER, dtype=conf.dtype, device=conf.device)
    exited = torch.zeros(n, dtype=torch.bool, device=conf.device)
    for k in range(num_exits - 1):
        n_k = counts[k]
        if n_k > 0:
            # alive[i] = the i-th most confident sample at exit k has not exited yet; the running
            # count of alive samples first reaches n_k exactly at the n_k-th alive one.
            alive_count = (~exited[order[k]]).cumsum(0)
            if alive_count[-1].item() >= n_k:
                pos = torch.searchsorted(alive_count, torch.tensor([n_k], device=conf.device))
                thresholds[k] = sorted_conf[k, pos[0]]
        # Reference: `filtered.add_(max_preds[k].ge(T[k]))` -- ties at τ_k exit too.
        exited |= conf[k] >= thresholds[k]
    thresholds[-1] = EXIT_ALWAYS
    return thresholds


def fit_thresholds(confidences: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Fit one threshold per exit on a hold-out split (the reference's ``dynamic_eval_find_threshold``).

    Args:
        confidences: ``[K, N]`` max softmax probabilities.
        fractions: ``[K]`` target exit fractions (:func:`exit_fractions`); ``π_K`` is unused
            (everything left exits last).

    Returns:
        ``[K]`` thresholds in the confidences' dtype: ``τ_k`` is the ``floor(N·π_k)``-th largest
        confidence at exit k among samples that did not exit before k, or ``+1e8`` (no exit) when that
        count is 0 or too few samples remain; ``τ_K = -1e8``.  Because ties exit (``c ≥ τ``), the
        realised fractions can exceed the targets.
    """
    if confidences.dim() != 2 or fractions.shape != (confidences.shape[0],):
        raise ValueError(f"expected confidences [K, N] and fractions [K], got {tuple(confidences.shape)} and {tuple(fractions.shape)}")
    sorted_conf, order = confidences.sort(dim=1, descending=True)
    return _fit_sorted(confidences, sorted_conf, order, fractions)


# ----------------------------------------------------------------------------- applying
class ExitResult(NamedTuple):
    """Outcome of applying thresholds to a split (a tuple: ``acc, macs, counts, idx = apply_thresholds(...)``).

    Attributes:
        accuracy: top-1 in percent over all N samples.
        expected_macs: ``Σ_k (n_exit_k / N)·F_k`` (units of ``macs``), or ``None`` without ``macs``.
        exit_counts: ``[K]`` int64 (CPU), samples leaving at each exit.
        exit_index: ``[N]`` int64, 0-based exit of each sample.
    """

    accuracy: float
    expected_macs: Optional[float]
    exit_counts: torch.Tensor
    exit_index: torch.Tensor


def exit_indices(confidences: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``[K, N]`` confidences, ``[K]`` thresholds -> ``[N]`` first k with ``c_k ≥ τ_k`` (0-based).

    A sample that passes no threshold (only possible when ``τ_K > -1e8`` is supplied) is assigned to
    the last exit, as the real evaluator must; the reference would count it as neither correct nor
    costed, which never happens with its ``τ_K = -1e8``.
    """
    num_exits = confidences.shape[0]
    passed = confidences >= thresholds.to(confidences)[:, None]
    passed[-1] = True
    ks = torch.arange(num_exits, device=confidences.device)[:, None]
    return torch.where(passed, ks, num_exits).amin(dim=0)


def apply_thresholds(
    confidences: torch.Tensor,
    predictions: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor,
    macs: Optional[Sequence[float]] = None,
) -> ExitResult:
    """Exit every sample at the first k with ``c_k ≥ τ_k`` (the reference's ``dynamic_eval_with_threshold``).

    Args:
        confidences: ``[K, N]``; predictions: ``[K, N]`` argmax per exit; labels: ``[N]``.
        thresholds: ``[K]`` (from :func:`fit_thresholds`).
        macs: cumulative MACs per exit ``[K]`` (any unit; millions by convention).

    Returns:
        :class:`ExitResult` (unpacks as ``accuracy, expected_macs, exit_counts, exit_index``).
    """
    num_exits, n = confidences.shape
    idx = exit_indices(confidences, thresholds)
    pred = predictions.gather(0, idx[None]).squeeze(0)
    return score_exits(idx, pred, labels, num_exits, macs)


def score_exits(
    exit_index: torch.Tensor,
    predictions: torch.Tensor,
    labels: torch.Tensor,
    num_exits: int,
    macs: Optional[Sequence[float]] = None,
) -> ExitResult:
    """Score given exits: accuracy over all N samples, exit counts and expected cumulative MACs
    ``Σ_k (n_exit_k / N)·F_k``.  The one scorer of the simulated protocol and the real evaluator.

    Args:
        exit_index: ``[N]`` 0-based exit of each sample; predictions: ``[N]`` at that exit; labels: ``[N]``.
        macs: cumulative MACs per exit ``[K]``, or None.
    """
    n = exit_index.numel()
    correct = predictions == labels.to(predictions.device)
    counts = torch.bincount(exit_index, minlength=num_exits).cpu()
    accuracy = 100.0 * correct.sum().item() / max(n, 1)
    expected = None
    if macs is not None:
        if len(macs) != num_exits:
            raise ValueError(f"macs has {len(macs)} entries for {num_exits} exits")
        expected = float((counts.double() / max(n, 1) * torch.tensor(list(macs), dtype=torch.float64)).sum())
    return ExitResult(accuracy, expected, counts, exit_index)


# ----------------------------------------------------------------------------- sweeps
@dataclass
class BudgetRow:
    """One point of the budgeted sweep (one q): the reference's ``dynamic.txt`` line plus context."""

    q: float
    target_fractions: List[float]
    thresholds: List[float]
    fit_accuracy: float
    test_accuracy: float
    expected_macs: Optional[float]
    exit_fractions: List[float]  # realised on the test split
    fit_expected_macs: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


def budgeted_evaluation(
    fit_logits: LogitsLike,
    fit_labels: torch.Tensor,
    test_logits: LogitsLike,
    test_labels: torch.Tensor,
    macs: Optional[Sequence[float]] = None,
    *,
    points: int = 40,
    qs: Optional[Sequence[float]] = None,
    from_probs: bool = False,
    chunk_size: int = 16384,
) -> List[BudgetRow]:
    """The reference's dynamic evaluation: fit thresholds on ``fit_*``, apply them to ``test_*``, per q.

    Args:
        fit_logits / test_logits: ``[K, N, C]`` (or lists of ``[N, C]``) logits, or probabilities with
            ``from_probs=True``.  The fit split is the hold-out (docs/method.md §5 ``--use-valid``); without one
            the reference fits on the test set itself.
        fit_labels / test_labels: ``[N_fit]`` / ``[N_test]``.
        macs: cumulative per-exit MACs ``[K]`` (docs/method.md §8), e.g. from ``imta_fast.flops``.
        points: size of the ``q = p/20`` grid (40 as IMTA, 39 as MSD); ignored when ``qs`` is given.

    Returns:
        One :class:`BudgetRow` per q, in sweep order.
    """
    fit_conf, fit_pred = confidences_and_predictions(fit_logits, from_probs=from_probs, chunk_size=chunk_size)
    test_conf, test_pred = confidences_and_predictions(test_logits, from_probs=from_probs, chunk_size=chunk_size)
    num_exits = fit_conf.shape[0]
    if test_conf.shape[0] != num_exits:
        raise ValueError(f"fit split has {num_exits} exits, test split {test_conf.shape[0]}")
    sorted_conf, order = fit_conf.sort(dim=1, descending=True)  # once for the whole sweep
    rows = []
    for q in qs if qs is not None else budget_sweep(num_exits, points):
        fractions = exit_fractions(q, num_exits)
        thr = _fit_sorted(fit_conf, sorted_conf, order, fractions.to(fit_conf.device))
        fit = apply_thresholds(fit_conf, fit_pred, fit_labels, thr, macs)
        test = apply_thresholds(test_conf, test_pred, test_labels, thr, macs)
        n_test = max(test_conf.shape[1], 1)
        rows.append(BudgetRow(
            q=float(q),
            target_fractions=fractions.tolist(),
            thresholds=thr.tolist(),
            fit_accuracy=fit.accuracy,
            test_accuracy=test.accuracy,
            expected_macs=test.expected_macs,
            exit_fractions=(test.exit_counts.double() / n_test).tolist(),
            fit_expected_macs=fit.expected_macs,
        ))
    return rows


@torch.no_grad()
def anytime_accuracy(logits: LogitsLike, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> Dict[int, List[float]]:
    """Per-exit top-k accuracy in percent (the anytime protocol, docs/method.md §6).

    Args:
        logits: ``[K, N, C]`` or a list of K ``[N, C]``; labels: ``[N]``.
        topk: the k values; each is clipped to C.

    Returns:
        ``{k: [acc_exit_1, ..., acc_exit_K]}``.
    """
    per_exit = list(logits) if not isinstance(logits, torch.Tensor) else list(logits.unbind(0))
    out: Dict[int, List[float]] = {k: [] for k in topk}
    for z in per_exit:
        maxk = min(max(topk), z.shape[-1])
        top = z.topk(maxk, dim=-1).indices
        hit = top == labels.to(top.device)[:, None]
        n = max(z.shape[0], 1)
        for k in topk:
            out[k].append(100.0 * hit[:, : min(k, maxk)].any(dim=1).sum().item() / n)
    return out
