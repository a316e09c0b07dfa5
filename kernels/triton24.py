"""Our own 2:4 matmul for small token counts (decode, M = 1..64), in Triton.

y[M, N] = x[M, K] · W[N, K]ᵀ (+ bias) with W given in the packed format (values [N, K/2], meta
[N, K/8] uint8). No sparse tensor-core instruction is needed (upstream Triton has none): each program
reads a [BLOCK_N, BLOCK_K/2] tile of kept values and its [BLOCK_N, BLOCK_K/8] metadata bytes, expands
them in registers to a dense [BLOCK_N, BLOCK_K] tile, and accumulates x-tile · tileᵀ in fp32 with
``tl.dot``. At decode sizes the matmul is bound by the bytes of W it reads, so the ceiling over dense
is the byte ratio: 2·K / (K + K/8) = 1.78× for 16-bit weights.

Runs on a CUDA GPU, and on CPU through the Triton interpreter (``TRITON_INTERPRET=1``, set before
triton is imported), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is an optional dependency
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _sparse24_kernel(x_ptr, v_ptr, meta_ptr, bias_ptr, y_ptr, M, N, K,
                         stride_xm, stride_vn, stride_mn, stride_ym,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        half_k = tl.arange(0, BLOCK_K // 2)
        eighth_k = tl.arange(0, BLOCK_K // 8)
        full_k = tl.arange(0, BLOCK_K)
        row_ok = offs_n[:, None] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            # kept values [BLOCK_N, BLOCK_K/2] -> the two of each group [BLOCK_N, BLOCK_K/4]
            v = tl.load(v_ptr + offs_n[:, None] * stride_vn + (k0 // 2 + half_k)[None, :], mask=row_ok, other=0.0)
            v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))
            # metadata bytes [BLOCK_N, BLOCK_K/8] -> one nibble per group [BLOCK_N, BLOCK_K/4]
            byte = tl.load(meta_ptr + offs_n[:, None] * stride_mn + (k0 // 8 + eighth_k)[None, :], mask=row_ok, other=0)
            byte = byte.to(tl.int32)
            nib = tl.reshape(tl.join(byte & 0xF, (byte >> 4) & 0xF), (BLOCK_N, BLOCK_K // 4))
            i0 = nib & 3
            i1 = (nib >> 2) & 3
            zero = tl.zeros_like(v0)
            d0 = tl.where(i0 == 0, v0, zero)
            d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
            d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
            d3 = tl.where(i1 == 3, v1, zero)
            # join adds a minor axis: join(join(d0, d2), join(d1, d3)) flattens to d0, d1, d2, d3
            w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + full_k)[None, :],
                        mask=offs_m[:, None] < M, other=0.0)
            acc += tl.dot(x, tl.trans(w))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def block_k_for(k: int) -> int | None:
    """The K tile: the largest of 128, 64, 32 that divides K (None: this kernel does not take K)."""
    for block in (128, 64, 32):
        if k % block == 0:
            return block
    return None


def tile_for(n: int, k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) measured best on an H200 at M <= 16 for the Llama-3-8B shapes
    (benchmarks/kernels/sweep.py): narrow N tiles (more programs) for N < 8192, wide K tiles for
    the long rows."""
    block_n = 64 if n >= 8192 else 32
    block_k = 256 if k % 256 == 0 and (n >= 8192 or k >= 8192) else block_k_for(k)
    return block_n, block_k


def supports(x: torch.Tensor, values: torch.Tensor) -> bool:
    return HAVE_TRITON and block_k_for(2 * values.shape[1]) is not None and x.dtype == values.dtype


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
                    block_m: int = 16, block_n: int | None = None, block_k: int | None = None, num_warps: int = 4,
                    num_stages: int = 4) -> torch.Tensor:
    """x [..., K] · Wᵀ (+ bias) with W packed; the same dtype as x (fp32 accumulation)."""
    if not HAVE_TRITON:
        raise RuntimeError("the triton backend needs the triton package")
    n, half = values.shape
    k = 2 * half
    tile_n, tile_k = tile_for(n, k)
    block_n = block_n or tile_n
    block_k = block_k or tile_k
    if block_k is None or k % block_k:
        raise ValueError(f"K={k} is not a multiple of the K tile {block_k}")
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _sparse24_kernel[grid](x2, values, meta, bias if bias is not None else values, y, m, n, k,
                           x2.stride(0), values.stride(0), meta.stride(0), y.stride(0),
                           HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                           num_warps=num_warps, num_stages=num_stages)
    return y.reshape(*x.shape[:-1], n)


def compile_for(capability: int = 90, dtype: str = "fp16", block_m: int = 16, block_n: int = 64,
                block_k: int = 128) -> dict:
    """Compile the kernel ahead of time for an NVIDIA target (no GPU needed): {stage: size}."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = f"*{dtype}"
    signature = {"x_ptr": ptr, "v_ptr": ptr, "meta_ptr": "*u8", "bias_ptr": ptr, "y_ptr": ptr,
                 "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_vn": "i32", "stride_mn": "i32",
                 "stride_ym": "i32", "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                 "BLOCK_K": "constexpr"}
    constexprs = {"HAS_BIAS": False, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    source = ASTSource(fn=_sparse24_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
    return {stage: len(text) for stage, text in compiled.asm.items()}
