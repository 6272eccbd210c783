"""Process-level switches, applied when fastpo is imported (before triton can be).

On a machine without CUDA, Triton kernels can only run through its interpreter,
and ``TRITON_INTERPRET=1`` has to be set before triton is first imported (triton
decides per function at decoration time; torch may import triton lazily, e.g.
when a custom op is first called). So fastpo sets it at import time when the
user has not chosen, and no CUDA device exists. ``torch.cuda.is_available()``
does not create a CUDA context.
"""
from __future__ import annotations

import os
import sys


def configure_triton_interpreter() -> None:
    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def triton_interpreting() -> bool:
    """True when triton's own kernels were set up for the interpreter.

    Checked on a triton standard-library function: if triton was imported before
    TRITON_INTERPRET=1 was set, its builtins are compiled-mode and cannot run on CPU.
    """
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    if "triton" not in sys.modules:
        return True
    import triton.language as tl

    return type(tl.standard.zeros_like).__name__ == "InterpretedFunction"
