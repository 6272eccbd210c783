"""Launchers over the compiled modules ``fastpo._C_cpu`` and ``fastpo._C_cuda`` (csrc/).

Same signatures as the Triton launchers (``fastpo/kernels/token_logprobs.py``), so
the registry can swap backends; no autograd here. The modules take raw addresses
(``tensor.data_ptr()``), sizes, element strides, a dtype code and, last, the
OpenMP thread count (CPU) or the CUDA stream (GPU); this file is the only place
that turns tensors into those. The module is picked from the tensors' device and
imported lazily, so importing fastpo never needs a compiled module or a GPU.

Outputs (log-probs, entropies, lse, sequence sums) are float32, float64 for
float64 logits; gradients are written in the logits' dtype into ``grad_out``,
which may be the logits tensor itself (in-place backward).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from types import ModuleType

import torch

from ..reference._dtypes import acc_dtype

__all__ = [
    "cpu_available", "cuda_available",
    "token_logprobs_fwd", "token_logprobs_bwd",
    "sequence_logprobs_fwd", "sequence_logprobs_bwd",
    "policy_loss_fwd",
]

# must match csrc/common.h (DtypeCode)
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


@functools.lru_cache(maxsize=None)
def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"fastpo.{name}")
    except ImportError:
        return None


def cpu_available() -> bool:
    """``fastpo._C_cpu`` was built and imports."""
    return _import("_C_cpu") is not None


def cuda_available() -> bool:
    """``fastpo._C_cuda`` was built and imports (running it also needs a CUDA device)."""
    return _import("_C_cuda") is not None


def _module(device: torch.device) -> tuple[ModuleType, int]:
    """(module, last argument): the OpenMP thread count on CPU, the current stream on CUDA."""
    name = {"cpu": "_C_cpu", "cuda": "_C_cuda"}.get(device.type)
    mod = _import(name) if name else None
    if mod is None:
        raise RuntimeError(
            f"fastpo's compiled kernels for {device.type} tensors are not built "
            "(reinstall with a C++ compiler / nvcc; see setup.py)"
        )
    if device.type == "cuda":
        return mod, torch.cuda.current_stream(device).cuda_stream
    return mod, torch.get_num_threads()


def _dtype_code(t: torch.Tensor) -> int:
    if t.dtype not in _DTYPE_CODE:
        raise TypeError(f"fastpo: logits dtype {t.dtype} is not supported (fp32, bf16, fp16, fp64)")
    if t.stride(-1) != 1:
        raise ValueError("fastpo: the last (vocabulary) dimension must be contiguous")
    return _DTYPE_CODE[t.dtype]


def _vec(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous()


_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=None)
def _libc():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def _advise_huge_pages(grad: torch.Tensor, logits: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages on a fresh CPU gradient buffer.

    Writing a new N x V buffer costs one page fault per 4 KiB page (about half the
    backward's time for a 125 MiB bf16 gradient on the 2-core dev machine); with
    MADV_HUGEPAGE (THP in "madvise" mode) it is one per 2 MiB. Advisory only:
    skipped for in-place gradients, small buffers and non-Linux systems.
    """
    nbytes = grad.numel() * grad.element_size()
    if grad.device.type != "cpu" or grad.data_ptr() == logits.data_ptr() or nbytes < 16 * _HUGE_PAGE:
        return
    libc = _libc()
    if libc is None:
        return
    start = (grad.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    end = (grad.data_ptr() + nbytes) & ~(_HUGE_PAGE - 1)
    if end > start:
        libc.madvise(start, end - start, _MADV_HUGEPAGE)


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def token_logprobs_fwd(
    logits: torch.Tensor,  # [N, V], stride(1) == 1, any row stride
    labels: torch.Tensor,  # [N] int64, contiguous
    temperature: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: ``(logp, entropy, lse)``, each [N] fp32 (fp64 for fp64 logits)."""
    n, v = logits.shape
    code = _dtype_code(logits)
    labels = _vec(labels, torch.int64)
    logp = torch.empty(n, dtype=acc_dtype(logits.dtype), device=logits.device)
    entropy, lse = torch.empty_like(logp), torch.empty_like(logp)
    if n == 0:
        return logp, entropy, lse
    with _device_guard(logits):
        mod, last = _module(logits.device)
        mod.token_logprobs_fwd(
            logits.data_ptr(), labels.data_ptr(), logp.data_ptr(), entropy.data_ptr(), lse.data_ptr(),
            n, v, logits.stride(0), code, float(temperature), int(ignore_index), last,
        )
    return logp, entropy, lse


def token_logprobs_bwd(
    logits: torch.Tensor,  # [N, V]
    labels: torch.Tensor,  # [N] int64
    lse: torch.Tensor,  # [N] from the forward
    entropy: torch.Tensor,  # [N] from the forward
    grad_logp: torch.Tensor,  # [N]
    grad_entropy: torch.Tensor | None,  # [N] or None
    temperature: float,
    ignore_index: int,
    grad_out: torch.Tensor,  # [N, V] logits dtype; may be `logits` itself
) -> torch.Tensor:
    """Backward: writes dL/dlogits into ``grad_out`` (returned); ignored rows get exact zeros."""
    n, v = logits.shape
    code = _dtype_code(logits)
    if grad_out.dtype != logits.dtype or tuple(grad_out.shape) != (n, v) or grad_out.stride(-1) != 1:
        raise ValueError("fastpo: grad_out must be [N, V] in the logits' dtype with a contiguous last dim")
    if n == 0:
        return grad_out
    acc = acc_dtype(logits.dtype)
    labels = _vec(labels, torch.int64)
    lse, entropy, grad_logp = _vec(lse, acc), _vec(entropy, acc), _vec(grad_logp, acc)
    grad_entropy = None if grad_entropy is None else _vec(grad_entropy, acc)
    _advise_huge_pages(grad_out, logits)
    with _device_guard(logits):
        mod, last = _module(logits.device)
        mod.token_logprobs_bwd(
            logits.data_ptr(), labels.data_ptr(), lse.data_ptr(), entropy.data_ptr(), grad_logp.data_ptr(),
            0 if grad_entropy is None else grad_entropy.data_ptr(), grad_out.data_ptr(),
            n, v, logits.stride(0), grad_out.stride(0), code, float(temperature), int(ignore_index), last,
        )
    return grad_out


def sequence_logprobs_fwd(
    logits: torch.Tensor,  # [B, T, V], stride(2) == 1
    labels: torch.Tensor,  # [B, T] int64
    temperature: float,
    ignore_index: int,
    average: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out [B], lse [B, T])``; out_b = sum over kept t of logp (mean if ``average``;
    0 for a sequence with no kept token). fp32, fp64 for fp64 logits."""
    b, t, v = logits.shape
    code = _dtype_code(logits)
    labels = _vec(labels, torch.int64)
    out = torch.empty(b, dtype=acc_dtype(logits.dtype), device=logits.device)
    lse = torch.empty(b, t, dtype=out.dtype, device=logits.device)
    if b * t == 0:
        return out.zero_(), lse
    with _device_guard(logits):
        mod, last = _module(logits.device)
        mod.sequence_logprobs_fwd(
            logits.data_ptr(), labels.data_ptr(), out.data_ptr(), lse.data_ptr(),
            b, t, v, logits.stride(0), logits.stride(1), code, float(temperature), int(ignore_index),
            int(bool(average)), last,
        )
    return out, lse


def sequence_logprobs_bwd(
    logits: torch.Tensor,  # [B, T, V]
    labels: torch.Tensor,  # [B, T] int64
    lse: torch.Tensor,  # [B, T] from the forward
    grad_out: torch.Tensor,  # [B]
    temperature: float,
    ignore_index: int,
    average: bool,
    grad_in: torch.Tensor,  # [B, T, V] logits dtype; may be `logits` itself
) -> torch.Tensor:
    """Backward: writes dL/dlogits into ``grad_in`` (returned); ignored tokens get exact zeros."""
    b, t, v = logits.shape
    code = _dtype_code(logits)
    if grad_in.dtype != logits.dtype or tuple(grad_in.shape) != (b, t, v) or grad_in.stride(-1) != 1:
        raise ValueError("fastpo: grad_in must be [B, T, V] in the logits' dtype with a contiguous last dim")
    if b * t == 0:
        return grad_in
    acc = acc_dtype(logits.dtype)
    labels, lse, grad_out = _vec(labels, torch.int64), _vec(lse, acc), _vec(grad_out, acc)
    _advise_huge_pages(grad_in, logits)
    with _device_guard(logits):
        mod, last = _module(logits.device)
        mod.sequence_logprobs_bwd(
            logits.data_ptr(), labels.data_ptr(), lse.data_ptr(), grad_out.data_ptr(), grad_in.data_ptr(),
            b, t, v, logits.stride(0), logits.stride(1), grad_in.stride(0), grad_in.stride(1), code,
            float(temperature), int(ignore_index), int(bool(average)), last,
        )
    return grad_in


def policy_loss_fwd(
    logits: torch.Tensor,  # [N, V], stride(1) == 1, any row stride
    labels: torch.Tensor,  # [N] int64, masked tokens = ignore_index
    old_logprobs: torch.Tensor,  # [N]
    advantages: torch.Tensor,  # [N] per token
    ref_logprobs: torch.Tensor | None,  # [N] or None: no KL term
    weight: torch.Tensor,  # [N] d loss / d per_token_loss
    args,  # fastpo.kernels.policy_args.PolicyKernelArgs (read by field name)
    grad_out: torch.Tensor | None,  # [N, V] logits dtype (may be `logits`), or None: no gradient
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused policy loss (csrc/policy_math.h): ``(per_token_loss, logp, entropy)``, [N] each,
    fp32 (fp64 for fp64 logits); with ``grad_out``, dL/dlogits of ``sum(weight * loss)`` is written
    there during this call. Same signature as the Triton launcher
    (``fastpo.kernels.policy_loss.policy_loss_fwd``)."""
    n, v = logits.shape
    code = _dtype_code(logits)
    acc = acc_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    logp, entropy = torch.empty_like(loss), torch.empty_like(loss)
    if grad_out is not None and (
        grad_out.dtype != logits.dtype or tuple(grad_out.shape) != (n, v) or grad_out.stride(-1) != 1
    ):
        raise ValueError("fastpo: grad_out must be [N, V] in the logits' dtype with a contiguous last dim")
    if n == 0:
        return loss, logp, entropy
    labels = _vec(labels, torch.int64)
    old, adv, w = _vec(old_logprobs, acc), _vec(advantages, acc), _vec(weight, acc)
    ref = None if ref_logprobs is None or args.kl_kind == 0 else _vec(ref_logprobs, acc)
    if grad_out is not None:
        _advise_huge_pages(grad_out, logits)
    with _device_guard(logits):
        mod, last = _module(logits.device)
        mod.policy_loss_fwd(
            logits.data_ptr(), labels.data_ptr(), old.data_ptr(), adv.data_ptr(),
            0 if ref is None else ref.data_ptr(), w.data_ptr(), loss.data_ptr(), logp.data_ptr(),
            entropy.data_ptr(), 0 if grad_out is None else grad_out.data_ptr(),
            n, v, logits.stride(0), 0 if grad_out is None else grad_out.stride(0), code,
            int(args.variant), float(args.clip_low), float(args.clip_high), float(args.ratio_cap),
            float(args.dual_clip), float(args.logratio_clamp), int(args.kl_kind), bool(args.kl_straight),
            float(args.kl_clamp), float(args.kl_coef), float(args.entropy_coef), float(args.temperature),
            int(args.ignore_index), last,
        )
    return loss, logp, entropy
