"""Matmul throughput by dtype on this machine: why oneshot runs 16-bit layers in float32 on the CPU.

    python benchmarks/cpu_dtypes.py [--m 256 --k 4096 --n 4096 --repeat 1]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = torch.randn(args.m, args.k).to(dtype)
        b = torch.randn(args.k, args.n).to(dtype)
        a @ b  # warm-up
        t = time.perf_counter()
        for _ in range(args.repeat):
            a @ b
        seconds = (time.perf_counter() - t) / args.repeat
        print(f"{str(dtype).replace('torch.', ''):>9}: {2 * args.m * args.k * args.n / seconds / 1e9:8.1f} GFLOP/s "
              f"({args.m}x{args.k}x{args.n})")


if __name__ == "__main__":
    main()
