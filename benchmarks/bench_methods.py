"""Per-step cost of each training method vs ``ce`` (docs/method.md §10, §11): one loaded batch through
``method.train_step`` on a real MSDNet, with the run's StepContext (SGD, LR schedule, fused loss dispatch).

Cases: ``ce``, ``distill`` (annealed T), ``l2w`` at ``--meta-interval`` 1 (two half-batch real steps plus two
meta steps per loaded batch; meta gradient by forward-mode JVP, and by double backward as the reference:
``l2w_i1_dbl``) and at interval 10.  One loaded batch = one timed call, so the ratios are per *loaded*
batch (L2W at interval 1 is expected near 3x: spec estimate 3-4x).

    pytest benchmarks/bench_methods.py --benchmark-json=results/methods.json     # CUDA (skipped without)
    python -m benchmarks.bench_methods [--model msdnet_mnist] [--batch 64] [--rounds 7]   # CPU quick run

The CPU quick run interleaves the methods round by round (fair on a contended machine) and prints the
median ms per loaded batch and each method's ratio to ``ce``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace
from typing import Callable, Dict, Optional

import pytest
import torch

from imta_fast.distributed import DistInfo

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda", 0) if CUDA else torch.device("cpu")
CASES = {  # name -> (method, config overrides)
    "ce": ("ce", {}),
    "distill": ("distill", {}),
    "l2w_i1": ("l2w", {"meta_interval": 1}),
    "l2w_i1_dbl": ("l2w", {"meta_interval": 1, "l2w_meta_grad": "double-backward"}),
    "l2w_i10": ("l2w", {"meta_interval": 10}),
}
MODELS = {"msdnet_mnist": (1, 28, 10), "msdnet_cifar_anytime": (3, 32, 100)}  # in_channels, size, classes


def make_cfg(method: str, **overrides) -> SimpleNamespace:
    """The config fields the methods read, at their command-line defaults (docs/method.md §10, §11)."""
    cfg = dict(method=method, loss_impl="auto", seed=0, output=".", temperature=3.0, gamma=0.9, kl_reduction="mean",
               distill_c=0.5, distill_temperature=None, distill_anneal_factor=1.05, distill_anneal_threshold=0.5,
               meta_interval=1, meta_lr=1e-4, meta_weight_decay=1e-4, meta_net_hidden=500, l2w_target_index=15,
               l2w_epsilon=0.8, l2w_constraint="sample", l2w_meta_grad="jvp", dump_weights=False)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def make_step(case: str, model_name: str = "msdnet_mnist", batch: int = 64, amp: bool = False) -> Callable[[], None]:
    """A closure that trains one loaded batch with ``case``'s method (fresh model, seeded)."""
    from imta_fast.models import create_model
    from imta_fast.train.methods import build_method
    from imta_fast.train.optim import build_lr_schedule, build_optimizer
    from imta_fast.train.step import StepContext

    method_name, overrides = CASES[case]
    in_ch, size, classes = MODELS[model_name]
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=classes, in_channels=in_ch).to(DEVICE).train()
    opt = build_optimizer(model, 0.1, 0.9, 1e-4, False, DEVICE)
    sched = build_lr_schedule(opt, "cosine", 1000, 1000, (), 0.1)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=False)
    dist = DistInfo(device=DEVICE)
    cfg = make_cfg(method_name, **overrides)
    ctx = StepContext(model=model, module=model, optimizer=opt, scheduler=sched, scaler=scaler, dist=dist, amp=amp,
                      loss_impl=cfg.loss_impl)
    method = build_method(cfg, model, dist)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_ch, size, size, generator=g).to(DEVICE)
    y = torch.randint(0, classes, (batch,), generator=g).to(DEVICE)

    def step() -> None:
        method.train_step(ctx, x, y)

    return step


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("case", list(CASES))
def test_method_step(benchmark, case):
    """GPU: one loaded batch of msdnet_cifar_anytime, batch 64 per step (the reference's CIFAR batch)."""
    step = make_step(case, "msdnet_cifar_anytime", 64)

    def timed():
        step()
        _sync()

    benchmark.group = "method step msdnet_cifar_anytime B64"
    benchmark.pedantic(timed, rounds=30, iterations=1, warmup_rounds=3)
    benchmark.extra_info.update(bench="methods", case=case, model="msdnet_cifar_anytime", batch=64, device=str(DEVICE))


# --- CPU quick run: python -m benchmarks.bench_methods ------------------------------------------------

def measure(model_name: str, batch: int, rounds: int, warmup: int = 2, cases=tuple(CASES)) -> Dict[str, tuple]:
    """Per case: (median seconds per loaded batch, median over rounds of the ratio to that round's ``ce``).

    Rounds are interleaved across cases, and the per-round ratio cancels slow drifts of a shared machine."""
    steps = {case: make_step(case, model_name, batch) for case in cases}
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync()
    times: Dict[str, list] = {case: [] for case in cases}
    for _ in range(rounds):
        for case, step in steps.items():
            t0 = time.perf_counter()
            step()
            _sync()
            times[case].append(time.perf_counter() - t0)
    return {case: (statistics.median(ts), statistics.median(t / c for t, c in zip(ts, times["ce"])))
            for case, ts in times.items()}


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description="per-step cost of each training method vs ce (median of interleaved rounds)")
    p.add_argument("--model", default="msdnet_mnist", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = p.parse_args(argv)
    if "ce" not in args.cases:
        args.cases = ["ce", *args.cases]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {DEVICE}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, model {args.model}, "
          f"batch {args.batch}", flush=True)
    res = measure(args.model, args.batch, args.rounds, args.warmup, tuple(args.cases))
    for case, (s, ratio) in res.items():
        print(f"{case:10s} {1e3 * s:9.1f} ms per loaded batch   ratio vs ce {ratio:.2f}x (median of per-round ratios)",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
