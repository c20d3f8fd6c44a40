"""Budgeted (dynamic) early-exit protocol of MSDNet/IMTA, vectorised (spec §6, §8, §9.1 items 9/14/17).

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
  (blocks 1..k and heads 1..k, spec §8).

The reference caches the logits and reuses the cache blindly even after the checkpoint changed
(spec §9.1 item 9); :func:`cached_logits` keys the cache on :func:`cache_key` (checkpoint hash +
split/transform context) and recomputes on mismatch.

On top of the reference, :func:`fit_latency_budget` picks thresholds for a wall-clock budget from
measured per-stage costs (see :class:`StageCosts` for the cost model and its limits).

Conventions: confidences are float32 (as the reference's stored softmax); thresholds are compared in
the confidences' dtype; exit indices are 0-based (exit k ↔ ``exit_index == k-1``).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from imta_fast.fileio import atomic_torch_save

__all__ = [
    "EXIT_NEVER",
    "EXIT_ALWAYS",
    "exit_fractions",
    "budget_sweep",
    "max_softmax",
    "confidences_and_predictions",
    "fit_thresholds",
    "exit_indices",
    "apply_thresholds",
    "ExitResult",
    "BudgetRow",
    "budgeted_evaluation",
    "anytime_accuracy",
    "StageCosts",
    "predict_latency",
    "LatencyFit",
    "fit_latency_budget",
    "cache_key",
    "cached_logits",
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
    inclusive ``torch.range``; spec §9.1 item 14), so that ``floor(N·π_k)`` agrees with it at the
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
            when ``from_probs``; the reference caches softmax probabilities, spec §6 step 1).
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
    correct = pred == labels.to(pred.device)
    counts = torch.bincount(idx, minlength=num_exits).cpu()
    accuracy = 100.0 * correct.sum().item() / max(n, 1)
    expected = None
    if macs is not None:
        if len(macs) != num_exits:
            raise ValueError(f"macs has {len(macs)} entries for {num_exits} exits")
        expected = float((counts.double() / max(n, 1) * torch.tensor(list(macs), dtype=torch.float64)).sum())
    return ExitResult(accuracy, expected, counts, idx)


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
            ``from_probs=True``.  The fit split is the hold-out (spec §5 ``--use-valid``); without one
            the reference fits on the test set itself.
        fit_labels / test_labels: ``[N_fit]`` / ``[N_test]``.
        macs: cumulative per-exit MACs ``[K]`` (spec §8), e.g. from ``imta_fast.flops``.
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
    """Per-exit top-k accuracy in percent (the anytime protocol, spec §6).

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


# ----------------------------------------------------------------------------- latency budgets
@dataclass
class StageCosts:
    """Measured costs of the batched early-exit evaluator, for :func:`predict_latency`.

    Cost model (per batch of ``batch_size`` images, stage ``k`` entered by ``m_k`` rows)::

        T_batch = Σ_{k : m_k > 0} ( overhead_ms[k] + per_image_ms[k] · m_k )

    so the latency per image is ``Σ_k a_k·per_image_ms[k] + [a_k > 0]·overhead_ms[k]/batch_size``
    with ``a_k = m_k / batch_size`` the fraction of samples still active at stage k.  Stage 0
    includes the stem; each stage's time includes its head, the confidence, and the compaction of
    the survivors, exactly what the evaluator times.  ``per_image_ms`` and ``overhead_ms`` are the
    slope and intercept of a line fitted to stage times at two batch sizes
    (``imta_fast.inference.evaluator.measure_stage_costs``).

    Honest limits: the line is exact only between the measured batch sizes; on a GPU a small active
    batch under-uses the device, which the intercept absorbs only approximately; with batch-size
    buckets the rows computed are the bucket size, not ``m_k`` (pass ``buckets`` to
    :func:`predict_latency`); the per-stage host sync and launch latency sit in the intercept.
    """

    batch_size: int
    per_image_ms: List[float]
    overhead_ms: List[float]
    device: str = "cpu"
    measured_batch_sizes: List[int] = field(default_factory=list)

    @property
    def num_exits(self) -> int:
        return len(self.per_image_ms)

    def to_dict(self) -> dict:
        return asdict(self)


def _bucket_rows(m: int, buckets: Optional[Sequence[int]]) -> int:
    if not buckets or m == 0:
        return m
    fitting = [b for b in sorted(buckets) if b >= m]
    return fitting[0] if fitting else m


def predict_latency(
    fractions: Union[torch.Tensor, Sequence[float]],
    costs: StageCosts,
    *,
    batch_size: Optional[int] = None,
    buckets: Optional[Sequence[int]] = None,
) -> float:
    """Predicted ms per image for given realised exit fractions ``[K]`` (see :class:`StageCosts`).

    Args:
        fractions: realised fraction of samples leaving at each exit (sums to 1).
        batch_size: the serving batch size (default: the one the costs were measured at).
        buckets: batch-size buckets of the evaluator, if it pads the active batch.
    """
    frac = [float(v) for v in (fractions.tolist() if isinstance(fractions, torch.Tensor) else fractions)]
    if len(frac) != costs.num_exits:
        raise ValueError(f"{len(frac)} exit fractions for {costs.num_exits} stages")
    b = batch_size or costs.batch_size
    total, active = 0.0, 1.0
    for k in range(costs.num_exits):
        rows = _bucket_rows(math.ceil(active * b - 1e-9), buckets)
        if rows > 0:
            total += costs.per_image_ms[k] * rows / b + costs.overhead_ms[k] / b
        active = max(active - frac[k], 0.0)
    return total


@dataclass
class LatencyFit:
    """Result of :func:`fit_latency_budget`.

    ``feasible`` is False when no candidate meets the budget; the cheapest candidate is returned then.
    ``candidates`` lists ``(q, predicted_ms, accuracy)`` of every threshold set considered.
    """

    q: Optional[float]
    thresholds: torch.Tensor
    predicted_ms: float
    accuracy: float
    exit_fractions: List[float]
    feasible: bool
    budget_ms: float
    candidates: List[Tuple[Optional[float], float, float]]


def _latency_grid(num_exits: int) -> List[float]:
    # The reference's p/20 sweep plus a geometric grid reaching further towards "everything at the
    # first exit" (q -> 0) and "everything at the last exit" (q -> inf).
    grid = set(budget_sweep(num_exits, 40))
    grid.update(float(v) for v in torch.logspace(-2, 2, 81, dtype=torch.float64).tolist())
    return sorted(grid)


def fit_latency_budget(
    confidences: torch.Tensor,
    predictions: torch.Tensor,
    labels: torch.Tensor,
    costs: StageCosts,
    budget_ms: float,
    *,
    qs: Optional[Sequence[float]] = None,
    batch_size: Optional[int] = None,
    buckets: Optional[Sequence[int]] = None,
) -> LatencyFit:
    """Thresholds for a wall-clock budget (ms per image) from measured stage costs.

    For every candidate threshold set (the reference fitting at each q of a fixed geometric grid,
    plus the two extremes "all exit first" and "full network") the realised exit fractions on the
    hold-out split give a predicted latency (:func:`predict_latency`); among candidates whose
    prediction is ``≤ budget_ms`` the most accurate on the hold-out split wins (ties: the cheaper).
    Because the candidate set does not depend on the budget, the chosen accuracy is monotone
    non-decreasing in ``budget_ms``.

    Args:
        confidences / predictions: ``[K, N]`` on the hold-out (fit) split; labels: ``[N]``.
        costs: :class:`StageCosts` measured with the evaluator that will serve the thresholds.
        budget_ms: target mean latency per image at ``batch_size`` (default ``costs.batch_size``).
        qs: the q grid (default: the p/20 sweep ∪ 81 log-spaced q in [0.01, 100]).
        buckets: the evaluator's batch-size buckets, if any.

    Returns:
        :class:`LatencyFit`.
    """
    num_exits, _ = confidences.shape
    sorted_conf, order = confidences.sort(dim=1, descending=True)
    first_only = torch.zeros(num_exits)
    first_only[0] = 1.0
    cand_fracs: List[Tuple[Optional[float], torch.Tensor]] = [(None, first_only), (None, torch.zeros(num_exits))]
    cand_fracs += [(float(q), exit_fractions(q, num_exits)) for q in (qs if qs is not None else _latency_grid(num_exits))]
    best = cheapest = None
    seen = []
    for q, fractions in cand_fracs:
        thr = _fit_sorted(confidences, sorted_conf, order, fractions.to(confidences.device))
        res = apply_thresholds(confidences, predictions, labels, thr)
        realised = (res.exit_counts.double() / max(confidences.shape[1], 1)).tolist()
        ms = predict_latency(realised, costs, batch_size=batch_size, buckets=buckets)
        cand = (q, thr, ms, res.accuracy, realised)
        seen.append((q, ms, res.accuracy))
        if cheapest is None or ms < cheapest[2]:
            cheapest = cand
        if ms <= budget_ms and (best is None or (res.accuracy, -ms) > (best[3], -best[2])):
            best = cand
    chosen, feasible = (best, True) if best is not None else (cheapest, False)
    q, thr, ms, acc, realised = chosen
    return LatencyFit(q, thr, ms, acc, realised, feasible, float(budget_ms), seen)


# ----------------------------------------------------------------------------- logits cache
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
    atomically (tmp file + ``os.replace``).  An unreadable cache file is recomputed, not an error."""
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
