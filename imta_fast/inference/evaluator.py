"""Batched early-exit evaluator that really exits early (the reference only simulates it,
docs/method.md §1.5, §9.1 item 17, §13).

A batch runs stage by stage on a :class:`~imta_fast.inference.executor.StageExecutor`.  After stage
``k`` every active sample with confidence ``conf ≥ τ_k`` leaves with its argmax and exit index
``k``; the state of the others is compacted (the executor's ``gather``) before stage ``k+1``.  The
last stage takes everyone left.

Parity with the simulated protocol (:func:`imta_fast.inference.protocol.apply_thresholds` on
full-network logits) holds sample by sample as long as each sample's logits do not depend on the
batch it is computed in.  Eval-mode BN makes samples independent, but the BLAS is not bit-invariant
to the batch: a single row goes to GEMV (hence ``min_rows=2``), and for some Linear shapes a row's
result depends on its position in the batch or on the number of rows (tail-block kernels; CPU logits
differ by 1-2 ulp below ~16 rows for some shapes).  Fitted thresholds sit exactly on one sample's
confidence, so a 1-ulp change can flip that sample.  What is tested (CPU fp32, torch 2.14): MSDNet
tiny/mnist with the batch sizes and buckets of ``tests/inference/test_evaluator.py`` give identical
confidences, exits and predictions; that is not a promise for every batch size.  Exits agree except
for samples sitting exactly on a threshold; on GPU cuDNN/cuBLAS pick kernels per batch size and a
few near-threshold samples may flip.

One host sync per stage (the number of survivors, needed to size the next stage); per-stage times
use CUDA events (perf_counter on CPU) read once at the end of the batch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from imta_fast.inference.buckets import Buckets, resolve_bucket
from imta_fast.inference.executor import StageExecutor, StageTimer
from imta_fast.inference.protocol import EXIT_ALWAYS, EXIT_NEVER, score_exits

__all__ = ["EarlyExitBatch", "EvalReport", "EarlyExitEvaluator", "resolve_bucket", "no_exit_thresholds"]


@dataclass
class EarlyExitBatch:
    """Output of :meth:`EarlyExitEvaluator.__call__` for a batch of B samples.

    Attributes:
        predictions / exit_index: ``[B]`` int64 on the input's device (exit index is 0-based).
        confidence: ``[B]`` float32, max softmax probability at the exit taken.
        stage_ms: ``[K]`` wall time of each stage (stage 0 includes the stem and the input padding;
            each stage includes its confidence and the compaction of its survivors); 0 for stages
            no sample reached.
        gather_ms: ``[K]`` the part of ``stage_ms`` spent compacting the survivors for the next stage
            (0 when nothing was gathered); the latency model charges it by the rows gathered.
        active: ``[K]`` samples entering each stage; computed: ``[K]`` rows computed (with padding).
        total_ms: sum of ``stage_ms`` (output allocation excluded: time whole calls from outside,
            :mod:`imta_fast.inference.timing`, to compare with another configuration).
    """

    predictions: torch.Tensor
    exit_index: torch.Tensor
    confidence: torch.Tensor
    stage_ms: List[float]
    active: List[int]
    computed: List[int]
    total_ms: float
    gather_ms: List[float] = field(default_factory=list)


@dataclass
class EvalReport:
    """Aggregate of :meth:`EarlyExitEvaluator.evaluate` over a loader.

    ``ms_per_image`` is the evaluator's stage time only (no data loading), summed over batches / N.
    ``expected_macs`` is the protocol's ``Σ_k (n_exit_k/N)·F_k`` (:func:`~imta_fast.inference.protocol.score_exits`)
    when ``macs`` was given.
    """

    num_samples: int
    accuracy: float
    exit_counts: List[int]
    expected_macs: Optional[float]
    ms_per_image: float
    stage_ms: List[float]
    active: List[int]
    predictions: torch.Tensor = field(repr=False)
    exit_index: torch.Tensor = field(repr=False)
    computed: List[int] = field(default_factory=list)


def no_exit_thresholds(num_exits: int, device=None) -> torch.Tensor:
    """Thresholds under which every sample runs every stage (profiling the full cost of each stage)."""
    tau = torch.full((num_exits,), EXIT_NEVER, device=device)
    tau[-1] = EXIT_ALWAYS
    return tau


class EarlyExitEvaluator:
    """Batched early-exit inference for any model with the stage protocol
    (``num_exits``, ``forward_stem(x) -> state``, ``forward_stage(k, state) -> (state, logits)``).

    Args:
        model: in eval mode.
        thresholds: ``[K]`` default thresholds (:func:`imta_fast.inference.protocol.fit_thresholds`);
            can be overridden per call.
        timing: record per-stage times (one extra sync at the end of each batch on CUDA).
        executor: a ready :class:`StageExecutor` (then the execution options below must be left out).
        **execution: :class:`StageExecutor` options: ``buckets``, ``compile``, ``compile_backend``,
            ``compile_mode``, ``cuda_graphs``, ``amp_dtype``, ``channels_last``, ``min_rows``, ``fold_bn``,
            ``micro_batch`` (``'auto'``: CPU stages in cache-sized row chunks, much faster at B = 1024).

    Example:
        >>> ev = EarlyExitEvaluator(model.eval(), thresholds)
        >>> out = ev(images)            # out.predictions, out.exit_index, out.stage_ms, out.active
    """

    def __init__(self, model: nn.Module, thresholds: Optional[torch.Tensor] = None, *, timing: bool = True,
                 executor: Optional[StageExecutor] = None, **execution):
        if model.training:
            warnings.warn("EarlyExitEvaluator: model is in train mode; call model.eval() first", stacklevel=2)
        if executor is not None and execution:
            raise ValueError(f"pass either an executor or execution options ({', '.join(execution)}), not both")
        self.model = model
        self.executor = executor if executor is not None else StageExecutor(model, **execution)
        self.num_exits = self.executor.num_stages
        self.timing = timing
        self.thresholds = thresholds

    # configuration views (read-only; configure through the executor)
    @property
    def buckets(self) -> Buckets:
        return self.executor.buckets

    @property
    def min_rows(self) -> int:
        return self.executor.min_rows

    @property
    def thresholds(self) -> Optional[torch.Tensor]:
        """Default ``[K]`` float32 thresholds (CPU copy); settable."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value) -> None:
        self._thresholds = None if value is None else torch.as_tensor(value, dtype=torch.float32).detach().cpu()
        if self._thresholds is not None and self._thresholds.shape != (self.num_exits,):
            raise ValueError(f"expected {self.num_exits} thresholds, got shape {tuple(self._thresholds.shape)}")
        self._tau_cache: Dict[torch.device, torch.Tensor] = {}

    def _tau(self, thresholds: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        if thresholds is None:
            if self.thresholds is None:
                raise ValueError("no thresholds: pass them to the constructor or the call")
            if device not in self._tau_cache:
                self._tau_cache[device] = self._thresholds.to(device)
            return self._tau_cache[device]
        tau = torch.as_tensor(thresholds, dtype=torch.float32).to(device)
        if tau.shape != (self.num_exits,):
            raise ValueError(f"expected {self.num_exits} thresholds, got shape {tuple(tau.shape)}")
        return tau

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def __call__(self, x: torch.Tensor, thresholds: Optional[torch.Tensor] = None) -> EarlyExitBatch:
        """Run a batch ``x`` ``[B, ...]`` with early exits.  See :class:`EarlyExitBatch`.

        ``thresholds`` overrides the default ones for this call; pass them on ``x``'s device (a CPU
        tensor costs a host-to-device copy per call; the default thresholds are cached per device)."""
        return self._exit_loop(x, self._tau(thresholds, x.device), force_compact=False, timing=self.timing)

    @torch.no_grad()
    def profile(self, x: torch.Tensor, thresholds: Optional[torch.Tensor] = None) -> EarlyExitBatch:
        """The profiling entry point: a timed run in which every stage compacts its survivors even
        when all stay (so a no-exit run, :func:`no_exit_thresholds`, costs each stage what it
        costs in a real early-exit run).  Default thresholds: no exit before the last stage."""
        tau = no_exit_thresholds(self.num_exits, x.device) if thresholds is None else self._tau(thresholds, x.device)
        return self._exit_loop(x, tau, force_compact=True, timing=True)

    def _exit_loop(self, x: torch.Tensor, tau: torch.Tensor, force_compact: bool, timing: bool) -> EarlyExitBatch:
        ex = self.executor
        device, n, K = x.device, x.shape[0], self.num_exits
        batch = n
        preds = torch.zeros(n, dtype=torch.long, device=device)
        exits = torch.full((n,), K - 1, dtype=torch.long, device=device)
        confs = torch.zeros(n, dtype=torch.float32, device=device)
        active, computed = [0] * K, [0] * K
        timer = StageTimer(device, timing)
        if n == 0:
            return EarlyExitBatch(preds, exits, confs, [0.0] * K, active, computed, 0.0, [0.0] * K)
        ex.begin_batch()
        timer.mark()  # then two marks per stage reached: computed (+ exit decision), compacted
        ids = torch.arange(n, device=device)  # original sample index of each valid row
        state, rows = ex.prepare(x)
        for k in range(K):
            active[k], computed[k] = n, rows
            state, conf, pred = ex.run(k, state, device)
            # Write every active row's result; rows that stay are overwritten by a later stage.
            # (Rows >= n are padding and are dropped here.)
            preds.index_copy_(0, ids, pred[:n])
            confs.index_copy_(0, ids, conf[:n])
            exits.index_fill_(0, ids, k)
            if k == K - 1:
                timer.mark()
                timer.repeat()  # no compaction after the last stage
                break
            stay = ~(conf >= tau[k])  # same comparison as apply_thresholds (NaN confidence stays)
            if rows != n:
                stay &= torch.arange(rows, device=device) < n
            order = torch.argsort((~stay).to(torch.int32), stable=True)  # survivors first, in order
            n_stay = int(stay.sum())  # the one host sync of this stage
            timer.mark()
            if n_stay == 0:
                timer.repeat()
                break
            new_rows = ex.rows(n_stay, batch)
            if n_stay != n:
                ids = ids.index_select(0, order[:n_stay])
            if force_compact or n_stay != n or new_rows != rows:
                # order[:new_rows]: survivors, then (as padding) rows that left or were padding.
                state = ex.gather(k + 1, state, order[:new_rows])
            n, rows = n_stay, new_rows
            timer.mark()
        ms = timer.intervals_ms()
        compute_ms, gather_ms = ms[0::2], ms[1::2]
        stage_ms = ([c + g for c, g in zip(compute_ms, gather_ms)] + [0.0] * K)[:K]
        gather_ms = (gather_ms + [0.0] * K)[:K]
        return EarlyExitBatch(preds, exits, confs, stage_ms, active, computed, float(sum(ms)), gather_ms)

    @torch.no_grad()
    def full_network(self, x: torch.Tensor) -> torch.Tensor:
        """Every stage on the whole batch with the same executor (compiled / graphed stages, padding),
        no exit logic: the baseline for wall-clock speedups.  Returns last-exit predictions ``[B]``."""
        return self.executor.full_network(x)

    @torch.no_grad()
    def evaluate(
        self,
        batches: Iterable,
        *,
        device: Optional[torch.device] = None,
        thresholds: Optional[torch.Tensor] = None,
        macs: Optional[Sequence[float]] = None,
    ) -> EvalReport:
        """Run over ``(images, labels)`` batches; aggregate accuracy, exits, time and expected MACs
        (scored by the protocol's own :func:`~imta_fast.inference.protocol.score_exits`)."""
        preds, exits, labels = [], [], []
        stage_ms, active, computed = [0.0] * self.num_exits, [0] * self.num_exits, [0] * self.num_exits
        total_ms = 0.0
        for x, y in batches:
            if device is not None:
                x = x.to(device, non_blocking=True)
            out = self(x, thresholds)
            preds.append(out.predictions)
            exits.append(out.exit_index)
            labels.append(y.to(out.predictions.device, non_blocking=True))
            stage_ms = [a + b for a, b in zip(stage_ms, out.stage_ms)]
            active = [a + b for a, b in zip(active, out.active)]
            computed = [a + b for a, b in zip(computed, out.computed)]
            total_ms += out.total_ms
        pred, exit_index, label = (torch.cat(t) if t else torch.zeros(0, dtype=torch.long) for t in (preds, exits, labels))
        n = pred.numel()
        score = score_exits(exit_index, pred, label, self.num_exits, macs)
        return EvalReport(
            num_samples=n,
            accuracy=score.accuracy,
            exit_counts=score.exit_counts.tolist(),
            expected_macs=score.expected_macs,
            ms_per_image=total_ms / max(n, 1),
            stage_ms=stage_ms,
            active=active,
            predictions=pred.cpu(),
            exit_index=exit_index.cpu(),
            computed=computed,
        )
