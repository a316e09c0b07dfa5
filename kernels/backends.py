"""``sparse_linear(x, packed, bias, backend)``: one call, several ways to compute a 2:4 linear.

| backend | where | how |
|---|---|---|
| ``dense`` | any | the decompressed weight through ``F.linear`` (cuBLAS on GPU): the comparison and fallback |
| ``reference`` | any | fp32 ``F.linear`` of the decompressed weight, cast back: the ground truth |
| ``cutlass`` | CUDA | PyTorch's semi-structured tensor, CUTLASS kernels, built from the packed form directly |
| ``cusparselt`` | CUDA | cuSPARSELt through ``torch._cslt_sparse_mm``, its algorithm searched per shape |
| ``triton`` | CUDA, or CPU under ``TRITON_INTERPRET=1`` | our kernel for small M (``kernels.triton24``) |
| ``auto`` | any | the tuning table's choice for (GPU, dtype, N, K, M), else a rule of thumb |

Backend-specific forms of a weight (the dense copy, the torch sparse tensor) are built once and
cached on the ``Packed24`` object.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .format24 import compress24, decompress24, to_cutlass

TUNING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning.json")


@dataclass
class Packed24:
    """A 2:4 weight [N, K] in the canonical packed form, plus cached backend forms."""

    values: torch.Tensor  # [N, K/2]
    meta: torch.Tensor  # [N, ceil(K/8)] uint8
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> Packed24:
        return cls(*compress24(weight))

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[0], 2 * self.values.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel()

    def to(self, device) -> Packed24:
        return Packed24(self.values.to(device), self.meta.to(device))

    def dense(self) -> torch.Tensor:
        if "dense" not in self.cache:
            self.cache["dense"] = decompress24(self.values, self.meta)
        return self.cache["dense"]

    def torch_sparse(self, backend: str):
        """The weight as ``torch.sparse.SparseSemiStructuredTensor`` for ``cutlass`` or ``cusparselt``."""
        if backend not in self.cache:
            from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

            if backend == "cutlass":
                packed, meta = to_cutlass(self.values, self.meta)
                self.cache[backend] = SparseSemiStructuredTensorCUTLASS(
                    torch.Size(self.shape), packed=packed, meta=meta, packed_t=None, meta_t=None,
                    compressed_swizzled_bitmask=None)
            else:  # cuSPARSELt compresses into its own opaque layout
                self.cache[backend] = SparseSemiStructuredTensorCUSPARSELT.from_dense(decompress24(self.values,
                                                                                                   self.meta))
        return self.cache[backend]


def _dense(x, packed, bias):
    return F.linear(x, packed.dense(), bias)


def _reference(x, packed, bias):
    out = F.linear(x.float(), packed.dense().float(), None if bias is None else bias.float())
    return out.to(x.dtype)


def _torch_sparse(backend):
    def run(x, packed, bias):
        weight = packed.torch_sparse(backend)
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, weight, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return run


_CSLT_ALGS: dict = {}  # (N, K, dtype, M bucket) -> the algorithm cuSPARSELt's search found fastest


def _cusparselt(x, packed, bias):
    """cuSPARSELt. bfloat16: ``torch._cslt_sparse_mm`` on the compressed weight with the algorithm
    ``torch._cslt_sparse_mm_search`` finds fastest, searched once per (shape, power-of-two M bucket)
    for the whole process. torch's own semi-structured ``F.linear`` path uses the default algorithm:
    on an H200 that kernel is 0.73-0.96x dense at M = 16384 where the searched one is 1.42-1.58x
    (benchmarks/kernels/sweep.py). float16: torch's path, because the search fails inside cuSPARSELt
    0.8 for float16 on the H200 ("internal error", and the CUDA context is lost with it)."""
    if packed.dtype != torch.bfloat16:
        return _torch_sparse("cusparselt")(x, packed, bias)
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    pad = -m % 16  # cuSPARSELt refuses a 1-row dense operand; 16 rows is what the search was run at
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    compressed = packed.cache.get("cslt")
    if compressed is None:
        # from a temporary dense copy: caching it (packed.dense()) would hold the whole dense model too
        compressed = packed.cache["cslt"] = torch._cslt_compress(decompress24(packed.values, packed.meta))
    key = (*packed.shape, packed.dtype, 1 << max(0, (m + pad - 1).bit_length()))
    if key not in _CSLT_ALGS:
        found = torch._cslt_sparse_mm_search(compressed, x2.t(), transpose_result=True)
        _CSLT_ALGS[key] = int(found[0] if isinstance(found, (tuple, list)) else found)
    out = torch._cslt_sparse_mm(compressed, x2.t(), transpose_result=True, alg_id=_CSLT_ALGS[key])
    if pad:
        out = out[:m]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _triton(x, packed, bias):
    from .triton24 import sparse24_linear

    return sparse24_linear(x, packed.values, packed.meta, bias)


def _cuda_16bit(x, packed) -> bool:
    return x.is_cuda and packed.dtype in (torch.float16, torch.bfloat16)


def _triton_ok(x, packed) -> bool:
    from .triton24 import supports

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return supports(x, packed.values) and (x.is_cuda or (interpreted and not x.is_cuda))


def _torch_sparse_ok(x, packed) -> bool:
    n, k = packed.shape
    return _cuda_16bit(x, packed) and n % 32 == 0 and k % 64 == 0


def _cutlass_ok(x, packed) -> bool:
    """PyTorch's CUTLASS semi-structured kernels run on compute capability 8.x only (Ampere, Ada): on
    Hopper (H100, H200) torch raises "Supported only on GPUs with compute capability 8.x"."""
    return _torch_sparse_ok(x, packed) and torch.cuda.get_device_capability(x.device)[0] == 8


BACKENDS = {
    "dense": (_dense, lambda x, p: True),
    "reference": (_reference, lambda x, p: True),
    "cutlass": (_torch_sparse("cutlass"), _cutlass_ok),
    "cusparselt": (_cusparselt, lambda x, p: _torch_sparse_ok(x, p) and _has_cusparselt()),
    "triton": (_triton, _triton_ok),
}


def _has_cusparselt() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except AttributeError:
        return False


def available(x: torch.Tensor, packed: Packed24) -> list[str]:
    return [name for name, (_, ok) in BACKENDS.items() if ok(x, packed)]


_TABLE: dict | None = None


def tuning_table() -> dict:
    """{gpu name: {dtype: {"NxK": {M: backend}}}}, written by benchmarks/kernels/gemm.py --write-tuning."""
    global _TABLE
    if _TABLE is None:
        try:
            with open(TUNING, encoding="utf-8") as fh:
                _TABLE = json.load(fh)
        except (OSError, ValueError):
            _TABLE = {}
    return _TABLE


def pick(by_shape: dict, shape: tuple[int, int], m: int, ok: list[str]) -> str:
    """The backend for an [N, K] weight at M tokens from one GPU and dtype's tuning table
    ({"NxK": {M: backend}}): the nearest tuned M at or above this M (above the largest, the
    largest's); dense for a shape the table lacks when the table has others (on the one GPU
    measured so far, dense wins most shapes); with no table, triton for M <= 64, else cuSPARSELt."""
    tuned = by_shape.get(f"{shape[0]}x{shape[1]}", {})
    buckets = sorted(int(b) for b in tuned)
    for bucket in buckets:
        if m <= bucket and tuned[str(bucket)] in ok:
            return tuned[str(bucket)]
    if buckets:
        return tuned[str(buckets[-1])] if tuned[str(buckets[-1])] in ok else "dense"
    if by_shape:
        return "dense"
    for name in (("triton",) if m <= 64 else ()) + ("cusparselt", "cutlass"):
        if name in ok:
            return name
    return "dense"


def choose(x: torch.Tensor, packed: Packed24) -> str:
    """``auto``: :func:`pick` with this GPU's tuning table for the weight's dtype; dense on CPU."""
    if not x.is_cuda:
        return "dense"
    by_shape = tuning_table().get(torch.cuda.get_device_name(x.device), {}).get(str(packed.dtype).split(".")[-1], {})
    return pick(by_shape, packed.shape, x.numel() // x.shape[-1], available(x, packed))


def sparse_linear(x: torch.Tensor, packed: Packed24, bias: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """y = x · Wᵀ (+ bias) for a 2:4 weight W held as ``packed``; x [..., K] -> y [..., N]."""
    if backend == "auto":
        backend = choose(x, packed)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: auto, {', '.join(BACKENDS)}")
    fn, ok = BACKENDS[backend]
    if not ok(x, packed):
        raise ValueError(f"backend {backend!r} cannot run this case ({x.device}, {packed.dtype}, {packed.shape})")
    return fn(x, packed, bias)
