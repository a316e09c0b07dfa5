"""The bitmask format: any sparse weight as its kept values plus one bit per weight.

A weight W [rows, cols] is stored as

- ``values`` [nnz], W's dtype: every entry that is not +0.0, row by row, in column order;
- ``mask`` [rows, ceil(cols/8)] uint8: column j of a row in bit j % 8 of byte j // 8 (1: kept).

This is oneshot's ``bitmask`` on-disk format. ``decompress_bitmask(*compress_bitmask(W), W.shape)``
gives W back bit for bit, -0.0 included (a -0.0 is kept, since it is not the +0.0 that decompression
writes). For 16-bit weights at sparsity s that is 2·(1-s)·cols + cols/8 bytes a row against 2·cols.

Kernels cannot find where a row's values for column c start without counting the bits before it,
so they read a prefix table built once at load, :func:`group_offsets`: for every ``group`` columns
of every row, the index in ``values`` of the group's first kept value.
"""

from __future__ import annotations

import torch


def entries(weight: torch.Tensor) -> torch.Tensor:
    """True where an entry is anything but +0.0 (non-zeros, NaN, and -0.0)."""
    return (weight != 0) | torch.signbit(weight)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[rows, cols] bool -> [rows, ceil(cols/8)] uint8, column j in bit j % 8 of byte j // 8."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask.to(torch.uint8)
    weights = (1 << torch.arange(8, device=mask.device)).to(torch.uint8)
    return (padded.reshape(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: [rows, ceil(cols/8)] uint8 -> [rows, cols] bool."""
    shifts = torch.arange(8, device=packed.device).to(torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def compress_bitmask(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [rows, cols] -> (values [nnz], mask [rows, ceil(cols/8)] uint8)."""
    if weight.dim() != 2:
        raise ValueError(f"compress_bitmask needs a matrix, got shape {tuple(weight.shape)}")
    kept = entries(weight)
    return weight[kept].contiguous(), pack_bits(kept)


def decompress_bitmask(values: torch.Tensor, mask: torch.Tensor, shape) -> torch.Tensor:
    """The dense W back from :func:`compress_bitmask`'s output and W's shape."""
    rows, cols = (int(v) for v in shape)
    kept = unpack_bits(mask, cols)
    if int(kept.sum()) != values.numel():
        raise ValueError(f"the mask keeps {int(kept.sum())} entries and there are {values.numel()} values")
    dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    dense[kept] = values
    return dense


def group_offsets(mask: torch.Tensor, cols: int, group: int) -> torch.Tensor:
    """[rows, ceil(cols/group)]: the index in ``values`` of the first kept value of each ``group``
    columns of each row (``group`` a multiple of 8). int32 when every index fits, else int64."""
    if group % 8:
        raise ValueError(f"the offset group ({group}) must be a multiple of 8 columns")
    rows = mask.shape[0]
    per_byte = POPCOUNT.to(mask.device)[mask.long()]  # [rows, bytes]
    groups = -(-cols // group)
    per_byte = torch.nn.functional.pad(per_byte, (0, groups * (group // 8) - per_byte.shape[1]))
    per_group = per_byte.reshape(rows, groups, group // 8).sum(-1)  # kept values in each group
    flat = per_group.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat
    dtype = torch.int32 if int(flat.sum()) < 2**31 else torch.int64
    return starts.reshape(rows, groups).to(dtype).contiguous()


POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def bitmask_nbytes(nnz: int, rows: int, cols: int, element_size: int) -> int:
    """Bytes of the values and the mask of a [rows, cols] weight with ``nnz`` kept entries."""
    return nnz * element_size + rows * (-(-cols // 8))
