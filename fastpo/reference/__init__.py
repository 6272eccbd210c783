"""Plain PyTorch oracle for every fastpo op.

Float64-capable, readable, and the ground truth that tests, `fastpo verify` and
benchmarks compare against. This package imports nothing from the rest of fastpo.
"""
from .advantages import gae_ref, value_loss_ref, whiten_ref
from .dpo_loss import dpo_loss_ref
from .kl_penalty import kl_penalty_ref
from .policy_loss import aggregate_ref, policy_loss_ref
from .sequence_logprobs import sequence_grad_logp, sequence_logprobs_ref, sequence_sum
from .token_logprobs import token_logprobs_chunked_bwd, token_logprobs_chunked_fwd, token_logprobs_ref

__all__ = [
    "aggregate_ref",
    "dpo_loss_ref",
    "gae_ref",
    "kl_penalty_ref",
    "policy_loss_ref",
    "sequence_grad_logp",
    "sequence_logprobs_ref",
    "sequence_sum",
    "token_logprobs_chunked_bwd",
    "token_logprobs_chunked_fwd",
    "token_logprobs_ref",
    "value_loss_ref",
    "whiten_ref",
]
