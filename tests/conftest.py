"""Session-wide test setup: Triton runs in its interpreter when there is no GPU; one CPU thread.

One intra-op thread per process: the CPU suite's models are small, and on a shared or 2-core machine
the default thread pool oversubscribes (a training step measured 0.9 s with 1 thread and 35 s with 2
under load). Set through the environment too, so train.py / torchrun subprocesses inherit it.
"""
import os

import torch

if not torch.cuda.is_available():
    # Must happen before Triton is first imported; the project's own kernels also pick the
    # interpreter by themselves without a GPU, this covers any other Triton code.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
