#!/usr/bin/env python
"""Evaluate one or more training runs: anytime accuracy per exit, budgeted (dynamic) accuracy vs
expected MACs, and (``--mode wallclock``) real early exit timed on the device.

    python eval.py runs/ce runs/imta --labels MSDNet IMTA --output runs/compare

Thresholds are fitted on each run's hold-out split (``split.json`` in the run dir) and applied to
the test split.  Writes ``anytime.csv``, ``budgeted.csv``, ``summary.json`` and PNG plots, with
all runs overlaid.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from imta_fast.train.checkpoint import CheckpointError, load_checkpoint
from imta_fast.data import DataError, build_data, build_eval_loader
from imta_fast.distributed import DistInfo, init_distributed
from imta_fast.inference.protocol import anytime_accuracy, budgeted_evaluation, cache_key, cached_logits, \
    confidences_and_predictions, exit_indices, fit_latency_budget
from imta_fast.inference.predict import predict
from imta_fast.models.build import build_model
from imta_fast.inference.evaluator import EarlyExitEvaluator, measure_stage_costs, time_full_network
from imta_fast.flops import count_exit_costs
from imta_fast.plotting import plot_anytime, plot_budgeted, plot_wallclock

log = logging.getLogger("imta_fast")


@dataclass
class RunResult:
    label: str
    run_dir: str
    dataset: str
    macs_m: List[float]
    params_m: List[float]
    top1: List[float]
    top5: List[float]
    budgeted: List[dict]
    wallclock: Optional[List[dict]] = None
    latency_fit: Optional[dict] = None


def load_run(run_dir: str, which: str, device: torch.device):
    """(model in eval mode, checkpoint path, saved config, model kwargs) of a run directory."""
    path = Path(run_dir) / f"{which}.pt"
    if not path.is_file():
        raise CheckpointError(f"no {which}.pt in {run_dir}: is it a train.py --output directory?")
    payload = load_checkpoint(str(path))
    config, kwargs = payload["config"], payload["model_kwargs"]
    model = build_model(config, kwargs["num_classes"], kwargs["in_channels"])
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), str(path), config, kwargs


def run_logits(model, config: dict, kwargs: dict, run_dir: str, ckpt_path: str, args, dist: DistInfo) -> dict:
    """Hold-out and test logits [K, N, C] and labels, cached in the run dir (``logits_<split>.pt``).

    The cache key covers the checkpoint's bytes and everything else that changes the logits
    (hold-out transform, autocast, data root, image size), so a stale cache is never reused.
    """
    holdout_transform = args.holdout_transform or config["holdout_transform"]
    data_dir = args.data_dir or config["data_dir"]
    key = cache_key(ckpt_path, holdout_transform=holdout_transform, amp=args.amp, data_dir=data_dir,
                    image_size=kwargs.get("image_size"), dataset=config["dataset"])
    data = []

    def compute(split: str):
        if not data:
            data.append(build_data(config["dataset"], data_dir, split_path=str(Path(run_dir) / "split.json"),
                                   holdout_size=config["holdout_size"], holdout_transform=holdout_transform,
                                   seed=config["seed"], image_size=config.get("image_size")))
        loader = build_eval_loader(getattr(data[0], split), args.batch_size, args.workers, dist)
        return predict(model, loader, dist.device, args.amp, "bfloat16", False, progress=sys.stderr.isatty(), desc=split)

    result = {}
    for split in ("holdout", "test"):
        result[f"{split}_logits"], result[f"{split}_labels"] = cached_logits(
            Path(run_dir) / f"logits_{split}.pt", key, lambda: compute(split), write=dist.is_primary)
    return result


def evaluate_run(run_dir: str, label: str, args, dist: DistInfo) -> RunResult:
    model, ckpt_path, config, kwargs = load_run(run_dir, args.checkpoint, dist.device)
    out = run_logits(model, config, kwargs, run_dir, ckpt_path, args, dist)
    costs = count_exit_costs(model, (kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"]))
    acc = anytime_accuracy(out["test_logits"], out["test_labels"], topk=(1, 5))
    rows = budgeted_evaluation(out["holdout_logits"], out["holdout_labels"], out["test_logits"], out["test_labels"],
                               costs.macs_m, points=args.budget_points)
    result = RunResult(label, run_dir, config["dataset"], costs.macs_m, costs.params_m, acc[1], acc[5], [r.to_dict() for r in rows])
    if args.mode == "wallclock":
        wallclock_evaluation(result, model, config, run_dir, out, args, dist)
    return result


def test_images(config: dict, run_dir: str, args) -> List[torch.Tensor]:
    """The test split as batches of images (labels come from the logits cache, in the same order)."""
    data = build_data(config["dataset"], args.data_dir or config["data_dir"], split_path=str(Path(run_dir) / "split.json"),
                      holdout_size=config["holdout_size"], holdout_transform="eval", seed=config["seed"],
                      image_size=config.get("image_size"))
    loader = torch.utils.data.DataLoader(data.test, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    return [x for x, _ in loader]


def wallclock_evaluation(result: RunResult, model, config: dict, run_dir: str, logits: dict, args, dist: DistInfo) -> None:
    """Real early exit, timed: accuracy vs measured ms/image per budget, next to the FLOPs view.

    The full network is timed with the evaluator's own (compiled / graphed) stages, so the
    speedup compares like with like.  ``parity`` is the fraction of test samples whose exit equals
    the simulated protocol's (budgeted evaluation from full-network logits).
    """
    device = dist.device
    amp_dtype = torch.bfloat16 if args.amp else None
    model = model.to(memory_format=torch.channels_last) if args.channels_last else model
    ev = EarlyExitEvaluator(model, compile=args.compile, cuda_graphs=args.cuda_graphs and device.type == "cuda",
                            amp_dtype=amp_dtype, channels_last=args.channels_last)
    batches = [x.to(device) for x in test_images(config, run_dir, args)]
    labels = logits["test_labels"].to(device)
    conf, _ = confidences_and_predictions(logits["test_logits"])
    full_ms = sum(time_full_network(ev, x, repeats=args.repeats, warmup=1) for x in batches) / labels.numel()
    rows = result.budgeted[:: max(1, len(result.budgeted) // args.wallclock_points)]
    out = []
    for row in tqdm(rows, desc=f"wallclock {result.label}", leave=False, disable=not sys.stderr.isatty()):
        tau = torch.tensor(row["thresholds"], device=device)
        ev.evaluate(zip(batches[:1], labels.split(args.batch_size)[:1]), thresholds=tau)  # warm-up (compile, graphs)
        reports = [ev.evaluate(zip(batches, labels.split(args.batch_size)), thresholds=tau) for _ in range(args.repeats)]
        rep = min(reports, key=lambda r: r.ms_per_image)
        parity = (rep.exit_index == exit_indices(conf, tau.cpu())).double().mean().item()
        out.append({"q": row["q"], "expected_mmacs": row["expected_macs"], "flops_speedup": result.macs_m[-1] / row["expected_macs"],
                    "ms_per_image": rep.ms_per_image, "full_ms_per_image": full_ms,
                    "wallclock_speedup": full_ms / rep.ms_per_image, "test_top1": rep.accuracy, "parity": parity,
                    "exit_counts": rep.exit_counts})
    result.wallclock = out
    if args.latency_budget is not None:
        costs = measure_stage_costs(ev, batches[0])
        hold_conf, hold_pred = confidences_and_predictions(logits["holdout_logits"])
        fit = fit_latency_budget(hold_conf, hold_pred, logits["holdout_labels"], costs, args.latency_budget)
        tau = torch.as_tensor(fit.thresholds, device=device, dtype=torch.float32)
        rep = ev.evaluate(zip(batches, labels.split(args.batch_size)), thresholds=tau)
        result.latency_fit = {"budget_ms": args.latency_budget, "predicted_ms": fit.predicted_ms, "feasible": fit.feasible,
                              "measured_ms": rep.ms_per_image, "test_top1": rep.accuracy, "thresholds": list(map(float, tau))}


def write_outputs(results: Sequence[RunResult], output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    dataset = ", ".join(sorted({r.dataset for r in results}))
    with open(output / "anytime.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "exit", "cumulative_mmacs", "cumulative_mparams", "top1", "top5"])
        for r in results:
            for k in range(len(r.top1)):
                w.writerow([r.label, k + 1, f"{r.macs_m[k]:.4f}", f"{r.params_m[k]:.4f}", f"{r.top1[k]:.2f}", f"{r.top5[k]:.2f}"])
    with open(output / "budgeted.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "q", "expected_mmacs", "test_top1", "holdout_top1", "exit_fractions", "thresholds"])
        for r in results:
            for row in r.budgeted:
                w.writerow([r.label, f"{row['q']:.2f}", f"{row['expected_macs']:.4f}", f"{row['test_accuracy']:.2f}",
                            f"{row['fit_accuracy']:.2f}", " ".join(f"{x:.4f}" for x in row["exit_fractions"]),
                            " ".join(f"{x:.6g}" for x in row["thresholds"])])
    if any(r.wallclock for r in results):
        with open(output / "wallclock.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "q", "expected_mmacs", "flops_speedup", "ms_per_image", "full_ms_per_image",
                        "wallclock_speedup", "test_top1", "parity_with_simulated"])
            for r in results:
                for row in r.wallclock:
                    w.writerow([r.label, f"{row['q']:.2f}", f"{row['expected_mmacs']:.4f}", f"{row['flops_speedup']:.3f}",
                                f"{row['ms_per_image']:.5f}", f"{row['full_ms_per_image']:.5f}",
                                f"{row['wallclock_speedup']:.3f}", f"{row['test_top1']:.2f}", f"{row['parity']:.4f}"])
        plot_wallclock({r.label: ([x["ms_per_image"] for x in r.wallclock], [x["test_top1"] for x in r.wallclock]) for r in results},
                       str(output / "wallclock.png"),
                       {r.label: ([x["expected_macs"] for x in r.budgeted], [x["test_accuracy"] for x in r.budgeted]) for r in results},
                       dataset=dataset, device=device_name())
    with open(output / "summary.json", "w") as f:
        json.dump([r.__dict__ for r in results], f, indent=1)
    plot_anytime({r.label: (r.macs_m, r.top1) for r in results}, str(output / "anytime.png"), dataset=dataset)
    plot_budgeted({r.label: ([row["expected_macs"] for row in r.budgeted], [row["test_accuracy"] for row in r.budgeted])
                   for r in results}, str(output / "budgeted.png"), dataset=dataset)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"


def format_wallclock(results: Sequence[RunResult]) -> str:
    """FLOPs speedup vs measured wall-clock speedup per budget."""
    lines = [f"{'run':>14} {'q':>5} {'MMACs':>8} {'FLOPs x':>8} {'ms/img':>9} {'clock x':>8} {'top-1':>6} {'parity':>7}"]
    for r in results:
        for x in r.wallclock or []:
            lines.append(f"{r.label[:14]:>14} {x['q']:>5.2f} {x['expected_mmacs']:>8.2f} {x['flops_speedup']:>8.2f} "
                         f"{x['ms_per_image']:>9.4f} {x['wallclock_speedup']:>8.2f} {x['test_top1']:>6.2f} {x['parity']:>7.4f}")
        if r.latency_fit:
            f = r.latency_fit
            lines.append(f"{r.label[:14]:>14} latency budget {f['budget_ms']:.4f} ms/img: predicted {f['predicted_ms']:.4f}, "
                         f"measured {f['measured_ms']:.4f}, top-1 {f['test_top1']:.2f}{'' if f['feasible'] else ' (infeasible)'}")
    return "\n".join(lines)


def format_table(results: Sequence[RunResult]) -> str:
    """Per-exit test top-1, runs side by side."""
    head = f"{'exit':>4} {'MMACs':>9} " + " ".join(f"{r.label[:14]:>14}" for r in results)
    lines = [head, "-" * len(head)]
    for k in range(len(results[0].top1)):
        lines.append(f"{k + 1:>4} {results[0].macs_m[k]:>9.2f} " + " ".join(f"{r.top1[k]:>14.2f}" for r in results))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py --output directories")
    p.add_argument("--labels", nargs="+", help="legend labels, one per run (default: directory names)")
    p.add_argument("--output", default=None, help="where CSV/JSON/PNG go (default: the single run's dir, else ./eval)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--data-dir", help="override the dataset root saved in the run")
    p.add_argument("--holdout-transform", choices=["train", "eval"], help="override the run's hold-out augmentation")
    p.add_argument("--budget-points", type=int, default=40, help="q = p/20 for p = 1..N (IMTA 40, MSDNet 39)")
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("-j", "--workers", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--mode", default="budgeted", choices=["budgeted", "wallclock"],
                   help="wallclock: also run the real early-exit evaluator and time it on --device")
    p.add_argument("--wallclock-points", type=int, default=10, help="budgets timed in wallclock mode")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per budget (the fastest is kept)")
    p.add_argument("--latency-budget", type=float, help="also fit thresholds for this many ms per image")
    p.add_argument("--compile", action="store_true", help="torch.compile each stage (batch-size buckets)")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA graph per (stage, bucket)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="auto")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        print(f"error: {len(labels)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        dist = init_distributed(args.device)
        results = [evaluate_run(r, lab, args, dist) for r, lab in zip(args.runs, labels)]
    except (CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not dist.is_primary:  # every rank evaluated its shard; rank 0 writes
        return 0
    output = Path(args.output or (args.runs[0] if len(args.runs) == 1 else "eval"))
    write_outputs(results, output)
    print(format_table(results))
    if args.mode == "wallclock":
        print(format_wallclock(results))
    print(f"wrote {output}/anytime.csv, budgeted.csv, summary.json, anytime.png, budgeted.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
