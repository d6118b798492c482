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
import logging
import time

log = logging.getLogger(__name__)

_trim_fn: object = None  # None: not looked up yet; False: none (not glibc)


def trim() -> int:
    """``malloc_trim(0)``: the nanoseconds it took (0 where there is none)."""
    global _trim_fn
    if _trim_fn is None:
        try:
            fn = ctypes.CDLL(None).malloc_trim
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            _trim_fn = fn
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            _trim_fn = False
            log.debug("no malloc_trim here: freed memory stays with the allocator")
    if _trim_fn is False:
        return 0
    t0 = time.monotonic_ns()
    _trim_fn(0)  # type: ignore[operator]
    return time.monotonic_ns() - t0
