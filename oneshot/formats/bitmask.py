"""``bitmask``: any sparse weight as its kept values (row-major) + a 1-bit-per-weight mask."""

from __future__ import annotations

import torch

from ..kernels.formatbm import bitmask_nbytes, compress_bitmask, decompress_bitmask, entries
from .base import Format, register


@register
class Bitmask(Format):
    name = "bitmask"
    summary = "kept values + 1 bit per weight (any pattern)"

    def encode(self, weight):
        values, mask = compress_bitmask(weight)
        return {"values": values, "mask": mask, "shape": torch.tensor(list(weight.shape), dtype=torch.int64)}

    def decode(self, parts):
        return decompress_bitmask(parts["values"], parts["mask"], parts["shape"].tolist())

    def parts(self):
        return ("values", "mask", "shape")

    def nbytes(self, weight):
        return bitmask_nbytes(int(entries(weight).sum()), *weight.shape, weight.element_size()) + 16
