"""oneshot: one-shot post-training pruning for Hugging Face causal language models."""

__version__ = "0.1.0"

from .config import Constraint, OneshotError, PruneConfig  # noqa: E402

__all__ = ["prune", "load", "PruneConfig", "PruneResult", "Constraint", "OneshotError", "__version__"]


def __getattr__(name):  # keep `import oneshot` light: torch/transformers load on first use of prune
    if name in ("prune", "PruneResult"):
        from . import api

        return getattr(api, name)
    if name == "load":
        from .formats import load

        return load
    raise AttributeError(f"module 'oneshot' has no attribute {name!r}")
