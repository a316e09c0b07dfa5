"""CPU kernels for sparse weights (bitmask, 2:4) and a dense GEMV of the same hand: the ``cpu`` backend.

The C++ (``kernels/csrc/cpu_kernels.cpp``) is built with ``torch.utils.cpp_extension`` at first use
(or by ``.ci/setup``) and cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``), so a
fresh install needs nothing beyond a C++ compiler and ninja; without them the ``cpu`` backend is
unavailable, and ``oneshot.load(..., kernels="cpu")`` says so in one line and leaves the layers dense.

Paths, chosen at run time from the CPU's flags (``ONESHOT_CPU_ISA=avx2|scalar`` forces a lower one):
AVX-512 (F, BW, VBMI2: ``vpexpandw``/``vexpandps`` place a row's kept values of 32 columns in one
instruction), AVX2 + FMA + F16C (a table of lane permutations per mask byte), portable scalar code.
x is taken in fp32 (a bf16 x is widened once per call), accumulation is fp32, the weights stay in
their dtype (fp32, bf16, fp16). Threads are PyTorch's (``at::parallel_for``: ``torch.set_num_threads``
holds); each output is summed by one thread in a fixed order, so the bits do not depend on the
thread count (they do depend on the path: AVX-512 and AVX2 add in different orders).

Kernel-side layout, built once per weight and cached on it (``layout``): rows in blocks of 4, each
group of 32 columns of a block holding the 4 rows' 32-bit mask words, then their kept values, so a
block is one sequential stream and no load waits on a chain of popcounts. A 2:4 weight enters it as
the bitmask of its two stored positions per group (the same bytes as its 2-bit metadata). The layout
is a copy: the canonical parts stay on the module (state dict, ``.to()``).
"""

from __future__ import annotations

import functools
import os
import platform
import sys

import torch

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cpu_kernels.cpp")
HEADER = os.path.join(os.path.dirname(SOURCE), "cpu_kernels.h")
_STATE: dict = {}


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


@functools.lru_cache(maxsize=1)
def cpu_flags() -> list[str]:
    """The instruction-set flags the kernels care about, as /proc/cpuinfo lists them."""
    want = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vbmi2", "avx512_bf16", "amx_bf16")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in want if f in have]
    except OSError:
        pass
    return []


def build(verbose: bool = False):
    """The compiled extension (built or found in the cache), or None; ``build_error()`` says why not."""
    if "module" in _STATE or "error" in _STATE:
        return _STATE.get("module")
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        _STATE["error"] = f"the CPU kernels are written for x86-64 Linux, not {sys.platform} {platform.machine()}"
        return None
    try:
        import hashlib

        from torch.utils.cpp_extension import load

        digest = hashlib.sha256()
        for path in (SOURCE, HEADER):  # a changed kernel is a new module name: never a stale cached build
            with open(path, "rb") as fh:
                digest.update(fh.read())
        digest = digest.hexdigest()[:12]
        _STATE["module"] = load(name=f"oneshot_cpu_kernels_{digest}", sources=[SOURCE],
                                extra_cflags=["-O3", "-fno-math-errno", "-fopenmp"], verbose=verbose)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: the backend is unavailable
        _STATE["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc) else ''}"
        return None
    return _STATE["module"]


def build_error() -> str | None:
    build()
    return _STATE.get("error")


def isa() -> int:
    """The path the kernels take here: the CPU's best, or lower if ``ONESHOT_CPU_ISA`` says so."""
    forced = os.environ.get("ONESHOT_CPU_ISA")
    if "isa" in _STATE and _STATE["isa"][0] == forced:  # asked every call: the last answer, unless the env moved
        return _STATE["isa"][1]
    module = build()
    if module is None:
        return -1
    _STATE["isa"] = (forced, _isa(int(module.best_isa()), forced))
    return _STATE["isa"][1]


def _isa(best: int, forced: str | None) -> int:
    if forced:
        if forced not in ISAS:
            raise ValueError(f"ONESHOT_CPU_ISA={forced!r}; choose one of: {', '.join(ISAS)}")
        return min(best, ISAS[forced])
    return best


def isa_name(code: int | None = None) -> str:
    code = isa() if code is None else code
    return {v: k for k, v in ISAS.items()}.get(code, "unavailable")


def supports(x: torch.Tensor, weight) -> bool:
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16,
            torch.float16) and weight.dtype in (torch.float32, torch.bfloat16, torch.float16) and build() is not None)


def _mask_from_meta(meta: torch.Tensor, k: int) -> torch.Tensor:
    """A 2:4 weight's 2-bit positions as a bitmask of its two stored values per group of 4."""
    from .formatbm import pack_bits

    n = meta.shape[0]
    nibbles = torch.stack([meta & 0x0F, meta >> 4], dim=-1).reshape(n, -1)[:, : k // 4].long()
    bits = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    bits.scatter_(-1, torch.stack([nibbles & 3, (nibbles >> 2) & 3], dim=-1), True)
    return pack_bits(bits.reshape(n, k))


WTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def layout(weight) -> tuple:
    """The kernel-side form of a weight, built once and cached on it: ("dense", W) or ("blocked", data,
    block starts, group offsets, weight type code): rows in blocks of 4, each group of 32 columns of a block
    its 4 mask words then the 4 rows' kept values (cpu_kernels.h), one sequential stream per block."""
    cached = weight.cache.get("cpu")
    if cached is not None:
        return cached
    n, k = weight.shape
    if weight.kind == "dense":
        cached = ("dense", weight.weight.contiguous())
    else:
        if weight.kind == "2:4":
            values, mask = weight.values.reshape(-1), _mask_from_meta(weight.meta, k)
            row_ptr = torch.arange(n + 1, dtype=torch.int64) * (k // 2)
        else:
            from .formatbm import POPCOUNT

            values, mask = weight.values, weight.mask.contiguous()
            row_ptr = torch.zeros(n + 1, dtype=torch.int64)
            torch.cumsum(POPCOUNT[mask.long()].sum(1), 0, out=row_ptr[1:])
        data, start, goff = build().build_blocked(values.contiguous(), mask, row_ptr, k)
        cached = ("blocked", data, start, goff, WTYPES[weight.dtype])
    weight.cache["cpu"] = cached
    return cached


def cpu_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, path: int | None = None) -> torch.Tensor:
    """x [..., K] · Wᵀ (+ bias) on the CPU kernels; the dtype of x. ``path``: 0 scalar, 1 AVX2, 2 AVX-512
    (default: :func:`isa`)."""
    module = build()
    if module is None:
        raise RuntimeError(f"the cpu backend is not built here: {build_error()}")
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    code = isa() if path is None else path
    form = layout(weight)
    if form[0] == "dense":
        y = module.dense_linear(x2, form[1], code)
    else:
        y = module.bitmask_linear(x2, form[1], form[2], form[3], n, k, form[4], code)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


_CHOICES: dict = {}


def measured_choice(x: torch.Tensor, weight, iters: int = 7) -> str:
    """``cpu`` or ``dense`` for this weight's shape, kind and dtype at x's M bucket (1, or 2..16 timed at 8):
    both timed here, interleaved, once per process; the median decides. The choice is remembered
    (``measured_choices()``), so later calls cost a dictionary lookup."""
    m = x.numel() // x.shape[-1]
    bucket = 1 if m <= 1 else 8
    key = (weight.kind, str(weight.dtype).split(".")[-1], f"{weight.shape[0]}x{weight.shape[1]}", bucket)
    if key not in _CHOICES:
        import time

        import torch.nn.functional as F

        probe = torch.randn(bucket, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(x.dtype)
        had = set(weight.cache)
        dense = weight.dense()
        runs = {"cpu": lambda: cpu_linear(probe, weight), "dense": lambda: F.linear(probe, dense)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for i in range(iters + 1):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                if i:  # the first call builds the layout and warms the caches
                    times[name].append(time.perf_counter() - t)
        _CHOICES[key] = min(times, key=lambda name: sorted(times[name])[len(times[name]) // 2])
        other = "dense" if _CHOICES[key] == "cpu" else "cpu"
        if other not in had:  # keep only the form that runs: the other is a copy of the weight
            weight.cache.pop(other, None)
    return _CHOICES[key]


def measured_choices() -> dict:
    """{"kind dtype NxK M<=bucket": "cpu" | "dense"}: what ``auto`` chose on this CPU in this process."""
    return {f"{k[0]} {k[1]} {k[2]} {'M=1' if k[3] == 1 else 'M=2..16'}": v for k, v in _CHOICES.items()}
