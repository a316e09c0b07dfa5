"""PruneConfig: every knob of a pruning run, validated once, here.

Anything a user can get wrong is checked by :meth:`PruneConfig.validate` before any model is
loaded; errors are :class:`OneshotError` with one line that says what is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field


class OneshotError(ValueError):
    """A user-facing error: the CLI prints its one-line message and exits non-zero."""


@dataclass(frozen=True)
class Constraint:
    """What a solver must reach in one weight matrix.

    ``n``/``m`` set for an N:M pattern: at most ``n`` non-zeros in every group of ``m`` consecutive
    input columns of each row. Otherwise ``sparsity`` is the exact fraction of zeros.
    """

    sparsity: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``None``/"unstructured" -> None; "N:M" -> (N, M) with 0 < N < M."""
    if pattern is None or pattern.strip().lower() in ("", "unstructured"):
        return None
    match = _PATTERN.match(pattern)
    if not match:
        raise OneshotError(f"--pattern {pattern!r} is not 'unstructured' or N:M (for example 2:4 or 4:8)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise OneshotError(f"--pattern {pattern!r}: N:M needs 0 < N < M (N kept weights in every M)")
    return n, m


@dataclass
class PruneConfig:
    """One pruning run. Build it, call :meth:`validate`, hand it to :func:`oneshot.prune`."""

    model: str
    out: str | None = None
    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str | None = None
    calib: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    text_field: str = "text"
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 0  # windows per forward; 0 = as many as fit in ~8k tokens
    ignore: list[str] = field(default_factory=list)
    overwrite: bool = False
    # solver options
    blocksize: int = 128
    dampening: float = 0.01
    magnitude_scope: str = "layer"  # "layer" (the papers) or "row"
    sparsegpt_scope: str = "row"  # unstructured sparsegpt: equal count per row in each block, or "block" (reference)
    sequential: str = "layer"  # statistics from the dense layer; "linear": from inputs after the linears before were pruned
    trust_remote_code: bool = False

    def validate(self) -> "PruneConfig":
        from .solvers import SOLVERS

        if not self.model or not str(self.model).strip():
            raise OneshotError("no model given: pass a hub id, a local directory or a .gguf file")
        if self.method not in SOLVERS:
            raise OneshotError(f"unknown --method {self.method!r}; choose one of: {', '.join(sorted(SOLVERS))}")
        nm = parse_pattern(self.pattern)
        if self.sparsity is not None:
            if not isinstance(self.sparsity, (int, float)) or math.isnan(self.sparsity) or not 0 < self.sparsity < 1:
                raise OneshotError(f"--sparsity must be a fraction strictly between 0 and 1, got {self.sparsity}")
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise OneshotError(
                    f"--pattern {nm[0]}:{nm[1]} means sparsity {implied:g}, but --sparsity {self.sparsity:g} was given; "
                    "drop --sparsity or make them agree"
                )
        for name in ("nsamples", "seqlen"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise OneshotError(f"--{name} must be a positive integer, got {value}")
        if self.batch_size < 0:
            raise OneshotError(f"--batch-size must be >= 0 (0 = automatic), got {self.batch_size}")
        if self.blocksize <= 0:
            raise OneshotError(f"--blocksize must be positive, got {self.blocksize}")
        if not 0 <= self.dampening < 10:
            raise OneshotError(f"--dampening must be in [0, 10), got {self.dampening}")
        if self.dtype not in DTYPES:
            raise OneshotError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise OneshotError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device != "cpu" and self.device != "auto":
            import torch

            if not torch.cuda.is_available():
                raise OneshotError(f"--device {self.device} asked for, but no CUDA GPU is available")
        if self.magnitude_scope not in ("layer", "row"):
            raise OneshotError(f"--magnitude-scope must be 'layer' or 'row', got {self.magnitude_scope!r}")
        if self.sparsegpt_scope not in ("row", "block"):
            raise OneshotError(f"--sparsegpt-scope must be 'row' or 'block', got {self.sparsegpt_scope!r}")
        if self.sequential not in ("linear", "layer"):
            raise OneshotError(f"--sequential must be 'linear' or 'layer', got {self.sequential!r}")
        for pattern in self.ignore:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise OneshotError(f"--ignore {pattern!r} is not a valid regular expression: {exc}") from None
        if self.out is not None:
            out = os.path.abspath(self.out)
            if os.path.isfile(out):
                raise OneshotError(f"--out {self.out} is an existing file; give a directory")
            if os.path.isdir(out) and os.listdir(out) and not self.overwrite:
                raise OneshotError(f"--out {self.out} exists and is not empty; pass --overwrite to replace it")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def constraint(self) -> Constraint:
        nm = self.nm
        if nm is not None:
            return Constraint(sparsity=1 - nm[0] / nm[1], n=nm[0], m=nm[1])
        return Constraint(sparsity=0.5 if self.sparsity is None else float(self.sparsity))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
