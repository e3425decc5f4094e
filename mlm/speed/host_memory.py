"""glibc malloc settings for CPU training: keep freed memory for reuse instead of handing it back to the kernel.

A training step allocates and frees about a gigabyte of activations and gradients, in tensors of tens of MB
at full size. glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB as
large blocks are freed) with a fresh mapping that it unmaps on free, and it trims the heap top whenever enough
of it is free. So every step the kernel maps and zero-fills the same memory again: a page fault per 4 KiB
page, every step, which is costly where faults are expensive (VMs). Measured figures: docs/performance.md.

`keep_freed_memory` raises the mmap threshold to 256 MiB and switches heap trimming off. The first steps grow
the heap and later steps reuse its pages, with no page faults. The peak resident memory stays close to
glibc's default, because the heap's high-water mark is mostly reached anyway; but the resident memory no
longer shrinks between steps, and one pattern grows the heap more: the same large aligned allocation repeated
with little in between needs slightly more than the block just freed, so glibc can add several blocks before
freed ones coalesce into one that fits. Tensors above 256 MiB keep their own mappings. Other C libraries are
left alone.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Above every per-step tensor of the full-size model up to batch 64 x 128 (the largest: the (N, V) fp32
# log-probabilities at ~1,200 labelled tokens, ~150 MB).
MMAP_THRESHOLD = 256 * 2**20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int; this many free bytes at the heap top never occur


def keep_freed_memory() -> bool:
    """Apply the settings above to the whole process, its forked DataLoader workers included; False where not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the symbols already loaded into this process, libc's among them
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the mmap threshold is refused above glibc's ceiling (larger on newer glibc).
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
