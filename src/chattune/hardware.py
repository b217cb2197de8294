"""Device, precision and thread choices.

`train.precision=auto` picks bf16 on CPU only where bf16 matmul is really fast: CPUs differ (one measured bf16
at 5x fp32 speed with AVX512-BF16, another, AVX2 only, at 1/140 of it), so a flag check is not enough and a
short timed probe decides. On GPU: bf16 where supported, else fp16.
"""

from __future__ import annotations

import functools
import os
import time

import torch


def device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def set_cpu_threads(num_threads: int | None = None, processes: int = 1) -> int:
    """Torch threads = cores per process (oversubscription slows small matmuls a lot)."""
    n = num_threads or max(1, cpu_cores() // max(1, processes))
    torch.set_num_threads(n)
    return n


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS (Linux/glibc only).

    By default every block over 32 MB (a batch's logits, activations) gets fresh pages from the kernel on each step
    and returns them when freed, so each step pays a page fault per 4 KiB touched, several times over: in a VM
    that cost ~10x the work itself (a 218 MB bf16->fp32 copy of the logits: 60-660 ms fresh, 8 ms reused). Keeping
    the memory changes nothing about the peak, which the process reaches anyway. Returns True if applied."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1  # serve big blocks from the heap, not fresh mmaps
        return ok and libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1  # and never trim the heap's top
    except (OSError, AttributeError):  # not glibc (musl, ...): leave the allocator alone
        return False


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup() -> float:
    """bf16 / fp32 matmul throughput ratio on this CPU, from a ~0.1 s probe."""

    def rate(dtype: torch.dtype) -> float:
        a = torch.randn(256, 512, dtype=dtype)
        b = torch.randn(512, 512, dtype=dtype)
        a @ b  # warm-up (kernel selection)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.04 or n < 3:
            a @ b
            n += 1
        return n / (time.perf_counter() - t0)

    try:
        return rate(torch.bfloat16) / rate(torch.float32)
    except RuntimeError:
        return 0.0


def resolve_precision(precision: str, device: str | None = None) -> str:
    """auto -> fp32 | bf16 | fp16 for this machine; explicit values are checked."""
    device = device or device_type()
    if device == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if precision == "auto":
            return "bf16" if bf16_ok else "fp16"
        return precision
    if precision == "fp16":
        return "fp32"  # fp16 autocast on CPU is slow and unstable; a warning is printed by the caller
    if precision == "auto":
        return "bf16" if cpu_bf16_speedup() >= 1.5 else "fp32"
    return precision


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
