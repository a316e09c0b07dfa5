"""Compile every Triton variant the GPU sweep will time, here, for sm_90 (H100/H200) and sm_100 (B200),
and print ptxas's resource report: registers, spills, stack frame, shared memory. No GPU needed.

    python benchmarks/kernels/aot.py [--caps 90,100] [--dtype bf16] [--json benchmarks/out/aot.json]

The variants are ``kernels.triton_sparse.sweep_configs`` at the Llama-3-8B shapes for M = 1, 4, 8, 16,
both formats (2:4, bitmask), deduplicated by what the compiler sees (the K split is a run-time
argument, so only split or not matters). Exit code 1 when a variant fails to compile or spills more than
SPILL_LIMIT bytes (a few bytes of spill, seen on some variants, cost nothing measurable next to the weight).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
M_SIZES = (1, 4, 8, 16)
SPILL_LIMIT = 64


def variants() -> list[tuple[int, object, int]]:
    """Distinct (format, config, BLOCK_M) as compiled (split reduced to 1 or 2, which is all it changes)."""
    from oneshot.kernels.triton_sparse import FORMAT_24, FORMAT_BITMASK, Config, block_m_for, sweep_configs

    seen, out = set(), []
    for fmt in (FORMAT_24, FORMAT_BITMASK):
        for n, k in SHAPES:
            for m in M_SIZES:
                for c in sweep_configs(n, k, m):
                    compiled = Config(c.block_n, c.block_k, min(c.split_k, 2), c.use_dot, c.num_warps, c.num_stages,
                                      c.reduce if c.split_k > 1 else "kernel")
                    key = (fmt, compiled, block_m_for(m, c.use_dot))
                    if key not in seen:
                        seen.add(key)
                        out.append(key)
    return out


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caps", default="90,100")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--limit", type=int, default=None, help="compile only the first N variants (a quick check)")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "out", "aot.json"))
    args = ap.parse_args(argv)
    import triton

    from oneshot.kernels.triton_sparse import compile_report

    rows, bad = [], 0
    todo = variants()[: args.limit]
    t0 = time.time()
    print(f"Triton {triton.__version__}: {len(todo)} variants x capabilities {args.caps}, {args.dtype}")
    print(f"{'format':<8} {'variant':<34} {'BM':>3} {'sm':>4} {'regs':>5} {'spill st/ld':>12} {'stack':>6} "
          f"{'smem':>7}")
    for fmt, config, block_m in todo:
        for cap in (int(c) for c in args.caps.split(",")):
            try:
                r = compile_report(fmt, config, block_m, cap, args.dtype)
            except Exception as exc:  # noqa: BLE001 - a variant that fails to compile is a finding
                r = {"capability": cap, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            r.update(format="2:4" if fmt == 0 else "bitmask", variant=config.key(), block_m=block_m)
            rows.append(r)
            spills = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)
            if "error" in r or r.get("ptxas_error") or spills > SPILL_LIMIT:
                bad += 1
            print(f"{r['format']:<8} {r['variant']:<34} {block_m:>3} {cap:>4} {r.get('registers', '-')!s:>5} "
                  f"{str(r.get('spill_stores', '-')) + '/' + str(r.get('spill_loads', '-')):>12} "
                  f"{r.get('stack_bytes', '-')!s:>6} {r.get('shared_bytes', '-')!s:>7}"
                  + (f"  {r.get('error') or r.get('ptxas_error')}" if "error" in r or r.get("ptxas_error") else ""),
                  flush=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as fh:
        json.dump({"triton": triton.__version__, "dtype": args.dtype, "rows": rows}, fh, indent=1)
    print(f"{len(rows)} compiles in {time.time() - t0:.0f} s; {bad} with errors or spills over {SPILL_LIMIT} bytes; "
          f"wrote {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
