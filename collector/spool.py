"""A bounded on-disk spool of encoded batches, for an agent whose collector is away.

One directory per agent, one file per batch, named by its sequence number
(``00000000000000000042.hsb``, so that name order is seq order). A file is
written to a temporary name and renamed into place (``fsync=True`` also
syncs the file and the directory), so a crash leaves either the whole batch
or a ``.tmp-*`` file that the next start removes. Each file carries a small
header (magic, seq, length, CRC-32) so that a torn or corrupted file is
recognised, skipped with a warning and deleted, never crashes the agent.

Caps: ``max_bytes`` (file bytes, header included) and ``max_files``. When
an append would go over either, the oldest batches are deleted first and
counted in :attr:`Spool.dropped_batches` / :attr:`Spool.dropped_bytes`.

Memory first (``memory_bytes``, what a live agent uses): while the batches
not yet acked fit in ``memory_bytes`` they stay in memory and no file is
written; one that does not fit goes to disk with every batch held in memory
before it, and :meth:`Spool.close` writes what memory still holds. With a
collector that acks, a live agent then writes nothing to disk (a file per
batch, read back and deleted milliseconds later, was much of what shipping
cost it: bench/README.md); a ``kill -9`` loses at most ``memory_bytes`` of batches, and, while
the collector is away at the next start, the sequence can restart below what
the collector acked (the last seq is written at most once a second): batches
it then takes for duplicates are lost.

Use::

    with Spool(state_dir / "spool", max_bytes=256 << 20) as spool:
        spool.append(seq, frame_bytes)       # while the collector is away
        ...
        spool.ack(welcome.acked)             # after reconnecting
        for seq, frame_bytes in spool:       # replay, oldest first
            writer.write(frame_bytes)
        ...
        spool.ack(ack.seq)                   # delivered: gone from disk

The highest seq ever appended survives restarts (:attr:`Spool.last_seq`),
even once everything is acked: an agent continues its sequence from it.
See ``docs/wire.md``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from hopscope.errors import SpoolError

log = logging.getLogger(__name__)

MAGIC = b"HSP1"
_HEAD = struct.Struct(">4sQII")  # magic, seq, payload length, crc32(payload)
HEADER_SIZE = _HEAD.size
SUFFIX = ".hsb"
_NAME = re.compile(r"^(\d{20})\.hsb$")
_TMP_PREFIX = ".tmp-"
_LAST = "last_seq"
_LOCK = "lock"
#: Seconds between two "spool full" warnings (the counters keep counting).
WARN_EVERY_S = 60.0


def _fname(seq: int) -> str:
    return f"{seq:020d}{SUFFIX}"


class Spool:
    """A directory of encoded batches, oldest first, bounded in bytes and files.

    One process at a time: the directory is locked (``flock``) while open.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int = 256 << 20,
                 max_files: int = 100_000, fsync: bool = False, memory_bytes: int = 0) -> None:
        if max_bytes <= HEADER_SIZE or max_files < 1:
            raise SpoolError(f"spool caps too small: max_bytes={max_bytes},"
                             f" max_files={max_files}")
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.fsync = fsync
        self.memory_bytes = memory_bytes
        #: batches deleted to make room (or too large to ever fit), and their bytes
        self.dropped_batches = 0
        self.dropped_bytes = 0
        #: files found corrupt or partial, skipped and deleted
        self.corrupt_files = 0
        #: appends that failed to write (disk full, I/O error): counted as dropped too
        self.write_errors = 0
        self._index: OrderedDict[int, int] = OrderedDict()  # seq -> file size
        self._bytes = 0
        self._mem: dict[int, bytes] = {}  # seq -> data, the batches held in memory only
        self._mem_bytes = 0  # their sizes as files
        self._last_written = 0.0  # when last_seq was written (memory first: once a second)
        self._last = -1
        self._last_warn = 0.0
        self._lock_fd = -1
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(self.dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"spool directory {self.dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise SpoolError(f"spool directory {self.dir} is in use by another process") from None
        self._scan()
        self._enforce(0)

    # -- state --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    @property
    def nbytes(self) -> int:
        """File bytes held (headers included), what ``max_bytes`` caps."""
        return self._bytes

    @property
    def first_seq(self) -> int:
        """The oldest seq held, -1 when empty."""
        return next(iter(self._index), -1)

    @property
    def last_seq(self) -> int:
        """The highest seq ever appended here (kept across restarts), -1 if none."""
        return self._last

    def seqs(self) -> list[int]:
        return list(self._index)

    # -- open / close -------------------------------------------------------

    def _scan(self) -> None:
        found: list[tuple[int, int]] = []
        for entry in os.scandir(self.dir):
            name = entry.name
            m = _NAME.match(name)
            if m:
                try:
                    found.append((int(m.group(1)), entry.stat().st_size))
                except OSError:
                    continue
            elif name.startswith(_TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)  # a write cut short by a crash
        found.sort()
        for seq, size in found:
            self._index[seq] = size
            self._bytes += size
        self._last = max(found[-1][0] if found else -1, self._read_last())

    def _read_last(self) -> int:
        try:
            text = (self.dir / _LAST).read_text()
        except FileNotFoundError:
            return -1
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("spool %s: cannot read %s (%s): ignored", self.dir, _LAST, exc)
            return -1
        try:
            return int(text.strip())
        except ValueError:
            log.warning("spool %s: %s holds %r, not a number: ignored", self.dir, _LAST,
                        text[:40])
            return -1

    def _write_last(self) -> None:
        tmp = self.dir / f"{_TMP_PREFIX}{_LAST}"
        try:
            tmp.write_text(f"{self._last}\n")
            os.replace(tmp, self.dir / _LAST)
        except OSError as exc:
            log.warning("spool %s: cannot record the last seq %d: %s", self.dir, self._last, exc)

    def close(self) -> None:
        """Write the batches held in memory to disk (and the last seq), then unlock."""
        if self._lock_fd < 0:
            return
        if self.memory_bytes:
            self.flush()
            self._write_last()
        os.close(self._lock_fd)  # releases the flock
        self._lock_fd = -1

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- writing ------------------------------------------------------------

    def append(self, seq: int, data: bytes) -> bool:
        """Spool one batch (its framed bytes); False when it was dropped instead.

        ``seq`` must be above every seq appended before (:class:`SpoolError`
        otherwise). Older batches are dropped (and counted) to make room; a
        batch larger than ``max_bytes`` on its own is dropped, counted, and
        the others kept. A write error (disk full...) is logged and counted
        as a drop, not raised: the spool is best effort.
        """
        if seq <= self._last:
            raise SpoolError(f"spool {self.dir}: seq {seq} is not above the last one"
                             f" ({self._last}): seqs must increase")
        self._last = seq
        size = HEADER_SIZE + len(data)
        if size > self.max_bytes:
            self._count_drop(1, len(data), f"batch {seq} ({size} bytes) is over the spool's"
                                           f" cap of {self.max_bytes} bytes")
            self._write_last()  # no file will tell this seq
            return False
        self._enforce(size)
        if self.memory_bytes:
            if self._mem_bytes + size <= self.memory_bytes:
                self._mem[seq] = data
                self._mem_bytes += size
                self._index[seq] = size
                self._bytes += size
                return True
            self.flush()  # the collector is behind: from here on, disk
        if not self._write(seq, data):
            return False
        self._index[seq] = size
        self._bytes += size
        return True

    def flush(self) -> None:
        """Write the batches held in memory to disk, oldest first (one that cannot be
        written is dropped and counted)."""
        for seq in list(self._mem):
            data = self._mem_pop(seq)
            if data is not None and not self._write(seq, data):
                self._forget(seq)

    def _mem_pop(self, seq: int) -> bytes | None:
        """Take batch ``seq`` out of memory (None when it is not held there)."""
        data = self._mem.pop(seq, None)
        if data is not None:
            self._mem_bytes -= HEADER_SIZE + len(data)
        return data

    def _write(self, seq: int, data: bytes) -> bool:
        """One batch's file, written to a temporary name and renamed into place."""
        path = self.dir / _fname(seq)
        tmp = self.dir / f"{_TMP_PREFIX}{_fname(seq)}"
        head = _HEAD.pack(MAGIC, seq, len(data), zlib.crc32(data))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                with os.fdopen(fd, "wb", closefd=True) as f:
                    f.write(head)
                    f.write(data)
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            os.replace(tmp, path)
            if self.fsync:
                self._fsync_dir()
        except OSError as exc:
            self.write_errors += 1
            self.dropped_batches += 1
            self.dropped_bytes += len(data)
            log.error("spool %s: cannot write batch %d: %s (dropped)", self.dir, seq,
                      exc.strerror or exc)
            self._write_last()
            return False
        return True

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def make_room(self, nbytes: int) -> int:
        """Drop the oldest batches (counted) until a batch of ``nbytes`` fits; returns how
        many went. A shipper calls it before it writes the drop counters into that
        batch, so that the batch reports its own drops too."""
        before = self.dropped_batches
        if HEADER_SIZE + nbytes <= self.max_bytes:
            self._enforce(HEADER_SIZE + nbytes)
        return self.dropped_batches - before

    def _enforce(self, incoming: int) -> None:
        """Drop the oldest until ``incoming`` more bytes (and one more file, if any) fit."""
        n = 0
        nbytes = 0
        extra = 1 if incoming else 0
        while self._index and (self._bytes + incoming > self.max_bytes
                               or len(self._index) + extra > self.max_files):
            seq, size = self._index.popitem(last=False)
            self._bytes -= size
            self._unlink(seq)
            n += 1
            nbytes += max(0, size - HEADER_SIZE)
        if n:
            self._count_drop(n, nbytes, f"full ({self.max_bytes} bytes, {self.max_files}"
                                        " files): dropped the oldest")

    def _count_drop(self, n: int, nbytes: int, why: str) -> None:
        self.dropped_batches += n
        self.dropped_bytes += nbytes
        now = time.monotonic()
        if now - self._last_warn >= WARN_EVERY_S or self._last_warn == 0.0:
            self._last_warn = now
            log.warning("spool %s: %s; %d batches (%d bytes) dropped so far", self.dir, why,
                        self.dropped_batches, self.dropped_bytes)

    def _unlink(self, seq: int) -> None:
        if self._mem_pop(seq) is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / _fname(seq))

    # -- reading and acking ---------------------------------------------------

    def refused(self, seq: int) -> bool:
        """The collector refused batch ``seq`` for good: drop it, counted as the drops of a
        full spool are (the batches' ``lost`` map reports them to the collector)."""
        size = self._index.pop(seq, None)
        if size is None:
            return False
        self._bytes -= size
        self._unlink(seq)
        self._count_drop(1, max(0, size - HEADER_SIZE), f"batch {seq} refused by the "
                         "collector: dropped")
        return True

    def ack(self, seq: int) -> int:
        """Delete every batch up to and including ``seq`` (delivered); how many went."""
        n = 0
        while self._index:
            first = next(iter(self._index))
            if first > seq:
                break
            size = self._index.pop(first)
            self._bytes -= size
            self._unlink(first)
            n += 1
        if n and not self._index:
            # the files that told the last seq are gone (memory first: none was written,
            # and a file per ack would be what memory saves; close() writes it too)
            now = time.monotonic()
            if not self.memory_bytes or now - self._last_written >= 1.0:
                self._last_written = now
                self._write_last()
        return n

    def read(self, seq: int) -> bytes | None:
        """One batch's bytes; None when it is gone, or corrupt (then deleted, warned)."""
        data = self._mem.get(seq)
        if data is not None:
            return data
        path = self.dir / _fname(seq)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(HEADER_SIZE)
                problem = ""
                if len(head) < HEADER_SIZE:
                    problem = f"{size} bytes, shorter than a header"
                else:
                    magic, hseq, length, crc = _HEAD.unpack(head)
                    if magic != MAGIC:
                        problem = f"bad magic {magic!r}"
                    elif hseq != seq:
                        problem = f"header says seq {hseq}"
                    elif size != HEADER_SIZE + length:  # checked before reading `length` bytes
                        problem = f"{size} bytes, the header announces {HEADER_SIZE + length}"
                    else:
                        data = f.read(length)
                        if len(data) != length or zlib.crc32(data) != crc:
                            problem = "checksum mismatch"
                        else:
                            return data
        except FileNotFoundError:
            self._forget(seq)
            return None
        except OSError as exc:
            problem = f"unreadable: {exc.strerror or exc}"
        log.warning("spool %s: skipping batch %d (%s, corrupt or partial): deleted",
                    self.dir, seq, problem)
        self.corrupt_files += 1
        self._forget(seq)
        self._unlink(seq)
        return None

    def _forget(self, seq: int) -> None:
        self._mem_pop(seq)
        size = self._index.pop(seq, None)
        if size is not None:
            self._bytes -= size

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """(seq, bytes) oldest first, skipping corrupt files; safe to ack while iterating."""
        for seq in list(self._index):
            if seq not in self._index:
                continue  # acked or dropped meanwhile
            data = self.read(seq)
            if data is not None:
                yield seq, data

    def __repr__(self) -> str:
        return (f"Spool({str(self.dir)!r}, {len(self)} batches ({len(self._mem)} in memory),"
                f" {self._bytes} bytes,"
                f" last_seq={self._last}, dropped={self.dropped_batches})")
