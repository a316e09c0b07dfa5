"""kernels: the sparse formats oneshot writes (2:4 and bitmask), and the code that computes with them.

- ``kernels.format24`` / ``kernels.formatbm``: the canonical layouts (2:4: kept values [rows, cols/2] +
  2-bit positions; bitmask: kept values + 1 bit per weight), shared with oneshot's ``packed24`` and
  ``bitmask`` on-disk formats, and the kernel-side tables built from them at load;
- ``kernels.weights``: ``Packed24`` and ``Bitmask``, a weight with its cached backend forms;
- ``kernels.backends``: ``sparse_linear(x, weight, bias, backend)`` over dense / reference / cutlass /
  cusparselt / triton / expand / cpu, with ``auto`` read from a tuning table;
- ``kernels.triton_sparse``: the Triton decode kernels (split K, deterministic reduction);
- ``kernels.cpu``: the CPU kernels (AVX2 / AVX-512, built at first use);
- ``kernels.modules``: ``SparseLinear``, ``sparsify(model)`` and ``install(model, weights)``;
- ``kernels.decode``: greedy generation with a static cache, each step a CUDA graph on a GPU;
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
    from .backends import BACKENDS, available, choose, sparse_linear  # noqa: F401
    from .format24 import compress24, decompress24, from_cutlass, is_24, packed24_nbytes, to_cutlass  # noqa: F401
    from .formatbm import compress_bitmask, decompress_bitmask  # noqa: F401
    from .modules import SparseLinear, install, sparsify  # noqa: F401
    from .weights import Bitmask, Packed24  # noqa: F401

    __all__ = ["BACKENDS", "Bitmask", "Packed24", "SparseLinear", "available", "choose", "compress24",
               "compress_bitmask", "decompress24", "decompress_bitmask", "from_cutlass", "install", "is_24",
               "packed24_nbytes", "sparse_linear", "sparsify", "to_cutlass"]
