"""Stage executor: run stage k of a staged multi-exit model on a state, and gather rows of a state
into the next stage's input (docs/method.md §13).

The executor knows nothing about thresholds or exits; :class:`~imta_fast.inference.evaluator.EarlyExitEvaluator`
drives it.  A model qualifies if it has ``num_exits``, ``forward_stem(x) -> state`` and
``forward_stage(k, state) -> (state, logits)``; the state is an opaque pytree (MSDNet: a list of
per-scale tensors; IMTA: ``(xs, prior_logits)``; RANet: whatever it carries) whose tensor leaves
all have the batch in dim 0.  Stage ``k`` is (stem +) block ``k`` + head ``k`` + the confidence
(:func:`imta_fast.inference.protocol.max_softmax`).

Execution modes, each with a way back to plain PyTorch:

- eager (default);
- ``compile``: ``torch.compile`` per stage (``dynamic=False``: one graph per row count, so the
  buckets bound the recompiles; the dynamo recompile limit is raised accordingly);
- ``cuda_graphs``: one ``torch.cuda.CUDAGraph`` per (stage, rows) with static input buffers; a
  gather writes straight into the next graph's static input (``index_select(out=)``).
  ``compile_mode='reduce-overhead'`` uses inductor's own CUDA graphs instead.

Row counts come from :func:`imta_fast.inference.buckets.resolve_bucket` (the one rounding rule, shared
with the latency model).  Padded rows repeat valid rows (no NaN/inf from uninitialised memory).

Micro-batches (``micro_batch``, CPU): a stage's rows can run as chunks of at most ``M`` rows, the state
kept as a list of chunk states (:class:`Chunks`); compaction gathers the survivors of all chunks and
re-packs them into full chunks, so late stages still run wide chunks.  Why: on CPU a B = 1024 MSDNet
stage allocates activations of 40-170 MB; glibc serves every block above 32 MB with a fresh ``mmap``
(zeroed pages, ~700,000 page faults per CIFAR full-network pass) and the working set leaves the caches.
Chunks of ~16 MB per state tensor reuse heap blocks and stay cache-sized: the CIFAR MSDNet's full
network ran 1.7-2.9x faster per image on one CPU core (benchmarks/NOTES.md "Early exit").  ``'auto'``
sizes the chunks from the state's bytes per row (:data:`AUTO_MICRO_BATCH_BYTES`); CUDA gains nothing
(the caching allocator reuses blocks; big batches fill the GPU) and CUDA graphs need one static input
per shape, so ``'auto'`` means no chunking on CUDA.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from imta_fast.inference.buckets import Buckets, normalize_buckets, resolve_bucket
from imta_fast.inference.protocol import max_softmax

__all__ = ["StageExecutor", "StageTimer", "Chunks", "chunk_sizes", "DEFAULT_COMPILED_BUCKETS",
           "AUTO_MICRO_BATCH_BYTES"]

#: Buckets used when ``compile`` or ``cuda_graphs`` is on and none are given: multiples of 64 rows
#: (measured in benchmarks/NOTES.md "Early exit": powers of two waste up to half a stage in padding).
DEFAULT_COMPILED_BUCKETS = 64

#: ``micro_batch='auto'`` on CPU: rows per chunk such that the largest state tensor after stage 0 holds
#: at most this many bytes (well under glibc's 32 MB mmap ceiling; see the module docstring).
AUTO_MICRO_BATCH_BYTES = 16 << 20
_AUTO_MIN_ROWS = 16  # below this, per-op overheads outweigh what smaller chunks save

MicroBatch = Union[None, int, str]


class Chunks(list):
    """A stage state split into row chunks (a list of states; rows concatenate in order) of at most
    ``limit`` rows each."""

    def __init__(self, chunks, limit: int):
        super().__init__(chunks)
        self.limit = limit


def chunk_sizes(rows: int, micro_batch: int, step: Optional[int] = None) -> List[int]:
    """Row counts of the chunks of ``rows`` rows, each at most ``micro_batch``.

    With a bucket step (compile / CUDA-graph shapes must stay bounded) chunks are ``micro_batch``
    rounded up to the step, the last one what is left (a multiple of the step, since ``rows`` is).
    Otherwise the chunks are balanced (sizes differ by at most one), so no chunk is a stray row or two
    (a single row goes through GEMV and differs in the last bits from the batched result)."""
    if rows <= micro_batch:
        return [rows]
    if step:
        m = -(-micro_batch // step) * step
        return [m] * (rows // m) + ([rows % m] if rows % m else [])
    n = -(-rows // micro_batch)
    base, extra = divmod(rows, n)
    return [base + 1] * extra + [base] * (n - extra)


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


def _first_rows(state) -> int:
    if isinstance(state, Chunks):
        return sum(_first_rows(c) for c in state)
    return next(t for t in tree_flatten(state)[0] if isinstance(t, torch.Tensor)).shape[0]


def _gather_chunks(chunks: Chunks, idx: torch.Tensor, sizes: List[int], limit: int) -> Chunks:
    """Rows ``idx`` (of the chunks' concatenation) re-packed into chunks of ``sizes`` rows.  Each run
    of consecutive rows from one source chunk is one ``index_select`` written straight into the new
    chunk (no intermediate copy)."""
    counts = [_first_rows(c) for c in chunks]
    ends = torch.tensor(counts, device=idx.device).cumsum(0)
    starts = (ends - ends.new_tensor(counts)).tolist()
    flat = [tree_flatten(c) for c in chunks]
    spec = flat[0][1]
    out = Chunks((), limit)
    for sub in idx.split(sizes):
        src = torch.searchsorted(ends, sub, right=True)
        ids, lens = torch.unique_consecutive(src, return_counts=True)
        leaves = [_empty_rows_like(t, sub.numel()) if isinstance(t, torch.Tensor) else t for t in flat[0][0]]
        a = 0
        for j, n in zip(ids.tolist(), lens.tolist()):
            local = sub[a:a + n] - starts[j]
            for i, t in enumerate(flat[j][0]):
                if isinstance(t, torch.Tensor):
                    torch.index_select(t, 0, local, out=leaves[i][a:a + n])
            a += n
        out.append(tree_unflatten(leaves, spec))
    return out


class StageTimer:
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

    def repeat(self) -> None:
        """A mark at the previous one: an interval of exactly 0 (a step that did not happen)."""
        if self.enabled and self.marks:
            self.marks.append(self.marks[-1])

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


class StageExecutor:
    """Runs the stages of a staged model on (padded) states.  See the module docstring.

    Args:
        model: in eval mode (train-mode BN would couple samples and let padded rows leak in).
        buckets: see :mod:`imta_fast.inference.buckets`.  ``None`` with ``compile`` or ``cuda_graphs``
            becomes :data:`DEFAULT_COMPILED_BUCKETS` (multiples of 64 rows) to bound recompiles / captures.
        compile: ``torch.compile`` each stage (``compile_backend`` / ``compile_mode`` passed through).
        cuda_graphs: capture one CUDA graph per (stage, rows) on first use (CUDA inputs only; ignored on CPU).
        amp_dtype: autocast dtype, or None for the model's dtype.
        channels_last: convert 4-D inputs to channels_last (convert the model too).
        min_rows: compute at least this many rows (BLAS sends a single row to GEMV, whose summation
            order differs from GEMM: 2 keeps CPU logits bit-identical to the full batch's; 1 is the
            streaming mode, exits then agree with the simulated protocol except at exact ties).
        fold_bn: run a copy of the model with every Conv2d+BatchNorm2d pair folded (:func:`fold_batchnorm`;
            eval-mode BN is an affine map).  On CPU the separate BN pass is ~30 % of MSDNet's stage 0
            (benchmarks/NOTES.md "Early exit"); logits change in the last bits.
        micro_batch: run each stage in chunks of at most this many rows (see the module docstring):
            ``None`` (whole stages), an int, or ``'auto'`` (CPU: from the state's bytes per row,
            :data:`AUTO_MICRO_BATCH_BYTES`; CUDA: no chunks).  Not with ``cuda_graphs``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        buckets: Buckets = None,
        compile: bool = False,
        compile_backend: Union[str, Callable] = "inductor",
        compile_mode: Optional[str] = None,
        cuda_graphs: bool = False,
        amp_dtype: Optional[torch.dtype] = None,
        channels_last: bool = False,
        min_rows: int = 2,
        fold_bn: bool = False,
        micro_batch: MicroBatch = None,
    ):
        if cuda_graphs and compile_mode == "reduce-overhead":
            raise ValueError("use either cuda_graphs=True or compile_mode='reduce-overhead', not both")
        if not (micro_batch is None or micro_batch == "auto" or (isinstance(micro_batch, int)
                                                                   and not isinstance(micro_batch, bool) and micro_batch >= 1)):
            raise ValueError(f"micro_batch must be None, 'auto' or a positive number of rows, got {micro_batch!r}")
        if cuda_graphs and isinstance(micro_batch, int):
            raise ValueError("micro_batch chunks need one static input per chunk; not with cuda_graphs=True")
        if fold_bn:
            model = fold_batchnorm(model)
        self.model = model
        self.num_stages = int(model.num_exits)
        if buckets is None and (compile or cuda_graphs):
            buckets = DEFAULT_COMPILED_BUCKETS
        self.buckets = normalize_buckets(buckets)
        if isinstance(self.buckets, tuple):
            self.buckets = list(self.buckets)
        self.cuda_graphs = cuda_graphs
        self.compile_mode = compile_mode if compile else None
        self.compiled = bool(compile)
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        self.min_rows = max(int(min_rows), 1)
        self.micro_batch = micro_batch
        self._auto_rows: Dict[tuple, Optional[int]] = {}
        stages = [_make_stage(model, k) for k in range(self.num_stages)]
        if compile:
            n_shapes = len(self.buckets) + 16 if isinstance(self.buckets, list) else 64
            _raise_recompile_limit(self.num_stages * n_shapes + 8)
            stages = [torch.compile(f, backend=compile_backend, mode=compile_mode, dynamic=False) for f in stages]
        self._stages = stages
        self._graphs: Dict[Tuple[int, int], _Graph] = {}
        self._pool = None

    # ------------------------------------------------------------------ shapes
    def rows(self, n: int, batch_size: Optional[int] = None) -> int:
        """Rows computed for ``n`` active samples of a batch of ``batch_size`` (:func:`resolve_bucket`)."""
        return resolve_bucket(n, self.buckets, self.min_rows, batch_size)

    def uses_graphs(self, device: torch.device) -> bool:
        return self.cuda_graphs and device.type == "cuda"

    def autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype, cache_enabled=False)

    def begin_batch(self) -> None:
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # previous batch's graph outputs are dead

    # ------------------------------------------------------------------ state movement
    def prepare(self, x: torch.Tensor) -> Tuple[object, int]:
        """Stage 0's input for a batch ``x``: channels_last if asked, padded to its row count
        (padded rows repeat sample 0).  Returns ``(input, rows)``."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        b = x.shape[0]
        rows = self.rows(b, b)
        if rows != b or self.uses_graphs(x.device):
            pad = torch.zeros(rows, dtype=torch.long, device=x.device)
            pad[:b] = torch.arange(b, device=x.device)
            x = self.gather(0, x, pad)
        m = self.chunk_rows(x)
        if m is not None and rows > m:
            return Chunks(x.split(chunk_sizes(rows, m, self._bucket_step())), limit=m), rows
        return x, rows

    def _bucket_step(self) -> Optional[int]:
        return self.buckets if isinstance(self.buckets, int) and self.buckets > 1 else None

    def chunk_rows(self, x: torch.Tensor) -> Optional[int]:
        """Rows per chunk for inputs like ``x`` (None: whole stages).  ``'auto'`` runs the stem and
        stage 0 once on two rows to read the state's bytes per row (cached per input shape)."""
        if self.micro_batch is None or self.uses_graphs(x.device):
            return None
        if self.micro_batch != "auto":
            return int(self.micro_batch)
        if x.device.type == "cuda":
            return None
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._auto_rows:
            with torch.no_grad(), self.autocast(x.device):  # eager: no compile for a 2-row shape
                state, _, _ = _make_stage(self.model, 0)(x[:2])
            per_row = max(t[0].numel() * t.element_size() for t in tree_flatten(state)[0] if isinstance(t, torch.Tensor))
            self._auto_rows[key] = max(_AUTO_MIN_ROWS, AUTO_MICRO_BATCH_BYTES // max(per_row, 1))
        return self._auto_rows[key]

    def gather(self, k: int, state, idx: torch.Tensor):
        """Rows ``idx`` of every tensor leaf of ``state``, as stage ``k``'s input; written straight
        into graph ``(k, len(idx))``'s static input when that graph is captured.  A chunked state
        comes back re-packed into full chunks."""
        if isinstance(state, Chunks):
            return _gather_chunks(state, idx, chunk_sizes(idx.numel(), state.limit, self._bucket_step()), state.limit)
        entry = self._graphs.get((k, idx.numel())) if self.uses_graphs(idx.device) else None
        if entry is None:
            return tree_map(lambda t: _index_rows(t, idx), state)
        src, _ = tree_flatten(state)
        dst, _ = tree_flatten(entry.static_in)
        for s, d in zip(src, dst):
            if isinstance(s, torch.Tensor):
                torch.index_select(s, 0, idx, out=d)
        return entry.static_in

    # ------------------------------------------------------------------ running
    def run(self, k: int, state, device: torch.device):
        """Stage ``k`` on ``state`` -> ``(next state, confidence [rows] float32, prediction [rows])``.
        With CUDA graphs the outputs live in the graph's buffers until its next replay.  A chunked
        state runs chunk by chunk; confidence and prediction come back as one ``[rows]`` tensor each."""
        if isinstance(state, Chunks):
            outs = [self.run(k, c, device) for c in state]
            return (Chunks((o[0] for o in outs), limit=state.limit), torch.cat([o[1] for o in outs]),
                    torch.cat([o[2] for o in outs]))
        if not self.uses_graphs(device):
            with self.autocast(device):
                return self._stages[k](state)
        rows = _first_rows(state)
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
        with torch.cuda.stream(side), self.autocast(device):
            for _ in range(3):
                self._stages[k](static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), self.autocast(device):
            static_out = self._stages[k](static_in)
        entry = _Graph(graph, static_in, static_out)
        self._graphs[(k, _first_rows(state))] = entry
        return entry

    @torch.no_grad()
    def full_network(self, x: torch.Tensor) -> torch.Tensor:
        """Stem + every stage on the whole (padded) batch, no exit logic: the baseline for wall-clock
        speedups.  Returns last-exit predictions ``[B]``."""
        self.begin_batch()
        state, _ = self.prepare(x)
        for k in range(self.num_stages):
            state, _, pred = self.run(k, state, x.device)
        return pred[: x.shape[0]].clone()  # a graph's output buffer is overwritten by its next replay


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) in which every ``Conv2d`` directly followed by a ``BatchNorm2d``
    inside an ``nn.Sequential`` absorbs it (``fuse_conv_bn_eval``; the BN becomes ``Identity``).

    Model-agnostic (MSDNet's ConvBNReLU, RANet's, any Sequential).  Logits change in the last bits
    (the folded weights round differently), so exits agree with the unfolded model's simulated
    protocol except for samples within a few ulp of a threshold."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return folded
