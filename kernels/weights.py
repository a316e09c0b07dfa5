"""Sparse weights in memory: ``Packed24`` (2:4) and ``Bitmask`` (any pattern), as the kernels read them.

Each holds its format's canonical parts (exactly what oneshot's ``packed24`` and ``bitmask`` formats
store on disk) plus a cache of the forms the backends build once from them: the dense copy, PyTorch's
semi-structured tensor, cuSPARSELt's compressed operand, the Triton kernel's prefix table, the CPU
kernels' tiled layout. ``to(device)`` keeps the canonical parts only; the cache is rebuilt there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .format24 import compress24, decompress24
from .formatbm import compress_bitmask, decompress_bitmask, group_offsets


@dataclass
class Packed24:
    """A 2:4 weight [N, K] in the canonical packed form, plus cached backend forms."""

    values: torch.Tensor  # [N, K/2]
    meta: torch.Tensor  # [N, ceil(K/8)] uint8
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    kind = "2:4"

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> Packed24:
        return cls(*compress24(weight))

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[0], 2 * self.values.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel()

    def parts(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "meta": self.meta}

    def to(self, device) -> Packed24:
        return Packed24(self.values.to(device), self.meta.to(device))

    def dense(self) -> torch.Tensor:
        if "dense" not in self.cache:
            self.cache["dense"] = decompress24(self.values, self.meta)
        return self.cache["dense"]

    def torch_sparse(self, backend: str):
        """The weight as ``torch.sparse.SparseSemiStructuredTensor`` for ``cutlass`` or ``cusparselt``."""
        if backend not in self.cache:
            from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

            from .format24 import to_cutlass

            if backend == "cutlass":
                packed, meta = to_cutlass(self.values, self.meta)
                self.cache[backend] = SparseSemiStructuredTensorCUTLASS(
                    torch.Size(self.shape), packed=packed, meta=meta, packed_t=None, meta_t=None,
                    compressed_swizzled_bitmask=None)
            else:  # cuSPARSELt compresses into its own opaque layout
                self.cache[backend] = SparseSemiStructuredTensorCUSPARSELT.from_dense(decompress24(self.values,
                                                                                                   self.meta))
        return self.cache[backend]


@dataclass
class Bitmask:
    """A sparse weight [N, K] of any pattern: kept values row by row + one bit per weight."""

    values: torch.Tensor  # [nnz]
    mask: torch.Tensor  # [N, ceil(K/8)] uint8
    shape: tuple[int, int]
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    kind = "bitmask"

    def __post_init__(self):
        self.shape = (int(self.shape[0]), int(self.shape[1]))

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> Bitmask:
        return cls(*compress_bitmask(weight), tuple(weight.shape))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def sparsity(self) -> float:
        return 1.0 - self.values.numel() / max(1, self.shape[0] * self.shape[1])

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.mask.numel()

    def parts(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "mask": self.mask}

    def to(self, device) -> Bitmask:
        return Bitmask(self.values.to(device), self.mask.to(device), self.shape)

    def dense(self) -> torch.Tensor:
        if "dense" not in self.cache:
            self.cache["dense"] = decompress_bitmask(self.values, self.mask, self.shape)
        return self.cache["dense"]

    def offsets(self, group: int) -> torch.Tensor:
        """The prefix table the Triton kernel reads (:func:`kernels.formatbm.group_offsets`), built once."""
        key = ("offsets", group)
        if key not in self.cache:
            self.cache[key] = group_offsets(self.mask, self.shape[1], group)
        return self.cache[key]


@dataclass
class DenseWeight:
    """A dense weight [N, K] with the same interface, for this project's dense CPU kernel (a pruned layer
    of a ``--format dense`` output, or any linear)."""

    weight: torch.Tensor
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    kind = "dense"

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> DenseWeight:
        return cls(weight.contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def sparsity(self) -> float:
        return 1.0 - float((self.weight != 0).float().mean())

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def parts(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def to(self, device) -> DenseWeight:
        return DenseWeight(self.weight.to(device))

    def dense(self) -> torch.Tensor:
        return self.weight


KINDS = {"2:4": Packed24, "bitmask": Bitmask, "dense": DenseWeight}


def from_dense(weight: torch.Tensor, kind: str) -> Packed24 | Bitmask | DenseWeight:
    """``kind`` "2:4", "bitmask" or "dense"."""
    if kind not in KINDS:
        raise ValueError(f"unknown weight kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return KINDS[kind].from_dense(weight)


def from_parts(kind: str, parts: dict[str, torch.Tensor], shape: tuple[int, int]):
    """The weight object of ``kind`` over these parts (as ``parts()`` returned them)."""
    if kind == "bitmask":
        return Bitmask(parts["values"], parts["mask"], shape)
    return KINDS[kind](**parts)
