"""What a solver must reach in one weight matrix: an exact sparsity, or an N:M pattern."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import OneshotError


@dataclass(frozen=True)
class Constraint:
    """``n``/``m`` set for an N:M pattern: at most ``n`` non-zeros in every group of ``m`` consecutive
    input columns of each row. Otherwise ``sparsity`` is the exact fraction of zeros."""

    sparsity: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


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
