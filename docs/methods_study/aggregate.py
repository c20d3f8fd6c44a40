#!/usr/bin/env python
"""Aggregate `demo.py --methods ce ge imta distill l2w` runs over seeds: per-exit test top-1 (mean ± std)
and the budgeted curve (mean accuracy and expected MACs per q), as a Markdown table and a PNG.

    python docs/methods_study/aggregate.py runs/study/seed0 runs/study/seed1 runs/study/seed2 --output docs
"""
from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

from imta_fast.plotting import plot_budgeted


def read(path: Path):
    return list(csv.DictReader(open(path)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("seed_dirs", nargs="+")
    p.add_argument("--output", default="docs")
    args = p.parse_args(argv)
    anytime = defaultdict(lambda: defaultdict(list))   # run -> exit -> [top1 per seed]
    macs = {}
    budget = defaultdict(lambda: defaultdict(lambda: ([], [])))  # run -> q -> (macs, acc)
    for d in args.seed_dirs:
        for r in read(Path(d) / "compare" / "anytime.csv"):
            anytime[r["run"]][int(r["exit"])].append(float(r["top1"]))
            macs[int(r["exit"])] = float(r["cumulative_mmacs"])
        for r in read(Path(d) / "compare" / "budgeted.csv"):
            m, a = budget[r["run"]][float(r["q"])]
            m.append(float(r["expected_mmacs"]))
            a.append(float(r["test_top1"]))
    runs = list(anytime)
    exits = sorted(macs)
    lines = ["| exit | MMACs | " + " | ".join(runs) + " |", "|---|---|" + "---|" * len(runs)]
    for k in exits:
        cells = []
        for run in runs:
            v = anytime[run][k]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.2f} ± {sd:.2f}")
        lines.append(f"| {k} | {macs[k]:.2f} | " + " | ".join(cells) + " |")
    curves = {}
    for run in runs:
        qs = sorted(budget[run])
        curves[run] = ([statistics.mean(budget[run][q][0]) for q in qs], [statistics.mean(budget[run][q][1]) for q in qs])
    # Budgeted summary: mean accuracy at the budgets whose mean expected MACs fall in each third of the range.
    lines += ["", "| budgeted: mean test top-1 over the q-grid points with expected MMACs in | " +
              " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    lo, hi = macs[exits[0]], macs[exits[-1]]
    cuts = [lo, lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3, hi + 1e-9]
    for a, b in zip(cuts, cuts[1:]):
        cells = []
        for run in runs:
            pts = [acc for m, acc in zip(*curves[run]) if a <= m < b]
            cells.append(f"{statistics.mean(pts):.2f} (n={len(pts)})" if pts else "-")
        lines.append(f"| [{a:.2f}, {b:.2f}) | " + " | ".join(cells) + " |")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    plot_budgeted(curves, str(out / "methods_budgeted.png"), dataset=f"MNIST subset, mean of {len(args.seed_dirs)} seeds")
    table = "\n".join(lines)
    (out / "methods_study.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
