"""Early-exit evaluator vs the full network: wall-clock speedup against FLOPs speedup, exit agreement
with the simulated protocol, and the measured latency model's error (issue #10; docs/method.md §13).

    pytest benchmarks/bench_evaluator.py --benchmark-only [--benchmark-json=out.json]
    python -m benchmarks.bench_evaluator [--model msdnet_mnist] [--batch-size 1024] [--repeats 5]  # prints the table

Cases: CPU (marked ``cpu_bench``: they run without CUDA): ``msdnet_cifar_anytime`` (3x32x32) and
``msdnet_mnist`` (1x28x28), B = 1024, fp32, one thread (``torch.set_num_threads(1)``; pin the process
with ``taskset -c N`` on a shared box), eager stages, channels_last, Conv+BN folded, no buckets,
micro-batches ``auto`` (and the CIFAR net once more with whole stages, ``micro_batch=None``).  GPU (CUDA only): the
same models and ``msdnet_imagenet_step4``, B in {256, 1024}, bf16 autocast, channels_last, Conv+BN
folded, eager and CUDA graphs (buckets of 64 rows).  Random weights: meaningless accuracy, real per-stage costs.

Per case and budget q (thresholds fitted with ``fit_thresholds`` on the random-weight confidences of
the same batch, so the exits realise ``π_k ∝ q^k``):

- FLOPs speedup = full MACs / expected MACs of the realised exits (``imta_fast.flops``);
- wall-clock speedup = full-network median / early-exit median; both are whole evaluator calls timed
  the same way (perf_counter + device sync around the call), interleaved, after an untimed round that
  runs every shape (``imta_fast.inference.timing.time_interleaved``); the spread (IQR / median) is kept;
- exit agreement = fraction of samples whose exit equals the simulated protocol's on the same logits;
- latency-model error = |predicted - measured| / measured, prediction from
  ``measure_costs_and_time`` (no-exit profiles at B, B/2, ..., B/16, interleaved with the timed
  rounds so both see the same machine load) and the realised exits.

``extra_info`` (one benchmark per case; the timed call is the middle budget): ``budgets`` (the rows
above), ``min_clock_over_flops`` (worst wall-clock / FLOPs speedup over budgets whose FLOPs speedup is
>= 1.5), ``min_exit_agreement``, ``max_latency_model_error``, ``stage_time_shares`` /
``stage_mac_shares`` of the full network.  Targets: benchmarks/targets.py ("early exit" entries).
"""
from __future__ import annotations

import argparse
import os
import statistics
from typing import Dict, Optional

import pytest
import torch

from imta_fast.flops import count_exit_costs
from imta_fast.inference.buckets import parse_buckets
from imta_fast.inference.config import parse_micro_batch
from imta_fast.inference.evaluator import EarlyExitEvaluator
from imta_fast.inference.latency import measure_costs_and_time, predict_batches_ms
from imta_fast.inference.protocol import confidences_and_predictions, exit_fractions, exit_indices, fit_thresholds
from imta_fast.models import create_model

SHAPES = {"msdnet_cifar_anytime": (3, 32, 32), "msdnet_mnist": (1, 28, 28), "msdnet_imagenet_step4": (3, 224, 224)}
QS = (0.25, 0.5, 0.75, 1.0, 1.5)
MIN_FLOPS_SPEEDUP = 1.5
REPEATS = int(os.environ.get("IMTA_BENCH_EE_REPEATS", "5"))


def measure_case(model_name: str, batch_size: int, device: str = "cpu", *, impl: str = "eager", amp: bool = False,
                 channels_last: bool = True, threads: Optional[int] = 1, qs=QS, repeats: int = REPEATS,
                 buckets=None, fold_bn: bool = False, micro_batch="auto", seed: int = 0) -> Dict[str, object]:
    """Everything the benchmark records for one case (see the module docstring)."""
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = create_model(model_name).eval()
    macs = count_exit_costs(model, SHAPES[model_name]).macs_m
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, *SHAPES[model_name], device=dev)
    amp_dtype = torch.bfloat16 if amp else None
    ev = EarlyExitEvaluator(model, buckets=buckets, cuda_graphs=impl == "cuda_graphs", compile=impl == "compile",
                            amp_dtype=amp_dtype, channels_last=channels_last, fold_bn=fold_bn, timing=False,
                            micro_batch=None if impl == "cuda_graphs" else micro_batch)
    K = ev.num_exits
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
        xs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        logits, _ = model(xs)
    conf, _ = confidences_and_predictions(logits)
    conf = conf.cpu()
    taus = {q: fit_thresholds(conf, exit_fractions(q, K)).to(dev) for q in qs}
    outs = {q: ev(x, t) for q, t in taus.items()}  # exits; also runs every shape once
    fns = {"full": lambda: ev.full_network(x)}
    fns.update({q: (lambda t: lambda: ev(x, t))(t) for q, t in taus.items()})
    # the latency model's profiles run interleaved with the timed contenders (same load conditions)
    costs, stats = measure_costs_and_time(ev, x, fns, batch_sizes=[max(1, batch_size // d) for d in (1, 2, 4, 8, 16)],
                                          repeats=repeats, warmup=1)
    full = stats["full"]
    rows = []
    for q in qs:
        idx = outs[q].exit_index.cpu()
        frac = (torch.bincount(idx, minlength=K).double() / batch_size).tolist()
        expected = sum(f * m for f, m in zip(frac, macs))
        st = stats[q]
        pred_ms = predict_batches_ms(idx, costs, batch_size)
        measured = st.median_ms / batch_size
        rows.append({
            "q": q, "exit_fractions": frac, "flops_speedup": macs[-1] / expected,
            "wallclock_speedup": full.median_ms / st.median_ms,
            "clock_over_flops": (full.median_ms / st.median_ms) / (macs[-1] / expected),
            "ms_per_image": measured, "spread": st.spread, "predicted_ms_per_image": pred_ms,
            "latency_model_error": abs(pred_ms - measured) / measured,
            "exit_agreement": (idx == exit_indices(conf, taus[q].cpu())).double().mean().item(),
            "rows_per_stage": outs[q].computed,
        })
    prof = [ev.profile(x) for _ in range(3)]
    stage_ms = [statistics.median(p.stage_ms[k] for p in prof) for k in range(K)]
    own = [m - (macs[k - 1] if k else 0.0) for k, m in enumerate(macs)]
    eligible = [r["clock_over_flops"] for r in rows if r["flops_speedup"] >= MIN_FLOPS_SPEEDUP]
    return {
        "bench": "early_exit", "model": model_name, "batch_size": batch_size, "device": dev.type, "impl": impl,
        "dtype": "bf16" if amp else "fp32", "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "channels_last": channels_last, "buckets": buckets, "fold_bn": fold_bn,
        "micro_batch": micro_batch, "chunk_rows": ev.executor.chunk_rows(x),
        "full_ms_per_image": full.median_ms / batch_size, "full_spread": full.spread,
        "budgets": rows,
        "min_clock_over_flops": min(eligible) if eligible else float("nan"),
        "min_exit_agreement": min(r["exit_agreement"] for r in rows),
        "max_latency_model_error": max(r["latency_model_error"] for r in rows),
        "stage_time_shares": [t / sum(stage_ms) for t in stage_ms],
        "stage_mac_shares": [o / macs[-1] for o in own],
        "_ev": ev, "_x": x, "_tau": taus[qs[len(qs) // 2]],
    }


def format_case(r: Dict[str, object]) -> str:
    head = (f"{r['model']} B={r['batch_size']} {r['device']} {r['impl']} {r['dtype']} threads={r['threads']} "
            f"channels_last={r['channels_last']} fold_bn={r['fold_bn']} buckets={r['buckets']} "
            f"micro_batch={r['micro_batch']} (chunks of {r['chunk_rows']} rows): full {r['full_ms_per_image']:.4f} ms/img "
            f"(IQR {100 * r['full_spread']:.1f}%)")
    lines = [head, f"{'q':>5} {'FLOPs x':>8} {'clock x':>8} {'ratio':>6} {'ms/img':>8} {'IQR%':>5} {'pred':>8} "
                   f"{'err%':>5} {'agree':>7}"]
    for b in r["budgets"]:
        lines.append(f"{b['q']:>5.2f} {b['flops_speedup']:>8.2f} {b['wallclock_speedup']:>8.2f} "
                     f"{b['clock_over_flops']:>6.2f} {b['ms_per_image']:>8.4f} {100 * b['spread']:>5.1f} "
                     f"{b['predicted_ms_per_image']:>8.4f} {100 * b['latency_model_error']:>5.1f} "
                     f"{b['exit_agreement']:>7.4f}")
    lines.append("stage time shares " + " ".join(f"{v:.3f}" for v in r["stage_time_shares"]))
    lines.append("stage MAC shares  " + " ".join(f"{v:.3f}" for v in r["stage_mac_shares"]))
    lines.append(f"min clock/FLOPs (FLOPs x >= {MIN_FLOPS_SPEEDUP}) {r['min_clock_over_flops']:.3f}, "
                 f"min exit agreement {r['min_exit_agreement']:.4f}, max latency-model error "
                 f"{100 * r['max_latency_model_error']:.1f}%")
    return "\n".join(lines)


def _record(benchmark, r: Dict[str, object]) -> None:
    ev, x, tau = r["_ev"], r["_x"], r["_tau"]
    sync = (lambda: torch.cuda.synchronize()) if x.device.type == "cuda" else (lambda: None)

    def call():
        ev(x, tau)
        sync()

    benchmark.group = f"early exit {r['device']} B={r['batch_size']} {r['impl']} micro_batch={r['micro_batch']}"
    benchmark.pedantic(call, rounds=3 if x.device.type == "cpu" else 20, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in r.items() if not k.startswith("_")})


CPU_CASES = [("msdnet_cifar_anytime", 1024, "auto"), ("msdnet_mnist", 1024, "auto"),
             ("msdnet_cifar_anytime", 1024, None)]  # whole stages: what micro-batches buy
GPU_CASES = [(m, b, impl) for m in ("msdnet_cifar_anytime", "msdnet_mnist", "msdnet_imagenet_step4")
             for b in (256, 1024) for impl in ("eager", "cuda_graphs")]


@pytest.mark.cpu_bench
@pytest.mark.parametrize("model_name,batch_size,micro_batch", CPU_CASES)
def test_early_exit_cpu(benchmark, model_name, batch_size, micro_batch):
    r = measure_case(model_name, batch_size, "cpu", threads=1, fold_bn=True, micro_batch=micro_batch)
    _record(benchmark, r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")
@pytest.mark.parametrize("model_name,batch_size,impl", GPU_CASES)
def test_early_exit_gpu(benchmark, model_name, batch_size, impl):
    torch.backends.cudnn.benchmark = True
    r = measure_case(model_name, batch_size, "cuda", impl=impl, amp=True, threads=None,
                     buckets=64 if impl == "cuda_graphs" else None, fold_bn=True, repeats=20)
    _record(benchmark, r)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="CPU quick run of the early-exit benchmark (prints the table)")
    p.add_argument("--model", nargs="+", default=[m for m, _, mb in CPU_CASES if mb == "auto"], choices=sorted(SHAPES))
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--buckets", default="none", help="none, pow2, stepN or a list (imta_fast.inference.buckets)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--impl", default="eager", choices=["eager", "compile", "cuda_graphs"])
    p.add_argument("--amp", action="store_true")
    p.add_argument("--fold-bn", action="store_true")
    p.add_argument("--micro-batch", default="auto", type=parse_micro_batch, help="auto, none or rows per chunk")
    args = p.parse_args(argv)

    for m in args.model:
        r = measure_case(m, args.batch_size, args.device, impl=args.impl, amp=args.amp, threads=args.threads,
                         repeats=args.repeats, buckets=parse_buckets(args.buckets),
                         channels_last=not args.no_channels_last, fold_bn=args.fold_bn, micro_batch=args.micro_batch)
        print(format_case(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
