"""``packed24``: 2:4 weights as kept values [rows, cols/2] + 2-bit positions (``kernels.format24``)."""

from __future__ import annotations

from ..kernels.format24 import compress24, decompress24, packed24_nbytes
from .base import Format, register


@register
class Packed24(Format):
    name = "packed24"
    summary = "2:4 layers as kept values + 2-bit positions (56.25% of 16-bit dense)"

    def accepts(self, pattern):
        if pattern != "2:4":
            return f"packed24 stores 2:4 layers, and this output's layers are {pattern} (use --format bitmask)"
        return None

    def encode(self, weight):
        values, meta = compress24(weight)
        return {"values": values, "meta": meta}

    def decode(self, parts):
        return decompress24(parts["values"], parts["meta"])

    def parts(self):
        return ("values", "meta")

    def nbytes(self, weight):
        return packed24_nbytes(weight.shape[0], weight.shape[1], weight.element_size())
