"""Triton kernels and their launchers (no autograd).

Importing this package imports triton; fastpo does so lazily, only when the
``triton`` backend is used. On CPU tensors the kernels run through Triton's
interpreter (``TRITON_INTERPRET=1``, which ``fastpo._env`` sets at import time on
machines without CUDA): that is how CI exercises them.
"""
