"""The canonical 2:4 packed format.

A weight W [rows, cols] (cols a multiple of 4; groups of 4 consecutive input columns) in which every
group holds at most 2 entries that are not +0.0 is stored as

- ``values`` [rows, cols/2], W's dtype: the two kept entries of each group, in column order;
- ``meta`` [rows, ceil(cols/8)] uint8: per group a 4-bit nibble ``i0 | i1 << 2`` with the kept
  positions 0 <= i0 < i1 <= 3; two groups per byte, the even group in the low nibble.

For 16-bit weights that is cols + cols/8 bytes a row against 2·cols dense: 56.25%.

The nibble is CUTLASS's 4-bit metadata code, and a group with fewer than two entries stores the
same positions CUTLASS's compressor picks (none: 2,3; one at 0: 0,2; at 1: 1,2; at 2 or 3: 2,3), so
``to_cutlass`` is a repacking and a reordering, never a recompression. ``decompress24(compress24(W))
== W`` bit for bit, -0.0 included (a -0.0 counts as an entry to keep, since it is not the +0.0 that
decompression writes).
"""

from __future__ import annotations

import torch


def _positions() -> torch.Tensor:
    """For each 4-bit entry code (bit p: position p holds an entry), the two positions stored."""
    fill = {0: (0, 2), 1: (1, 2), 2: (2, 3), 3: (2, 3)}  # one entry: CUTLASS's choice of partner
    table = torch.zeros(16, 2, dtype=torch.int64)
    for code in range(16):
        kept = [p for p in range(4) if code >> p & 1]
        pair = kept if len(kept) == 2 else fill[kept[0]] if len(kept) == 1 else (2, 3) if not kept else (0, 1)
        table[code] = torch.tensor(pair)
    return table


_POSITIONS = _positions()  # codes with 3 or 4 entries are rejected before the table is read


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
    code = (entries.to(torch.int64) * torch.tensor([1, 2, 4, 8], device=weight.device)).sum(-1)
    idx = _POSITIONS.to(weight.device)[code]  # [rows, groups, 2]
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


# ---------------------------------------------------------------- PyTorch's CUTLASS layout


def _reorder_offsets(rows: int, meta_cols: int, device) -> torch.Tensor:
    from torch.sparse._semi_structured_conversions import _calculate_meta_reordering_scatter_offsets

    return _calculate_meta_reordering_scatter_offsets(rows, meta_cols, torch.int16, device)


def to_cutlass(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, meta) -> (packed, meta_reordered) as PyTorch's CUTLASS backend wants them for 16-bit
    weights (``torch.sparse.SparseSemiStructuredTensorCUTLASS``): the values unchanged, four nibbles
    per int16, interleaved as CUTLASS's ColumnMajorInterleaved<2> layout. rows % 32 == 0, cols % 16 == 0."""
    rows, half = values.shape
    cols = 2 * half
    if values.element_size() != 2:
        raise ValueError("the CUTLASS layout here is for 16-bit weights")
    if rows % 32 or cols % 16:
        raise ValueError(f"CUTLASS needs rows % 32 == 0 and cols % 16 == 0, got {rows} x {cols}")
    nibbles = torch.stack([meta & 0x0F, meta >> 4], dim=-1).reshape(rows, -1)[:, : cols // 4].to(torch.int32)
    quads = nibbles.reshape(rows, cols // 16, 4)
    words = quads[..., 0] | (quads[..., 1] << 4) | (quads[..., 2] << 8) | (quads[..., 3] << 12)
    words = torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)  # the same 16 bits, signed
    meta_cols = cols // 16
    reordered = torch.empty(rows * meta_cols, dtype=torch.int16, device=values.device)
    reordered.scatter_(0, _reorder_offsets(rows, meta_cols, values.device), words.reshape(-1))
    return values.contiguous(), reordered.view(rows, meta_cols)


def from_cutlass(packed: torch.Tensor, meta_reordered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``to_cutlass``."""
    rows, meta_cols = meta_reordered.shape
    words = meta_reordered.reshape(-1)[_reorder_offsets(rows, meta_cols, packed.device)].to(torch.int32) & 0xFFFF
    words = words.reshape(rows, meta_cols)
    nibbles = torch.stack([(words >> s) & 0x0F for s in (0, 4, 8, 12)], dim=-1).reshape(rows, -1).to(torch.uint8)
    meta = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return packed.contiguous(), meta.contiguous()
