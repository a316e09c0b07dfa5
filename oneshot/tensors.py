"""Moving nested arguments between devices and dtypes, calling a decoder layer, finite checks."""

from __future__ import annotations

import torch


def move(obj, device, dtype: torch.dtype | None = None):
    """``obj`` (tensors, nested in tuples, lists and dicts) on ``device``; floating tensors also cast
    to ``dtype`` when it is given (the compute dtype of a layer run in another dtype than stored)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [move(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: move(v, device, dtype) for k, v in obj.items()}
    return obj


def call_layer(layer, hidden, args, kwargs) -> torch.Tensor:
    """A decoder layer's output hidden states (layers return a tensor or a tuple led by it)."""
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``: one fp32 sum (NaN and Inf propagate into it) instead of a mask pass; the
    full check only when the sum is not finite (an overflowing sum of finite values)."""
    if bool(torch.isfinite(torch.sum(t, dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())
