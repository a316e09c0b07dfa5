"""OWL's pre-pass: the dense model run layer by layer (its own copy of the activations), measuring
each layer's outlier density and pruned parameter count (:mod:`oneshot.allocation`)."""

from __future__ import annotations

import torch

from ..allocation import outlier_density
from ..model.experts import ExpertRouting
from ..model.structure import find_linears, get_weight, linear_shape
from ..tensors import call_layer
from .capture import Captured, layer_inputs
from .layerio import LayerIO, onload, restore


@torch.no_grad()
def owl_densities(layers, path: str, captured: Captured, device, ignore, m: float, store,
                  io: LayerIO | None = None, compute: torch.dtype | None = None) -> tuple[list[float], list[int]]:
    io = io or LayerIO()
    hidden = [h.clone() for h in captured.hidden]
    dens, params = [], []
    for i, layer in enumerate(layers):
        stored = onload(io, i, layer, device, compute)
        linears = find_linears(layer, f"{path}.{i}", ignore)
        sums = {name: None for name in linears}

        def hook(name, sums=sums):
            def fn(module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sq = (x * x).sum(0)
                sums[name] = sq if sums[name] is None else sums[name] + sq

            return fn

        handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in linears.items()]
        try:
            view = Captured(hidden, captured.layer_args)
            with ExpertRouting(layer, f"{path}.{i}", linears):
                hidden = [call_layer(layer, h, a, kw).to(store)
                          for _, h, a, kw in layer_inputs(view, i, device, compute)]
        finally:
            for h in handles:
                h.remove()
        names = [n for n in linears if sums[n] is not None]
        if names:
            dens.append(outlier_density([get_weight(linears[n]) for n in names], [sums[n] for n in names], m))
        else:
            dens.append(0.0)
        params.append(sum(linear_shape(mod)[0] * linear_shape(mod)[1] for mod in linears.values()))
        restore(layer, stored)
        io.release(i, layer, device)
    return dens, params
