"""The accumulation-dtype and mask rules, stated once for every layer.

float64 inputs accumulate (and return) in float64 so kernels can be gradchecked;
everything else accumulates in float32. Masks: nonzero (or True) counts.
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def keep_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0
