"""kernels: the 2:4 semi-structured format oneshot writes, and the code that computes with it.

- ``kernels.format24``: the canonical packed layout (kept values [rows, cols/2] + 2-bit positions),
  shared with oneshot's ``packed24`` on-disk format, and converters to PyTorch's CUTLASS layout;
- ``kernels.backends``: ``sparse_linear(x, packed, bias, backend)`` over dense / reference / cutlass /
  cusparselt / triton, with ``auto`` read from a tuning table;
- ``kernels.modules``: ``SparseLinear`` and ``sparsify(model)``;
- ``kernels.bench``: timing (CUDA events, L2 flush, CUDA graphs) and roofline arithmetic.
"""

if __name__ == "kernels":  # pragma: no cover - the repository root is on sys.path (python -m pytest, a script)
    # This folder is installed as ``oneshot.kernels``; a top-level ``kernels`` is Hugging Face's hub-kernels
    # package, which transformers (>= 5.25 with kernels 0.19) imports at start. Hand the name over to it.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ImportError("no module named 'kernels' (this repository's kernels/ folder is oneshot.kernels)")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from .backends import BACKENDS, Packed24, available, choose, sparse_linear  # noqa: F401
    from .format24 import compress24, decompress24, from_cutlass, is_24, packed24_nbytes, to_cutlass  # noqa: F401
    from .modules import SparseLinear, sparsify  # noqa: F401

__all__ = ["BACKENDS", "Packed24", "SparseLinear", "available", "choose", "compress24", "decompress24",
           "from_cutlass", "is_24", "packed24_nbytes", "sparse_linear", "sparsify", "to_cutlass"]
