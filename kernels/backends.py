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


def _cusparselt(x, packed, bias):
    """cuSPARSELt through ``torch._cslt_sparse_mm`` on the compressed weight, with the algorithm that
    ``torch._cslt_sparse_mm_search`` finds fastest for this shape (searched once per power-of-two M
    bucket, cached on the weight). torch's own semi-structured ``F.linear`` path uses the default
    algorithm and adds a pad and copies: on an H200 that is 0.3-0.9x dense where the searched
    algorithm is 1.25-1.58x at M >= 1024 (benchmarks/kernels/sweep.py)."""
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    # cuSPARSELt refuses a dense operand of 1 row, and its algorithm search fails inside the library
    # at 8 rows (H200, cuSPARSELt 0.8): the operand is padded to a multiple of 16 rows
    pad = -m % 16
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    compressed = packed.cache.get("cslt")
    if compressed is None:
        compressed = packed.cache["cslt"] = torch._cslt_compress(packed.dense())
    bucket = ("cslt_alg", 1 << max(0, (m - 1).bit_length()))
    if bucket not in packed.cache:
        found = torch._cslt_sparse_mm_search(compressed, x2.t(), transpose_result=True)
        packed.cache[bucket] = int(found[0] if isinstance(found, (tuple, list)) else found)
    out = torch._cslt_sparse_mm(compressed, x2.t(), transpose_result=True, alg_id=packed.cache[bucket])
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


def choose(x: torch.Tensor, packed: Packed24) -> str:
    """``auto``: the measured fastest for this GPU and shape (the nearest tuned M at or above this
    M), else: triton for M <= 64 and cuSPARSELt above on a GPU; dense on CPU."""
    ok = available(x, packed)
    m = x.numel() // x.shape[-1]
    if x.is_cuda:
        by_shape = tuning_table().get(torch.cuda.get_device_name(x.device), {}).get(str(packed.dtype).split(".")[-1],
                                                                                    {})
        tuned = by_shape.get(f"{packed.shape[0]}x{packed.shape[1]}", {})
        for bucket in sorted(int(b) for b in tuned):
            if m <= bucket and tuned[str(bucket)] in ok:
                return tuned[str(bucket)]
        for name in (("triton",) if m <= 64 else ()) + ("cusparselt", "cutlass"):
            if name in ok:
                return name
    return "dense"


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
