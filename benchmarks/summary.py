"""Target table from pytest-benchmark JSON files.

Usage: ``python -m benchmarks.summary benchmarks/results/*.json [--require-all]``

Prints one row per target of :data:`benchmarks.targets.TARGETS`: target, measured ratio, goal, ok (``yes``,
``MISS``, or ``n/a`` when a benchmark it needs is absent, e.g. GPU cases in a CPU run).  Exits 1 when a
measured target misses its goal (with ``--require-all``: also when one could not be measured), 2 on
unreadable input or an ambiguous selector.  When several files hold the same benchmark, the file named
last wins (pass them oldest first).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from benchmarks.targets import TARGETS, Selector, Target

__all__ = ["load_benchmarks", "select", "evaluate", "format_table", "main"]


class SummaryError(Exception):
    """Bad input (unreadable JSON, ambiguous selector)."""


def load_benchmarks(paths: Sequence[str]) -> List[dict]:
    """All benchmarks of the files, later files replacing earlier ones with the same ``fullname``."""
    by_name: Dict[str, dict] = {}
    for path in paths:
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise SummaryError(f"{path}: cannot read pytest-benchmark JSON ({exc})") from exc
        benches = data.get("benchmarks") if isinstance(data, dict) else None
        if not isinstance(benches, list):
            raise SummaryError(f"{path}: no 'benchmarks' list (not a pytest-benchmark JSON file)")
        for b in benches:
            by_name[b.get("fullname") or b.get("name", "")] = b
    return list(by_name.values())


def _matches(bench: dict, sel: Selector) -> bool:
    if isinstance(sel, str):
        name = bench.get("fullname") or bench.get("name", "")
        return all(part.strip() in name for part in sel.split("&"))
    info = bench.get("extra_info") or {}
    return all(k in info and info[k] == v for k, v in sel.items())


def select(benches: Iterable[dict], sel: Selector) -> Optional[dict]:
    """The one benchmark matching ``sel``; None if none; SummaryError if several."""
    found = [b for b in benches if _matches(b, sel)]
    if len(found) > 1:
        names = ", ".join(sorted(b.get("fullname", "?") for b in found)[:4])
        raise SummaryError(f"selector {sel!r} matches {len(found)} benchmarks ({names}, ...)")
    return found[0] if found else None


def _metric(bench: dict, metric: str) -> Optional[float]:
    info = bench.get("extra_info") or {}
    if metric in info:
        val = info[metric]
    else:
        val = (bench.get("stats") or {}).get(metric)
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
        return None
    return float(val)


def evaluate(target: Target, benches: Sequence[dict]) -> Tuple[Optional[float], str]:
    """``(measured ratio or None, status)`` with status ``'yes'``, ``'MISS'`` or ``'n/a'``."""
    num = select(benches, target.numerator)
    den = select(benches, target.denominator) if target.denominator is not None else None
    if num is None or (target.denominator is not None and den is None):
        return None, "n/a"
    a = _metric(num, target.metric)
    b = _metric(den, target.metric) if den is not None else 1.0
    if a is None or b is None or b == 0:
        return None, "n/a"
    value = a / b
    ok = value >= target.goal if target.higher_is_better else value <= target.goal
    return value, "yes" if ok else "MISS"


def format_table(rows: Sequence[Tuple[Target, Optional[float], str]]) -> str:
    header = ("target", "measured", "goal", "ok")
    lines = []
    for t, value, status in rows:
        goal = (">= " if t.higher_is_better else "<= ") + f"{t.goal:g}"
        lines.append((t.name, "-" if value is None else f"{value:.3g}", goal, status))
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in lines)])


def main(argv: Optional[Sequence[str]] = None, targets: Sequence[Target] = TARGETS) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON files (oldest first)")
    ap.add_argument("--require-all", action="store_true", help="a target that could not be measured fails too")
    args = ap.parse_args(argv)
    try:
        benches = load_benchmarks(args.json)
        rows = [(t, *evaluate(t, benches)) for t in targets]
    except SummaryError as exc:
        print(f"benchmarks.summary: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    missed = [t.name for t, _, s in rows if s == "MISS" or (args.require_all and s == "n/a")]
    if missed:
        print(f"\n{len(missed)} target(s) missed: " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
