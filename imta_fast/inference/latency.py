"""Latency model of the early-exit evaluator: measured stage costs, predicted time per image, and
thresholds for a wall-clock budget (docs/method.md §13).

Cost model (per batch of ``B`` images; stage ``k`` computes ``r_k`` rows)::

    T_batch = batch_overhead_ms + Σ_{k : r_k > 0} [ c_k(r_k) + g_k(r_{k+1}) ]

``c_k`` is stage ``k``'s compute (with its exit decision), ``g_k`` the compaction of the survivors into
stage ``k+1``'s input, charged by the rows gathered (0 when nothing is gathered: nobody left, nobody
stayed, or the rows did not change).  Charging the compaction by the rows *entering* stage ``k`` (as a
no-exit profile measures it) over-predicted budgets with many early exits by up to ~15 % on CPU.

``r_k`` is the row count the executor really computes for the ``m_k`` samples active at stage ``k``:
:func:`imta_fast.inference.buckets.resolve_bucket` (buckets, ``min_rows``) -- the very function the
executor calls, so prediction and execution use the same shapes (tested).  ``t_k(r)`` is either a
line ``overhead_ms[k] + per_image_ms[k]·r`` or, when the costs were measured at several row counts,
the piecewise-linear interpolation of the measured medians (extrapolated with the end segments);
``g_k`` likewise from the profiles' compaction times (``t_k = c_k + g_k`` when all rows are gathered).
Stage 0 includes the stem and the input padding; each stage's time includes its head, the confidence
and the compaction of its survivors, exactly what the evaluator times.  ``batch_overhead_ms`` is the
rest of a call measured from outside (output allocation, bookkeeping).

Honest limits: the measurement is as good as the machine is quiet; a GPU under-used by a small active
batch is only approximated by the interpolation; per-stage host syncs and launches sit in the costs.
"""
from __future__ import annotations

import bisect
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from imta_fast.inference.buckets import Buckets, normalize_buckets, resolve_bucket
from imta_fast.inference.timing import TimingStats
from imta_fast.inference.protocol import _fit_sorted, apply_thresholds, budget_sweep, exit_fractions

__all__ = [
    "StageCosts",
    "active_counts",
    "stage_rows",
    "predict_latency",
    "predict_batches_ms",
    "LatencyFit",
    "fit_latency_budget",
    "measure_stage_costs",
    "measure_costs_and_time",
]

_SAME = object()  # "use the buckets recorded in the costs"


@dataclass
class StageCosts:
    """Measured costs of the batched early-exit evaluator (see the module docstring).

    Attributes:
        batch_size: the serving batch size the costs were measured for.
        per_image_ms / overhead_ms: ``[K]`` slope and intercept of the line model.
        buckets / min_rows: the evaluator's row rounding when measured (used by the predictions).
        table_rows / table_ms: optional measured row counts (ascending) and ``[K][len(table_rows)]``
            median stage times: when present, ``t_k`` interpolates them.
        batch_overhead_ms: per-call time outside the stages.
        gather_table_ms: optional ``[K][len(table_rows)]`` median compaction times (part of ``table_ms``),
            gathering that many rows; without it the compaction stays inside ``t_k(r_k)``.
    """

    batch_size: int
    per_image_ms: List[float]
    overhead_ms: List[float]
    device: str = "cpu"
    measured_batch_sizes: List[int] = field(default_factory=list)
    buckets: Buckets = None
    min_rows: int = 2
    table_rows: List[int] = field(default_factory=list)
    table_ms: List[List[float]] = field(default_factory=list)
    batch_overhead_ms: float = 0.0
    gather_table_ms: List[List[float]] = field(default_factory=list)

    @property
    def num_exits(self) -> int:
        return len(self.per_image_ms)

    def _interp(self, ys: Sequence[float], rows: int) -> float:
        xs = self.table_rows
        if len(xs) == 1:
            return ys[0] * rows / xs[0]
        i = min(max(bisect.bisect_left(xs, rows), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(y0 + (y1 - y0) * (rows - x0) / (x1 - x0), 0.0)

    def stage_ms(self, k: int, rows: int) -> float:
        """Predicted time of stage ``k`` computing ``rows`` rows and gathering all of them (what a
        no-exit profile measures; 0 rows cost nothing)."""
        if rows <= 0:
            return 0.0
        if self.table_rows:
            return self._interp(self.table_ms[k], rows)
        return self.overhead_ms[k] + self.per_image_ms[k] * rows

    def gather_ms(self, k: int, rows: int) -> float:
        """Predicted compaction time after stage ``k`` gathering ``rows`` rows (0 without a gather table)."""
        if rows <= 0 or not self.gather_table_ms or not self.table_rows:
            return 0.0
        return self._interp(self.gather_table_ms[k], rows)

    def compute_ms(self, k: int, rows: int) -> float:
        """Predicted time of stage ``k`` on ``rows`` rows without its compaction."""
        return max(self.stage_ms(k, rows) - self.gather_ms(k, rows), 0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["buckets"], tuple):
            d["buckets"] = list(d["buckets"])
        return d


def active_counts(exit_index: torch.Tensor, num_exits: int) -> List[int]:
    """Samples entering each stage, given each sample's 0-based exit: ``m_k = #{exit ≥ k}``."""
    counts = torch.bincount(exit_index.reshape(-1).cpu(), minlength=num_exits).tolist()
    out, left = [], int(exit_index.numel())
    for c in counts[:num_exits]:
        out.append(left)
        left -= c
    return out


def stage_rows(active: Sequence[int], buckets: Buckets, min_rows: int, batch_size: Optional[int] = None) -> List[int]:
    """Rows each stage computes for ``active`` samples per stage -- the executor's rounding
    (:func:`~imta_fast.inference.buckets.resolve_bucket`), batch size = ``active[0]`` by default."""
    b = batch_size if batch_size is not None else (active[0] if active else 0)
    return [resolve_bucket(int(m), buckets, min_rows, b) for m in active]


def _batch_ms(active: Sequence[int], costs: StageCosts, buckets: Buckets, min_rows: int, batch_size: int) -> float:
    rows = stage_rows(active, buckets, min_rows, batch_size)
    total = costs.batch_overhead_ms  # (without a gather table, compute_ms = stage_ms and gather_ms = 0)
    for k, r in enumerate(rows):
        if r <= 0:
            break
        total += costs.compute_ms(k, r)
        nxt = rows[k + 1] if k + 1 < len(rows) else 0
        # the evaluator gathers only when someone stays and the active set or its row count changed
        if nxt > 0 and (active[k + 1] != active[k] or nxt != r):
            total += costs.gather_ms(k, nxt)
    return total


def predict_latency(
    fractions: Union[torch.Tensor, Sequence[float]],
    costs: StageCosts,
    *,
    batch_size: Optional[int] = None,
    buckets: Buckets = _SAME,
    min_rows: Optional[int] = None,
) -> float:
    """Predicted ms per image for realised exit fractions ``[K]`` (sum 1) at ``batch_size``
    (default: the measured one).  ``buckets`` / ``min_rows`` default to the ones in ``costs``."""
    frac = [float(v) for v in (fractions.tolist() if isinstance(fractions, torch.Tensor) else fractions)]
    if len(frac) != costs.num_exits:
        raise ValueError(f"{len(frac)} exit fractions for {costs.num_exits} stages")
    b = batch_size or costs.batch_size
    buckets = costs.buckets if buckets is _SAME else normalize_buckets(buckets)
    min_rows = costs.min_rows if min_rows is None else min_rows
    active, left = [], 1.0
    for f in frac:
        active.append(math.ceil(left * b - 1e-9))
        left = max(left - f, 0.0)
    return _batch_ms(active, costs, buckets, min_rows, b) / b


def predict_batches_ms(exit_index: torch.Tensor, costs: StageCosts, batch_size: int, *,
                       buckets: Buckets = _SAME, min_rows: Optional[int] = None) -> float:
    """Predicted ms per image of a whole split run in consecutive batches of ``batch_size``, from
    each sample's exit (the last batch may be smaller): the shapes the evaluator will run, exactly."""
    buckets = costs.buckets if buckets is _SAME else normalize_buckets(buckets)
    min_rows = costs.min_rows if min_rows is None else min_rows
    n = exit_index.numel()
    total = 0.0
    for chunk in exit_index.reshape(-1).split(batch_size):
        total += _batch_ms(active_counts(chunk, costs.num_exits), costs, buckets, min_rows, chunk.numel())
    return total / max(n, 1)


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
    buckets: Buckets = _SAME,
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
        buckets: override the buckets recorded in ``costs``.
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_stage_costs(
    evaluator,
    x: torch.Tensor,
    *,
    batch_sizes: Optional[Sequence[int]] = None,
    repeats: int = 5,
    warmup: int = 2,
) -> StageCosts:
    """Per-stage cost model of ``evaluator`` (an :class:`~imta_fast.inference.evaluator.EarlyExitEvaluator`)
    for :func:`predict_latency` / :func:`fit_latency_budget`.

    Runs :meth:`~imta_fast.inference.evaluator.EarlyExitEvaluator.profile` (no exits; every stage
    compacts) at each batch size (default ``B`` and ``B//4``), sizes interleaved within each repeat,
    every shape warmed up first; takes the median time of each stage.  Records the line through the
    largest and smallest size (coefficients clipped at 0) and, with two or more sizes, the table of
    medians by computed rows that :meth:`StageCosts.stage_ms` interpolates.
    """
    return measure_costs_and_time(evaluator, x, None, batch_sizes=batch_sizes, repeats=repeats, warmup=warmup)[0]


@torch.no_grad()
def measure_costs_and_time(
    evaluator,
    x: torch.Tensor,
    contenders: Optional[Mapping[str, Callable[[], object]]] = None,
    *,
    batch_sizes: Optional[Sequence[int]] = None,
    repeats: int = 5,
    warmup: int = 1,
) -> Tuple[StageCosts, Dict[str, TimingStats]]:
    """:func:`measure_stage_costs` with the profiling runs interleaved among timed ``contenders``
    (:func:`~imta_fast.inference.timing.time_interleaved`), so the cost model and the wall clock it
    predicts are measured under the same conditions (a shared machine's load drifts).  Returns the
    costs and the contenders' :class:`~imta_fast.inference.timing.TimingStats`."""
    from imta_fast.inference.timing import time_interleaved

    K, B = evaluator.num_exits, x.shape[0]
    sizes = sorted({int(b) for b in (batch_sizes or (B, max(1, B // 4)))}, reverse=True)
    if sizes[0] > B:
        raise ValueError(f"batch size {sizes[0]} exceeds the {B} samples given")
    per_size = {b: [] for b in sizes}
    outer: List[float] = []

    def profiler(b):
        def run():
            t0 = time.perf_counter()
            r = evaluator.profile(x[:b])
            _sync(x.device)
            outer.append(1e3 * (time.perf_counter() - t0) - r.total_ms)
            per_size[b].append(r)
        return run

    fns: Dict[object, Callable[[], object]] = dict(contenders or {})
    for b in sizes:
        fns[("profile", b)] = profiler(b)
    stats = time_interleaved(fns, repeats=repeats, warmup=warmup, device=x.device)
    for b in sizes:
        per_size[b] = per_size[b][warmup:]
    outer = outer[warmup * len(sizes):]
    points = [(per_size[b][0].computed, [statistics.median(r.stage_ms[k] for r in per_size[b]) for k in range(K)],
               [statistics.median(r.gather_ms[k] for r in per_size[b]) for k in range(K)])
              for b in sizes]
    slope, icpt = [], []
    for k in range(K):
        (r1, t1), (r2, t2) = (points[0][0][k], points[0][1][k]), (points[-1][0][k], points[-1][1][k])
        s = (t1 - t2) / (r1 - r2) if r1 != r2 else t1 / max(r1, 1)
        s = max(s, 0.0)
        slope.append(s)
        icpt.append(max(t1 - s * r1, 0.0) if r1 != r2 else 0.0)
    table_rows, table_ms, gather_ms = [], [[] for _ in range(K)], [[] for _ in range(K)]
    for rows, ms, gms in sorted(((p[0][0], p[1], p[2]) for p in points), key=lambda t: t[0]):
        if table_rows and rows == table_rows[-1]:
            continue
        table_rows.append(rows)
        for k in range(K):
            table_ms[k].append(ms[k])
            gather_ms[k].append(min(gms[k], ms[k]))
    buckets = evaluator.buckets
    costs = StageCosts(batch_size=sizes[0], per_image_ms=slope, overhead_ms=icpt, device=str(x.device),
                       measured_batch_sizes=sizes, buckets=list(buckets) if isinstance(buckets, (list, tuple)) else buckets,
                       min_rows=evaluator.min_rows, table_rows=table_rows if len(table_rows) >= 2 else [],
                       table_ms=table_ms if len(table_rows) >= 2 else [],
                       batch_overhead_ms=max(statistics.median(outer), 0.0),
                       gather_table_ms=gather_ms if len(table_rows) >= 2 else [])
    return costs, {name: st for name, st in stats.items() if not (isinstance(name, tuple) and name[0] == "profile")}
