"""oneshot: one-shot post-training pruning for Hugging Face causal language models."""

import os as _os

from .constraint import Constraint
from .errors import OneshotError
from .version import __version__

__all__ = ["prune", "load", "PruneConfig", "PruneResult", "Constraint", "OneshotError", "__version__"]

# The repository's top-level kernels/ folder is installed as oneshot.kernels (pyproject.toml maps it;
# a top-level `kernels` would clash with Hugging Face's package of that name). Run from a source tree
# with no install (PYTHONPATH=repo), the same folder is found through the repository root.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
        _os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)


def __getattr__(name):  # keep `import oneshot` light: torch/transformers load on first use of prune
    if name in ("prune", "PruneResult"):
        from . import api

        return getattr(api, name)
    if name == "PruneConfig":
        from .config import PruneConfig

        return PruneConfig
    if name == "load":
        from .formats import load

        return load
    raise AttributeError(f"module 'oneshot' has no attribute {name!r}")
