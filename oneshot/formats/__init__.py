"""On-disk weight formats (``dense``, ``packed24``, ``bitmask``) and the loader for all of them."""

from . import bitmask, dense, packed24  # noqa: F401  (registers the formats)
from .base import FORMATS, Format
from .store import convert, format_sizes, load, load_state_dict, read_sidecar, rewrite

__all__ = ["FORMATS", "Format", "convert", "format_sizes", "load", "load_state_dict", "read_sidecar", "rewrite"]
