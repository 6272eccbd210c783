"""Backend registry, torch.library custom ops and autograd Functions."""
from . import registry  # noqa: F401
from . import token_logprobs  # noqa: F401
from . import policy_loss  # noqa: F401
from . import sequence_logprobs  # noqa: F401
