"""Evaluate training runs: anytime accuracy per exit, budgeted accuracy vs expected MACs, and (wallclock
mode) the real early-exit evaluator timed honestly next to the FLOPs view (docs/method.md §6, §13).

:func:`evaluate_runs` is the library behind ``eval.py``; it takes an
:class:`~imta_fast.inference.config.EvalConfig`.  Every file is written through :mod:`imta_fast.fileio`.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from imta_fast.fileio import atomic_write_text
from imta_fast.flops import count_exit_costs
from imta_fast.inference.config import EvalConfig
from imta_fast.inference.evaluator import EarlyExitEvaluator
from imta_fast.inference.latency import fit_latency_budget, measure_costs_and_time, predict_batches_ms
from imta_fast.inference.predict import predict
from imta_fast.inference.protocol import anytime_accuracy, budgeted_evaluation, confidences_and_predictions, exit_indices
from imta_fast.inference.rundir import LoadedRun, cache_key, cached_logits, load_run
from imta_fast.inference.timing import time_interleaved

log = logging.getLogger("imta_fast")

__all__ = ["RunResult", "RunData", "evaluate_runs", "evaluate_run", "write_outputs", "format_table",
           "format_wallclock", "device_name"]


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
    stage_costs: Optional[dict] = None


class RunData:
    """A run's datasets, built at most once (the logits pass and the timed pass share them)."""

    def __init__(self, run: LoadedRun, run_dir: str, cfg: EvalConfig):
        self.run, self.run_dir, self.cfg = run, run_dir, cfg
        self.holdout_transform = cfg.holdout_transform or run.config["holdout_transform"]
        self.data_dir = cfg.data_dir or run.config["data_dir"]
        self._bundle = None

    @property
    def bundle(self):
        if self._bundle is None:
            from imta_fast.data import build_data

            c = self.run.config
            self._bundle = build_data(c["dataset"], self.data_dir, split_path=str(Path(self.run_dir) / "split.json"),
                                      holdout_size=c["holdout_size"], holdout_transform=self.holdout_transform,
                                      seed=c["seed"], image_size=c.get("image_size"))
        return self._bundle


def run_logits(data: RunData, dist) -> dict:
    """Hold-out and test logits [K, N, C] and labels, cached in the run dir (``logits_<split>.pt``).

    The cache key covers the checkpoint's bytes and everything else that changes the logits
    (hold-out transform, autocast, data root, image size), so a stale cache is never reused.
    """
    from imta_fast.data import make_loader

    run, cfg = data.run, data.cfg
    # The backend is part of the key (DALI's decoder rounds differently) and so is skipping (it shrinks N).
    key = cache_key(run.checkpoint_path, holdout_transform=data.holdout_transform, amp=cfg.amp, data_dir=data.data_dir,
                    image_size=run.model_kwargs.get("image_size"), dataset=run.config["dataset"],
                    data_backend=cfg.data_backend, skip_corrupt=cfg.skip_corrupt)

    def compute(split: str):
        loader = make_loader(getattr(data.bundle, split), backend=cfg.data_backend, train=False,
                             batch_size=cfg.batch_size, workers=cfg.workers, seed=0, dist=dist,
                             skip_corrupt=cfg.skip_corrupt)
        return predict(run.model, loader, dist.device, cfg.amp, "bfloat16", False, progress=sys.stderr.isatty(), desc=split)

    result = {}
    for split in ("holdout", "test"):
        result[f"{split}_logits"], result[f"{split}_labels"] = cached_logits(
            Path(data.run_dir) / f"logits_{split}.pt", key, lambda: compute(split), write=dist.is_primary)
    return result


def evaluate_run(run_dir: str, label: str, cfg: EvalConfig, dist) -> RunResult:
    run = load_run(run_dir, cfg.checkpoint, dist.device)
    data = RunData(run, run_dir, cfg)
    out = run_logits(data, dist)
    k = run.model_kwargs
    costs = count_exit_costs(run.model, (k["in_channels"], k["image_size"], k["image_size"]))
    acc = anytime_accuracy(out["test_logits"], out["test_labels"], topk=(1, 5))
    rows = budgeted_evaluation(out["holdout_logits"], out["holdout_labels"], out["test_logits"], out["test_labels"],
                               costs.macs_m, points=cfg.budget_points)
    result = RunResult(label, run_dir, run.config["dataset"], costs.macs_m, costs.params_m, acc[1], acc[5],
                       [r.to_dict() for r in rows])
    if cfg.mode == "wallclock":
        wallclock_evaluation(result, data, out, dist)
    return result


def evaluate_runs(cfg: EvalConfig, dist) -> List[RunResult]:
    """Evaluate every run of ``cfg`` (raises CheckpointError / DataError with one-line messages)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return [evaluate_run(r, lab, cfg, dist) for r, lab in zip(cfg.runs, cfg.run_labels)]


def _stage_shares(stage_ms: Sequence[float], active: Sequence[int], macs_m: Sequence[float]):
    """Per-stage share of the measured time and of the MACs spent (MACs of stage k = its own
    blocks + head, times the samples that entered it)."""
    own = [m - (macs_m[k - 1] if k else 0.0) for k, m in enumerate(macs_m)]
    spent = [o * a for o, a in zip(own, active)]
    t, s = sum(stage_ms), sum(spent)
    return [x / t if t else 0.0 for x in stage_ms], [x / s if s else 0.0 for x in spent]


def wallclock_evaluation(result: RunResult, data: RunData, logits: dict, dist) -> None:
    """Real early exit, timed: accuracy vs measured ms/image per budget, next to the FLOPs view.

    The full network runs on the evaluator's own executor (same stages, memory format, buckets), and
    every contender (the full network, each budget) is timed as whole passes over the test split,
    interleaved, medians with quartiles (:func:`imta_fast.inference.timing.time_interleaved`); an
    untimed pass first runs every shape.  Defaults that pay on CPU (benchmarks/NOTES.md "Early exit"):
    channels_last and Conv+BN folding (``--no-channels-last`` / ``--no-fold-bn`` turn them off).
    ``parity`` is the exit agreement: the fraction of test samples whose exit equals the simulated
    protocol's (budgeted evaluation from the cached full-network logits).  The measured latency model
    (:func:`~imta_fast.inference.latency.measure_costs_and_time`, profiled interleaved with the timed
    passes) predicts each budget's time from its exits (``predicted_ms_per_image``) and serves
    ``--latency-budget``.
    """
    cfg, device, model = data.cfg, dist.device, data.run.model
    amp_dtype = torch.bfloat16 if cfg.amp else None
    channels_last = cfg.channels_last if cfg.channels_last is not None else True
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    bs = 1 if cfg.streaming else cfg.wallclock_batch_size
    ev = EarlyExitEvaluator(model, buckets=None if cfg.streaming else cfg.bucket_spec(), compile=cfg.compile,
                            cuda_graphs=cfg.cuda_graphs and device.type == "cuda", amp_dtype=amp_dtype,
                            channels_last=channels_last, min_rows=1 if cfg.streaming else 2,
                            fold_bn=cfg.fold_bn if cfg.fold_bn is not None else True,
                            micro_batch=None if (cfg.streaming or cfg.cuda_graphs) else cfg.micro_batch_spec())
    loader = torch.utils.data.DataLoader(data.bundle.test, batch_size=bs, shuffle=False, num_workers=cfg.workers)
    batches = [x.to(device) for x, _ in loader]
    labels = logits["test_labels"].to(device)
    label_batches = labels.split(bs)
    if sum(x.shape[0] for x in batches) != labels.numel():
        raise RuntimeError("test split and cached test logits disagree in size; delete logits_test.pt")
    conf, _ = confidences_and_predictions(logits["test_logits"])
    macs = result.macs_m
    picked = result.budgeted[:: max(1, len(result.budgeted) // cfg.wallclock_points)]
    taus = [torch.tensor(row["thresholds"], device=device, dtype=torch.float32) for row in picked]
    # Untimed pass per budget: exits, accuracy, per-stage times; also runs every shape once.
    reports = [ev.evaluate(zip(batches, label_batches), thresholds=tau, macs=macs) for tau in
               tqdm(taus, desc=f"wallclock {result.label}", leave=False, disable=not sys.stderr.isatty())]
    fns = {"full": lambda: [ev.full_network(x) for x in batches]}
    for i, tau in enumerate(taus):
        fns[f"b{i}"] = (lambda t: lambda: [ev(x, t) for x in batches])(tau)
    if cfg.streaming:
        stage_costs, stats = None, time_interleaved(fns, repeats=cfg.repeats, warmup=1, device=device)
    else:  # the latency model's profiles run interleaved with the timed passes (same machine load)
        stage_costs, stats = measure_costs_and_time(
            ev, batches[0], fns, batch_sizes=sorted({max(1, batches[0].shape[0] // d) for d in (1, 2, 4, 8, 16)}),
            repeats=cfg.repeats, warmup=1)
    n = labels.numel()
    full = stats["full"]
    out = []
    for row, tau, rep, name in zip(picked, taus, reports, list(fns)[1:]):
        st = stats[name]
        parity = (rep.exit_index == exit_indices(conf, tau.cpu())).double().mean().item()
        t_share, m_share = _stage_shares(rep.stage_ms, rep.active, macs)
        out.append({
            "q": row["q"], "expected_mmacs": rep.expected_macs, "flops_speedup": macs[-1] / rep.expected_macs,
            "ms_per_image": st.median_ms / n, "ms_q1": st.q1_ms / n, "ms_q3": st.q3_ms / n,
            "full_ms_per_image": full.median_ms / n, "full_ms_q1": full.q1_ms / n, "full_ms_q3": full.q3_ms / n,
            "wallclock_speedup": full.median_ms / st.median_ms,
            "predicted_ms_per_image": predict_batches_ms(rep.exit_index, stage_costs, bs) if stage_costs else None,
            "test_top1": rep.accuracy, "parity": parity, "exit_counts": rep.exit_counts,
            "stage_time_shares": t_share, "stage_mac_shares": m_share, "batch_size": bs,
        })
    result.wallclock = out
    result.stage_costs = stage_costs.to_dict() if stage_costs else None
    if cfg.latency_budget is not None:
        hold_conf, hold_pred = confidences_and_predictions(logits["holdout_logits"])
        fit = fit_latency_budget(hold_conf, hold_pred, logits["holdout_labels"], stage_costs, cfg.latency_budget,
                                 batch_size=bs)
        tau = torch.as_tensor(fit.thresholds, device=device, dtype=torch.float32)
        rep = ev.evaluate(zip(batches, label_batches), thresholds=tau)
        st = time_interleaved({"budget": lambda: [ev(x, tau) for x in batches]}, repeats=cfg.repeats, warmup=0,
                              device=device)["budget"]
        result.latency_fit = {"budget_ms": cfg.latency_budget, "predicted_ms": fit.predicted_ms, "feasible": fit.feasible,
                              "predicted_test_ms": predict_batches_ms(rep.exit_index, stage_costs, bs),
                              "measured_ms": st.median_ms / n, "test_top1": rep.accuracy,
                              "thresholds": [float(v) for v in tau]}


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def write_outputs(results: Sequence[RunResult], output: Path) -> None:
    """``anytime.csv``, ``budgeted.csv``, (``wallclock.csv``), ``summary.json`` and the PNG plots."""
    from imta_fast.plotting import plot_anytime, plot_budgeted, plot_wallclock

    output.mkdir(parents=True, exist_ok=True)
    dataset = ", ".join(sorted({r.dataset for r in results}))
    atomic_write_text(output / "anytime.csv", _csv_text(
        ["run", "exit", "cumulative_mmacs", "cumulative_mparams", "top1", "top5"],
        [[r.label, k + 1, f"{r.macs_m[k]:.4f}", f"{r.params_m[k]:.4f}", f"{r.top1[k]:.2f}", f"{r.top5[k]:.2f}"]
         for r in results for k in range(len(r.top1))]))
    atomic_write_text(output / "budgeted.csv", _csv_text(
        ["run", "q", "expected_mmacs", "test_top1", "holdout_top1", "exit_fractions", "thresholds"],
        [[r.label, f"{row['q']:.2f}", f"{row['expected_macs']:.4f}", f"{row['test_accuracy']:.2f}",
          f"{row['fit_accuracy']:.2f}", " ".join(f"{x:.4f}" for x in row["exit_fractions"]),
          " ".join(f"{x:.6g}" for x in row["thresholds"])] for r in results for row in r.budgeted]))
    if any(r.wallclock for r in results):
        atomic_write_text(output / "wallclock.csv", _csv_text(
            ["run", "q", "batch_size", "expected_mmacs", "flops_speedup", "ms_per_image", "ms_q1", "ms_q3",
             "full_ms_per_image", "full_ms_q1", "full_ms_q3", "wallclock_speedup", "clock_over_flops",
             "predicted_ms_per_image", "test_top1", "parity_with_simulated", "stage_time_shares", "stage_mac_shares"],
            [[r.label, f"{x['q']:.2f}", x["batch_size"], f"{x['expected_mmacs']:.4f}", f"{x['flops_speedup']:.3f}",
              f"{x['ms_per_image']:.5f}", f"{x['ms_q1']:.5f}", f"{x['ms_q3']:.5f}", f"{x['full_ms_per_image']:.5f}",
              f"{x['full_ms_q1']:.5f}", f"{x['full_ms_q3']:.5f}", f"{x['wallclock_speedup']:.3f}",
              f"{x['wallclock_speedup'] / x['flops_speedup']:.3f}", _fmt(x["predicted_ms_per_image"], ".5f"),
              f"{x['test_top1']:.2f}", f"{x['parity']:.4f}", " ".join(f"{v:.3f}" for v in x["stage_time_shares"]),
              " ".join(f"{v:.3f}" for v in x["stage_mac_shares"])]
             for r in results for x in (r.wallclock or [])]))
        bs = next(x["batch_size"] for r in results for x in (r.wallclock or []))
        plot_wallclock({r.label: ([x["ms_per_image"] for x in r.wallclock], [x["test_top1"] for x in r.wallclock])
                        for r in results if r.wallclock}, str(output / "wallclock.png"),
                       {r.label: ([x["expected_macs"] for x in r.budgeted], [x["test_accuracy"] for x in r.budgeted])
                        for r in results}, dataset=dataset, device=device_name(), batch_size=bs)
    atomic_write_text(output / "summary.json", json.dumps([asdict(r) for r in results], indent=1))
    plot_anytime({r.label: (r.macs_m, r.top1) for r in results}, str(output / "anytime.png"), dataset=dataset)
    plot_budgeted({r.label: ([row["expected_macs"] for row in r.budgeted], [row["test_accuracy"] for row in r.budgeted])
                   for r in results}, str(output / "budgeted.png"), dataset=dataset)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"


def format_wallclock(results: Sequence[RunResult]) -> str:
    """FLOPs speedup vs measured wall-clock speedup per budget (medians; IQR of the early-exit time)."""
    lines = [f"{'run':>14} {'q':>5} {'MMACs':>8} {'FLOPs x':>8} {'ms/img':>9} {'IQR %':>6} {'pred ms':>9} "
             f"{'clock x':>8} {'ratio':>6} {'top-1':>6} {'parity':>7}"]
    for r in results:
        for x in r.wallclock or []:
            iqr = 100 * (x["ms_q3"] - x["ms_q1"]) / x["ms_per_image"] if x["ms_per_image"] else 0.0
            pred = x["predicted_ms_per_image"]
            lines.append(f"{r.label[:14]:>14} {x['q']:>5.2f} {x['expected_mmacs']:>8.2f} {x['flops_speedup']:>8.2f} "
                         f"{x['ms_per_image']:>9.4f} {iqr:>6.1f} {(f'{pred:.4f}' if pred is not None else '-'):>9} "
                         f"{x['wallclock_speedup']:>8.2f} {x['wallclock_speedup'] / x['flops_speedup']:>6.2f} "
                         f"{x['test_top1']:>6.2f} {x['parity']:>7.4f}")
        if r.latency_fit:
            f = r.latency_fit
            lines.append(f"{r.label[:14]:>14} latency budget {f['budget_ms']:.4f} ms/img: predicted {f['predicted_ms']:.4f} "
                         f"(hold-out), {f['predicted_test_ms']:.4f} (test), measured {f['measured_ms']:.4f}, "
                         f"top-1 {f['test_top1']:.2f}{'' if f['feasible'] else ' (infeasible)'}")
    return "\n".join(lines)


def format_table(results: Sequence[RunResult]) -> str:
    """Per-exit test top-1, runs side by side."""
    head = f"{'exit':>4} {'MMACs':>9} " + " ".join(f"{r.label[:14]:>14}" for r in results)
    lines = [head, "-" * len(head)]
    for k in range(len(results[0].top1)):
        lines.append(f"{k + 1:>4} {results[0].macs_m[k]:>9.2f} " + " ".join(f"{r.top1[k]:>14.2f}" for r in results))
    return "\n".join(lines)
