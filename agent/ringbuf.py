"""A BPF ring buffer read in batches, straight from its shared memory.

bcc's ``open_ring_buffer`` calls a Python function per event through ctypes;
measured here that costs more than the stitching itself. This reader maps the
ring buffer (the consumer page read-write, the producer page and the data
pages, which the kernel maps twice in a row so that no record wraps) and hands
whole batches of records, as (offset, length) in the mapping, to a decoder
before it moves the consumer position on.

Layout (kernel/bpf/ringbuf.c): every record starts with an 8-byte header,
``u32 len`` (bit 31: still being written, bit 30: discarded) and ``u32
pg_off``; records are 8-byte aligned. :func:`hopscope.ringwalk.walk` (compiled)
walks them for :meth:`RingReader.take`.
"""

from __future__ import annotations

import mmap
import select
import struct
from collections.abc import Callable, Container, Iterable

from hopscope.errors import HopscopeError
from hopscope.ringwalk import BUSY, DISCARD, LEN_MASK, walk

_U32 = struct.Struct("<I")


class RingBufError(HopscopeError):
    """The ring buffer could not be mapped."""


class RingReader:
    """Read the records of a ``BPF_MAP_TYPE_RINGBUF`` map given its fd and size."""

    def __init__(self, map_fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1):
            raise RingBufError(f"ring buffer size {size} is not a power of two")
        self.size = size
        self.mask = size - 1
        page = mmap.PAGESIZE
        self.page = page
        try:
            self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._prod = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)
        except OSError as exc:
            raise RingBufError(f"cannot map the ring buffer (fd {map_fd}): {exc.strerror}; "
                               "this needs a kernel with BPF ring buffers (5.8+)") from exc
        self._cons_pos = u64_word(self._cons)
        self._prod_pos = u64_word(self._prod)
        # the mapping as native 32-bit words: a record's header is read with one aligned
        # load and no tuple (struct's unpack_from made the walk twice as slow)
        self._words = memoryview(self._prod).cast("I")
        self._poll = select.epoll()
        self._poll.register(map_fd, select.EPOLLIN)
        self.records = 0
        self.discarded = 0

    def wait(self, timeout: float) -> bool:
        """Wait until the kernel says records are there (or ``timeout`` s)."""
        return bool(self._poll.poll(timeout))

    def pending(self) -> int:
        """Bytes written by the producer and not yet consumed."""
        return self._prod_pos[0] - self._cons_pos[0]

    @property
    def consumed(self) -> int:
        """Bytes released since the ring was made (the consumer position: it only grows)."""
        return int(self._cons_pos[0])

    def drain(self, handle: Callable[[mmap.mmap, list[tuple[int, int]]], object],
              limit: int = 1 << 16) -> int:
        """Give every complete record (at most ``limit``) to ``handle(buffer, records)``,
        then release them. Returns how many were handed over."""
        prod_mm = self._prod
        words = self._words
        cons = self._cons_pos[0]
        prod = self._prod_pos[0]
        base = self.page
        mask = self.mask
        recs: list[tuple[int, int]] = []
        while cons < prod and len(recs) < limit:
            at = base + (cons & mask)
            ln = words[at >> 2]
            if ln & BUSY:
                break
            n = ln & LEN_MASK
            if ln & DISCARD:
                self.discarded += 1
            else:
                recs.append((at + 8, n))
            cons += (n + 15) & ~7
        if recs:
            handle(prod_mm, recs)
        self._release(cons)
        self.records += len(recs)
        return len(recs)

    def take(self, limit: int = 1 << 16, kind_at: int = -1,
             kinds: frozenset[int] = frozenset(),
             max_bytes: int = 1 << 62) -> tuple[bytes, int, list[tuple[int, int]]]:
        """Copy out the complete records (at most ``limit`` of them and, but for a first
        record that is larger, ``max_bytes``) as they lie in the ring, their 8-byte headers
        included (:func:`walk_records` reads them back), and release them.

        Returns the bytes, how many records they hold (discarded ones included) and
        (offset in the bytes, length) of the data of the records whose byte at
        ``kind_at`` is one of ``kinds``. One copy however many records: the kernel maps
        the data pages twice in a row, so the span never wraps.
        """
        start = self._cons_pos[0]
        base = self.page + (start & self.mask)
        # offsets in the mapping from here on: the span never wraps (see above)
        at, n, marked = walk(self._words, base, base + (self._prod_pos[0] - start),
                             base + max_bytes, limit, kind_at, kinds)
        if at == base:
            return b"", 0, marked
        blob = self._prod[base:at]
        self._release(start + at - base)
        self.records += n
        return blob, n, marked

    def _release(self, pos: int) -> None:
        """Move the consumer position to ``pos``, in one 8-byte store (see :func:`u64_word`)."""
        self._cons_pos[0] = pos

    def close(self) -> None:
        self._words.release()
        self._cons_pos.release()
        self._prod_pos.release()
        self._poll.close()
        self._cons.close()
        self._prod.close()


def u64_word(buf: mmap.mmap) -> memoryview:
    """The first 8 bytes of ``buf`` as one native unsigned 64-bit word, which Python loads and
    stores whole (a memoryview item is copied with one 8-byte move).

    The ring's positions must be accessed so: ``struct.pack_into("<Q", ...)`` stores a byte
    at a time, and a producer on another CPU that read a half-stored consumer position (the
    carry into a higher byte not stored yet) saw the ring up to 16 MiB fuller than it was
    and refused events; in the replica about one in 10,000, until this was found.
    """
    return memoryview(buf).cast("B")[:8].cast("Q")


def walk_records(blob: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    """(offset, length) of the data of the records in ``blob`` (what :meth:`RingReader.take`
    copied out), discarded ones left out. Raises ValueError when the headers do not tile
    ``blob`` exactly (a record still being written, a length beyond the end)."""
    unpack = _U32.unpack_from
    end = len(blob)
    at = 0
    recs: list[tuple[int, int]] = []
    while at + 8 <= end:
        ln = unpack(blob, at)[0]
        if ln & BUSY:
            raise ValueError(f"record at byte {at} is marked as still being written")
        size = ln & ~DISCARD
        nxt = at + ((size + 8 + 7) & ~7)
        if nxt > end:
            raise ValueError(f"record at byte {at} claims {size} bytes, beyond the end ({end})")
        if not ln & DISCARD:
            recs.append((at + 8, size))
        at = nxt
    if at != end:
        raise ValueError(f"{end - at} bytes after the last record")
    return recs


def ring_records(events: Iterable[bytes], discarded: Container[int] = ()) -> bytes:
    """``events`` laid out as a BPF ring buffer holds them (an 8-byte header each, padded
    to 8 bytes; those whose index is in ``discarded`` marked so): what
    :meth:`RingReader.take` copies out, for tests and benchmarks."""
    return b"".join((len(e) | (DISCARD if i in discarded else 0)).to_bytes(4, "little")
                    + bytes(4) + e + bytes(-len(e) % 8) for i, e in enumerate(events))
