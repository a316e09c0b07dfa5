"""The canonical 2:4 packed format.

A weight W [rows, cols] (cols a multiple of 4; groups of 4 consecutive input columns) in which every
group holds at most 2 entries that are not +0.0 is stored as

- ``values`` [rows, cols/2], W's dtype: the two kept entries of each group, in column order;
- ``meta`` [rows, ceil(cols/8)] uint8: per group a 4-bit nibble ``i0 | i1 << 2`` with the kept
  positions 0 <= i0 < i1 <= 3; two groups per byte, the even group in the low nibble.

For 16-bit weights that is cols + cols/8 bytes a row against 2·cols dense: 56.25%.

A group with fewer than two non-zeros keeps its non-zeros and fills the remaining slot(s) with the
lowest-index +0.0 positions, so ``decompress24(compress24(W)) == W`` bit for bit, -0.0 included (a
-0.0 counts as an entry to keep, since it is not the +0.0 that decompression writes).
"""

from __future__ import annotations

import torch


def _entries(weight: torch.Tensor) -> torch.Tensor:
    """True where the entry is anything but +0.0 (non-zeros, NaN, and -0.0)."""
    return (weight != 0) | torch.signbit(weight)


def is_24(weight: torch.Tensor) -> bool:
    """Whether ``weight`` [rows, cols] holds at most 2 entries other than +0.0 in every group of 4."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    rows, cols = weight.shape
    return bool((_entries(weight).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def compress24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [rows, cols] -> (values [rows, cols/2], meta [rows, ceil(cols/8)] uint8). Raises ValueError
    when W is not 2:4 along its last dimension."""
    if weight.dim() != 2:
        raise ValueError(f"compress24 needs a matrix, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"input dimension {cols} is not a multiple of 4")
    groups = weight.reshape(rows, cols // 4, 4)
    entries = _entries(groups)
    counts = entries.sum(-1)
    if bool((counts > 2).any()):
        bad = int((counts > 2).sum())
        raise ValueError(f"not 2:4: {bad} groups of 4 hold more than 2 entries")
    # entries first, then the lowest free positions; then the two chosen in column order
    position = torch.arange(4, device=weight.device)
    rank = entries.to(torch.int8) * 8 + (3 - position).to(torch.int8)
    idx = torch.topk(rank, 2, dim=-1).indices.sort(dim=-1).values  # [rows, groups, 2]
    values = torch.gather(groups, -1, idx).reshape(rows, cols // 2)
    nibbles = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [rows, groups]
    if nibbles.shape[1] % 2:
        nibbles = torch.cat([nibbles, torch.zeros(rows, 1, dtype=torch.uint8, device=weight.device)], dim=1)
    meta = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return values.contiguous(), meta.contiguous()


def decompress24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense W [rows, cols] back from ``compress24``'s output (cols = 2 · values.shape[1])."""
    rows, half = values.shape
    cols = 2 * half
    groups = cols // 4
    nibbles = torch.stack([meta & 0x0F, meta >> 4], dim=-1).reshape(rows, -1)[:, :groups].to(torch.int64)
    idx = torch.stack([nibbles & 0x3, (nibbles >> 2) & 0x3], dim=-1)  # [rows, groups, 2]
    dense = torch.zeros(rows, groups, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx, values.reshape(rows, groups, 2))
    return dense.reshape(rows, cols)


def packed24_nbytes(rows: int, cols: int, element_size: int) -> int:
    """Bytes of the packed form of a [rows, cols] weight with ``element_size``-byte entries."""
    return rows * (cols // 2) * element_size + rows * ((cols // 4 + 1) // 2)
