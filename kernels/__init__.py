"""kernels: the 2:4 semi-structured format oneshot writes, and the code that computes with it.

- ``kernels.format24``: the canonical packed layout (kept values [rows, cols/2] + 2-bit positions),
  shared with oneshot's ``packed24`` on-disk format, and converters to PyTorch's CUTLASS layout;
- ``kernels.backends``: ``sparse_linear(x, packed, bias, backend)`` over dense / reference / cutlass /
  cusparselt / triton, with ``auto`` read from a tuning table;
- ``kernels.modules``: ``SparseLinear`` and ``sparsify(model)``;
- ``kernels.bench``: timing (CUDA events, L2 flush, CUDA graphs) and roofline arithmetic.
"""

from .backends import BACKENDS, Packed24, available, choose, sparse_linear  # noqa: F401
from .format24 import compress24, decompress24, from_cutlass, is_24, packed24_nbytes, to_cutlass  # noqa: F401
from .modules import SparseLinear, sparsify  # noqa: F401

__all__ = ["BACKENDS", "Packed24", "SparseLinear", "available", "choose", "compress24", "decompress24",
           "from_cutlass", "is_24", "packed24_nbytes", "sparse_linear", "sparsify", "to_cutlass"]
