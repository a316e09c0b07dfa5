"""One small class per on-disk weight format, behind a registry (the compressed-tensors habit).

A format turns one pruned weight matrix into named parts and back, bit-exactly. It sees the matrix
as [out, in] with N:M groups along ``in``: the store transposes GPT-2's Conv1D weights and applies
RIA's input permutation before ``encode`` and undoes both after ``decode``.
"""

from __future__ import annotations

import torch

from ..kernels.formatbm import entries, pack_bits, unpack_bits  # noqa: F401  (kernels decide the bit order)

FORMATS: dict[str, Format] = {}


def register(cls):
    FORMATS[cls.name] = cls()
    return cls


class Format:
    name = ""
    summary = ""

    def accepts(self, pattern: str) -> str | None:
        """``None`` when layers pruned with ``pattern`` ("unstructured", "2:4", ...) can be stored."""
        return None

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def parts(self) -> tuple[str, ...]:
        """The names of the parts ``encode`` returns (stored as ``<weight key>.<part>``)."""
        raise NotImplementedError

    def nbytes(self, weight: torch.Tensor) -> int:
        """Bytes of ``encode(weight)`` (formats override this with arithmetic)."""
        return sum(t.numel() * t.element_size() for t in self.encode(weight).values())

