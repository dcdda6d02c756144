"""Keep freed memory in the process, so a CPU training step does not pay a page fault for every 4 KiB it allocates.

A training step frees and re-allocates the same large tensors every step: the tick logits alone are batch x block x
vocabulary floats (16 x 128 x 4096 x 4 bytes = 32 MiB on the tiny preset). glibc's malloc gives a request at or above
its mmap threshold (at most 32 MiB on 64-bit) a fresh mapping that it unmaps when freed, and hands the heap's top back
to the system once more than twice that threshold is free; either way the kernel zeroes the pages again on their next
touch. Measured on the tiny preset's main job (2-core VM, one thread, quiet): 173 million minor page faults and 270 of
its 1,040 CPU seconds in the kernel. Over 80 steps of phase 2, system time was 43 s by default, 18 s with only the top
kept (mmap threshold 32 MiB, trim threshold 2 GiB) and 1.5 s with mmap off as well (peak RSS 2.3 -> 2.6 GB).

`mallopt` changes the running process's malloc (the same parameters as the `MALLOC_MMAP_MAX_` and
`MALLOC_TRIM_THRESHOLD_` environment variables, which only a fresh process reads). Other C libraries have no
`mallopt`; there it is a no-op that says so.
"""

import ctypes
import ctypes.util
import logging


logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of free heap top instead of returning it
TOP_PAD = 256 * 2**20  # grow the heap in steps of 256 MiB: fewer brk calls while the first steps reach their peak


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse (glibc only). Returns whether the C
    library took the settings; idempotent, and it lasts for the life of the process."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.warning("keep_freed_memory: the C library (%s) has no mallopt; the allocator is unchanged", name)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success
    taken = [mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD), mallopt(M_TOP_PAD, TOP_PAD)]
    if not all(taken):
        logger.warning("keep_freed_memory: mallopt refused %s; the allocator is partly unchanged", taken)
    return all(taken)
