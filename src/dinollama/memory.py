"""Keep a long job's freed memory mapped, so its big per-step tensors cost no page faults."""

from __future__ import annotations

import ctypes
import functools

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the OS.

    glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh mapping
    and unmaps it on free, so each training step page-faults its large tensors back in 4 KiB at a
    time: logits over 65,536 prototypes are 90-160 MB each, and faulting them in costs 3-4x the
    arithmetic done on them on a CPU. Serving them from the heap and never trimming it keeps the
    pages. Peak memory is unchanged; what the process frees stays reserved for its own reuse.
    Threads' arenas still map what their heaps cannot hold. The trainers and the ``dinollama``
    command call it. A no-op (False) without glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
