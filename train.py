#!/usr/bin/env python
"""Train a multi-exit network: the MSDNet baseline (``--method ce``), IMTA stage 1 (``ge``) or
IMTA stage 2 (``imta --teacher STAGE1.pt``).  One process on CPU/GPU, or DDP under torchrun:

    python train.py --dataset mnist --method ge --epochs 10 --output runs/ge
    torchrun --nproc_per_node=8 train.py --dataset imagenet --data-dir /data/imagenet --amp --channels-last ...

The run itself is :func:`imta_fast.train.trainer.train`; this file parses flags and turns errors
into one line.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from imta_fast.data import DataError
from imta_fast.distributed import cleanup
from imta_fast.train.checkpoint import CheckpointError
from imta_fast.train.config import ConfigError, parse_train_args
from imta_fast.train.loop import NonFiniteLossError
from imta_fast.train.trainer import train


def last_line(err: BaseException) -> str:
    """The message itself: errors raised in DataLoader workers arrive wrapped in a multi-line report."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].split(": ", 1)[-1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        train(parse_train_args(argv))
    except (ConfigError, DataError, CheckpointError, NonFiniteLossError) as err:
        print(f"error: {last_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch's checkpoint is kept (resume with --resume auto)", file=sys.stderr)
        return 130
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
