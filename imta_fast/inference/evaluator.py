"""Batched early-exit evaluator that really exits early (the reference only simulates it, spec §1.5, §9.1 item 17).

A batch runs stage by stage.  Stage ``k`` is block ``k`` plus head ``k`` (stage 0 also runs the
stem), then the confidence (max softmax, :func:`imta_fast.inference.protocol.max_softmax`) of every
active sample.  Samples with ``conf ≥ τ_k`` leave with their argmax and exit index ``k``; the state
of the others is compacted (``index_select`` on every tensor leaf of the opaque state pytree)
before stage ``k+1``.  The last stage takes everyone left.

Given the same thresholds, exit indices and predictions equal the simulated protocol
(:func:`imta_fast.inference.protocol.apply_thresholds` on full-network logits) as long as each sample's
logits do not depend on the batch it is computed in.  Eval-mode BN guarantees that up to the last
bits of the BLAS: a single row goes to GEMV kernels (so a lone survivor is padded to ``min_rows=2``
rows), and for some Linear shapes a row's result depends on its position in the batch.  Fitted
thresholds sit exactly on one sample's confidence, so a 1-ulp change can flip that sample.  On CPU
fp32, MSDNet tiny/mnist are bit-identical (tested); on GPU, cuDNN/cuBLAS pick kernels per batch size
and a few near-threshold samples may flip (see ``tests/test_evaluator.py``).

Speed features (GPU), each with a way back to plain PyTorch:

- ``buckets``: pad the active batch up to the next bucket size (powers of two, or a user list), so
  each stage sees at most ``len(buckets)`` shapes; padded rows repeat valid rows (no NaN/inf from
  uninitialised memory), are never written to the outputs, and never survive a compaction.
- ``compile``: ``torch.compile`` per stage with ``dynamic=False`` (one graph per bucket); the dynamo
  recompile limit is raised to ``K × len(buckets)`` because the stages share one code object.
- ``cuda_graphs``: one ``torch.cuda.CUDAGraph`` per (stage, bucket) with static input buffers; the
  compaction writes straight into the next graph's static input (``index_select(out=)``).
  Alternatively ``compile_mode='reduce-overhead'`` uses inductor's own CUDA graphs.
- one host sync per stage (the number of survivors, needed to size the next stage); the per-stage
  timings use CUDA events (perf_counter on CPU) and are read once at the end of the batch.

On CPU, CUDA graphs are ignored and compile stays optional.
"""
from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from imta_fast.inference.protocol import EXIT_ALWAYS, EXIT_NEVER, StageCosts, max_softmax

__all__ = [
    "EarlyExitBatch",
    "EvalReport",
    "EarlyExitEvaluator",
    "resolve_bucket",
    "measure_stage_costs",
    "time_full_network",
]

Buckets = Union[None, str, Sequence[int]]


def resolve_bucket(n: int, buckets: Buckets, min_rows: int = 1) -> int:
    """Rows to compute for ``n`` active samples: ``n`` (no buckets), the next power of two
    (``'pow2'``), or the smallest listed bucket ``≥ n`` (``n`` itself beyond the largest); at least
    ``min_rows`` (0 stays 0)."""
    if n == 0:
        return 0
    m = max(n, min_rows)
    if buckets is None:
        return m
    if buckets == "pow2":
        return 1 << (m - 1).bit_length()
    fitting = [b for b in buckets if b >= m]
    return min(fitting) if fitting else m


def _empty_rows_like(t: torch.Tensor, rows: int) -> torch.Tensor:
    # index_select allocates contiguous outputs; keep channels_last activations channels_last.
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=fmt)


def _index_rows(t, idx: torch.Tensor):
    """Rows ``idx`` of every tensor leaf (dim 0); other leaves (None, ints) pass through."""
    if not isinstance(t, torch.Tensor):
        return t
    return torch.index_select(t, 0, idx, out=_empty_rows_like(t, idx.numel()))


@dataclass
class EarlyExitBatch:
    """Output of :meth:`EarlyExitEvaluator.__call__` for a batch of B samples.

    Attributes:
        predictions / exit_index: ``[B]`` int64 on the input's device (exit index is 0-based).
        confidence: ``[B]`` float32, max softmax probability at the exit taken.
        stage_ms: ``[K]`` wall time of each stage (stage 0 includes the stem; each stage includes its
            confidence and the compaction of its survivors); 0 for stages no sample reached.
        active: ``[K]`` samples entering each stage; computed: ``[K]`` rows computed (with padding).
        total_ms: wall time of the whole batch (input padding included).
    """

    predictions: torch.Tensor
    exit_index: torch.Tensor
    confidence: torch.Tensor
    stage_ms: List[float]
    active: List[int]
    computed: List[int]
    total_ms: float


@dataclass
class EvalReport:
    """Aggregate of :meth:`EarlyExitEvaluator.evaluate` over a loader.

    ``ms_per_image`` is evaluator time only (no data loading), summed over batches / N.
    ``expected_macs`` is the protocol's ``Σ_k (n_exit_k/N)·F_k`` when ``macs`` was given.
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


class _Timer:
    """Marks on the device's timeline: CUDA events (read after one sync) or perf_counter on CPU."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.marks: list = []

    def mark(self) -> None:
        if not self.enabled:
            return
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> List[float]:
        if len(self.marks) < 2:
            return []
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def _make_stage(model: nn.Module, k: int) -> Callable:
    """Stage ``k`` as a function of the state: (stem +) block k + head k + confidence."""

    def stage(state):
        if k == 0:
            state = model.forward_stem(state)
        state, logits = model.forward_stage(k, state)
        conf, pred = max_softmax(logits)
        return state, conf, pred

    return stage


def _raise_recompile_limit(n: int) -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6; set whichever exists
        try:
            if getattr(cfg, name) < n:
                setattr(cfg, name, n)
            return
        except AttributeError:
            continue


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    static_in: object
    static_out: tuple


class EarlyExitEvaluator:
    """Batched early-exit inference for any model with the stage protocol
    (``num_exits``, ``forward_stem(x) -> state``, ``forward_stage(k, state) -> (state, logits)``).

    Args:
        model: in eval mode (train-mode BN would couple samples and let padded rows leak in).
        thresholds: ``[K]`` default thresholds (:func:`imta_fast.inference.protocol.fit_thresholds`);
            can be overridden per call.
        buckets: ``None`` (exact active sizes), ``'pow2'``, or a list of batch sizes.  Defaults to
            ``'pow2'`` when ``compile`` or ``cuda_graphs`` is on, to bound recompiles / captures.
        compile: ``torch.compile`` each stage (``dynamic=False``; ``compile_backend``/``compile_mode``
            passed through).
        cuda_graphs: capture one CUDA graph per (stage, bucket) on first use (CUDA inputs only).
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``), or None for the model's dtype.
        channels_last: convert 4-D inputs to channels_last (the model should be converted too).
        timing: record per-stage times (one extra sync at the end of each batch on CUDA).
        min_rows: pad the active batch to at least this many rows (default 2).  BLAS libraries send
            a single row to GEMV kernels whose summation order differs from GEMM, so a lone survivor
            would get logits that differ in the last bits from its full-batch ones; with 2 rows the
            CPU results stay bit-identical (see the parity note in ``tests/test_evaluator.py``).

    Example:
        >>> ev = EarlyExitEvaluator(model.eval(), thresholds)
        >>> out = ev(images)            # out.predictions, out.exit_index, out.stage_ms, out.active
    """

    def __init__(
        self,
        model: nn.Module,
        thresholds: Optional[torch.Tensor] = None,
        *,
        buckets: Buckets = None,
        compile: bool = False,
        compile_backend: Union[str, Callable] = "inductor",
        compile_mode: Optional[str] = None,
        cuda_graphs: bool = False,
        amp_dtype: Optional[torch.dtype] = None,
        channels_last: bool = False,
        timing: bool = True,
        min_rows: int = 2,
    ):
        if model.training:
            warnings.warn("EarlyExitEvaluator: model is in train mode; call model.eval() first", stacklevel=2)
        if cuda_graphs and compile_mode == "reduce-overhead":
            raise ValueError("use either cuda_graphs=True or compile_mode='reduce-overhead', not both")
        self.model = model
        self.num_exits = int(model.num_exits)
        if buckets is None and (compile or cuda_graphs):
            buckets = "pow2"
        if buckets is not None and buckets != "pow2":
            buckets = sorted({int(b) for b in buckets})
            if not buckets or buckets[0] < 1:
                raise ValueError(f"buckets must be positive sizes, got {buckets}")
        self.buckets = buckets
        self.cuda_graphs = cuda_graphs
        self._compile_mode = compile_mode if compile else None
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        self.timing = timing
        self.min_rows = max(int(min_rows), 1)
        self.thresholds = thresholds
        stages = [_make_stage(model, k) for k in range(self.num_exits)]
        if compile:
            n_shapes = len(buckets) if isinstance(buckets, list) else 16  # pow2 up to 32768 rows
            _raise_recompile_limit(self.num_exits * n_shapes + 8)
            stages = [torch.compile(f, backend=compile_backend, mode=compile_mode, dynamic=False) for f in stages]
        self._stages = stages
        self._graphs: Dict[Tuple[int, int], _Graph] = {}
        self._pool = None

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

    # ------------------------------------------------------------------ helpers
    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype, cache_enabled=False)

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

    def _rows(self, n: int) -> int:
        return resolve_bucket(n, self.buckets, self.min_rows)

    def _use_graphs(self, device: torch.device) -> bool:
        return self.cuda_graphs and device.type == "cuda"

    def _gather(self, k: int, state, idx: torch.Tensor, device: torch.device):
        """Rows ``idx`` of the state, written straight into graph (k, len(idx))'s static input if captured."""
        entry = self._graphs.get((k, idx.numel())) if self._use_graphs(device) else None
        if entry is None:
            return tree_map(lambda t: _index_rows(t, idx), state)
        src, _ = tree_flatten(state)
        dst, _ = tree_flatten(entry.static_in)
        for s, d in zip(src, dst):
            if isinstance(s, torch.Tensor):
                torch.index_select(s, 0, idx, out=d)
        return entry.static_in

    def _run_stage(self, k: int, state, device: torch.device):
        if not self._use_graphs(device):
            with self._autocast(device):
                return self._stages[k](state)
        rows = tree_flatten(state)[0][0].shape[0]
        entry = self._graphs.get((k, rows))
        if entry is None:
            entry = self._capture(k, state, device)
        if state is not entry.static_in:
            for s, d in zip(tree_flatten(state)[0], tree_flatten(entry.static_in)[0]):
                if isinstance(s, torch.Tensor):
                    d.copy_(s)
        entry.graph.replay()
        return entry.static_out

    def _capture(self, k: int, state, device: torch.device) -> _Graph:
        # Warm up on a side stream (cuDNN/cuBLAS workspaces, compile), then capture.  All graphs
        # share one memory pool: safe because every graph's outputs are consumed (conf/pred written
        # out, state gathered into the next static input) before any other graph replays.
        static_in = tree_map(lambda t: t.clone(memory_format=torch.preserve_format) if isinstance(t, torch.Tensor) else t, state)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), self._autocast(device):
            for _ in range(3):
                self._stages[k](static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), self._autocast(device):
            static_out = self._stages[k](static_in)
        entry = _Graph(graph, static_in, static_out)
        self._graphs[(k, tree_flatten(state)[0][0].shape[0])] = entry
        return entry

    def _prepare(self, x: torch.Tensor, device: torch.device):
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        b = x.shape[0]
        rows = self._rows(b)
        if rows == b and not self._use_graphs(device):
            return x, rows
        pad = torch.zeros(rows, dtype=torch.long, device=device)  # padded rows repeat sample 0
        pad[:b] = torch.arange(b, device=device)
        return self._gather(0, x, pad, device), rows

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def __call__(self, x: torch.Tensor, thresholds: Optional[torch.Tensor] = None) -> EarlyExitBatch:
        """Run a batch ``x`` ``[B, ...]`` with early exits.  See :class:`EarlyExitBatch`.

        ``thresholds`` overrides the default ones for this call; pass them on ``x``'s device (a CPU
        tensor costs a host-to-device copy per call; the default thresholds are cached per device)."""
        return self._run(x, self._tau(thresholds, x.device), force_compact=False)

    def _run(self, x: torch.Tensor, tau: torch.Tensor, force_compact: bool) -> EarlyExitBatch:
        device, n, K = x.device, x.shape[0], self.num_exits
        preds = torch.zeros(n, dtype=torch.long, device=device)
        exits = torch.full((n,), K - 1, dtype=torch.long, device=device)
        confs = torch.zeros(n, dtype=torch.float32, device=device)
        active, computed = [0] * K, [0] * K
        timer = _Timer(device, self.timing)
        if n == 0:
            return EarlyExitBatch(preds, exits, confs, [0.0] * K, active, computed, 0.0)
        if self._compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # previous batch's graph outputs are dead
        timer.mark()
        ids = torch.arange(n, device=device)  # original sample index of each valid row
        state, rows = self._prepare(x, device)
        for k in range(K):
            active[k], computed[k] = n, rows
            state, conf, pred = self._run_stage(k, state, device)
            # Write every active row's result; rows that stay are overwritten by a later stage.
            # (Rows >= n are padding and are dropped here.)
            preds.index_copy_(0, ids, pred[:n])
            confs.index_copy_(0, ids, conf[:n])
            exits.index_fill_(0, ids, k)
            if k == K - 1:
                timer.mark()
                break
            stay = ~(conf >= tau[k])  # same comparison as apply_thresholds (NaN confidence stays)
            if rows != n:
                stay &= torch.arange(rows, device=device) < n
            order = torch.argsort((~stay).to(torch.int32), stable=True)  # survivors first, in order
            n_stay = int(stay.sum())  # the one host sync of this stage
            if n_stay == 0:
                timer.mark()
                break
            new_rows = self._rows(n_stay)
            if n_stay != n:
                ids = ids.index_select(0, order[:n_stay])
            if force_compact or n_stay != n or new_rows != rows:
                # order[:new_rows]: survivors, then (as padding) rows that left or were padding.
                state = self._gather(k + 1, state, order[:new_rows], device)
            n, rows = n_stay, new_rows
            timer.mark()
        ms = timer.intervals_ms()
        stage_ms = (ms + [0.0] * K)[:K]
        return EarlyExitBatch(preds, exits, confs, stage_ms, active, computed, float(sum(ms)))

    @torch.no_grad()
    def full_network(self, x: torch.Tensor) -> torch.Tensor:
        """Stem + every stage on the whole batch, with the same stage functions (compiled / graphed)
        and padding, no exit logic: the baseline for wall-clock speedups.  Returns last-exit
        predictions ``[B]``."""
        state, _ = self._prepare(x, x.device)
        for k in range(self.num_exits):
            state, _, pred = self._run_stage(k, state, x.device)
        return pred[: x.shape[0]].clone()  # a graph's output buffer is overwritten by its next replay

    @torch.no_grad()
    def evaluate(
        self,
        batches: Iterable,
        *,
        device: Optional[torch.device] = None,
        thresholds: Optional[torch.Tensor] = None,
        macs: Optional[Sequence[float]] = None,
    ) -> EvalReport:
        """Run over ``(images, labels)`` batches; aggregate accuracy, exits, time and expected MACs."""
        preds, exits, labels = [], [], []
        stage_ms, active = [0.0] * self.num_exits, [0] * self.num_exits
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
            total_ms += out.total_ms
        pred, exit_index, label = (torch.cat(t) if t else torch.zeros(0, dtype=torch.long) for t in (preds, exits, labels))
        n = pred.numel()
        counts = torch.bincount(exit_index, minlength=self.num_exits).cpu()
        expected = None
        if macs is not None:
            expected = float((counts.double() / max(n, 1) * torch.tensor(list(macs), dtype=torch.float64)).sum())
        return EvalReport(
            num_samples=n,
            accuracy=100.0 * (pred == label).sum().item() / max(n, 1),
            exit_counts=counts.tolist(),
            expected_macs=expected,
            ms_per_image=total_ms / max(n, 1),
            stage_ms=stage_ms,
            active=active,
            predictions=pred.cpu(),
            exit_index=exit_index.cpu(),
        )


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_full_network(
    model_or_evaluator: Union[nn.Module, EarlyExitEvaluator],
    x: torch.Tensor,
    *,
    repeats: int = 10,
    warmup: int = 3,
    amp_dtype: Optional[torch.dtype] = None,
) -> float:
    """Median wall time (ms per batch) of the full network on ``x``: ``forward_stem`` + every
    ``forward_stage`` on the whole batch.  With an evaluator, its :meth:`~EarlyExitEvaluator.full_network`
    (same compiled/graphed stages and padding) is timed instead."""
    if isinstance(model_or_evaluator, EarlyExitEvaluator):
        fn = lambda: model_or_evaluator.full_network(x)  # noqa: E731
    else:
        model = model_or_evaluator
        ctx = (lambda: torch.autocast(x.device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

        def fn():
            with ctx():
                state = model.forward_stem(x)
                for k in range(model.num_exits):
                    state, logits = model.forward_stage(k, state)
            return logits

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(x.device)
        t0 = time.perf_counter()
        fn()
        _sync(x.device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


@torch.no_grad()
def measure_stage_costs(
    evaluator: EarlyExitEvaluator,
    x: torch.Tensor,
    *,
    batch_sizes: Optional[Sequence[int]] = None,
    repeats: int = 5,
    warmup: int = 2,
) -> StageCosts:
    """Per-stage cost model for :func:`imta_fast.inference.protocol.fit_latency_budget`.

    Runs the evaluator with no exits (every stage sees every row, and the compaction still runs) at
    each batch size (default ``B`` and ``B//4``), takes the median time of each stage, and fits
    ``t_k(rows) = overhead_ms[k] + per_image_ms[k]·rows`` through the two sizes (rows = computed rows,
    padding included; both coefficients clipped at 0).  With one batch size the overhead is 0.
    """
    K, B = evaluator.num_exits, x.shape[0]
    sizes = sorted({int(b) for b in (batch_sizes or (B, max(1, B // 4)))}, reverse=True)
    if sizes[0] > B:
        raise ValueError(f"batch size {sizes[0]} exceeds the {B} samples given")
    tau = torch.full((K,), EXIT_NEVER, device=x.device)
    tau[-1] = EXIT_ALWAYS
    points = []  # (rows per stage, median ms per stage)
    for b in sizes:
        xb = x[:b]
        for _ in range(warmup):
            evaluator._run(xb, tau, force_compact=True)
        runs = [evaluator._run(xb, tau, force_compact=True) for _ in range(repeats)]
        points.append((runs[0].computed, [statistics.median(r.stage_ms[k] for r in runs) for k in range(K)]))
    slope, icpt = [], []
    for k in range(K):
        (r1, t1), (r2, t2) = (points[0][0][k], points[0][1][k]), (points[-1][0][k], points[-1][1][k])
        s = (t1 - t2) / (r1 - r2) if r1 != r2 else t1 / max(r1, 1)
        s = max(s, 0.0)
        slope.append(s)
        icpt.append(max(t1 - s * r1, 0.0) if r1 != r2 else 0.0)
    return StageCosts(batch_size=sizes[0], per_image_ms=slope, overhead_ms=icpt,
                      device=str(x.device), measured_batch_sizes=sizes)
