#!/usr/bin/env python
"""The main job on the embedded data: MSDNet baseline vs IMTA (GE stage 1, then ISC + OFA stage 2),
and optionally the other two methods (Phuong & Lampert distillation, L2W).

    python demo.py --output runs/demo                                  # ce, ge, imta (MNIST, CPU, a few minutes)
    python demo.py --output runs/demo --methods ce ge imta distill l2w  # all five (L2W costs ~5x a ce step)

Trains each run (``imta`` from the GE checkpoint), evaluates them with the anytime and budgeted
protocols, prints the per-exit test accuracy side by side and writes the overlaid plots to
``OUTPUT/compare`` (plus ``l2w_weights.png``, the learned weight per exit, when l2w ran).
Re-running resumes/skips finished runs (``--resume auto``).
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import eval as evaluate
import train
from imta_fast.plotting import plot_exit_weights

LABELS = {"ce": "MSDNet (ce)", "ge": "GE (stage 1)", "imta": "IMTA (GE+ISC+OFA)", "distill": "Distill (P&L)",
          "l2w": "L2W"}


def plot_l2w_weights(run_dir: Path, path: Path, dataset: str) -> None:
    rows = list(csv.DictReader(open(run_dir / "summary.csv")))
    cols = sorted((c for c in rows[0] if c.startswith("l2w_weight_exit")), key=lambda c: int(c[len("l2w_weight_exit"):]))
    plot_exit_weights([int(r["epoch"]) + 1 for r in rows], [[float(r[c]) for r in rows] for c in cols], str(path),
                      dataset=dataset)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "digits"])
    p.add_argument("--methods", nargs="+", default=["ce", "ge", "imta"], choices=list(LABELS),
                   help="which runs to train and compare (imta needs ge)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if "imta" in args.methods and "ge" not in args.methods:
        p.error("--methods imta needs ge (its stage-1 teacher)")
    out = Path(args.output)
    common = ["--dataset", args.dataset, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
              "--lr", str(args.lr), "--seed", str(args.seed), "--lr-schedule", "cosine", "--resume", "auto"]
    extra = {"imta": ["--teacher", str(out / "ge" / "best.pt")]}
    methods = [m for m in LABELS if m in args.methods]  # ge before imta
    for name in methods:
        t0 = time.perf_counter()
        print(f"== training {name} ==", flush=True)
        rc = train.main(common + ["--method", name, *extra.get(name, []), "--output", str(out / name)])
        if rc != 0:
            return rc
        print(f"== {name} done in {time.perf_counter() - t0:.0f} s ==", flush=True)
    rc = evaluate.main([str(out / m) for m in methods] + ["--labels", *[LABELS[m] for m in methods],
                                                          "--output", str(out / "compare")])
    if rc == 0 and "l2w" in methods:
        plot_l2w_weights(out / "l2w", out / "compare" / "l2w_weights.png", args.dataset)
    return rc


if __name__ == "__main__":
    sys.exit(main())
