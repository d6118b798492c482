"""The agents' raw batches on disk: append-only segment files beside the database.

A batch body is several hundred kilobytes of msgpack that is written once
and read back only after a restart (to stitch again what was acked but not
finished) or by ``hopscope pcap --db``. In SQLite's WAL it would be written
twice (to the WAL, then to the database by the checkpoint, each with its
fsync): on this project's bench machine that was most of the ingest time.
Here it is written once, one ``pwritev`` per group of batches on a file
opened with ``O_DSYNC`` (the call returns once the bytes are on disk), and
the database keeps only its place (segment, offset, length) in the
``batches`` table, committed *after* the bytes are on disk: a row never
points at bytes that a crash could have lost. Bytes whose row was never
committed (a crash in between) are simply never read.

Layout: ``<db>.batches/<segment>.seg``, segments numbered from 1. Each
writer (one per store instance that writes) starts a segment of its own,
the next number, and moves to a new one past ``segment_max`` bytes; the
highest-numbered segment is the one being written, and pruning never
removes it. A segment is removed once no row points into it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".seg"
SEGMENT_MAX = 64 << 20


def log_dir(db: str | os.PathLike[str]) -> Path:
    """Where the segments of database ``db`` live."""
    p = Path(db)
    return p.with_name(p.name + ".batches")


class BatchLog:
    """Segment files of one database: :meth:`append` (one writer), :meth:`read` (any)."""

    def __init__(self, directory: str | os.PathLike[str], *,
                 segment_max: int = SEGMENT_MAX) -> None:
        self.dir = Path(directory)
        self.segment_max = segment_max
        self._fd = -1  # the segment this instance writes
        self._seg = 0
        self._size = 0
        self._rfd = -1  # the segment last read
        self._rseg = 0

    # -- writing ---------------------------------------------------------------------
    def append(self, bodies: list[bytes]) -> list[tuple[int, int, int]]:
        """Write ``bodies``, synchronously (``O_DSYNC``); their (segment, offset, length) each.

        One system call for the group: the thread that calls this (the collector's batch
        writer) takes the GIL back once, not once per step."""
        if self._fd < 0 or self._size >= self.segment_max:
            self._next_segment()
        off = self._size
        total = sum(map(len, bodies))
        done = os.pwritev(self._fd, bodies, off)
        if done != total:  # a short write (a full disk, say): finish it or fail
            data = b"".join(bodies)
            while done < total:
                n = os.pwrite(self._fd, data[done:], off + done)
                if n <= 0:
                    raise OSError(f"{self._path(self._seg)}: short write")
                done += n
        out = []
        for b in bodies:
            out.append((self._seg, off, len(b)))
            off += len(b)
        self._size = off
        return out

    def _next_segment(self) -> None:
        self.close_writer()
        self.dir.mkdir(parents=True, exist_ok=True)
        seg = max(self.segments(), default=0) + 1
        while True:
            try:
                fd = os.open(self._path(seg), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                             | os.O_DSYNC, 0o600)
                break
            except FileExistsError:
                seg += 1
        self._fd, self._seg, self._size = fd, seg, 0
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)  # the new file's name is durable before any row points into it
        finally:
            os.close(dfd)
        log.debug("event=segment_opened path=%s", self._path(seg))

    # -- reading ---------------------------------------------------------------------
    def read(self, seg: int, off: int, length: int) -> bytes:
        if seg != self._rseg or self._rfd < 0:
            if self._rfd >= 0:
                os.close(self._rfd)
                self._rfd = -1
            self._rfd = os.open(self._path(seg), os.O_RDONLY | os.O_CLOEXEC)
            self._rseg = seg
        data = os.pread(self._rfd, length, off)
        if len(data) != length:
            raise OSError(f"{self._path(seg)}: {length} bytes at {off} wanted, {len(data)} there")
        return data

    # -- housekeeping ------------------------------------------------------------------
    def segments(self) -> list[int]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(int(n[:-len(SUFFIX)]) for n in names
                      if n.endswith(SUFFIX) and n[:-len(SUFFIX)].isdigit())

    def size(self, only: set[int] | None = None) -> int:
        """The segments' bytes on disk (of those in ``only``, when given)."""
        total = 0
        for seg in self.segments():
            if only is not None and seg not in only:
                continue
            with contextlib.suppress(FileNotFoundError):
                total += self._path(seg).stat().st_size
        return total

    def remove_unreferenced(self, referenced: set[int]) -> int:
        """Remove the segments no row points into, but the highest (being written)."""
        segs = self.segments()
        removed = 0
        for seg in segs[:-1]:
            if seg not in referenced and seg != self._seg:
                with contextlib.suppress(FileNotFoundError):
                    self._path(seg).unlink()
                    removed += 1
                if seg == self._rseg:
                    self._close_reader()
        if removed:
            log.info("event=segments_removed count=%d dir=%s", removed, self.dir)
        return removed

    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:08d}{SUFFIX}"

    def _close_reader(self) -> None:
        if self._rfd >= 0:
            os.close(self._rfd)
        self._rfd, self._rseg = -1, 0

    def close_writer(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def close(self) -> None:
        self.close_writer()
        self._close_reader()
