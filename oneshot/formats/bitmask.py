"""``bitmask``: any sparse weight as its kept values (row-major) + a 1-bit-per-weight mask."""

from __future__ import annotations

import torch

from .base import Format, entries, pack_bits, register, unpack_bits


@register
class Bitmask(Format):
    name = "bitmask"
    summary = "kept values + 1 bit per weight (any pattern)"

    def encode(self, weight):
        kept = entries(weight)
        return {
            "values": weight[kept].contiguous(),
            "mask": pack_bits(kept),
            "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        }

    def decode(self, parts):
        rows, cols = (int(v) for v in parts["shape"])
        kept = unpack_bits(parts["mask"], cols)
        dense = torch.zeros(rows, cols, dtype=parts["values"].dtype, device=parts["values"].device)
        dense[kept] = parts["values"]
        return dense

    def parts(self):
        return ("values", "mask", "shape")

    def nbytes(self, weight):
        rows, cols = weight.shape
        return int(entries(weight).sum()) * weight.element_size() + rows * (-(-cols // 8)) + 16
