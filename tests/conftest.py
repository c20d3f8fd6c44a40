"""Session-wide test setup: Triton runs in its interpreter when there is no GPU."""
import os

import torch

if not torch.cuda.is_available():
    # Must happen before Triton is first imported; the project's own kernels also pick the
    # interpreter by themselves without a GPU, this covers any other Triton code.
    os.environ.setdefault("TRITON_INTERPRET", "1")
