"""Give the memory a long-running process has freed back to the kernel.

glibc's allocator keeps what Python frees in its heaps for reuse and returns
it to the kernel only from the top of a heap: the agent's ring copies and
frames (tens of KB to MBs, made in one thread and freed in another) leave it
holding freed memory between live objects, and its RSS climbs for an hour
before it levels off (``bench/soak.py``: one agent at 68 MB gave back 16 MB
to one ``malloc_trim(0)``). :func:`trim` calls ``malloc_trim(0)``, which
returns the free pages of every heap, on glibc; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import time
from typing import Any

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (None where the libc has none, as musl)."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        log.debug("no malloc_trim here: freed memory stays with the allocator")
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> int:
    """``malloc_trim(0)``: the nanoseconds it took (0 where there is none)."""
    fn = _malloc_trim()
    if fn is None:
        return 0
    t0 = time.monotonic_ns()
    fn(0)
    return time.monotonic_ns() - t0
