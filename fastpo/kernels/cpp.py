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

Row layout (token and policy launchers): logits are [N, V] or [R, C, V] with any
strides on the leading dims and a contiguous last dim; the N = R*C rows are taken
in row-major order (row i*C + j at i*stride(0) + j*stride(1)), so the causal-LM
shift ``logits[:, :-1]`` is read where it lies, never copied. Labels and per-row
vectors are flat [N]; ``grad_out`` has the logits' shape with its own strides.

No launcher synchronises with the device: they read only Python scalars, shapes,
strides and addresses (labels out of range are checked by the caller; a kernel
given one anyway never reads it and writes NaN for that row).
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


def _rows(t: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(N, V, C, stride0, stride1) of [N, V] (C = 1) or [R, C, V] logits / gradients."""
    if t.dim() == 2:
        return t.shape[0], t.shape[1], 1, t.stride(0), 0
    if t.dim() == 3:
        r, c, v = t.shape
        return r * c, v, max(c, 1), t.stride(0), t.stride(1)
    raise ValueError(f"fastpo: logits must be [N, V] or [R, C, V], got shape {tuple(t.shape)}")


def _check_grad(grad: torch.Tensor, logits: torch.Tensor, name: str) -> None:
    if grad.dtype != logits.dtype or grad.shape != logits.shape or grad.stride(-1) != 1:
        raise ValueError(
            f"fastpo: {name} must have the logits' shape {tuple(logits.shape)} and dtype with a contiguous last dim"
        )


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


def _free_huge_blocks_bytes() -> int:
    """Bytes of free memory in blocks of >= 2 MiB (order >= 9 in /proc/buddyinfo), or 0."""
    try:
        with open("/proc/buddyinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    total = 0
    for line in lines:
        counts = line.split()[4:]  # "Node 0, zone Normal c0 c1 ... c10"
        total += sum(int(c) << (12 + k) for k, c in enumerate(counts) if k >= 9)
    return total


def _advise_huge_pages(grad: torch.Tensor, logits: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages on a fresh CPU gradient buffer, when that is free.

    Writing a new N x V buffer costs one page fault per 4 KiB page (fp32 2048 x 32000 on the
    2-core dev machine: fwd+bwd 111 ms with 4 KiB pages, 69 ms with 2 MiB ones); with
    MADV_HUGEPAGE it is one per 2 MiB. But with THP ``defrag`` in ``madvise`` mode (the
    default) a fault in an advised range that finds no free 2 MiB block compacts memory
    synchronously, in the faulting thread: on a fragmented machine that stalls the backward
    for hundreds of ms, intermittently (issue 8, defect 12). So the advice is given only while
    the free 2 MiB blocks cover twice the buffer (read from /proc/buddyinfo, ~20 us): the
    faults then take free huge pages and never compact. Skipped for in-place gradients,
    small buffers and non-Linux systems. The advised range is the span the (possibly
    strided) gradient covers, rounded inwards to 2 MiB.
    """
    if grad.device.type != "cpu" or grad.data_ptr() == logits.data_ptr() or grad.numel() == 0:
        return
    span = (1 + sum((n - 1) * st for n, st in zip(grad.shape, grad.stride()))) * grad.element_size()
    if span < 16 * _HUGE_PAGE:
        return
    libc = _libc()
    if libc is None or _free_huge_blocks_bytes() < 2 * span:
        return
    start = (grad.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    end = (grad.data_ptr() + span) & ~(_HUGE_PAGE - 1)
    if end > start:
        libc.madvise(start, end - start, _MADV_HUGEPAGE)


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def token_logprobs_fwd(
    logits: torch.Tensor,  # [N, V] or [R, C, V], stride(-1) == 1, any other strides
    labels: torch.Tensor,  # [N] int64
    temperature: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: ``(logp, entropy, lse)``, each [N] fp32 (fp64 for fp64 logits)."""
    n, v, c, s0, s1 = _rows(logits)
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
            n, v, c, s0, s1, code, float(temperature), int(ignore_index), last,
        )
    return logp, entropy, lse


def token_logprobs_bwd(
    logits: torch.Tensor,  # [N, V] or [R, C, V]
    labels: torch.Tensor,  # [N] int64
    lse: torch.Tensor,  # [N] from the forward
    entropy: torch.Tensor,  # [N] from the forward
    grad_logp: torch.Tensor,  # [N]
    grad_entropy: torch.Tensor | None,  # [N] or None
    temperature: float,
    ignore_index: int,
    grad_out: torch.Tensor,  # logits' shape and dtype, own strides; may be `logits` itself
) -> torch.Tensor:
    """Backward: writes dL/dlogits into ``grad_out`` (returned); ignored rows get exact zeros."""
    n, v, c, s0, s1 = _rows(logits)
    code = _dtype_code(logits)
    _check_grad(grad_out, logits, "grad_out")
    _, _, _, g0, g1 = _rows(grad_out)
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
            n, v, c, s0, s1, g0, g1, code, float(temperature), int(ignore_index), last,
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
    scale = torch.empty(b, dtype=acc, device=logits.device)  # per-sequence weight, counted once (CUDA)
    _advise_huge_pages(grad_in, logits)
    with _device_guard(logits):
        mod, last = _module(logits.device)
        mod.sequence_logprobs_bwd(
            logits.data_ptr(), labels.data_ptr(), lse.data_ptr(), grad_out.data_ptr(), scale.data_ptr(),
            grad_in.data_ptr(),
            b, t, v, logits.stride(0), logits.stride(1), grad_in.stride(0), grad_in.stride(1), code,
            float(temperature), int(ignore_index), int(bool(average)), last,
        )
    return grad_in


def policy_loss_fwd(
    logits: torch.Tensor,  # [N, V] or [R, C, V], stride(-1) == 1, any other strides
    labels: torch.Tensor,  # [N] int64, masked tokens = ignore_index
    old_logprobs: torch.Tensor,  # [N]
    advantages: torch.Tensor,  # [N] per token
    ref_logprobs: torch.Tensor | None,  # [N] or None: no KL term
    weight: torch.Tensor,  # [N] d loss / d per_token_loss
    args,  # fastpo.kernels.policy_args.PolicyKernelArgs (read by field name)
    grad_out: torch.Tensor | None,  # logits' shape and dtype, own strides (may be `logits`), or None
    policy_w: torch.Tensor | None = None,  # [N] factor of the policy term in the per-token loss; None: 1
    kl_w: torch.Tensor | None = None,  # [N] gradient weight of the KL term; None: weight
    ent_w: torch.Tensor | None = None,  # [N] gradient weight of the entropy term; None: weight
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused policy loss (csrc/policy_math.h): ``(per_token_loss, logp, entropy)``, [N] each,
    fp32 (fp64 for fp64 logits), per_token_loss = policy_w * S + kl_coef * K - entropy_coef * H;
    with ``grad_out``, dL/dlogits is written there during this call, of
    ``sum(weight * policy_w * S) + sum(kl_w * kl_coef * K) - sum(ent_w * entropy_coef * H)``
    (``sum(weight * loss)`` with the defaults). Same signature as the Triton launcher
    (``fastpo.kernels.policy_loss.policy_loss_fwd``)."""
    n, v, c, s0, s1 = _rows(logits)
    code = _dtype_code(logits)
    acc = acc_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    logp, entropy = torch.empty_like(loss), torch.empty_like(loss)
    g0 = g1 = 0
    if grad_out is not None:
        _check_grad(grad_out, logits, "grad_out")
        _, _, _, g0, g1 = _rows(grad_out)
    if n == 0:
        return loss, logp, entropy
    labels = _vec(labels, torch.int64)
    old, adv, w = _vec(old_logprobs, acc), _vec(advantages, acc), _vec(weight, acc)
    ref = None if ref_logprobs is None or args.kl_kind == 0 else _vec(ref_logprobs, acc)
    pw = None if policy_w is None else _vec(policy_w, acc)
    klw = None if kl_w is None or ref is None else _vec(kl_w, acc)
    entw = None if ent_w is None else _vec(ent_w, acc)
    if grad_out is not None:
        _advise_huge_pages(grad_out, logits)

    def ptr(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.data_ptr()

    with _device_guard(logits):
        mod, last = _module(logits.device)
        mod.policy_loss_fwd(
            logits.data_ptr(), labels.data_ptr(), old.data_ptr(), adv.data_ptr(),
            ptr(ref), w.data_ptr(), loss.data_ptr(), logp.data_ptr(),
            entropy.data_ptr(), ptr(grad_out),
            n, v, c, s0, s1, g0, g1, code,
            int(args.variant), float(args.clip_low), float(args.clip_high), float(args.ratio_cap),
            float(args.dual_clip), float(args.logratio_clamp), int(args.kl_kind), bool(args.kl_straight),
            float(args.kl_clamp), float(args.kl_coef), float(args.entropy_coef), float(args.temperature),
            int(args.ignore_index),
            float(getattr(args, "sapo_tau_pos", 1.0)), float(getattr(args, "sapo_tau_neg", 1.05)),
            bool(getattr(args, "kl_weighted", False)), ptr(pw), ptr(klw), ptr(entw), last,
        )
    return loss, logp, entropy
