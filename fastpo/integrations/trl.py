"""One reversible switch: TRL 1.16's trainers score tokens on fastpo.

    import fastpo.integrations.trl as ft
    ft.enable()          # or: with ft.patched(): trainer.train()

The whole patch is the table below (peer attribute -> fastpo replacement); TRL's own code,
losses and trainers are untouched. While enabled:

- ``trl.trainer.utils._ChunkedLogProbFunction`` (the fused LM head every trainer reaches through
  ``add_fused_lm_head``; looked up at call time, so models wrapped before ``enable()`` are
  served too) is ``FastpoChunkedLogProb``: ``fastpo.linear_token_logprobs`` with TRL's contract;
- ``trl.trainer.utils._use_triton`` answers True, so ``add_fused_lm_head`` passes only the kept
  positions (label != -100) to the head on every device ("compact" scoring; TRL's own default
  off CUDA / XPU scores every position, prompt and padding included);
- ``selective_log_softmax`` / ``entropy_from_logits`` / ``selective_log_softmax_and_entropy``
  are fastpo's (``trl_logits``) in every loaded ``trl.*`` module that holds TRL's object (the
  copies imported by name in ``trl.experimental``), with TRL's original as the fallback.

Optional, without the switch: ``fastpo.integrations.trl.GRPOTrainer`` is TRL's ``GRPOTrainer``
(same constructor) whose training loss comes from hidden states with ``fastpo.linear_policy_loss``
(``trl_grpo``; created on first access, so importing this module imports no TRL).

``disable()`` puts back every saved original and also any copy of a replacement that a ``trl``
module imported while enabled. ``enable()`` is idempotent; ``disable()`` without it is a no-op.
"""
from __future__ import annotations

import contextlib
import sys
import threading

from . import trl_logits
from .trl_head import FastpoChunkedLogProb
from .trl_logits import entropy_from_logits, selective_log_softmax, selective_log_softmax_and_entropy

__all__ = ["enable", "disable", "patched", "is_enabled", "original", "FastpoChunkedLogProb",
           "selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy"]


def _kept_tokens_only(device) -> bool:
    """Stands in for ``trl.trainer.utils._use_triton``, whose only use there is to choose compact
    scoring: with fastpo, ignored positions cost nothing on any device."""
    return True


# attributes of ``trl.trainer.utils`` replaced there only
_NAMED = {
    "_ChunkedLogProbFunction": FastpoChunkedLogProb,
    "_use_triton": _kept_tokens_only,
}
# TRL functions replaced in every loaded ``trl.*`` module whose attribute is TRL's object
_BY_IDENTITY = {
    "selective_log_softmax": trl_logits.selective_log_softmax,
    "entropy_from_logits": trl_logits.entropy_from_logits,
    "selective_log_softmax_and_entropy": trl_logits.selective_log_softmax_and_entropy,
}

_lock = threading.Lock()
_originals: dict[str, object] = {}  # name -> TRL's object (read once, at the first enable)
_saved: dict[tuple[str, str], object] = {}  # (module name, attribute) -> original, while enabled


def _trl_modules():
    return [(name, mod) for name, mod in list(sys.modules.items())
            if mod is not None and (name == "trl" or name.startswith("trl."))]


def _read_originals() -> None:
    if _originals:
        return
    import trl.trainer.utils as utils  # noqa: F401  (imports the modules that hold the names)
    for name in list(_NAMED) + list(_BY_IDENTITY):
        _originals[name] = getattr(utils, name)


def original(name: str):
    """TRL's own object for a patched name (e.g. ``"selective_log_softmax"``), enabled or not."""
    if name not in _NAMED and name not in _BY_IDENTITY:
        raise KeyError(f"fastpo.integrations.trl does not patch {name!r}")
    with _lock:
        _read_originals()
    return _originals[name]


def is_enabled() -> bool:
    return bool(_saved)


def enable() -> None:
    """Serve TRL's LM head and logits helpers with fastpo (see the module docstring)."""
    with _lock:
        if _saved:
            return
        _read_originals()
        utils = sys.modules["trl.trainer.utils"]
        plan = [(utils, "trl.trainer.utils", name, new) for name, new in _NAMED.items()]
        swaps = [(_originals[name], new) for name, new in _BY_IDENTITY.items()]
        for mod_name, mod in _trl_modules():
            for attr, value in list(vars(mod).items()):
                plan += [(mod, mod_name, attr, new) for old, new in swaps if value is old]
        for mod, mod_name, attr, new in plan:
            _saved[(mod_name, attr)] = getattr(mod, attr)
            setattr(mod, attr, new)


def disable() -> None:
    """Put back TRL's objects everywhere fastpo's are (a no-op when not enabled)."""
    with _lock:
        if not _saved:
            return
        for (mod_name, attr), old in _saved.items():
            mod = sys.modules.get(mod_name)
            if mod is not None:
                setattr(mod, attr, old)
        _saved.clear()
        # copies taken by ``from trl.trainer.utils import ...`` in modules imported while enabled
        swaps = [(new, _originals[name]) for name, new in (*_NAMED.items(), *_BY_IDENTITY.items())]
        for _, mod in _trl_modules():
            for attr, value in list(vars(mod).items()):
                for new, old in swaps:
                    if value is new:
                        setattr(mod, attr, old)


_lazy: dict[str, object] = {}


def __getattr__(name: str):
    """``GRPOTrainer``: the fastpo-loss subclass of TRL's, built on first access (imports TRL)."""
    if name != "GRPOTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _lazy:
        from .trl_grpo import make_grpo_trainer_class
        _lazy[name] = make_grpo_trainer_class()
    return _lazy[name]


@contextlib.contextmanager
def patched():
    """``enable()`` for the ``with`` block, then restore (also on an exception). Nested inside
    an outer ``enable()``, it leaves the patch on."""
    was_on = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was_on:
            disable()
