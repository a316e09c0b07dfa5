"""Inference swap: ``SparseLinear`` and ``sparsify(model)``, which replaces every 2:4 linear in place."""

from __future__ import annotations

import torch
from torch import nn

from .backends import Packed24, sparse_linear
from .format24 import is_24


class SparseLinear(nn.Module):
    """A linear layer whose weight is stored packed (values + 2-bit positions) and computed by a
    ``kernels`` backend."""

    def __init__(self, packed: Packed24, bias: torch.Tensor | None = None, backend: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.register_buffer("values", packed.values)
        self.register_buffer("meta", packed.meta)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.backend = backend
        self._packed: Packed24 | None = None

    @classmethod
    def from_linear(cls, linear: nn.Module, backend: str = "auto") -> SparseLinear:
        weight = linear.weight.detach()
        if not isinstance(linear, nn.Linear):  # transformers' Conv1D stores [in, out]
            weight = weight.t()
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(Packed24.from_dense(weight.contiguous()), bias, backend)

    @property
    def packed(self) -> Packed24:
        if self._packed is None or self._packed.values is not self.values:
            self._packed = Packed24(self.values, self.meta)  # rebuilt after .to(device)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.packed, self.bias, self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4, backend={self.backend}"


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def sparsify(model: nn.Module, backend: str = "auto", skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace, in place, every linear (``nn.Linear`` or transformers' ``Conv1D``) whose weight is
    2:4 along its inputs by a ``SparseLinear``; returns the replaced names. Modules whose name ends
    with one of ``skip`` stay (the head, tied to the embeddings, is dense)."""
    try:
        from transformers.pytorch_utils import Conv1D
        kinds: tuple = (nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover
        kinds = (nn.Linear,)
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, kinds) or any(name.endswith(s) for s in skip):
            continue
        if not is_24(_weight_matrix(module).detach()):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SparseLinear.from_linear(module, backend))
        replaced.append(name)
    return replaced
