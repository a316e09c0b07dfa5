"""Our Triton kernels for sparse weights at decode sizes (M = 1..64): 2:4 and bitmask.

y[M, N] = x[M, K] · W[N, K]ᵀ (+ bias), W held as

- 2:4 (``FORMAT_24``): kept values [N, K/2] + one metadata nibble per group of 4 ([N, K/8] bytes);
- bitmask (``FORMAT_BITMASK``): kept values [nnz] row by row + one bit per weight ([N, K/8] bytes),
  plus the kernel-side prefix table :func:`kernels.formatbm.group_offsets` built once at load: the
  index of each row's first kept value in every ``GROUP`` columns, so a tile finds its values with
  one load and an in-register prefix sum over its bits instead of a popcount chain.

At decode a linear is bound by the bytes of its weight, so each program reads one [BLOCK_N, K/SPLIT_K]
stripe of W once, expands it tile by tile in registers to dense [BLOCK_N, BLOCK_K] (zeros where W is
pruned) and accumulates x-tile · tileᵀ in fp32, either with ``tl.dot`` (Tensor Cores; BLOCK_M >= 16)
or, for M <= 8, as broadcast products summed on the CUDA cores (``USE_DOT=False``).

Split K: ``splits`` programs share a row block, each writing its fp32 partial to a workspace
[splits, M, N]. The partials are added in a fixed order (split 0, 1, ...), never with float atomics,
so two runs give the same bits: either by the last program of the row block to finish
(``REDUCE_IN_KERNEL``: an integer arrival counter per row block, reset by that program, so the
counters stay zero between calls and inside CUDA graphs) or by a second small kernel.

Runs on CUDA, and on CPU through the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), which is how the tests check every variant without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is an optional dependency
    HAVE_TRITON = False

FORMAT_24, FORMAT_BITMASK = 0, 1
GROUP = 64  # columns per entry of the bitmask prefix table; every BLOCK_K is a multiple of it


@dataclass(frozen=True)
class Config:
    """One kernel variant: the tile, how K is split, how the partials are reduced, the dot."""

    block_n: int
    block_k: int
    split_k: int = 1
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 3
    reduce: str = "kernel"  # "kernel": the last program adds the partials; "pass": a second kernel does

    def key(self) -> str:
        dot = "dot" if self.use_dot else "fma"
        tile = f"n{self.block_n}-k{self.block_k}-s{self.split_k}"
        return f"{dot}-{tile}-w{self.num_warps}-p{self.num_stages}-{self.reduce}"

    @classmethod
    def from_key(cls, key: str) -> Config:
        dot, n, k, s, w, p, reduce = key.split("-")
        return cls(int(n[1:]), int(k[1:]), int(s[1:]), dot == "dot", int(w[1:]), int(p[1:]), reduce)

    def as_dict(self) -> dict:
        return asdict(self)


if HAVE_TRITON:

    @triton.jit
    def _tile_24(v_ptr, meta_ptr, offs_n, k0, N, K, stride_v, stride_meta,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The dense [BLOCK_N, BLOCK_K] tile at column k0 of a 2:4 weight."""
        half_k = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        eighth_k = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        row_ok = offs_n[:, None] < N
        v = tl.load(v_ptr + offs_n[:, None] * stride_v + half_k[None, :], mask=row_ok & (half_k[None, :] < K // 2),
                    other=0.0)
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))
        byte = tl.load(meta_ptr + offs_n[:, None] * stride_meta + eighth_k[None, :],
                       mask=row_ok & (eighth_k[None, :] < (K + 7) // 8), other=0).to(tl.int32)
        nib = tl.reshape(tl.join(byte & 0xF, (byte >> 4) & 0xF), (BLOCK_N, BLOCK_K // 4))
        i0 = nib & 3
        i1 = (nib >> 2) & 3
        zero = tl.zeros_like(v0)
        d0 = tl.where(i0 == 0, v0, zero)
        d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
        d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
        d3 = tl.where(i1 == 3, v1, zero)
        # join adds a minor axis: join(join(d0, d2), join(d1, d3)) flattens to d0, d1, d2, d3
        return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))

    @triton.jit
    def _tile_bitmask(v_ptr, mask_ptr, off_ptr, offs_n, k0, N, K, stride_mask, stride_off,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The dense [BLOCK_N, BLOCK_K] tile at column k0 of a bitmask weight."""
        row_ok = offs_n[:, None] < N
        byte_k = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        byte = tl.load(mask_ptr + offs_n[:, None] * stride_mask + byte_k[None, :],
                       mask=row_ok & (byte_k[None, :] < (K + 7) // 8), other=0).to(tl.int32)
        bits = (byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1  # [BLOCK_N, BLOCK_K/8, 8]
        bits = tl.reshape(bits, (BLOCK_N, BLOCK_K // GROUP, GROUP))
        before = tl.cumsum(bits, axis=2) - bits  # kept values before each column within its group
        group_k = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        start = tl.load(off_ptr + offs_n[:, None] * stride_off + group_k[None, :],
                        mask=row_ok & (group_k[None, :] < (K + GROUP - 1) // GROUP), other=0)
        w = tl.load(v_ptr + start[:, :, None] + before, mask=bits != 0, other=0.0)
        return tl.reshape(w, (BLOCK_N, BLOCK_K))

    @triton.jit
    def _sparse_mm_kernel(x_ptr, a_ptr, b_ptr, c_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr,
                          M, N, K, k_split, splits, stride_xm, stride_a, stride_b, stride_ym,
                          FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          SPLIT: tl.constexpr, USE_DOT: tl.constexpr, REDUCE_IN_KERNEL: tl.constexpr,
                          IEEE: tl.constexpr, UPCAST: tl.constexpr = False):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_begin = pid_s * k_split  # k_split is a multiple of BLOCK_K: every tile lies in one split
        k_end = tl.minimum(k_begin + k_split, K)
        for k0 in range(k_begin, k_end, BLOCK_K):
            if FORMAT == 0:
                w = _tile_24(a_ptr, b_ptr, offs_n, k0, N, K, stride_a, stride_b, BLOCK_N, BLOCK_K)
            else:
                w = _tile_bitmask(a_ptr, b_ptr, c_ptr, offs_n, k0, N, K, stride_b, stride_a, GROUP, BLOCK_N, BLOCK_K)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
            if USE_DOT:
                if UPCAST:  # the Triton 3.9 interpreter's bf16 tl.dot returns garbage: the same dot in fp32
                    acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
                elif IEEE:
                    acc += tl.dot(x, tl.trans(w), input_precision="ieee")
                else:
                    acc += tl.dot(x, tl.trans(w))
            else:
                acc += tl.sum(x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
        out_mask = m_ok[:, None] & (offs_n[None, :] < N)
        out_offs = offs_m[:, None] * stride_ym + offs_n[None, :]
        if not SPLIT:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + out_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            ws_offs = offs_m[:, None] * N + offs_n[None, :]
            tl.store(ws_ptr + pid_s * M * N + ws_offs, acc, mask=out_mask)
            if REDUCE_IN_KERNEL:
                tl.debug_barrier()  # every thread's partial is stored before the arrival is counted
                lock = lock_ptr + pid_m * tl.num_programs(0) + pid_n
                arrived = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
                if arrived == splits - 1:  # the last of the row block: add the partials in split order
                    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for s in range(splits):
                        total += tl.load(ws_ptr + s * M * N + ws_offs, mask=out_mask, other=0.0,
                                         cache_modifier=".cg")
                    if HAS_BIAS:
                        total += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
                    tl.store(y_ptr + out_offs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
                    tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _reduce_kernel(ws_ptr, bias_ptr, y_ptr, M, N, stride_ym, splits, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < M * N
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(splits):
            total += tl.load(ws_ptr + s * M * N + offs, mask=ok, other=0.0)
        n = offs % N
        if HAS_BIAS:
            total += tl.load(bias_ptr + n, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + (offs // N) * stride_ym + n, total.to(y_ptr.dtype.element_ty), mask=ok)


    @triton.jit
    def _expand_kernel(a_ptr, b_ptr, c_ptr, w_ptr, N, K, stride_a, stride_b, stride_w,
                       FORMAT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        if FORMAT == 0:
            w = _tile_24(a_ptr, b_ptr, offs_n, k0, N, K, stride_a, stride_b, BLOCK_N, BLOCK_K)
        else:
            w = _tile_bitmask(a_ptr, b_ptr, c_ptr, offs_n, k0, N, K, stride_b, stride_a, GROUP, BLOCK_N, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tl.store(w_ptr + offs_n[:, None] * stride_w + offs_k[None, :], w,
                 mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_m_for(m: int, use_dot: bool) -> int:
    """Rows of x per program: >= 16 for ``tl.dot``; M itself (a power of two, at most 8) on the CUDA cores."""
    if use_dot:
        return max(16, min(64, triton.next_power_of_2(m)))
    return min(8, triton.next_power_of_2(m))


def default_config(fmt: int, n: int, k: int, m: int, sms: int = 132) -> Config:
    """A variant for a shape the tuning table lacks: the CUDA-core dot for M <= 4, tl.dot above; K split
    until there are about four programs per multiprocessor."""
    use_dot = m > 4
    block_n = 32 if use_dot else 16
    if interpreted():  # the interpreter runs programs one after another: fewer, wider ones (tests pin tiles)
        block_n = max(block_n, min(64, triton.next_power_of_2(n)))
    block_k = 256 if k >= 256 else max(GROUP, triton.next_power_of_2(k))
    if not use_dot:
        block_k = max(GROUP, min(block_k, FMA_ELEMENTS // (block_n * block_m_for(m, False))))
    return Config(block_n, block_k, auto_split(n, k, block_n, block_k, sms), use_dot, 4, 3, "kernel")


FMA_TILES = ((4, 512), (8, 256), (16, 128), (16, 256), (8, 128), (16, 64))  # (BLOCK_N, BLOCK_K); (32, 128) spills
DOT_TILES = ((16, 128), (16, 256), (32, 128), (32, 256), (64, 128))  # (64, 256) spills hundreds of bytes
FMA_MAX_M = 8
FMA_ELEMENTS = 8192  # BLOCK_M x BLOCK_N x BLOCK_K products in registers at 4 warps: 64 a thread


def auto_split(n: int, k: int, block_n: int, block_k: int, sms: int = 132) -> int:
    """The smallest power-of-two split of K that gives about four programs per multiprocessor."""
    tiles, steps, split = -(-n // block_n), -(-k // block_k), 1
    while tiles * split < 4 * sms and split * 2 <= steps and split < 32:
        split *= 2
    return split


def sweep_configs(n: int, k: int, m: int, sms: int = 132) -> list[Config]:
    """The fixed list of variants the GPU sweep times for one shape and M (no open autotune): every
    CUDA-core tile whose products fit the registers (M <= 8) and every tl.dot tile, each at the split
    that fills the GPU and at twice that, plus the two-kernel reduction at the first."""
    out = []
    tiles = []
    if m <= FMA_MAX_M:
        block_m = block_m_for(m, False)
        tiles += [(bn, bk, False) for bn, bk in FMA_TILES if block_m * bn * bk <= FMA_ELEMENTS]
    tiles += [(bn, bk, True) for bn, bk in DOT_TILES]
    for bn, bk, dot in tiles:
        if bk > max(GROUP, triton.next_power_of_2(k)) if HAVE_TRITON else False:
            continue
        split = auto_split(n, k, bn, bk, sms)
        for s in sorted({split, min(split * 2, -(-k // bk))}):
            out.append(Config(bn, bk, s, dot))
    first = out[0]
    if first.split_k > 1:
        out.append(Config(first.block_n, first.block_k, first.split_k, first.use_dot, reduce="pass"))
    return out


_LOCKS: dict = {}


def _locks(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 arrival counters, kept for the process (every launch leaves them zero again)."""
    have = _LOCKS.get(device)
    if have is None or have.numel() < count:
        have = _LOCKS[device] = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    return have


def check_config(config: Config, k: int) -> None:
    for name, size in (("BLOCK_N", config.block_n), ("BLOCK_K", config.block_k)):
        if size & (size - 1):
            raise ValueError(f"{name} {size} must be a power of two")
    if config.block_k % GROUP or config.block_k < GROUP:
        raise ValueError(f"BLOCK_K {config.block_k} must be a multiple of {GROUP}")
    if config.use_dot and config.block_n < 16:
        raise ValueError("tl.dot needs BLOCK_N >= 16")
    if config.reduce not in ("kernel", "pass"):
        raise ValueError(f"unknown reduce {config.reduce!r}")


def _pointers(fmt: int, parts: tuple) -> tuple[tuple, tuple]:
    """The kernels' (a, b, c) pointers and (stride_a, stride_b) for a weight's parts."""
    if fmt == FORMAT_24:
        values, meta = parts
        return (values, meta, values), (values.stride(0), meta.stride(0))
    values, mask, offsets = parts
    return (values, mask, offsets), (offsets.stride(0), mask.stride(0))


def expand(fmt: int, parts: tuple, n: int, k: int, block_n: int = 32, block_k: int = 256) -> torch.Tensor:
    """The dense [n, k] weight, written by one kernel launch from the sparse parts (no host sync, so it
    can be captured in a CUDA graph): the prefill path of weights that have no sparse GEMM for large M."""
    if not HAVE_TRITON:
        raise RuntimeError("the triton backend needs the triton package")
    ptrs, strides = _pointers(fmt, parts)
    w = torch.empty(n, k, dtype=ptrs[0].dtype, device=ptrs[0].device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _expand_kernel[grid](ptrs[0], ptrs[1], ptrs[2], w, n, k, strides[0], strides[1], w.stride(0),
                         FORMAT=fmt, GROUP=GROUP, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return w


def sparse_mm(x: torch.Tensor, fmt: int, parts: tuple, n: int, k: int, bias: torch.Tensor | None = None,
              config: Config | None = None) -> torch.Tensor:
    """x [..., K] · Wᵀ (+ bias) for W [n, k], the same dtype as x. ``parts``: for 2:4 (values [n, k/2],
    meta [n, ceil(k/8)]); for bitmask (values [nnz], mask [n, ceil(k/8)], offsets [n, ceil(k/GROUP)])."""
    if not HAVE_TRITON:
        raise RuntimeError("the triton backend needs the triton package")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != k):
        x2 = x2.contiguous()
    m = x2.shape[0]
    config = config or default_config(fmt, n, k, m)
    check_config(config, k)
    block_m = block_m_for(m, config.use_dot)
    steps = triton.cdiv(k, config.block_k)
    split = max(1, min(config.split_k, steps))
    k_split = triton.cdiv(steps, split) * config.block_k
    split = triton.cdiv(k, k_split)  # no empty splits
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config.block_n), split, triton.cdiv(m, block_m))
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    in_kernel = split > 1 and config.reduce == "kernel"
    locks = _locks(x.device, grid[0] * grid[2]) if in_kernel else y
    ptrs, strides = _pointers(fmt, parts)
    _sparse_mm_kernel[grid](x2, ptrs[0], ptrs[1], ptrs[2], bias if bias is not None else y, y, ws, locks,
                            m, n, k, k_split, split, x2.stride(0), strides[0], strides[1], y.stride(0),
                            FORMAT=fmt, GROUP=GROUP, HAS_BIAS=bias is not None, BLOCK_M=block_m,
                            BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT=split > 1, USE_DOT=config.use_dot,
                            REDUCE_IN_KERNEL=in_kernel, IEEE=x.dtype == torch.float32,
                            UPCAST=interpreted() and x.dtype == torch.bfloat16,
                            num_warps=config.num_warps, num_stages=config.num_stages)
    if split > 1 and not in_kernel:
        block = 1024
        _reduce_kernel[(triton.cdiv(m * n, block),)](ws, bias if bias is not None else y, y, m, n, y.stride(0),
                                                     split, HAS_BIAS=bias is not None, BLOCK=block,
                                                     num_warps=4)
    return y.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------- ahead-of-time compilation (no GPU needed)


def _signature(fmt: int, dtype: str, offsets: str = "i32") -> dict:
    ptr = f"*{dtype}"
    return {"x_ptr": ptr, "a_ptr": ptr, "b_ptr": "*u8", "c_ptr": f"*{offsets}" if fmt == FORMAT_BITMASK else ptr,
            "bias_ptr": ptr, "y_ptr": ptr, "ws_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
            "k_split": "i32", "splits": "i32", "stride_xm": "i32", "stride_a": "i32", "stride_b": "i32",
            "stride_ym": "i32"}


def compile_report(fmt: int, config: Config, block_m: int, capability: int = 90, dtype: str = "bf16") -> dict:
    """Compile one variant for an NVIDIA target here (no GPU needed) and read ptxas's resource report:
    {"registers", "spill_stores", "spill_loads", "stack_bytes", "shared_bytes", "ptx_bytes", "cubin_bytes"}."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    constexprs = {"FORMAT": fmt, "GROUP": GROUP, "HAS_BIAS": False, "BLOCK_M": block_m, "BLOCK_N": config.block_n,
                  "BLOCK_K": config.block_k, "SPLIT": config.split_k > 1, "USE_DOT": config.use_dot,
                  "REDUCE_IN_KERNEL": config.split_k > 1 and config.reduce == "kernel", "IEEE": False, "UPCAST": False}
    signature = {**_signature(fmt, dtype), **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=_sparse_mm_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    report = {"capability": capability, "shared_bytes": int(compiled.metadata.shared),
              "ptx_bytes": len(compiled.asm["ptx"]), "cubin_bytes": len(compiled.asm["cubin"])}
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w", encoding="utf-8") as fh:
            fh.write(compiled.asm["ptx"])
        proc = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", ptx, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True, timeout=300)
    text = proc.stderr + proc.stdout
    for key, pattern in (("registers", r"Used (\d+) registers"), ("stack_bytes", r"(\d+) bytes stack frame"),
                         ("spill_stores", r"(\d+) bytes spill stores"), ("spill_loads", r"(\d+) bytes spill loads")):
        found = re.search(pattern, text)
        report[key] = int(found.group(1)) if found else None
    if proc.returncode:
        report["ptxas_error"] = text.strip()[-300:]
    return report
