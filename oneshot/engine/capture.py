"""What every decoder layer receives: the hidden states entering layer 0, and for each layer its own
positional and keyword arguments (masks, position embeddings, positions), recorded by running the
model once per batch with each layer's forward replaced by a recorder that passes the hidden states
through (the layer objects stay in place)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import OneshotError
from ..tensors import move
from .layerio import LayerIO


class StopForward(Exception):
    """Raised inside a forward pass to end it early (the last recorder; a linear not yet ready)."""


def layer_outputs(owner: nn.Module) -> tuple[list[str], list[str]] | None:
    """How the forward of ``owner`` (the module holding the decoder layers) unpacks each layer's result:
    None when it takes one value, else the names it unpacks (``hidden_states, attn_weights``) and those
    of them it hands back to a layer call (state carried from layer to layer)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(owner).forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    held = set()  # ``outputs = block(...)``: names that hold a layer's whole result
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
                and ("layer" in node.value.func.id or node.value.func.id == "block")):
            continue
        if isinstance(node.targets[0], ast.Name):
            first = node.value.args[0] if node.value.args else None
            held.add((node.targets[0].id, first.id if isinstance(first, ast.Name) else None))
            continue
        if not isinstance(node.targets[0], ast.Tuple):
            continue
        names = [t.id if isinstance(t, ast.Name) else "_" for t in node.targets[0].elts]
        call = node.value
        used = {n.id for a in [*call.args, *(k.value for k in call.keywords)] for n in ast.walk(a)
                if isinstance(n, ast.Name)}
        return names, [n for n in names[1:] if n in used]
    for node in ast.walk(tree):  # ``hidden_states = outputs[0]`` (GPT-Neo): the layer returns a tuple
        value = getattr(node, "value", None)
        if isinstance(node, ast.Assign) and isinstance(value, ast.Subscript) and isinstance(value.value, ast.Name) \
                and isinstance(value.slice, ast.Constant) and value.slice.value == 0 \
                and isinstance(node.targets[0], ast.Name) and (value.value.id, node.targets[0].id) in held:
            return ["hidden_states", "_"], []
    return None


def pass_through(owner: nn.Module, layer: nn.Module) -> int:
    """How many values a stand-in for ``layer`` returns (1: the hidden states; more: the hidden states
    then None for what the model unpacks and drops). State carried from layer to layer is refused."""
    found = layer_outputs(owner)
    if found is None:
        return 1
    names, carried = found
    if carried:
        raise OneshotError(
            f"{type(owner).__name__}: its decoder layers return ({', '.join(names)}) and it hands "
            f"{', '.join(carried)} to the next layer: state carried from layer to layer beside the hidden "
            "states, which pruning one layer at a time does not carry yet")
    return len(names)


def recorder(index: int, sink: list, last: bool, outputs: int = 1):
    """A forward for decoder layer ``index`` during capture: records its inputs and passes the hidden
    states on (the last one ends the pass). It is set on the layer object itself, so that whatever the
    model reads from its layers (a per-layer attention or block type) is still there."""

    def forward(*args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        sink.append((index, hidden, rest, kwargs))
        if last:
            raise StopForward
        return hidden if outputs == 1 else (hidden,) + (None,) * (outputs - 1)

    return forward


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def describe_calls(calls: list[int], n: int) -> str:
    shown = ", ".join(map(str, calls[:12])) + (", ..." if len(calls) > 12 else "")
    return f"[{shown}] ({len(calls)} calls, {n} layers)"


def prepare_outside(model, layers: nn.ModuleList, io: LayerIO, device) -> None:
    """``io.prepare``, with the decoder layers out of the model while it moves (embeddings, rotary
    tables and norms go to ``device``, the layers stay where they are)."""
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = nn.Identity()
    try:
        io.prepare(model, device)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


@contextmanager
def forwards_replaced(layers: list[nn.Module], forwards: list):
    """Each layer's ``forward`` set to the given one on the layer object, and put back after (a hook
    library's own wrapper on the instance is kept)."""
    own = [layer.__dict__.get("forward") for layer in layers]
    for layer, forward in zip(layers, forwards):
        layer.forward = forward
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


@dataclass
class Captured:
    """Per batch: the hidden states entering the current layer, and every layer's own (args, kwargs)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    layer_args: list[list[tuple[tuple, dict]]] = field(default_factory=list)


@torch.no_grad()
def capture_inputs(model, layers: nn.ModuleList, batches: list[torch.Tensor], device, store,
                   io: LayerIO | None = None) -> Captured:
    """Run the model with each layer's forward replaced by a recorder; returns what each layer receives."""
    io = io or LayerIO()
    originals = list(layers)
    owner = next((m for m in model.modules() if any(c is layers for c in m.children())), None)
    outputs = pass_through(owner, originals[0]) if owner is not None else 1
    prepare_outside(model, layers, io, device)
    sink: list = []
    captured = Captured()
    with forwards_replaced(originals, [recorder(i, sink, last=i == len(layers) - 1, outputs=outputs)
                                       for i in range(len(originals))]):
        for ids in batches:
            sink.clear()
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
            except OneshotError:
                raise
            except Exception as exc:  # the model's own forward: one line naming where it failed
                if not sink:
                    raise OneshotError(f"{type(model).__name__}: its forward failed on the calibration windows "
                                       f"before decoder layer 0 was reached ({first_line(exc)}); the model does "
                                       "not run as configured") from exc
                raise OneshotError(f"{type(model).__name__}: its forward failed after decoder layer {len(sink) - 1} "
                                   f"returned ({first_line(exc)}): its loop reads more from a layer's result than "
                                   "the hidden states; this layout is not supported") from exc
            if [i for i, *_ in sink] != list(range(len(layers))):
                raise OneshotError(
                    f"{type(model).__name__}: its decoder layers were called in the order "
                    f"{describe_calls([i for i, *_ in sink], len(layers))} during a forward pass, not each once in "
                    "order; pruning layer by layer needs each layer's inputs to come from the one before it"
                )
            captured.hidden.append(sink[0][1].to(store))
            captured.layer_args.append([(move(rest, store), move(kw, store)) for _, _, rest, kw in sink])
    return captured


def layer_inputs(captured: Captured, i: int, device, dtype: torch.dtype | None = None):
    """(window offset, hidden, args, kwargs) of every captured batch for layer ``i``, floating
    tensors in ``dtype`` when given."""
    offset = 0
    for b, hidden in enumerate(captured.hidden):
        args, kwargs = captured.layer_args[b][i]
        yield offset, move(hidden, device, dtype), move(args, device, dtype), move(kwargs, device, dtype)
        offset += hidden.shape[0]
