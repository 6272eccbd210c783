"""Plain PyTorch oracle for every fastpo op.

Float64-capable, readable, and the ground truth that tests, `fastpo verify` and
benchmarks compare against. This package imports nothing from the rest of fastpo.
"""
from .token_logprobs import token_logprobs_ref, token_logprobs_chunked_fwd, token_logprobs_chunked_bwd

__all__ = ["token_logprobs_ref", "token_logprobs_chunked_fwd", "token_logprobs_chunked_bwd"]
