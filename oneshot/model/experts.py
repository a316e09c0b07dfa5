"""Mixture-of-experts blocks: each expert's matrices inside fused expert parameters, as modules.

transformers 5 holds a block's experts as 3-D parameters, ``gate_up_proj`` [E, 2·I, H] and
``down_proj`` [E, H, I] (Qwen-MoE, Mixtral, DeepSeek-V3, …), or transposed [E, in, out] with biases
(gpt-oss). Each expert's slice is a prunable matrix: :class:`ExpertMatrix` is a module whose
``weight`` is that slice seen as [out, in] (a view: writing it writes the fused parameter), so the
engine's hooks, solvers and error meter treat it exactly like an ``nn.Linear``.

While a layer is pruned, :class:`ExpertRouting` runs each experts module's own eager forward with its
fused parameters replaced by indexers: the forward's ``F.linear(x, W[e])`` or ``x @ W[e]`` becomes a
call of expert ``e``'s :class:`ExpertMatrix` (through ``__torch_function__``), so the hooks see the
tokens the router sends to each expert, whatever the activation, bias or gate layout between the two
matrices. Any other use of an expert's weight stops the run with its name: it is never skipped.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OneshotError

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "top_k", "moe_topk")


class ExpertMatrix(nn.Module):
    """Expert ``index``'s matrix in the fused parameter ``param`` of ``owner``, as an [out, in]
    ``weight`` (a view of the live parameter, so it follows dtype casts and device moves)."""

    def __init__(self, owner: nn.Module, param: str, index: int, transposed: bool):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not a submodule: the layer's state dict stays the model's
        self.param, self.index, self.transposed = param, index, transposed
        self.bias = None

    @property
    def fused(self) -> nn.Parameter:
        return getattr(self.owner, self.param)

    @property
    def weight(self) -> torch.Tensor:
        w = self.fused[self.index]
        return w.t() if self.transposed else w

    @property
    def shape(self) -> tuple[int, int]:
        shape = tuple(self.fused.shape[1:])
        return (shape[1], shape[0]) if self.transposed else shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.param}[{self.index}], [out, in] = {list(self.shape)}"


def _hidden_size(module: nn.Module) -> int | None:
    for key in ("hidden_dim", "hidden_size"):
        if isinstance(getattr(module, key, None), int):
            return getattr(module, key)
    config = getattr(module, "config", None)
    return getattr(config, "hidden_size", None)


def fused_parameters(module: nn.Module) -> dict[str, bool]:
    """The fused expert parameters held directly by ``module`` (3-D, one slice per expert), each with
    whether it is stored [E, in, out]: transformers' own ``is_transposed`` flag where the class has
    it, else by which dimension is the hidden size (``down`` matrices output it, the others read it)."""
    named = "expert" in type(module).__name__.lower() or any(hasattr(module, k) for k in EXPERT_COUNT_KEYS)
    if isinstance(module, nn.modules.conv._ConvNd) or not named:  # a conv kernel [C, 1, K]; XLNet's [H, heads, d]
        return {}
    params = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
    if not params:
        return {}
    flag = getattr(module, "is_transposed", None)
    hidden = _hidden_size(module)
    out = {}
    for name, p in params.items():
        if isinstance(flag, bool):
            out[name] = flag
        elif hidden is None or p.shape[1] == p.shape[2]:
            out[name] = False
        elif "down" in name:
            out[name] = p.shape[2] == hidden
        else:
            out[name] = p.shape[1] == hidden
    return out


def experts_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """Path -> module for every module in ``layer`` that holds fused expert parameters."""
    return {path: m for path, m in layer.named_modules() if fused_parameters(m)}


def expert_count(module: nn.Module) -> int:
    return next(iter(p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3))


def expert_matrices(layer: nn.Module, prefix: str) -> dict[str, ExpertMatrix]:
    """Every expert's matrix in ``layer``'s fused expert parameters, as ``PREFIX.PATH.E.PARAM``
    (``model.layers.3.mlp.experts.17.gate_up_proj``, as per-expert ``nn.Linear`` names read)."""
    found = {}
    for path, module in experts_modules(layer).items():
        base = f"{prefix}.{path}" if prefix else path
        for param, transposed in fused_parameters(module).items():
            for e in range(getattr(module, param).shape[0]):
                found[f"{base}.{e}.{param}"] = ExpertMatrix(module, param, e, transposed)
    # the order a forward runs them in: expert by expert, each expert's matrices in parameter order
    return dict(sorted(found.items(), key=lambda kv: (id(kv[1].owner), kv[1].index)))


def is_moe_block(module: nn.Module) -> bool:
    """A module whose children hold experts: fused parameters, or a ModuleList called ``experts``."""
    for name, child in module.named_children():
        if fused_parameters(child) or (name == "experts" and isinstance(child, nn.ModuleList)):
            return True
    return False


def router_names(layer: nn.Module) -> dict[str, str]:
    """Module path -> why it is a router, for every router in ``layer``'s MoE blocks: a child of a
    block holding experts that scores tokens (a 2-D ``weight`` with one row per expert, or a linear
    named ``gate``/``router``/``*expert_gate``, or a module so named that holds its scoring linear inside).
    Routers stay dense."""
    found = {}
    for path, block in layer.named_modules():
        if not is_moe_block(block):
            continue
        count = None
        for child in block.children():
            if fused_parameters(child):
                count = expert_count(child)
            elif isinstance(child, nn.ModuleList):
                count = len(child)
        for name, child in block.named_children():
            if fused_parameters(child) or isinstance(child, nn.ModuleList):
                continue
            weight = getattr(child, "weight", None)
            named = name in ("gate", "router") or name.endswith("expert_gate")
            rows = isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] in (count, 1)
            holder = weight is None and any(isinstance(m, nn.Linear) for m in child.modules())  # LongCat's classifier
            if (named and (rows or holder)) or (rows and not isinstance(child, nn.Linear)):
                found[f"{path}.{name}" if path else name] = "router"
    return found


# -- running the experts' own forward with each expert's matrix as a module

class _Slice:
    """``fused[e]`` inside an experts forward: its ``F.linear`` / ``@`` becomes expert ``e``'s module."""

    def __init__(self, matrix: ExpertMatrix, name: str):
        self.matrix, self.name = matrix, name

    def __getattr__(self, key):
        return getattr(self.matrix.fused[self.matrix.index], key)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], _Slice) and not isinstance(args[0], _Slice):
            s = args[1]
            if s.matrix.transposed:
                raise OneshotError(f"{s.name}: used as [out, in] but stored [in, out]; this expert layout is not "
                                   "supported (--ignore it)")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out = s.matrix(args[0])
            return out if bias is None else out + bias
        if func in (torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul) and len(args) == 2 \
                and isinstance(args[1], _Slice) and not isinstance(args[0], _Slice):
            s = args[1]
            if not s.matrix.transposed:
                raise OneshotError(f"{s.name}: used as [in, out] but stored [out, in]; this expert layout is not "
                                   "supported (--ignore it)")
            return s.matrix(args[0])
        name = next((a.name for a in args if isinstance(a, _Slice)), "an expert matrix")
        raise OneshotError(f"{name}: the experts' forward uses it in {getattr(func, '__name__', func)}, which oneshot "
                           "cannot follow per expert; this expert layout is not supported (--ignore it)")


class _Fused:
    """A fused parameter inside an experts forward: indexing by an expert gives a :class:`_Slice`."""

    def __init__(self, param: nn.Parameter, matrices: list[ExpertMatrix], names: list[str]):
        self.param, self.matrices, self.names = param, matrices, names

    def __getitem__(self, index):
        if isinstance(index, torch.Tensor) and index.numel() == 1:
            index = int(index)
        if not isinstance(index, int):
            raise OneshotError(f"{self.names[0].rsplit('.', 2)[0]}: the experts' forward indexes its weights by "
                               f"{type(index).__name__}; this expert layout is not supported (--ignore it)")
        return _Slice(self.matrices[index], self.names[index])

    def __getattr__(self, key):
        return getattr(self.param, key)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.bmm, torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.bmm) \
                and len(args) == 2 and isinstance(args[1], _Fused) and isinstance(args[0], torch.Tensor) \
                and args[0].dim() == 3 and args[0].shape[0] == len(args[1].matrices):
            return args[1].per_expert(args[0])
        raise OneshotError(f"the experts' forward uses its fused weights whole in {getattr(func, '__name__', func)}; "
                           "this expert layout is not supported (--ignore it)")

    def per_expert(self, x: torch.Tensor) -> torch.Tensor:
        """``torch.bmm(x, fused)``, x [E, T, in] (Llama 4): each expert's module on its routed rows; the others
        are zero (the router's weight is folded into the input) and give zero without being run."""
        outs = []
        for matrix, name in zip(self.matrices, self.names):
            if not matrix.transposed:
                raise OneshotError(f"{name}: used as [in, out] but stored [out, in]; this expert layout is not "
                                   "supported (--ignore it)")
            rows = x[matrix.index]
            live = rows.abs().amax(-1) > 0
            out = rows.new_zeros(rows.shape[0], matrix.shape[0])
            if bool(live.any()):
                out[live] = matrix(rows[live]).to(out.dtype)
            outs.append(out)
        return torch.stack(outs)


class _View:
    """``self`` for an experts module's eager forward: its attributes, fused parameters as :class:`_Fused`;
    an instance of a subclass of the module's class (:func:`view_of`), so ``super().forward`` works."""

    def __getattr__(self, key):
        fused = object.__getattribute__(self, "_fused")
        if key in fused:
            return fused[key]
        value = getattr(object.__getattribute__(self, "_module"), key)
        return _EagerConfig(value) if key == "config" else value


class _EagerConfig:
    """A module's config as its experts' forward reads it: transformers' dispatch (also in a parent's forward
    reached through ``super()``) picks the eager per-expert loop."""

    _experts_implementation = "eager"

    def __init__(self, config):
        object.__setattr__(self, "_config", config)

    def __getattr__(self, key):
        return getattr(object.__getattribute__(self, "_config"), key)


def view_of(module: nn.Module, fused: dict[str, _Fused]) -> _View:
    cls = type(module)
    view = object.__new__(type(f"{cls.__name__}View", (_View, cls), {}))
    object.__setattr__(view, "_module", module)
    object.__setattr__(view, "_fused", fused)
    return view


def eager_forward(module: nn.Module):
    """The experts class's own per-expert loop, under transformers' implementation dispatch."""
    return inspect.unwrap(type(module).forward)


class _Block:
    """One experts module while its layer is pruned: the routing record and the patched forward."""

    def __init__(self, path: str, module: nn.Module, matrices: dict[str, ExpertMatrix]):
        self.path, self.module = path, module
        self.count = expert_count(module)
        self.eager = eager_forward(module)
        fused = {}
        for param, transposed in fused_parameters(module).items():
            mats, names = [], []
            for e in range(self.count):
                name = f"{path}.{e}.{param}"
                mats.append(matrices.get(name) or ExpertMatrix(module, param, e, transposed))
                names.append(name)
            fused[param] = _Fused(getattr(module, param), mats, names)
        self.view = view_of(module, fused)
        self.signature = inspect.signature(self.eager)
        # Llama 4: forward(hidden_states) gets [E·T, H], each expert's T rows already routed and scaled
        self.stacked = len(self.signature.parameters) == 2
        self.routed = torch.zeros(self.count, dtype=torch.float64)  # (token, slot) pairs sent to each expert
        self.saliency = torch.zeros(self.count, dtype=torch.float64)  # Σ router weight × ‖expert output‖

    def run(self, *args, **kwargs):
        return self.eager(self.view, *args, **kwargs)

    def routing(self, args, kwargs) -> tuple:
        """(hidden states, top-k expert indices, top-k weights) from a call's arguments, by position or name."""
        bound = self.signature.bind(None, *args, **kwargs)
        values = list(bound.arguments.values())[1:4]
        if len(values) < 3:
            raise OneshotError(f"{self.path}: its forward takes {list(self.signature.parameters)[1:]}, not (hidden "
                               "states, expert indices, expert weights); this expert layout is not supported")
        return tuple(values)

    def alone(self, hidden: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e``'s output for every row of ``hidden``, router weight 1."""
        n = hidden.shape[0]
        index = torch.full((n, 1), e, dtype=torch.long, device=hidden.device)
        return self.run(hidden, index, torch.ones(n, 1, dtype=hidden.dtype, device=hidden.device))


class ExpertRouting:
    """While one decoder layer is pruned: every fused experts module runs its eager forward with each
    expert's matrix as an :class:`ExpertMatrix` (hooks see each expert's own tokens). Use as a
    context manager; the modules get their own forward back on exit.

    ``all_tokens`` (set by the engine for the statistics pass, ``--moe-calibrate all``): every token
    also goes through every expert for the statistics, inside ``quiet()`` for the real routing, so the
    block's output keeps the real top-k. ``record``: count routed tokens per expert (and, with
    ``saliency``, the REAP sum of router weight × output norm over them).
    """

    def __init__(self, layer: nn.Module, prefix: str, matrices: dict[str, nn.Module]):
        ours = {n: m for n, m in matrices.items() if isinstance(m, ExpertMatrix)}
        self.blocks = {}
        for path, module in experts_modules(layer).items():
            full = f"{prefix}.{path}" if prefix else path
            self.blocks[full] = _Block(full, module, ours)
        self.all_tokens, self.record, self.saliency = False, False, False
        self.only: dict[str, set[int]] | None = None  # with all_tokens: only these experts (routed-mode fallback)
        self.quiet = contextlib.nullcontext

    def __bool__(self) -> bool:
        return bool(self.blocks)

    def __enter__(self):
        for block in self.blocks.values():
            block.module.forward = self._forward(block)
        return self

    def __exit__(self, *exc):
        for block in self.blocks.values():
            block.module.__dict__.pop("forward", None)

    def _forward(self, block: _Block):
        def forward(*args, **kwargs):
            if not (self.record or self.all_tokens):
                return block.run(*args, **kwargs)
            if block.stacked:
                return self._stacked(block, args, kwargs)
            hidden, index, weights = block.routing(args, kwargs)
            if self.record:
                self._record(block, hidden, index, weights)
            if not self.all_tokens:
                return block.run(*args, **kwargs)
            chosen = range(block.count) if self.only is None else sorted(self.only.get(block.path, ()))
            for e in chosen:  # statistics: every token through every expert, one expert at a time
                block.alone(hidden, e)
            with self.quiet():
                return block.run(*args, **kwargs)

        return forward

    def _stacked(self, block: _Block, args, kwargs):
        """An experts forward that takes only its rows, [E·T, H] with zeros where the router sent no
        token: routed tokens are the non-zero rows; "every token" is every routed row (each scaled by
        its own router weight) through every expert; REAP's router weights are not visible."""
        if self.saliency:
            raise OneshotError(f"{block.path}: its forward gets each expert's tokens already scaled by the "
                               "router, so the REAP score cannot be computed; use --expert-score frequency")
        hidden = args[0] if args else next(iter(kwargs.values()))
        per = hidden.reshape(block.count, -1, hidden.shape[-1])
        live = per.abs().amax(-1) > 0
        if self.record:
            block.routed += live.sum(1).double().cpu()
        if not self.all_tokens:
            return block.run(*args, **kwargs)
        every = per[live]
        chosen = range(block.count) if self.only is None else sorted(self.only.get(block.path, ()))
        step = max(1, (256 << 20) // (block.count * every.shape[-1] * every.element_size()))  # E x rows x H ≤ 256 MiB
        for e, part in ((e, part) for e in chosen for part in every.split(step)):  # e's rows routed, the others' zero
            block.run(torch.cat([part if k == e else torch.zeros_like(part) for k in range(block.count)]))
        with self.quiet():
            return block.run(*args, **kwargs)

    def _record(self, block: _Block, hidden, index, weights) -> None:
        flat = index.reshape(-1)
        flat = flat[flat < block.count]
        block.routed += torch.bincount(flat.cpu(), minlength=block.count)[: block.count].double()
        if not self.saliency:
            return
        with self.quiet():
            for e in range(block.count):
                rows, slots = (index == e).nonzero(as_tuple=True)
                if rows.numel() == 0:
                    continue
                out = block.alone(hidden[rows], e).float()
                gate = weights[rows, slots].float()
                block.saliency[e] += float((gate * out.norm(dim=-1)).sum())

    def reset(self) -> None:
        for block in self.blocks.values():
            block.routed.zero_()
            block.saliency.zero_()
