"""What every decoder layer receives: the hidden states entering layer 0, and for each layer its own
positional and keyword arguments (masks, position embeddings, positions), recorded by running the
model once per batch with the layers replaced by recorders that pass the hidden states through."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import OneshotError
from ..tensors import move
from .layerio import LayerIO


class StopForward(Exception):
    """Raised inside a forward pass to end it early (the last recorder; a linear not yet ready)."""


class Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during capture: records its inputs, passes them on."""

    def __init__(self, index: int, sink: list, last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.sink.append((self.index, hidden, rest, kwargs))
        if self.last:
            raise StopForward
        return hidden


@dataclass
class Captured:
    """Per batch: the hidden states entering the current layer, and every layer's own (args, kwargs)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    layer_args: list[list[tuple[tuple, dict]]] = field(default_factory=list)


@torch.no_grad()
def capture_inputs(model, layers: nn.ModuleList, batches: list[torch.Tensor], device, store,
                   io: LayerIO | None = None) -> Captured:
    """Run the model with recorders in place of its layers; returns what each layer receives."""
    io = io or LayerIO()
    originals = list(layers)
    sink: list = []
    for i in range(len(layers)):
        layers[i] = Recorder(i, sink, last=i == len(layers) - 1)
    captured = Captured()
    try:
        io.prepare(model, device)  # only embeddings, rotary tables and norms are left: the layers are recorders
        for ids in batches:
            sink.clear()
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
            if len(sink) != len(layers):
                raise OneshotError(
                    f"{type(model).__name__}: {len(sink)} of {len(layers)} decoder layers were called during a "
                    "forward pass; this layout is not supported"
                )
            captured.hidden.append(sink[0][1].to(store))
            captured.layer_args.append([(move(rest, store), move(kw, store)) for _, _, rest, kw in sink])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return captured


def layer_inputs(captured: Captured, i: int, device, dtype: torch.dtype | None = None):
    """(window offset, hidden, args, kwargs) of every captured batch for layer ``i``, floating
    tensors in ``dtype`` when given."""
    offset = 0
    for b, hidden in enumerate(captured.hidden):
        args, kwargs = captured.layer_args[b][i]
        yield offset, move(hidden, device, dtype), move(args, device, dtype), move(kwargs, device, dtype)
        offset += hidden.shape[0]
