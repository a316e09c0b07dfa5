"""CPU kernels for sparse weights (bitmask, 2:4) and a dense bf16 GEMV: the ``cpu`` backend."""

from __future__ import annotations

import functools
import platform

import torch


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (the tuning table's key for CPUs)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def supports(x: torch.Tensor, weight) -> bool:
    return False


def cpu_linear(x, weight, bias):
    raise RuntimeError("the cpu backend is not built")
