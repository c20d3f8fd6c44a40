"""Aggregate the seed study: per-exit test top-1 mean ± std, budgeted accuracy at matched MACs,
paired (same test images) differences with exact McNemar p-values.  usage: analyze.py > tables.md"""
import csv, glob, json, math, sys
from pathlib import Path
import numpy as np
import torch

ROOT = Path("/work/main/runs")
REGIMES = {
    "10 epochs": {0: ROOT / "demo", 1: ROOT / "study/e10_s1", 2: ROOT / "study/e10_s2"},
    "2 epochs": {s: ROOT / f"study/e2_s{s}" for s in (0, 1, 2)},
}
METHODS = [("ce", "MSDNet (ce)"), ("ge", "GE (stage 1)"), ("imta", "IMTA (GE+ISC+OFA)")]
BUDGETS = [2.5, 3.5, 4.5]


def ms(v):
    v = np.asarray(v, float)
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def anytime(d):
    rows = list(csv.DictReader(open(d / "compare/anytime.csv")))
    return {m: [float(r["top1"]) for r in rows if r["run"] == lab] for m, lab in METHODS}


def budgeted(d):
    rows = list(csv.DictReader(open(d / "compare/budgeted.csv")))
    out = {}
    for m, lab in METHODS:
        pts = sorted((float(r["expected_mmacs"]), float(r["test_top1"])) for r in rows if r["run"] == lab)
        x, y = np.array(pts).T
        out[m] = (x, y)
    return out


def test_correct(run_dir):
    """[K, N] bool correctness of the best.pt test logits (eval.py's cache; newest file)."""
    files = sorted(glob.glob(str(run_dir / "logits_*_train.pt")), key=lambda p: Path(p).stat().st_mtime)
    d = torch.load(files[-1], weights_only=True)
    return (d["test_logits"].argmax(-1) == d["test_labels"].unsqueeze(0)).numpy()


def mcnemar_p(b, c):
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * p)


for regime, runs in REGIMES.items():
    done = {s: d for s, d in runs.items() if (d / "compare/anytime.csv").is_file()}
    if not done:
        continue
    seeds = sorted(done)
    print(f"\n### {regime} — seeds {seeds}\n")
    at = {s: anytime(done[s]) for s in seeds}
    K = len(at[seeds[0]]["ce"])
    print("Per-exit test top-1 (%), mean ± std over seeds (per-seed values in brackets):\n")
    print("| method | " + " | ".join(f"exit {k+1}" for k in range(K)) + " |")
    print("|---|" + "---|" * K)
    for m, lab in METHODS:
        cells = []
        for k in range(K):
            v = [at[s][m][k] for s in seeds]
            cells.append(f"{ms(v)} [{' / '.join(f'{x:.1f}' for x in v)}]")
        print(f"| {lab} | " + " | ".join(cells) + " |")
    # paired differences
    print("\nPaired differences on the same 1,000 test images (points; mean ± std over seeds), and the exact McNemar "
          "p-value of the discordant counts pooled over seeds (b = first right/second wrong, c = reverse):\n")
    print("| comparison | " + " | ".join(f"exit {k+1}" for k in range(K)) + " |")
    print("|---|" + "---|" * K)
    for a, b_ in (("imta", "ce"), ("ge", "ce"), ("imta", "ge")):
        cells = []
        for k in range(K):
            diffs = [at[s][a][k] - at[s][b_][k] for s in seeds]
            B = C = 0
            for s in seeds:
                ca, cb = test_correct(done[s] / a), test_correct(done[s] / b_)
                B += int((ca[k] & ~cb[k]).sum()); C += int((~ca[k] & cb[k]).sum())
            cells.append(f"{ms(diffs)} (b={B}, c={C}, p={mcnemar_p(B, C):.2g})")
        print(f"| {a} − {b_} | " + " | ".join(cells) + " |")
    # budgeted
    bd = {s: budgeted(done[s]) for s in seeds}
    print("\nBudgeted (dynamic) test top-1 (%) interpolated at matched expected MACs, mean ± std over seeds "
          "(curve range in MMACs in the last column; values outside a curve's range are clipped to its end):\n")
    print("| method | " + " | ".join(f"{b} MMACs" for b in BUDGETS) + " | curve range (MMACs) |")
    print("|---|" + "---|" * (len(BUDGETS) + 1))
    for m, lab in METHODS:
        cells = [ms([np.interp(b, *bd[s][m]) for s in seeds]) for b in BUDGETS]
        lo = min(bd[s][m][0].min() for s in seeds); hi = max(bd[s][m][0].max() for s in seeds)
        print(f"| {lab} | " + " | ".join(cells) + f" | {lo:.2f}–{hi:.2f} |")
    print("\nBudgeted difference imta − ce at matched MACs (points, mean ± std over seeds): " + ", ".join(
        f"{b}: {ms([np.interp(b, *bd[s]['imta']) - np.interp(b, *bd[s]['ce']) for s in seeds])}" for b in BUDGETS))

# ---- stage 2 with kl_reduction='batchmean' vs the default 'mean', from the same GE checkpoints
BM = {"10 epochs": {0: (ROOT / "study/bm_e10_s0", ROOT / "demo")},
      "2 epochs": {s: (ROOT / f"study/bm_e2_s{s}", ROOT / f"study/e2_s{s}") for s in (0, 1, 2)}}
for regime, runs in BM.items():
    done = {s: v for s, v in runs.items() if (v[0] / "compare/anytime.csv").is_file()}
    if not done:
        continue
    seeds = sorted(done)
    print(f"\n### stage 2 'batchmean' vs 'mean' — {regime}, seeds {seeds}\n")
    vals = {}
    for s in seeds:
        rows = list(csv.DictReader(open(done[s][0] / "compare/anytime.csv")))
        for lab in ("GE (stage 1)", "IMTA batchmean", "IMTA mean"):
            vals.setdefault(lab, []).append([float(r["top1"]) for r in rows if r["run"] == lab])
    K = len(vals["IMTA mean"][0])
    print("| run | " + " | ".join(f"exit {k+1}" for k in range(K)) + " |")
    print("|---|" + "---|" * K)
    for lab, v in vals.items():
        print(f"| {lab} | " + " | ".join(f"{ms([x[k] for x in v])} [{' / '.join(f'{x[k]:.1f}' for x in v)}]" for k in range(K)) + " |")
    for a, b_, da, db in (("batchmean", "mean", None, "imta"), ("batchmean", "GE", None, "ge")):
        cells = []
        for k in range(K):
            B = C = 0; diffs = []
            for s in seeds:
                ca = test_correct(done[s][0] / "imta"); cb = test_correct(done[s][1] / db)
                B += int((ca[k] & ~cb[k]).sum()); C += int((~ca[k] & cb[k]).sum()); diffs.append(100 * (ca[k].mean() - cb[k].mean()))
            cells.append(f"{ms(diffs)} (b={B}, c={C}, p={mcnemar_p(B, C):.2g})")
        print(f"| {a} − {b_} (paired) | " + " | ".join(cells) + " |")
