"""``oneshot.load(DIR, kernels=...)``: the pruned linears of a loaded output computed by ``oneshot.kernels``.

The output's format decides the form each pruned linear runs in, read straight from its stored
parts (nothing is recompressed): ``packed24`` layers become 2:4 ``SparseLinear``s, ``bitmask``
layers bitmask ones, and a ``dense`` output's pruned layers run this project's dense CPU kernel
(``kernels="cpu"``; on a GPU a dense output stays on cuBLAS). The kernel-side layout each backend
needs is built once, at the first call. A RIA input permutation is applied to the inputs, Conv1D
layers are handled as [out, in]; experts inside fused parameters are not linears and stay dense.
What was and was not swapped is recorded on the model as ``model.oneshot_kernels``.
"""

from __future__ import annotations

import sys

import torch

from ..errors import OneshotError

KERNELS = ("auto", "triton", "cpu", "expand", "cusparselt", "cutlass", "dense", "reference")


def check_kernels(kernels: str) -> None:
    if kernels.partition(":")[0] not in KERNELS:
        raise OneshotError(f"unknown kernels={kernels!r}; choose one of: {', '.join(KERNELS)}")


def sparse_weights(raw: dict, fmt: str, matrices: dict, model) -> tuple[dict, dict]:
    """({module name: (weight object, input permutation or None)}, {name: why it stays as it is})
    for every pruned matrix of the output (``matrices``: ``store.pruned_matrices``), from the stored
    parts ``raw`` of format ``fmt``."""
    from ..kernels.modules import linear_kinds
    from ..kernels.weights import Bitmask, DenseWeight, Packed24

    weights, kept = {}, {}
    for name, (key, expert, layer, perm) in matrices.items():
        if expert is not None or (layer.get("tensor") and "module" not in layer):
            kept[name] = "an expert of a fused parameter, not a linear"
            continue
        try:
            module = model.get_submodule(layer.get("module", name))  # a linear written under another name
        except AttributeError:
            kept[name] = "no such module in the loaded model"
            continue
        if not isinstance(module, linear_kinds()):
            kept[name] = f"a {type(module).__name__}, not a linear"
            continue
        if fmt == "packed24":
            weight = Packed24(raw[f"{key}.values"], raw[f"{key}.meta"])
        elif fmt == "bitmask":
            weight = Bitmask(raw[f"{key}.values"], raw[f"{key}.mask"], tuple(raw[f"{key}.shape"].tolist()))
        else:
            matrix = module.weight.detach()
            matrix = matrix.t() if layer.get("transposed") else matrix
            weight = DenseWeight(matrix.contiguous() if perm is None else matrix[:, perm.long()].contiguous())
        weights[layer.get("module", name)] = (weight, perm)
    return weights, kept


def swap(model, raw: dict, fmt: str, matrices: dict, kernels: str):
    """Replace the pruned linears of ``model`` (loaded from these parts) by ``SparseLinear``s that run
    ``kernels``; checks on the first one that the backend runs here and fails in one line if not."""
    from ..kernels.backends import BACKENDS
    from ..kernels.modules import install

    check_kernels(kernels)
    device = next(model.parameters()).device
    weights, kept = sparse_weights(raw, fmt, matrices, model)
    if kernels == "cpu" and device.type == "cpu":
        from ..kernels import cpu

        if cpu.build() is None:  # no compiler, a failed build, not x86-64: the model as transformers loads it
            why = f"kernels='cpu' is unavailable here ({cpu.build_error()}); the pruned layers stay dense"
            print(f"oneshot: {why}", file=sys.stderr)
            kept.update({name: why for name in weights})
            model.oneshot_kernels = {"kernels": kernels, "format": fmt, "replaced": 0, "kept": kept}
            return model
    if fmt == "dense" and device.type != "cpu":
        kept.update({name: "a dense output on a GPU runs cuBLAS (convert to packed24 or bitmask for the sparse "
                           "kernels)" for name in weights})
        weights = {}
    replaced = install(model, weights, kernels)
    if replaced:
        first = model.get_submodule(replaced[0])
        name = kernels.partition(":")[0]
        probe = torch.zeros(1, first.in_features, dtype=first.dtype, device=device)
        if name != "auto" and not BACKENDS[name][1](probe, first.packed):
            hint = " (set TRITON_INTERPRET=1 before importing triton to run it on a CPU)" if name == "triton" else ""
            raise OneshotError(f"kernels={kernels!r} cannot run the {first.kind} {first.dtype} layers of this output "
                               f"on {device}{hint}")
    model.oneshot_kernels = {"kernels": kernels, "format": fmt, "replaced": len(replaced), "kept": kept}
    return model
