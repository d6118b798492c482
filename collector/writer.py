"""The collector's batch writer: agents' batches made durable in a thread of their own.

Decoding a batch (msgpack, the checks) needs the interpreter; writing it
(its body appended to a segment file with one ``pwritev``, then its row in
one SQLite statement, both with the GIL released) mostly does not. So the
event loop decodes the next batch while this thread writes the last ones,
on its own connection to the store: what the collector does before it acks
is spread over two CPUs instead of one.

Batches queued while a write runs go into the next one together (a group
commit, at most ``max_group`` batches); each submitter is told when its
batch is durable, in submission order. The thread holds the only
connection that writes ``batches`` and ``agents``; the rest of the store is
written from the event loop's connection (SQLite serializes the two).

A transaction that fails is tried again (``retries`` times, backing off:
a database locked for longer than the busy timeout, say). If it still
fails, the writer stops for good: that group and everything after it is
refused, so that no later batch of an agent is stored after one of its
batches was not (which would leave a hole behind the agent's acked seq).
The collector then refuses every batch with an ``internal`` error, the
agents keep theirs in their spools, and the log says what failed.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hopscope.collector import wire
from hopscope.collector.store import SqliteStore
from hopscope.collector.wire import Batch

from hopscope.errors import WriterClosed, WriterFailed

log = logging.getLogger(__name__)

#: called once per batch, in the writer thread: None when durable, else the error
Done = Callable[[BaseException | None], None]
_STOP = object()


class BatchWriter:
    """A thread that stores batches (``SqliteStore.put_batches``) in group commits."""

    def __init__(self, db: str | Path, *, max_group: int = 64, retries: int = 3,
                 retry_wait: float = 0.5) -> None:
        self.db = str(db)
        self.max_group = max_group
        self.retries = retries
        self.retry_wait = retry_wait
        self.failed: BaseException | None = None  # set when the writer stopped for good
        self.commits = 0
        self.batches = 0
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hopscope-batch-writer",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def submit(self, batch: Batch, done: Done) -> None:
        """Queue ``batch`` (its received ``body``; encoded when it has none)."""
        if self._closed:
            raise WriterClosed("the batch writer is closed")
        if self.failed is not None:
            raise self.failed
        self._q.put((batch, done))

    def queue(self, batch: Batch) -> asyncio.Future[None]:
        """Queue ``batch`` now; the future is done once it is durable (call from the loop)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        def done(exc: BaseException | None) -> None:
            loop.call_soon_threadsafe(settle, exc)

        self.submit(batch, done)
        return fut

    def close(self) -> None:
        """Store what is queued, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._q.put(_STOP)
        self._thread.join()

    # -- the thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            store = SqliteStore(self.db)
        except BaseException as exc:  # raised again in __init__
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        stop = False
        try:
            while not stop:
                group: list[tuple[Batch, Done]] = []
                item = self._q.get()
                while True:
                    if item is _STOP:
                        stop = True
                        break
                    group.append(item)  # type: ignore[arg-type]
                    if len(group) >= self.max_group:
                        break
                    try:
                        item = self._q.get_nowait()
                    except queue.Empty:
                        break
                if group:
                    self._commit(store, group)
        finally:
            store.close()

    def _commit(self, store: SqliteStore, group: list[tuple[Batch, Done]]) -> None:
        err: BaseException | None = self.failed
        for attempt in range(self.retries + 1):
            if err is not None:
                break
            try:
                store.put_batches([(b.agent, b.seq, b.node, wire.batch_body(b))
                                   for b, _ in group])
                self.commits += 1
                self.batches += len(group)
                break
            except Exception as exc:
                if attempt < self.retries:
                    log.warning("event=batch_write_retry batches=%d attempt=%d error=%s",
                                len(group), attempt + 1, exc)
                    time.sleep(self.retry_wait * (attempt + 1))
                    continue
                log.error("event=batch_writer_failed batches=%d db=%s error=%s: the collector"
                          " refuses every batch from now on (the agents keep them spooled);"
                          " fix the database's disk and restart it", len(group), self.db, exc)
                self.failed = err = WriterFailed(f"storing batches in {self.db} failed: {exc}")
        for _b, done in group:
            try:
                done(err)
            except Exception:  # a submitter's callback must not stop the writer
                log.exception("event=batch_callback_failed")

