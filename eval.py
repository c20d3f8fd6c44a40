#!/usr/bin/env python
"""Evaluate one or more training runs: anytime accuracy per exit, budgeted (dynamic) accuracy vs
expected MACs, and (``--mode wallclock``) real early exit timed on the device.

    python eval.py runs/ce runs/imta --labels MSDNet IMTA --output runs/compare
    python eval.py runs/imta --mode wallclock --threads 1 --latency-budget 0.5

Thresholds are fitted on each run's hold-out split (``split.json`` in the run dir) and applied to
the test split.  Writes ``anytime.csv``, ``budgeted.csv``, ``summary.json`` and PNG plots (wallclock
mode: also ``wallclock.csv`` and ``wallclock.png``), with all runs overlaid.  The options are the
fields of :class:`imta_fast.inference.config.EvalConfig`; the work is done by
:mod:`imta_fast.inference.runs`.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from imta_fast.data import DataError
from imta_fast.distributed import init_distributed
from imta_fast.inference.config import parse_eval_config
from imta_fast.inference.runs import evaluate_runs, format_table, format_wallclock, write_outputs
from imta_fast.train.checkpoint import CheckpointError


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = parse_eval_config(argv, __doc__)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        dist = init_distributed(cfg.device)
        results = evaluate_runs(cfg, dist)
    except (CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not dist.is_primary:  # every rank evaluated its shard; rank 0 writes
        return 0
    output = Path(cfg.output or (cfg.runs[0] if len(cfg.runs) == 1 else "eval"))
    write_outputs(results, output)
    print(format_table(results))
    if cfg.mode == "wallclock":
        print(format_wallclock(results))
    extra = ", wallclock.csv, wallclock.png" if cfg.mode == "wallclock" else ""
    print(f"wrote {output}/anytime.csv, budgeted.csv, summary.json, anytime.png, budgeted.png{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
