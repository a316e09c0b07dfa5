"""``dense``: the pruned weights as ordinary tensors with zeros; plain transformers loads it."""

from __future__ import annotations

from .base import Format, register


@register
class Dense(Format):
    name = "dense"
    summary = "ordinary safetensors with zeros (plain transformers loads it)"

    def encode(self, weight):
        return {"": weight}

    def decode(self, parts):
        return parts[""]

    def parts(self):
        return ("",)

    def nbytes(self, weight):
        return weight.numel() * weight.element_size()
