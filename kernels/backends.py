"""``sparse_linear(x, weight, bias, backend)``: one call, several ways to compute a sparse linear.

``weight`` is a ``Packed24`` (2:4) or a ``Bitmask`` (any pattern; ``kernels.weights``).

| backend | weights | where | how |
|---|---|---|---|
| ``dense`` | both | any | the decompressed weight (cached) through ``F.linear`` (cuBLAS): comparison, fallback |
| ``reference`` | both | any | fp32 ``F.linear`` of the decompressed weight, cast back: the ground truth |
| ``cutlass`` | 2:4 | CUDA 8.x | PyTorch's semi-structured tensor (CUTLASS), built from the packed form directly |
| ``cusparselt`` | 2:4 | CUDA | cuSPARSELt through ``torch._cslt_sparse_mm``, its algorithm searched per shape |
| ``triton`` | both | CUDA, or CPU under ``TRITON_INTERPRET=1`` | our decode kernel (``kernels.triton_sparse``) |
| ``expand`` | both | as triton | dense weight written by one Triton launch a call, then ``F.linear`` (no copy kept) |
| ``cpu`` | both | CPU | our AVX2 / AVX-512 kernels (``kernels.cpu``) |
| ``auto`` | both | any | the tuning table's choice for (device, dtype, kind, N, K, M), else a rule of thumb |

Backend-specific forms of a weight are built once and cached on the weight object.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from .weights import Bitmask, Packed24

__all__ = ["BACKENDS", "Bitmask", "Packed24", "available", "choose", "pick", "sparse_linear", "tuning_table"]

TUNING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning.json")


def _dense(x, weight, bias, config=None):
    return F.linear(x, weight.dense(), bias)


def _reference(x, weight, bias, config=None):
    out = F.linear(x.float(), weight.dense().float(), None if bias is None else bias.float())
    return out.to(x.dtype)


def _torch_sparse(backend):
    def run(x, weight, bias, config=None):
        sparse = weight.torch_sparse(backend)
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, sparse, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return run


_CSLT_ALGS: dict = {}  # (N, K, dtype, M bucket) -> the algorithm cuSPARSELt's search found fastest


def _cusparselt(x, weight, bias, config=None):
    """cuSPARSELt. bfloat16: ``torch._cslt_sparse_mm`` on the compressed weight with the algorithm
    ``torch._cslt_sparse_mm_search`` finds fastest, searched once per (shape, power-of-two M bucket)
    for the whole process. torch's own semi-structured ``F.linear`` path uses the default algorithm:
    on an H200 that kernel is 0.73-0.96x dense at M = 16384 where the searched one is 1.42-1.58x
    (benchmarks/kernels/sweep.py). float16: torch's path, because the search fails inside cuSPARSELt
    0.8 for float16 on the H200 ("internal error", and the CUDA context is lost with it)."""
    if weight.dtype != torch.bfloat16:
        return _torch_sparse("cusparselt")(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    pad = -m % 16  # cuSPARSELt refuses a 1-row dense operand; 16 rows is what the search was run at
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    compressed = weight.cache.get("cslt")
    if compressed is None:
        from .format24 import decompress24

        # from a temporary dense copy: caching it (weight.dense()) would hold the whole dense model too
        compressed = weight.cache["cslt"] = torch._cslt_compress(decompress24(weight.values, weight.meta))
    key = (*weight.shape, weight.dtype, 1 << max(0, (m + pad - 1).bit_length()))
    if key not in _CSLT_ALGS:
        found = torch._cslt_sparse_mm_search(compressed, x2.t(), transpose_result=True)
        _CSLT_ALGS[key] = int(found[0] if isinstance(found, (tuple, list)) else found)
    out = torch._cslt_sparse_mm(compressed, x2.t(), transpose_result=True, alg_id=_CSLT_ALGS[key])
    if pad:
        out = out[:m]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def triton_parts(weight) -> tuple[int, tuple]:
    """(format code, parts) for ``kernels.triton_sparse``."""
    from .triton_sparse import FORMAT_24, FORMAT_BITMASK, GROUP

    if isinstance(weight, Packed24):
        return FORMAT_24, (weight.values, weight.meta)
    return FORMAT_BITMASK, (weight.values, weight.mask, weight.offsets(GROUP))


def _triton(x, weight, bias, config=None):
    from .triton_sparse import Config, sparse_mm

    if isinstance(config, str):
        config = Config.from_key(config)
    fmt, parts = triton_parts(weight)
    return sparse_mm(x, fmt, parts, *weight.shape, bias, config)


def _expand(x, weight, bias, config=None):
    from .triton_sparse import expand

    fmt, parts = triton_parts(weight)
    return F.linear(x, expand(fmt, parts, *weight.shape), bias)


def _cpu(x, weight, bias, config=None):
    from .cpu import cpu_linear

    return cpu_linear(x, weight, bias)


def _cuda_16bit(x, weight) -> bool:
    return x.is_cuda and weight.dtype in (torch.float16, torch.bfloat16)


def _triton_ok(x, weight) -> bool:
    from .triton_sparse import HAVE_TRITON, interpreted

    if not HAVE_TRITON or x.dtype != weight.dtype or weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if isinstance(weight, Packed24) and weight.shape[1] % 4:
        return False
    return x.is_cuda or (interpreted() and not x.is_cuda)


def _torch_sparse_ok(x, weight) -> bool:
    if not isinstance(weight, Packed24):
        return False
    n, k = weight.shape
    return _cuda_16bit(x, weight) and n % 32 == 0 and k % 64 == 0


def _cutlass_ok(x, weight) -> bool:
    """PyTorch's CUTLASS semi-structured kernels run on compute capability 8.x only (Ampere, Ada): on
    Hopper (H100, H200) torch raises "Supported only on GPUs with compute capability 8.x"."""
    return _torch_sparse_ok(x, weight) and torch.cuda.get_device_capability(x.device)[0] == 8


def _cpu_ok(x, weight) -> bool:
    if x.is_cuda or weight.device.type != "cpu":
        return False
    from .cpu import supports

    return supports(x, weight)


def _has_cusparselt() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except AttributeError:
        return False


BACKENDS = {
    "dense": (_dense, lambda x, w: True),
    "reference": (_reference, lambda x, w: True),
    "cutlass": (_torch_sparse("cutlass"), _cutlass_ok),
    "cusparselt": (_cusparselt, lambda x, w: _torch_sparse_ok(x, w) and _has_cusparselt()),
    "triton": (_triton, _triton_ok),
    "expand": (_expand, _triton_ok),
    "cpu": (_cpu, _cpu_ok),
}


def available(x: torch.Tensor, weight) -> list[str]:
    return [name for name, (_, ok) in BACKENDS.items() if ok(x, weight)]


_TABLE: dict | None = None


def tuning_table() -> dict:
    """{device name: {table key: {"NxK": {M: choice}}}}, written by benchmarks/gpu_check.py (GPUs) and
    benchmarks/cpu_kernels.py (CPUs). A choice is a backend name, or ``triton:<config key>``."""
    global _TABLE
    if _TABLE is None:
        try:
            with open(TUNING, encoding="utf-8") as fh:
                _TABLE = json.load(fh)
        except (OSError, ValueError):
            _TABLE = {}
    return _TABLE


def table_key(dtype: torch.dtype, kind: str) -> str:
    """The table a weight's choices live in: the dtype's name for 2:4 (``bfloat16``), ``bfloat16/bitmask``."""
    name = str(dtype).split(".")[-1]
    return name if kind == "2:4" else f"{name}/{kind}"


def _name(choice: str) -> str:
    return choice.split(":", 1)[0]


def pick(by_shape: dict, shape: tuple[int, int], m: int, ok: list[str], kind: str = "2:4") -> str:
    """The choice for an [N, K] weight at M tokens from one device and table key's tuning table
    ({"NxK": {M: choice}}): the nearest tuned M at or above this M (above the largest, the largest's);
    dense for a shape the table lacks when the table has others; with no table, the rule of thumb:
    triton for M <= 64, then cuSPARSELt (2:4) or expand (bitmask)."""
    tuned = by_shape.get(f"{shape[0]}x{shape[1]}", {})
    buckets = sorted(int(b) for b in tuned)
    for bucket in buckets:
        if m <= bucket and _name(tuned[str(bucket)]) in ok:
            return tuned[str(bucket)]
    if buckets:
        last = tuned[str(buckets[-1])]
        return last if _name(last) in ok else "dense"
    if by_shape:
        return "dense"
    large = ("cusparselt", "cutlass") if kind == "2:4" else ("expand",)
    for name in (("triton",) if m <= 64 else ()) + large:
        if name in ok:
            return name
    return "dense"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from .cpu import cpu_name

    return cpu_name()


def choose(x: torch.Tensor, weight) -> str:
    """``auto``: :func:`pick` with this device's tuning table for the weight's dtype and kind; on a CPU,
    the table measured on this CPU model, else (M <= 16, our CPU kernels built) whichever of ``cpu`` and
    dense measures faster for this shape here, timed once per process (``cpu.measured_choice``)."""
    ok = available(x, weight)
    m = x.numel() // x.shape[-1]
    by_shape = tuning_table().get(device_name(x.device), {}).get(table_key(weight.dtype, weight.kind), {})
    if x.is_cuda or f"{weight.shape[0]}x{weight.shape[1]}" in by_shape:
        return pick(by_shape, weight.shape, m, ok, weight.kind)
    if "cpu" not in ok or m > 16:
        return "dense"
    from .cpu import measured_choice

    return measured_choice(x, weight)


def sparse_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, backend: str = "auto",
                  config=None) -> torch.Tensor:
    """y = x · Wᵀ (+ bias) for a sparse weight W (``Packed24`` or ``Bitmask``); x [..., K] -> y [..., N].
    ``backend`` may carry a Triton variant as ``triton:<config key>``; ``config`` overrides it."""
    if backend == "auto":
        backend = choose(x, weight)
    name, _, key = backend.partition(":")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    fn, ok = BACKENDS[name]
    if not ok(x, weight):
        raise ValueError(f"backend {name!r} cannot run this case ({x.device}, {x.dtype} x, {weight.kind} "
                         f"{weight.dtype} weight {weight.shape})")
    return fn(x, weight, bias, config or key or None)
