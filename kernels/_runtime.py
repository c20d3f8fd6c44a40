"""How this process runs Triton: compiled on a GPU, or in Triton's interpreter without one.

Kernels are built as interpreted functions explicitly (not through ``@triton.jit``, which reads
``TRITON_INTERPRET`` when it runs), so the import order of a CPU test session does not matter; for
the same reason kernels call no jit helper of ``triton.language`` (``tl.sum``, ``tl.max``,
``tl.zeros`` are jit functions whose mode was fixed when Triton was imported) but the builtins
``tl.reduce`` / ``tl.full``.
"""
from __future__ import annotations

import os

import torch
import triton

__all__ = ["INTERPRET", "USES_TRITON_OP", "jit"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available()
# triton_op + wrap_triton (torch >= 2.6) let inductor see the kernel; wrap_triton cannot trace an
# interpreted kernel, so the interpreter (and older torch) registers an opaque custom_op instead.
USES_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not INTERPRET


def jit(fn):
    """``triton.jit``, or Triton's interpreter when there is no GPU."""
    if INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return triton.jit(fn)
