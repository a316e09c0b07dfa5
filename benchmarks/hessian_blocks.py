"""Accumulating H = xᵀx as its lower block triangle vs one full product (16,384 tokens, fp32).

    python benchmarks/hessian_blocks.py
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine  # noqa: E402
from oneshot.engine.statistics import accumulate_hessian, hessian_blocks  # noqa: E402


def best_of(fn, n=3):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


print(machine())
print("| width | blocks | full product s | block triangle s | speedup |")
print("|---|---|---|---|---|")
for d in (576, 1536, 4096):
    x = torch.randn(16384, d)
    h = torch.zeros(d, d)
    full = best_of(lambda h=h, x=x: h.addmm_(x.t(), x))
    tri = best_of(lambda h=h, x=x: accumulate_hessian(h, x))
    print(f"| {d} | {len(hessian_blocks(d)) - 1} | {full:.3f} | {tri:.3f} | {full / tri:.2f}x |")
