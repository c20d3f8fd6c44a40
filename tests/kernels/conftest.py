"""Kernel tests run on CPU through Triton's interpreter when no GPU is present.

``TRITON_INTERPRET=1`` must be set before Triton is first imported (``triton.language``'s own helpers
are jit functions whose mode is fixed at import), hence at the top of this conftest, before any test
module imports ``imta_fast.kernels``.  The interpreter costs ~ms per program instance, so the tests
use large ``BLOCK_B`` tiles (the interpreter default in the launchers) and small shapes.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
