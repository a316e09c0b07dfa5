"""Moving nested arguments between devices and dtypes, calling a decoder layer, finite checks."""

from __future__ import annotations

import torch


def map_tensors(obj, fn):
    """``obj`` with ``fn`` applied to every tensor nested in its tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def move(obj, device, dtype: torch.dtype | None = None):
    """``obj`` (tensors, nested in tuples, lists and dicts) on ``device``; floating tensors also cast
    to ``dtype`` when it is given (the compute dtype of a layer run in another dtype than stored)."""

    def one(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device)

    return map_tensors(obj, one)


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
