"""Where the engine's decoder layers come from and where they go once pruned, and the dtype a layer
computes in while it is on the device."""

from __future__ import annotations

import torch
from torch import nn


class LayerIO:
    """The whole model in memory. :class:`oneshot.stream.StreamIO` instead reads each layer from the
    checkpoint's safetensors shards when it is needed and frees it once it is written."""

    streaming = False

    def prepare(self, model, device) -> None:
        """Before capture: everything outside the decoder layers on the compute device."""
        model.to(device)

    def captured(self, model) -> None:
        """After capture: what sits outside the decoder layers is no longer needed."""

    def prepare_head(self, model, device) -> None:
        """After :meth:`prepare`, the output head too (a streamed run reads it only at the end)."""

    def load(self, i: int, layer: nn.Module, device) -> None:
        layer.to(device)

    def release(self, i: int, layer: nn.Module, device) -> None:
        if device.type != "cpu":
            layer.to("cpu")

    def finish(self, model) -> None:
        model.to("cpu")


class HeldIO(LayerIO):
    """A model object: each layer goes back to the device the caller keeps the model on, not the CPU."""

    def __init__(self, home: torch.device):
        self.home = home

    def release(self, i: int, layer: nn.Module, device) -> None:
        if torch.device(device) != self.home:
            layer.to(self.home)

    def finish(self, model) -> None:
        model.to(self.home)


def onload(io: LayerIO, i: int, layer: nn.Module, device, compute: torch.dtype | None) -> dict:
    """Layer ``i`` on ``device`` with its floating parameters in ``compute`` (when given); returns
    each cast parameter's stored dtype for :func:`restore`."""
    io.load(i, layer, device)
    stored = {}
    if compute is not None:
        for name, param in layer.named_parameters():
            if param.is_floating_point() and param.dtype != compute:
                stored[name] = param.dtype
                param.data = param.data.to(compute)
    return stored


def restore(layer: nn.Module, stored: dict) -> None:
    """Parameters back in their stored dtype (exact: pruned weights were rounded to it already)."""
    for name, param in layer.named_parameters():
        if name in stored:
            param.data = param.data.to(stored[name])
