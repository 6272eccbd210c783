"""fastpo: fused kernels for LLM policy optimization losses.

Importing fastpo never imports triton, never initialises CUDA and never builds anything:
backends load on first use.
"""
from ._env import configure_triton_interpreter as _configure

_configure()

from . import ops as _ops  # noqa: F401  (registers the ops)
from .functional.token_logprobs import token_logprobs

__version__ = "0.1.0"

__all__ = ["token_logprobs"]
