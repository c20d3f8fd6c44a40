"""Training speed, measured: a settings ladder, a ResNet-50 anchor, DDP at world size 1 and IMTA stage 2.

Every case runs the project's real training loop (``imta_fast.train.loop.train_one_epoch`` over
``TrainingMethod.train_step``) on a model, optimiser, LR schedule and ``StepContext`` built by the same
functions ``train(cfg)`` uses (``build_model``, ``build_optimizer`` / plain SGD, ``build_lr_schedule``,
``build_method``, ``apply_channels_last`` / ``apply_sync_bn`` / ``apply_compile`` / ``apply_ddp``), on one
synthetic batch that already lives on the device (so the loader is out of the picture).

The ladder (each rung adds one setting to the previous one):

=============  ====================================================================================
reference      what the reference does: fp32, NCHW, eager, plain-PyTorch loss and GE
               (``impl='torch'``), ``torch.optim.SGD`` with its default implementation, and a
               ``loss.item()`` per step (its ``losses.update(loss.item())``)
no_sync        + no host sync per step (our loop checks the loss on the device)
bf16           + bf16 autocast
channels_last  + channels_last memory format
compile        + ``torch.compile`` (inductor, also on CPU)
fused_ops      + the fused Triton loss and GE backward (``impl='triton'``; CUDA only, skipped on CPU)
fused_optim    + fused SGD (``fused=True`` on CUDA; ``foreach=True`` on CPU) = the full settings
=============  ====================================================================================

Then at the full settings: ``resnet50`` (torchvision ResNet-50, CE on its one exit through the same
method / loop, as an anchor), ``ddp_ws1`` (the same step wrapped in DDP on a one-process group,
gloo on CPU / nccl on CUDA), and IMTA stage 2 (``imta``: ISC heads and OFA KD on a frozen backbone,
random stage-1 weights) with ``backbone_bn='train'`` and ``'eval'``; stage 1 (``ge``) is the
ladder's ``fused_optim`` rung itself.  (``ddp_ws1`` leaves SyncBN off: at world size 1 SyncBatchNorm
runs plain batch norm, and its different module code would only add a compile.)

Numbers per case:
- ``images_per_s``: batch x steps / wall time of ``steps`` steps, median over rounds; on CUDA the round
  ends with a synchronize.  The script interleaves the cases round by round (ABBA order) so machine
  load drifts hit every case alike, and also prints the best round (on a shared machine the least
  disturbed one); pytest-benchmark times each case alone (its ``stats`` are per round of ``steps``
  steps, the script's JSON ``stats`` per step; ``extra_info['images_per_s']`` means the same in both).
- ``compile_s``: warm-up wall time minus the warm-up steps at the steady median step time
  (Dynamo tracing + Inductor codegen for forward and backward; ~0 for eager cases).
- ``recompiles``: Dynamo frame compilations and new graphs after warm-up
  (``torch._dynamo.utils.counters['frames']['total']`` and ``['stats']['unique_graphs']``); must be 0.
- memory: ``step_mem_mb`` = peak bytes allocated during one steady-state step above what was allocated
  when it started (activations, gradients -- they are set to None each step -- and temporaries);
  ``state_mb`` = parameters + buffers + optimiser state; ``peak_mem_mb`` = their sum, i.e. the
  training peak of this case run alone.  On CUDA the step peak is ``torch.cuda.max_memory_allocated``
  after ``reset_peak_memory_stats``; on CPU it comes from the CPU allocator's running total recorded by
  ``torch.profiler`` (``profile_memory=True``): tensor bytes only, not the Python heap, code or the
  glibc arena (RSS high-water marks cannot be reset per case and keep freed memory).

Usage::

    python -m benchmarks.bench_train --device cpu --threads 1 --model msdnet_mnist --batch-size 64 --steps 10
    python -m benchmarks.bench_train --model msdnet_imagenet_step4 --batch-size 256          # on a GPU
    pytest benchmarks/bench_train.py --benchmark-only --benchmark-json=out.json              # one test per case

pytest settings come from the environment: ``IMTA_BENCH_TRAIN_MODEL`` / ``_BATCH`` / ``_STEPS`` /
``_ROUNDS`` / ``_THREADS`` / ``_CASES`` (comma-separated case names) / ``_BUDGET_S`` (cases that would
start after this many seconds of the module are skipped, so a slow compile cannot eat a fixed time slot).  Defaults:
msdnet_imagenet_step4, B = 256 on CUDA; msdnet_mnist, B = 64 on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["Settings", "CaseSpec", "CaseResult", "LADDER", "FULL", "case_specs", "build_case", "measure_cases",
           "recompile_counters", "format_table", "ratios", "main"]


# ----------------------------------------------------------------------------- what is measured
@dataclass(frozen=True)
class Settings:
    amp: bool = False            # bf16 autocast
    channels_last: bool = False
    compile: bool = False        # torch.compile (apply_compile)
    fused_ops: bool = False      # impl='triton' for the multi-exit loss and the GE backward
    fused_optim: bool = False    # build_optimizer (fused / foreach SGD) instead of torch's default SGD
    host_sync: bool = True       # loss.item() every step, as the reference
    ddp: bool = False            # DDP on a one-process group


_R = Settings()
LADDER: Tuple[Tuple[str, Settings], ...] = (
    ("reference", _R),
    ("no_sync", replace(_R, host_sync=False)),
    ("bf16", replace(_R, host_sync=False, amp=True)),
    ("channels_last", replace(_R, host_sync=False, amp=True, channels_last=True)),
    ("compile", replace(_R, host_sync=False, amp=True, channels_last=True, compile=True)),
    ("fused_ops", replace(_R, host_sync=False, amp=True, channels_last=True, compile=True, fused_ops=True)),
    ("fused_optim", replace(_R, host_sync=False, amp=True, channels_last=True, compile=True, fused_ops=True,
                            fused_optim=True)),
)
FULL = LADDER[-1][1]
CASE_NAMES = tuple(n for n, _ in LADDER) + ("resnet50", "ddp_ws1", "stage2_bn_train", "stage2_bn_eval")
# The order pytest runs them in (and the budget cuts from the end): the cases the targets need first.
PRIORITY = ("reference", "fused_optim", "resnet50", "ddp_ws1", "stage2_bn_train", "stage2_bn_eval", "no_sync",
            "bf16", "channels_last", "compile", "fused_ops")


@dataclass(frozen=True)
class CaseSpec:
    name: str
    model: str                  # registry name, or 'resnet50' (torchvision, the input shape of `shape_of`)
    method: str                 # 'ge' (IMTA stage 1) | 'imta' (stage 2) | 'ce'
    settings: Settings
    batch_size: int
    shape_of: str = ""          # the MSDNet config whose input shape / classes the anchor uses
    backbone_bn: str = "train"
    skip: Optional[str] = None  # reason, when the case cannot run on this device

    @property
    def group(self) -> str:
        return f"train {self.shape_of or self.model} B{self.batch_size}"


def resolve_device(name: str) -> torch.device:
    """``'cuda'`` -> ``cuda:<current>`` (DDP's device_ids and nccl's device_id need an index)."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _effective(settings: Settings, device: torch.device) -> Settings:
    """The fused Triton ops run on CUDA only; on CPU the 'full' settings leave them out."""
    return settings if device.type == "cuda" else replace(settings, fused_ops=False)


def case_specs(model: str, batch_size: int, device: torch.device, anchor_batch_size: Optional[int] = None,
               names: Optional[Sequence[str]] = None) -> List[CaseSpec]:
    """All cases for one model/batch, in CASE_NAMES order (``names`` selects a subset)."""
    cpu = device.type != "cuda"
    full = _effective(FULL, device)
    specs = []
    for name, s in LADDER:
        skip = "fused Triton ops need CUDA" if (name == "fused_ops" and cpu) else None
        specs.append(CaseSpec(name, model, "ge", _effective(s, device), batch_size, skip=skip))
    specs.append(CaseSpec("resnet50", "resnet50", "ce", full, anchor_batch_size or batch_size, shape_of=model))
    specs.append(CaseSpec("ddp_ws1", model, "ge", replace(full, ddp=True), batch_size))
    specs.append(CaseSpec("stage2_bn_train", model, "imta", full, batch_size, backbone_bn="train"))
    specs.append(CaseSpec("stage2_bn_eval", model, "imta", full, batch_size, backbone_bn="eval"))
    if names is not None:
        unknown = sorted(set(names) - set(CASE_NAMES))
        if unknown:
            raise ValueError(f"unknown case(s) {unknown}; choose from {', '.join(CASE_NAMES)}")
        specs = [s for s in specs if s.name in names]
    return specs


# ----------------------------------------------------------------------------- building one case
_DATASET_OF = (("msdnet_imagenet", "imagenet"), ("msdnet_cifar", "cifar100"), ("msdnet_mnist", "mnist"),
               ("msdnet_tiny", "mnist"))


def _train_config(spec: CaseSpec, model_name: str):
    from imta_fast.train.config import TrainConfig

    dataset = next((d for prefix, d in _DATASET_OF if model_name.startswith(prefix)), "mnist")
    s = spec.settings
    return TrainConfig(dataset=dataset, model=model_name, method=spec.method,
                       teacher="synthetic-teacher" if spec.method == "imta" else None, backbone_bn=spec.backbone_bn,
                       loss_impl="triton" if s.fused_ops else "torch", amp=s.amp, channels_last=s.channels_last,
                       compile=s.compile, batch_size=spec.batch_size,
                       lr=1e-3)  # speed does not depend on lr; one repeated batch at 0.1 can diverge


class SingleExit(nn.Module):
    """A one-exit network in the multi-exit interface: ``forward(x) -> ([logits], None)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_exits = 1

    def forward(self, x):
        return [self.net(x)], None


def _resnet50(num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    net = torchvision.models.resnet50(num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return SingleExit(net)


class HostSyncPerStep:
    """The reference's ``losses.update(loss.item(), ...)``: one device-to-host copy per step."""

    def __init__(self, method):
        self.method = method

    def train_step(self, ctx, x, y):
        result = self.method.train_step(ctx, x, y)
        result.loss.item()
        return result


@dataclass
class Case:
    spec: CaseSpec
    ctx: object
    method: object
    x: torch.Tensor
    y: torch.Tensor
    state_bytes: int = 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_process_group(device: torch.device):
    """A world-size-1 process group (gloo on CPU, nccl on CUDA) on a free local port; torn down after."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_case(spec: CaseSpec, device: torch.device, compile_backend: Optional[str] = None, seed: int = 0) -> Case:
    """Model, optimiser, schedule, method and StepContext of ``spec``, as ``train(cfg)`` builds them."""
    from imta_fast.distributed import DistInfo
    from imta_fast.models import model_config
    from imta_fast.models.build import build_model
    from imta_fast.train.methods import build_method
    from imta_fast.train.optim import build_lr_schedule, build_optimizer, trainable_parameters
    from imta_fast.train.parallel import apply_channels_last, apply_compile, apply_ddp, apply_sync_bn
    from imta_fast.train.step import StepContext

    if spec.skip:
        raise RuntimeError(f"case {spec.name} cannot run here: {spec.skip}")
    s = spec.settings
    torch.manual_seed(seed)
    shape_name = spec.shape_of or spec.model
    mc = model_config(shape_name)
    cfg = _train_config(spec, shape_name)
    if spec.model == "resnet50":
        model = _resnet50(mc.num_classes, mc.in_channels)
    else:
        model = build_model(cfg.to_dict(), mc.num_classes, mc.in_channels)  # imta: random 'stage-1' weights
    model = model.to(device)
    if s.ddp:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("a DDP case needs a process group: build it inside one_process_group(device)")
        info = DistInfo(dist.get_rank(), dist.get_world_size(), 0, device, True)
    else:
        info = DistInfo(0, 1, 0, device, False)
    if s.fused_optim:
        optimizer = build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov, device)
    else:  # the reference: torch.optim.SGD with torch's default implementation choice
        optimizer = torch.optim.SGD(trainable_parameters(model), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    scheduler = build_lr_schedule(optimizer, "cosine", 1, 10 ** 9, (), cfg.lr_decay)  # a new lr every step
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 / fp32: no loss scaling
    method = build_method(cfg, model, info)
    model = apply_sync_bn(model, cfg.sync_bn, info)  # off: at world size 1 SyncBN only adds a recompile
    model = apply_channels_last(model, s.channels_last)
    if s.compile and compile_backend:  # tests: a cheap backend, same Dynamo capture and guards
        compiled = torch.compile(model, backend=compile_backend)
    else:
        compiled = apply_compile(model, s.compile)
    runner = apply_ddp(compiled, info)
    ctx = StepContext(model=runner, module=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, dist=info,
                      amp=s.amp, amp_dtype="bfloat16", channels_last=s.channels_last, loss_impl=cfg.loss_impl)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.batch_size, mc.in_channels, mc.image_size, mc.image_size, generator=g).to(device)
    y = torch.randint(0, mc.num_classes, (spec.batch_size,), generator=g).to(device)
    return Case(spec, ctx, HostSyncPerStep(method) if s.host_sync else method, x, y)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(case: Case, steps: int) -> None:
    """``steps`` optimisation steps through the training loop, on the case's one synthetic batch."""
    from imta_fast.train.loop import train_one_epoch

    loader = [(case.x, case.y)] * steps
    train_one_epoch(case.ctx, case.method, loader, epoch=0, start_step=0, log_interval=steps)
    _sync(case.ctx.device)


def _state_bytes(case: Case) -> int:
    module, opt = case.ctx.module, case.ctx.optimizer
    n = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return n


def step_memory_bytes(case: Case) -> int:
    """Peak bytes allocated during one steady-state step above the bytes allocated when it started."""
    device = case.ctx.device
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_steps(case, 1)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_steps(case, 1)
    stack, allocs = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
    if not allocs:
        return 0
    allocs.sort()
    start = allocs[0][2] - allocs[0][1]  # the running total before the first event of the step
    return max(total for _, _, total in allocs) - start


def recompile_counters() -> Tuple[int, int]:
    """(Dynamo frame compilations, captured graphs) so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"]), int(counters["stats"]["unique_graphs"])


def recompiles_since(before: Tuple[int, int]) -> int:
    now = recompile_counters()
    return max(now[0] - before[0], now[1] - before[1])


# ----------------------------------------------------------------------------- measuring
@dataclass
class CaseResult:
    name: str
    model: str
    method: str
    batch_size: int
    settings: Dict[str, bool]
    group: str
    images_per_s: float = float("nan")       # median over rounds
    images_per_s_rounds: List[float] = field(default_factory=list)
    step_ms: float = float("nan")
    peak_mem_mb: float = float("nan")
    step_mem_mb: float = float("nan")
    state_mb: float = float("nan")
    compile_s: float = float("nan")
    warmup_s: float = float("nan")
    recompiles: int = 0                      # after warm-up; must be 0
    steps_per_round: int = 0
    skipped: Optional[str] = None


def _result_of(spec: CaseSpec) -> CaseResult:
    return CaseResult(spec.name, spec.model, spec.method, spec.batch_size, asdict(spec.settings), spec.group,
                      skipped=spec.skip)


def warm_up(case: Case, steps: int) -> float:
    t0 = time.perf_counter()
    run_steps(case, steps)
    return time.perf_counter() - t0


def finish(result: CaseResult, case: Case, step_times: List[float], warmup_s: float, warmup_steps: int) -> None:
    """Fill in the numbers from per-round wall times of ``steps`` steps (seconds per step each)."""
    b = result.batch_size
    result.images_per_s_rounds = [b / t for t in step_times]
    median_step = statistics.median(step_times)
    result.images_per_s = b / median_step
    result.step_ms = median_step * 1e3
    result.warmup_s = warmup_s
    result.compile_s = max(0.0, warmup_s - warmup_steps * median_step)
    case.state_bytes = _state_bytes(case)
    step_bytes = step_memory_bytes(case)
    result.step_mem_mb = step_bytes / 2 ** 20
    result.state_mb = case.state_bytes / 2 ** 20
    result.peak_mem_mb = (step_bytes + case.state_bytes) / 2 ** 20


def measure_cases(specs: Sequence[CaseSpec], device: torch.device, steps: int = 10, rounds: int = 5,
                  warmup_steps: int = 3, compile_backend: Optional[str] = None, max_warmup_s: float = float("inf"),
                  log=print) -> List[CaseResult]:
    """Build and warm up every case, then time them interleaved: round r runs all cases, in forward
    order on even rounds and reverse order on odd ones; the median round counts."""
    results = {s.name: _result_of(s) for s in specs}
    cases: Dict[str, Case] = {}
    need_group = any(s.settings.ddp and not s.skip for s in specs)
    with one_process_group(device) if need_group else contextlib.nullcontext():
        t_start = time.perf_counter()
        warm: Dict[str, float] = {}
        for spec in sorted(specs, key=lambda s: PRIORITY.index(s.name)):  # the budget cuts the least needed
            if spec.skip:
                continue
            if time.perf_counter() - t_start > max_warmup_s:
                results[spec.name].skipped = f"warm-up budget of {max_warmup_s:.0f} s spent"
                continue
            cases[spec.name] = build_case(spec, device, compile_backend)
            warm[spec.name] = warm_up(cases[spec.name], warmup_steps)
            log(f"  warmed up {spec.name:16s} {warm[spec.name]:7.1f} s")
        times: Dict[str, List[float]] = {n: [] for n in cases}
        order = list(cases)
        for r in range(rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                before = recompile_counters()
                t0 = time.perf_counter()
                run_steps(cases[name], steps)
                times[name].append((time.perf_counter() - t0) / steps)
                results[name].recompiles += recompiles_since(before)
        for name, case in cases.items():
            finish(results[name], case, times[name], warm[name], warmup_steps)
            results[name].steps_per_round = steps
        cases.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [results[s.name] for s in specs]


# ----------------------------------------------------------------------------- reporting
def ratios(results: Sequence[CaseResult]) -> Dict[str, float]:
    """The ratios the targets are about (images/s unless named *_mem)."""
    by = {r.name: r for r in results if r.skipped is None}
    out = {}

    def put(key, num, den, attr="images_per_s"):
        if num in by and den in by:
            out[key] = getattr(by[num], attr) / getattr(by[den], attr)

    put("full_vs_reference", "fused_optim", "reference")
    put("msdnet_vs_resnet50", "fused_optim", "resnet50")
    put("ddp_ws1_vs_no_ddp", "ddp_ws1", "fused_optim")
    put("stage2_bn_train_vs_stage1", "stage2_bn_train", "fused_optim")
    put("stage2_bn_eval_vs_stage1", "stage2_bn_eval", "fused_optim")
    put("stage2_bn_train_vs_stage1_mem", "stage2_bn_train", "fused_optim", "peak_mem_mb")
    put("stage2_bn_eval_vs_stage1_mem", "stage2_bn_eval", "fused_optim", "peak_mem_mb")
    return out


def format_table(results: Sequence[CaseResult], device_name: str) -> str:
    ref_r = next((r for r in results if r.name == "reference" and r.skipped is None), None)
    ref = ref_r.images_per_s if ref_r else float("nan")
    ref_best = max(ref_r.images_per_s_rounds) if ref_r else float("nan")
    lines = [f"device: {device_name}", "",
             "| case | model | method | B | images/s (median) | x reference | best round | x reference | step ms | "
             "peak MB | step MB | compile s | recompiles |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.name} | {r.model} | {r.method} | {r.batch_size} | skipped: {r.skipped} ||||||||")
            continue
        lines.append(f"| {r.name} | {r.model} | {r.method} | {r.batch_size} | {r.images_per_s:.1f} | "
                     f"{r.images_per_s / ref:.2f} | {max(r.images_per_s_rounds):.1f} | "
                     f"{max(r.images_per_s_rounds) / ref_best:.2f} | {r.step_ms:.1f} | {r.peak_mem_mb:.1f} | {r.step_mem_mb:.1f} | "
                     f"{r.compile_s:.1f} | {r.recompiles} |")
    rat = ratios(results)
    if rat:
        lines += ["", "ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in rat.items())]
    return "\n".join(lines)


def extra_info(r: CaseResult) -> Dict[str, object]:
    """The pytest-benchmark ``extra_info`` of one case (what benchmarks/targets.py selects and divides)."""
    return {"bench": "train", "case": r.name, "images_per_s": round(r.images_per_s, 2),
            "peak_mem_mb": round(r.peak_mem_mb, 1), "step_mem_mb": round(r.step_mem_mb, 1),
            "state_mb": round(r.state_mb, 1), "compile_s": round(r.compile_s, 2), "recompiles": r.recompiles,
            "model": r.group.split()[1], "arch": r.model, "method": r.method, "batch_size": r.batch_size,
            "steps_per_round": r.steps_per_round, **r.settings}


def benchmark_json(results: Sequence[CaseResult], device: torch.device) -> Dict[str, object]:
    """The script's results in pytest-benchmark's JSON shape (``benchmarks`` with ``fullname``, ``group``,
    ``stats`` in seconds per step, ``extra_info``), so ``python -m benchmarks.summary`` reads them too."""
    benches = []
    for r in results:
        if r.skipped is not None:
            continue
        per_step = [r.batch_size / v for v in r.images_per_s_rounds]
        benches.append({
            "name": f"test_train[{r.name}]", "fullname": f"benchmarks/bench_train.py::test_train[{r.name}]",
            "group": r.group, "params": {"spec": r.name}, "extra_info": extra_info(r),
            "stats": {"median": statistics.median(per_step), "mean": statistics.fmean(per_step),
                      "min": min(per_step), "max": max(per_step), "rounds": len(per_step),
                      "stddev": statistics.stdev(per_step) if len(per_step) > 1 else 0.0,
                      "iterations": r.steps_per_round, "data": per_step}})
    return {"machine_info": {"device": device_name(device), "torch": torch.__version__},
            "commit_info": {}, "benchmarks": benches, "datetime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "version": "bench_train", "command": " ".join(sys.argv),
            "skipped": {r.name: r.skipped for r in results if r.skipped is not None}, "ratios": ratios(results)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    import platform

    return (f"CPU, {platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} torch threads "
            f"(torch {torch.__version__})")


def profile_case(spec: CaseSpec, device: torch.device, steps: int = 3, warmup_steps: int = 3, top: int = 15) -> str:
    """torch.profiler table (self time) of ``steps`` steady-state steps of one case."""
    from torch.profiler import ProfilerActivity, profile

    case = build_case(spec, device)
    warm_up(case, warmup_steps)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run_steps(case, steps)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Training images/s and peak memory: settings ladder, ResNet-50 "
                                            "anchor, DDP world size 1, IMTA stage 2 (one interleaved run).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="default: msdnet_imagenet_step4 on CUDA, msdnet_mnist on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 64 on CPU")
    p.add_argument("--anchor-batch-size", type=int, default=None,
                   help="ResNet-50 batch (default: the batch size; min(B, 16) on CPU)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (the median counts)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--cases", default=None, help=f"comma-separated subset of {','.join(CASE_NAMES)}")
    p.add_argument("--max-warmup-s", type=float, default=float("inf"),
                   help="skip cases not yet warmed up after this many seconds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a loaded machine use 1: OpenMP barriers "
                        "between busy cores cost more than the second thread gains)")
    p.add_argument("--compile-backend", default=None, help="(testing) torch.compile backend instead of inductor")
    p.add_argument("--profile", default=None, metavar="CASE", help="print a torch.profiler table of CASE and exit")
    p.add_argument("--json", default=None, help="also write the results here, as pytest-benchmark-shaped JSON")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or ("msdnet_imagenet_step4" if cuda else "msdnet_mnist")
    batch = args.batch_size or (256 if cuda else 64)
    anchor_batch = args.anchor_batch_size or (batch if cuda else min(batch, 16))
    names = args.cases.split(",") if args.cases else None
    specs = case_specs(model, batch, device, anchor_batch, names)
    if args.profile:
        spec = next((s for s in specs if s.name == args.profile), None)
        if spec is None:
            p.error(f"--profile {args.profile}: not among the selected cases")
        print(profile_case(spec, device))
        return 0
    results = measure_cases(specs, device, args.steps, args.rounds, args.warmup_steps, args.compile_backend,
                            args.max_warmup_s, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(results, device_name(device)))
    if args.json:
        from imta_fast.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(benchmark_json(results, device), indent=1))
    bad = [r.name for r in results if r.skipped is None and r.recompiles]
    if bad:
        print(f"recompiles after warm-up in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- pytest-benchmark
def _env_specs() -> Tuple[torch.device, List[CaseSpec], int, int]:
    device = resolve_device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    model = os.environ.get("IMTA_BENCH_TRAIN_MODEL") or ("msdnet_imagenet_step4" if cuda else "msdnet_mnist")
    batch = int(os.environ.get("IMTA_BENCH_TRAIN_BATCH") or (256 if cuda else 64))
    steps = int(os.environ.get("IMTA_BENCH_TRAIN_STEPS") or 10)
    rounds = int(os.environ.get("IMTA_BENCH_TRAIN_ROUNDS") or 5)
    names = os.environ.get("IMTA_BENCH_TRAIN_CASES")
    if os.environ.get("IMTA_BENCH_TRAIN_THREADS"):
        torch.set_num_threads(int(os.environ["IMTA_BENCH_TRAIN_THREADS"]))
    specs = case_specs(model, batch, device, batch if cuda else min(batch, 16), names.split(",") if names else None)
    specs.sort(key=lambda s: PRIORITY.index(s.name))
    return device, specs, steps, rounds


_DEVICE, _SPECS, _STEPS, _ROUNDS = _env_specs()
_T0 = time.perf_counter()

try:
    import pytest
except ImportError:  # script use without pytest installed
    pytest = None

if pytest is not None:
    @pytest.mark.cpu_bench  # runs on CPU too (small model and batch there), so the ratios are tracked
    @pytest.mark.parametrize("spec", _SPECS, ids=[s.name for s in _SPECS])
    def test_train(benchmark, spec):
        budget = float(os.environ.get("IMTA_BENCH_TRAIN_BUDGET_S") or "inf")
        if spec.skip:
            pytest.skip(spec.skip)
        if time.perf_counter() - _T0 > budget:
            pytest.skip(f"IMTA_BENCH_TRAIN_BUDGET_S={budget:.0f} s spent before this case")
        result = _result_of(spec)
        with one_process_group(_DEVICE) if spec.settings.ddp else contextlib.nullcontext():
            case = build_case(spec, _DEVICE)
            warmup_s = warm_up(case, 3)
            before = recompile_counters()
            benchmark.group = spec.group
            benchmark.pedantic(run_steps, args=(case, _STEPS), rounds=_ROUNDS, iterations=1, warmup_rounds=0)
            result.recompiles = recompiles_since(before)
            stats = getattr(benchmark, "stats", None)
            if stats is not None:  # None under --benchmark-disable
                finish(result, case, [stats.stats.median / _STEPS], warmup_s, 3)
                result.steps_per_round = _STEPS
                benchmark.extra_info.update(extra_info(result))
            del case
        gc.collect()
        assert result.recompiles == 0, f"{spec.name}: {result.recompiles} recompilation(s) after warm-up"


if __name__ == "__main__":
    sys.exit(main())
