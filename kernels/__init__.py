"""kernels: the 2:4 semi-structured format oneshot writes, and the code that computes with it.

``kernels.format24`` is the canonical packed layout (kept values [rows, cols/2] + 2-bit positions),
shared with ``oneshot``'s ``packed24`` on-disk format. Plain PyTorch; runs on CPU.
"""

from .format24 import compress24, decompress24, is_24, packed24_nbytes  # noqa: F401

__all__ = ["compress24", "decompress24", "is_24", "packed24_nbytes"]
