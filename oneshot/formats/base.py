"""One small class per on-disk weight format, behind a registry (the compressed-tensors habit).

A format turns one pruned weight matrix into named parts and back, bit-exactly. It sees the matrix
as [out, in] with N:M groups along ``in``: the store transposes GPT-2's Conv1D weights and applies
RIA's input permutation before ``encode`` and undoes both after ``decode``.
"""

from __future__ import annotations

import torch

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


def entries(weight: torch.Tensor) -> torch.Tensor:
    """True where an entry is anything but +0.0 (-0.0 is kept, so round trips are bit-exact)."""
    return (weight != 0) | torch.signbit(weight)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[rows, cols] bool -> [rows, ceil(cols/8)] uint8, column j in bit j % 8 of byte j // 8."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask.to(torch.uint8)
    weights = (1 << torch.arange(8, device=mask.device)).to(torch.uint8)
    return (padded.reshape(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    shifts = torch.arange(8, device=packed.device).to(torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()
