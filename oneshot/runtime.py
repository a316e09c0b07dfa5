"""The machine a run executes on: devices, the dtype layers compute in, memory available and used,
and the host heap."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is available, else ``cpu``; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def compute_dtype_for(storage: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a layer (or a model under evaluation) runs in: float32 for 16-bit weights on the CPU,
    so that the CPU never changes a result, and because bfloat16 and float16 matmuls on CPUs without
    AVX512-BF16/AMX run at a fraction of a GFLOP/s (with AMX bfloat16 is the faster one:
    ``benchmarks/cpu_dtypes.py``, RESULTS.md); else the stored one. Pruned weights are rounded to the
    stored dtype as they are written, so the output keeps it."""
    if torch.device(device).type == "cpu" and storage in (torch.float16, torch.bfloat16):
        return torch.float32
    return storage


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the CUDA allocator's view, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def peak_memory() -> dict:
    """Peak host RSS of this process (and peak CUDA memory when a GPU was used)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"host_rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["device_bytes"] = int(torch.cuda.max_memory_allocated())
    return peak


@contextlib.contextmanager
def reuse_host_heap(enabled: bool = True):
    """glibc serves allocations above a threshold (adaptive, at most 32 MB) with fresh pages from mmap
    and unmaps them when freed, so every activation-sized temporary of every forward page-faults
    anew. Inside this block, blocks up to 512 MB come from the heap and freed memory stays there for
    reuse; afterwards the thresholds return to glibc's initial 128 KB (no longer adaptive) and the
    heap is trimmed. SparseGPT on SmolLM2-135M, 2-core CPU: 3-21% less layer work (it varies with the
    machine's state) for about 0.25 GiB more peak RSS (``python benchmarks/host_heap.py``,
    RESULTS.md). Not glibc: nothing changes."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 512 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_threshold, 128 << 10)
        libc.mallopt(m_trim_threshold, 128 << 10)
        libc.malloc_trim(0)


def _glibc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


def free_memory() -> None:
    """After each layer: collect reference cycles (hooks and modules hold some, and with them a layer's
    tensors) and hand freed heap back to the OS, so host memory stays flat over hundreds of layers."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
