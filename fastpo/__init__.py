"""fastpo: fused kernels for LLM policy optimization losses.

Importing fastpo never imports triton, never initialises CUDA and never builds anything:
backends load on first use. On a machine without CUDA it sets TRITON_INTERPRET=1 (unless
set) so the Triton backend runs on CPU tensors through Triton's interpreter.
"""
from ._env import configure_triton_interpreter as _configure

_configure()

from . import ops as _ops  # noqa: E402,F401  (registers the ops)
from . import presets  # noqa: E402
from .config import PolicyLossConfig, PolicyLossOutput  # noqa: E402
from .functional.advantages import gae, value_loss, whiten  # noqa: E402
from .functional.dpo_loss import DPOOutput, dpo_loss, dpo_loss_from_logprobs  # noqa: E402
from .functional.kl_penalty import kl_penalty  # noqa: E402
from .functional.policy_loss import policy_loss, policy_loss_from_logprobs  # noqa: E402
from .functional.sequence_logprobs import sequence_logprobs  # noqa: E402
from .functional.token_logprobs import token_logprobs  # noqa: E402
from .modules.dpo import DPOLoss  # noqa: E402
from .modules.policy import PolicyLoss, ValueLoss  # noqa: E402
from .functional.advantages import (  # noqa: E402
    discounted_returns,
    group_advantages,
    passk_advantages,
    token_rewards,
)
from .functional.rollout import rollout_is_weights, rollout_rejection_mask  # noqa: E402
from .functional.linear import (  # noqa: E402
    linear_dpo_loss,
    linear_policy_loss,
    linear_sequence_logprobs,
    linear_token_logprobs,
)

__version__ = "0.1.0"

__all__ = [
    "DPOLoss",
    "DPOOutput",
    "PolicyLoss",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "ValueLoss",
    "dpo_loss",
    "dpo_loss_from_logprobs",
    "gae",
    "kl_penalty",
    "policy_loss",
    "policy_loss_from_logprobs",
    "presets",
    "sequence_logprobs",
    "token_logprobs",
    "value_loss",
    "whiten",
    "discounted_returns",
    "group_advantages",
    "passk_advantages",
    "rollout_is_weights",
    "rollout_rejection_mask",
    "token_rewards",
    "linear_dpo_loss",
    "linear_policy_loss",
    "linear_sequence_logprobs",
    "linear_token_logprobs",
]
