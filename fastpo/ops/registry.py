"""The one backend registry (DESIGN.md §2).

Every op registers, per backend, a set of launcher functions by *import path*
(``"module:attr"``), so registering never imports triton or a compiled module:
importing fastpo stays GPU-free. ``resolve`` turns the user's ``backend=`` into
a concrete backend for a device and fails loudly when the named one is not
available; nothing falls back silently.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from .._env import triton_interpreting

BACKENDS = ("triton", "cuda", "cpu", "torch")


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def triton_available(device: torch.device) -> bool:
    """Triton runs CUDA tensors when compiled, CPU tensors under the interpreter."""
    if not _module_present("triton"):
        return False
    if device.type == "cuda":
        return os.environ.get("TRITON_INTERPRET", "0") != "1"
    if device.type == "cpu":
        return triton_interpreting()
    return False


def cpu_ext_available(device: torch.device) -> bool:
    return device.type == "cpu" and _module_present("fastpo._C_cpu")


def cuda_ext_available(device: torch.device) -> bool:
    return device.type == "cuda" and _module_present("fastpo._C_cuda")


def torch_available(device: torch.device) -> bool:
    return True


_AVAILABLE: dict[str, Callable[[torch.device], bool]] = {
    "triton": triton_available,
    "cuda": cuda_ext_available,
    "cpu": cpu_ext_available,
    "torch": torch_available,
}

# preference order of `auto` per device type
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


@dataclass
class _Impl:
    paths: dict[str, str]
    cache: dict[str, Callable] = field(default_factory=dict)

    def fn(self, name: str) -> Callable:
        if name not in self.cache:
            module, attr = self.paths[name].split(":")
            self.cache[name] = getattr(importlib.import_module(module), attr)
        return self.cache[name]


_REGISTRY: dict[str, dict[str, _Impl]] = {}


def register(op: str, backend: str, **paths: str) -> None:
    """Register launchers of ``op`` for ``backend``, e.g. ``fwd="fastpo.kernels.x:x_fwd"``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(paths)


def backends_for(op: str, device: torch.device | str) -> list[str]:
    """Backends that implement ``op`` and can run on ``device`` now."""
    device = torch.device(device)
    impls = _REGISTRY.get(op, {})
    return [b for b in BACKENDS if b in impls and _AVAILABLE[b](device)]


def resolve(op: str, backend: str, device: torch.device | str) -> str:
    """Concrete backend for ``backend`` ("auto" or a name) on ``device``; raises if unavailable."""
    device = torch.device(device)
    if op not in _REGISTRY:
        raise KeyError(f"no op {op!r} is registered")
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if name in _REGISTRY[op] and _AVAILABLE[name](device):
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if backend not in _REGISTRY[op]:
        raise NotImplementedError(f"backend {backend!r} does not implement {op!r}")
    if not _AVAILABLE[backend](device):
        raise RuntimeError(
            f"backend {backend!r} is not available for {device.type} tensors "
            f"(available for {op!r} here: {backends_for(op, device)})"
        )
    return backend


def launcher(op: str, backend: str, name: str) -> Callable:
    """The registered launcher ``name`` (e.g. "fwd") of ``op`` on a concrete ``backend``."""
    return _REGISTRY[op][backend].fn(name)
