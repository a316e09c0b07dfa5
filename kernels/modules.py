"""Inference swap: ``SparseLinear``, ``sparsify(model)`` and ``install(model, weights)``.

A ``SparseLinear`` holds a 2:4 (``Packed24``) or bitmask (``Bitmask``) weight as buffers and computes
with a ``kernels`` backend. ``sparsify`` compresses the linears of a loaded model in place;
``install`` puts weights that were read in their sparse form (``oneshot.load(DIR, kernels=...)``)
in place of the linears they belong to.
"""

from __future__ import annotations

import torch
from torch import nn

from .backends import sparse_linear
from .format24 import is_24
from .formatbm import entries
from .weights import Bitmask, DenseWeight, Packed24, from_dense, from_parts


class SparseLinear(nn.Module):
    """A linear layer whose weight is stored sparse (2:4 or bitmask) and computed by a ``kernels``
    backend. ``input_perm``: the layer's inputs are read in this order first (RIA's channel
    permutation, which the stored matrix was pruned and packed in)."""

    def __init__(self, weight: Packed24 | Bitmask | DenseWeight, bias: torch.Tensor | None = None,
                 backend: str = "auto",
                 input_perm: torch.Tensor | None = None):
        super().__init__()
        self.kind = weight.kind
        self.out_features, self.in_features = weight.shape
        self._parts = tuple(weight.parts())
        for name, tensor in weight.parts().items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("input_perm", None if input_perm is None else input_perm.long())
        self.backend = backend
        self._weight = weight

    @classmethod
    def from_linear(cls, linear: nn.Module, backend: str = "auto", kind: str = "2:4") -> SparseLinear:
        weight = linear.weight.detach()
        if not isinstance(linear, nn.Linear):  # transformers' Conv1D stores [in, out]
            weight = weight.t()
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(from_dense(weight.contiguous(), kind), bias, backend)

    @property
    def packed(self) -> Packed24 | Bitmask | DenseWeight:
        """The weight object the backends read (rebuilt, with an empty cache, after ``.to(device)``)."""
        parts = {name: getattr(self, name) for name in self._parts}
        if any(getattr(self._weight, name) is not tensor for name, tensor in parts.items()):
            self._weight = from_parts(self.kind, parts, (self.out_features, self.in_features))
        return self._weight

    @property
    def dtype(self) -> torch.dtype:
        return self.packed.dtype

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in with the weight's shape, dtype and device, for model code that reads
        ``o_proj.weight.dtype`` (Ergo): one NaN expanded, so arithmetic on it shows instead of passing
        silently. The values live in the sparse parts."""
        if "weight" in self._parts:  # a DenseWeight's own buffer (AttributeError until it is registered)
            if "weight" not in self._buffers:
                raise AttributeError("weight")
            return self._buffers["weight"]
        part = getattr(self, self._parts[0])
        return torch.full((), float("nan"), dtype=self.dtype, device=part.device).expand(self.out_features,
                                                                                        self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        return sparse_linear(x, self.packed, self.bias, self.backend)

    def extra_repr(self) -> str:
        extra = f", sparsity={self.packed.sparsity:.3f}" if self.kind != "2:4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}{extra}, "
                f"backend={self.backend}")


def linear_kinds() -> tuple:
    try:
        from transformers.pytorch_utils import Conv1D

        return nn.Linear, Conv1D
    except ImportError:  # pragma: no cover
        return (nn.Linear,)


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def sparsify(model: nn.Module, backend: str = "auto", skip: tuple[str, ...] = ("lm_head",), kind: str = "2:4",
             min_sparsity: float = 0.3) -> list[str]:
    """Replace, in place, the linears (``nn.Linear`` or transformers' ``Conv1D``) of a loaded model by
    ``SparseLinear``s; returns the replaced names. ``kind``: "2:4" takes every linear whose weight is 2:4
    along its inputs; "bitmask" every linear with at least ``min_sparsity`` of its entries +0.0;
    "auto" the first where it applies, else the second; "dense" every linear, as a ``DenseWeight`` (this
    project's dense CPU kernel with ``backend="cpu"``). Modules whose name ends with one of ``skip``
    stay (the head, tied to the embeddings, is dense)."""
    if kind not in ("2:4", "bitmask", "auto", "dense"):
        raise ValueError(f"unknown kind {kind!r}; choose 2:4, bitmask, auto or dense")
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, linear_kinds()) or any(name.endswith(s) for s in skip):
            continue
        matrix = _weight_matrix(module).detach()
        chosen = "dense" if kind == "dense" else None
        if kind in ("2:4", "auto") and is_24(matrix):
            chosen = "2:4"
        elif kind in ("bitmask", "auto") and 1.0 - float(entries(matrix).float().mean()) >= min_sparsity:
            chosen = "bitmask"
        if chosen is None:
            continue
        _replace(model, name, SparseLinear.from_linear(module, backend, chosen))
        replaced.append(name)
    return replaced


def install(model: nn.Module, weights: dict[str, tuple], backend: str = "auto") -> list[str]:
    """Put ``weights`` ({module name: (Packed24 | Bitmask, input permutation or None)}) in place of the
    linears of those names, keeping each linear's bias; returns the replaced names."""
    replaced = []
    for name, (weight, perm) in weights.items():
        module = model.get_submodule(name)
        if not isinstance(module, linear_kinds()):
            raise ValueError(f"{name} is a {type(module).__name__}, not a linear layer")
        bias = None if module.bias is None else module.bias.detach()
        device = module.weight.device
        _replace(model, name, SparseLinear(weight.to(device), bias, backend,
                                           None if perm is None else perm.to(device)))
        replaced.append(name)
    return replaced
