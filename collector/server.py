"""The collector: agents' batches in, stitched requests out, a small HTTP JSON API.

Per batch (``serve_agent`` calls :meth:`Collector.store_batch` as each new
batch is decoded): the :class:`~hopscope.collector.writer.BatchWriter`
thread appends the batch as received to a segment file (synced), then
writes its row and the agent's new seq in **one statement** (batches that
wait meanwhile share the write), while the event loop reads and decodes the
next frames. The ack goes out after the commit; the batch then waits in a
bounded queue (``feed_backlog`` bytes; above it the acks wait too) for the
feeder task, which hands it, in arrival order, to its node's
:class:`~hopscope.tcpflow.NodeTracker`: a burst (agents replaying their
spools) is taken in at the speed of decoding and writing, and stitched as
fast as the trackers go.
Every ``drain_every`` seconds the trackers hand over what they settled to
one :class:`~hopscope.stitch.Stitcher`, whose finished requests, drops and
clock offsets are stored (``request_id`` unique, so a request stitched
twice is stored once: the more complete stitch, see ``late_ns``). A
restarted collector first re-stitches the raw batches it kept
(``raw_keep``), so that what it acked before a crash but had not finished
stitching is not lost.

A node that sent nothing for ``idle_flush`` seconds is flushed (its open
connections closed, its watermark lifted) so that it does not hold back the
other nodes' requests forever; when every node is idle, everything pending
is finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import signal
import ssl
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from hopscope.collector import wire
from hopscope.collector.metrics import CollectorMetrics
from hopscope.collector.otlp import OtlpConfig, OtlpExporter
from hopscope.collector.store import (
    PRUNE_CHUNK,
    SqliteStore,
    _drop_key,
    in_range,
    parse_duration,
    resolve_since,
)
from hopscope.collector.writer import BatchWriter

from hopscope import memtrim
from hopscope.errors import HopscopeError, UsageError
from hopscope.model import Observation, Reorder
from hopscope.stitch import Stitcher
from hopscope.tcpflow import Cidrs, NodeTracker

log = logging.getLogger(__name__)

_FAR = 1 << 62


@dataclass
class CollectorConfig:
    db: str
    token: bytes
    listen: tuple[str, int] = ("127.0.0.1", 7000)
    http: tuple[str, int] | None = None
    ssl_context: ssl.SSLContext | None = None
    reference: str | None = None
    cidrs: Cidrs | None = None
    entry_ports: tuple[int, ...] = (80,)
    name: str = "hopscope-collector"
    drain_every: float = 0.5
    idle_flush: float = 5.0
    late_ns: int = 5 * 60_000_000_000  # see Stitcher(late_ns=)
    max_age_ns: int | None = 7 * 86_400_000_000_000
    max_bytes: int | None = 1 << 30
    raw_keep_ns: int = 15 * 60_000_000_000
    prune_every: float = 60.0
    prune_chunk: int = PRUNE_CHUNK  # rows deleted a step (a transaction) of a prune
    hello_timeout: float = 10.0
    otlp: OtlpConfig | None = None  # export stitched requests as OTLP traces (off: None)
    #: bytes of durable batches (their bodies) that may wait for their node's tracker;
    #: above it, acks wait until the trackers catch up (backpressure on the agents)
    feed_backlog: int = 64 << 20


def _first_new(keys: list[str], items: list[dict[str, Any]], have: set[str]
               ) -> list[dict[str, Any]]:
    """The items whose key is not in ``have``, each key once (``have`` grows)."""
    out = []
    for k, it in zip(keys, items, strict=True):
        if k not in have:
            have.add(k)
            out.append(it)
    return out


def parse_hostport(text: str, what: str = "address") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"bad {what} {text!r}: use HOST:PORT, e.g. 127.0.0.1:7000")
    return host.strip("[]") or "0.0.0.0", int(port)


class Collector:
    """One collector process: the agents' port, the stitcher, the store, the HTTP API."""

    def __init__(self, cfg: CollectorConfig) -> None:
        self.cfg = cfg
        self.store = SqliteStore(cfg.db)
        self.writer: BatchWriter | None = None  # started by start(); without it, inline
        self.seqs = wire.SeqTracker(self.store.agent_seqs())
        self.stitcher = self._new_stitcher()
        self.trackers: dict[str, NodeTracker] = {}
        #: per node, decoded raw records waiting to be put in time order (wire v3)
        self.reorders: dict[str, Reorder] = {}
        self.last_seen: dict[str, float] = {}
        self.flushed: set[str] = set()
        #: durable batches waiting for their tracker (the feeder's queue), their bytes,
        #: and how many per node (a node with batches waiting is not idle)
        self._unfed: deque[wire.Batch] = deque()
        self._unfed_bytes = 0
        self._unfed_nodes: Counter[str] = Counter()
        self._wake: asyncio.Event | None = None  # the feeder's; made in the running loop
        self._room: asyncio.Event | None = None  # set while the backlog is under its cap
        self._stopping = False
        self.feed_errors = 0
        self.decode_errors = 0  # raw records no observation could be made of
        self.batches = 0
        self.stored_requests = 0
        self.agent_port = 0
        self.http_port = 0
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._conns: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.metrics = CollectorMetrics()
        self.metrics.feed_state = lambda: (len(self._unfed), self._unfed_bytes, self.feed_errors)
        self.exporter = OtlpExporter(cfg.otlp, collector=cfg.name) if cfg.otlp else None
        if self.exporter is not None:
            self.metrics.registry.register(self.exporter)

    def _new_stitcher(self) -> Stitcher:
        st = Stitcher([self.cfg.reference] if self.cfg.reference else [],
                      reference=self.cfg.reference, cidrs=self.cfg.cidrs,
                      entry_ports=self.cfg.entry_ports, late_ns=self.cfg.late_ns)
        st.offsets_used = {}  # stored with each request: what `trace` shows
        return st

    # -- batches -----------------------------------------------------------------
    def _tracker(self, node: str) -> NodeTracker:
        t = self.trackers.get(node)
        if t is None:
            t = self.trackers[node] = NodeTracker(node, self.stitcher.cidrs,
                                                   self.stitcher.entry_ports)
        return t

    def _feed(self, node: str, obs: Sequence[Observation]) -> None:
        """Into the node's tracker: as they are, or (raw records, wire v3) in time order
        up to the batch's cut, the rest held back for the next (as the agent would)."""
        ro = self.reorders.get(node)
        ready: Sequence[Observation]
        if isinstance(obs, wire.RawObs):
            if ro is None:
                ro = self.reorders[node] = Reorder()
            ready = ro.push(obs, obs.cut_mono_ns)
            self.decode_errors += obs.bad
        elif ro:  # decoded by the agent again: first what waits
            ready = ro.push(obs, _FAR)
        else:
            ready = obs
        if ready:
            self._tracker(node).feed(ready)

    def _flush_reorder(self, node: str) -> None:
        ro = self.reorders.pop(node, None)
        if ro:
            self._tracker(node).feed(ro.flush())

    def store_batch(self, batch: wire.Batch) -> Awaitable[None] | None:
        """Durable first (batch + seq in one transaction), then queued for its tracker.

        With the writer thread running, the batch is queued for it now and the
        awaitable returned completes once the batch is durable and in the feeder's
        queue, or, while that queue is over ``feed_backlog`` bytes, once the feeder
        has caught up (``serve_agent`` acks when it completes); without the writer
        (before ``start``), the batch is stored and fed at once."""
        if self.writer is None:
            self.store.put_batches([(batch.agent, batch.seq, batch.node, wire.batch_body(batch))])
            self.took(batch)
            return None
        return self._queued_when(self.writer.queue(batch), batch)

    async def _queued_when(self, durable: asyncio.Future[None], batch: wire.Batch) -> None:
        await durable
        self.arrived(batch)
        self._unfed.append(batch)
        self._unfed_bytes += len(batch.body)  # as received
        self._unfed_nodes[batch.node] += 1
        assert self._wake is not None and self._room is not None  # made by start_feeder()
        self._wake.set()
        while self._unfed_bytes > self.cfg.feed_backlog and not self._stopping:
            self._room.clear()
            await self._room.wait()

    def arrived(self, batch: wire.Batch) -> None:
        """A durable batch: counted; its node is not idle."""
        self.batches += 1
        self.last_seen[batch.node] = time.monotonic()
        self.flushed.discard(batch.node)
        self.metrics.observe_batch(batch.agent, batch.node, wire.batch_size(batch),
                                   batch.clock, batch.lost)

    def took(self, batch: wire.Batch) -> None:
        """A stored batch: counted, and fed to its node's tracker at once."""
        self.arrived(batch)
        self._feed(batch.node, batch.obs)

    def start_feeder(self) -> asyncio.Task[None]:
        """The feeder task (in the running loop): queued batches into their trackers."""
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        return asyncio.create_task(self._feed_loop())

    async def _feed_loop(self) -> None:
        assert self._wake is not None
        while True:
            while not self._unfed:
                self._wake.clear()
                await self._wake.wait()
            self.feed_next()
            await asyncio.sleep(0)  # the connections read and ack between two batches

    def feed_next(self) -> None:
        """Hand the oldest queued batch to its node's tracker."""
        b = self._unfed.popleft()
        self._unfed_bytes -= len(b.body)
        self._unfed_nodes[b.node] -= 1
        if not self._unfed_nodes[b.node]:
            del self._unfed_nodes[b.node]
        try:
            self._feed(b.node, b.obs)
        except Exception:  # the batch is stored: a restart stitches it again (restore)
            self.feed_errors += 1
            log.exception("event=feed_failed agent=%s seq=%d node=%s", b.agent, b.seq, b.node)
        if self._room is not None and self._unfed_bytes <= self.cfg.feed_backlog:
            self._room.set()

    @property
    def backlog(self) -> int:
        """Durable batches waiting for their tracker."""
        return len(self._unfed)

    def restore(self) -> int:
        """Re-stitch the raw batches kept from earlier runs (a restart); returns batches."""
        n = 0
        now = time.monotonic()
        for _agent, _seq, node, obs in self.store.iter_batches():
            self._feed(node, obs)
            self.last_seen[node] = now
            n += 1
        if n:
            log.info("event=restore batches=%d nodes=%d", n, len(self.trackers))
            self.step()
        return n

    def step(self) -> int:
        """Hand the trackers' settled sightings to the stitcher; store what is finished."""
        now = time.monotonic()
        st = self.stitcher
        for node, tr in self.trackers.items():
            if node in self.flushed:
                continue
            if (now - self.last_seen.get(node, now) >= self.cfg.idle_flush
                    and node not in self._unfed_nodes):
                self._flush_reorder(node)
                st.add(node, tr.take(final=True), watermark=_FAR)
                self.flushed.add(node)
                log.info("event=idle_flush node=%s idle_s=%.1f", node, self.cfg.idle_flush)
            else:
                st.add(node, tr.take())
        final = (bool(self.trackers) and self.flushed >= set(self.trackers)
                 and not self._unfed_nodes)  # a new node's first batch may wait
        reqs = st.drain(final=final)
        drops, st.drops = st.drops, []
        fresh = self._unstored(reqs)  # metrics and traces: once per request, also on restarts
        fresh_drops = self._unstored_drops(drops)
        replaced = self.store.replaced
        used, st.offsets_used = st.offsets_used, {}
        new = self.store.put_requests(reqs, used) if reqs else 0
        replaced = self.store.replaced - replaced
        if drops:
            self.store.put_drops(drops)
        if reqs or drops:
            env = st.envelope([], [])
            self.store.put_offsets(env)
            self.metrics.set_offsets(env)
        if fresh:
            self.metrics.observe_requests(fresh)
            if self.exporter is not None:
                self.exporter.submit(fresh)
        if fresh_drops:
            self.metrics.observe_drops(fresh_drops)
        self.stored_requests += new
        self.metrics.completed_late += replaced
        if reqs:
            log.info("event=stored requests=%d new=%d completed=%d drops=%d total=%d"
                     " backlog=%d", len(reqs), new, replaced, len(drops), self.stored_requests,
                     len(self._unfed))
        for w in st.warnings:
            log.warning("event=stitch_warning msg=%s", json.dumps(w))
        st.warnings.clear()
        return new

    def _unstored(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The requests whose id is not stored yet (the first of a repeated id)."""
        keys = [r["request_id"] for r in reqs]
        return _first_new(keys, reqs, self.store.stored_keys("requests", keys))

    def _unstored_drops(self, drops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The drops not stored yet (by the store's key)."""
        keys = [_drop_key(d) for d in drops]
        return _first_new(keys, drops, self.store.stored_keys("drops", keys))

    async def _drain_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.drain_every)
            try:
                self.step()
            except Exception:
                log.exception("event=drain_failed")

    async def _prune_loop(self) -> None:
        """Retention, every ``prune_every`` seconds, beside the drain loop: a prune at the
        cap deletes tens of thousands of requests, a chunk a step (one transaction each,
        ``SqliteStore.prune_steps``), and between two steps the event loop stores what
        was stitched and serves the agents and queries."""
        while True:
            await asyncio.sleep(self.cfg.prune_every)
            try:
                for _ in self.store.prune_steps(self.cfg.max_age_ns, self.cfg.max_bytes,
                                                self.cfg.raw_keep_ns, self.cfg.prune_chunk):
                    await asyncio.sleep(0)
                memtrim.trim()  # what the stitcher and the prune freed
            except Exception:
                log.exception("event=prune_failed")

    # -- agents ------------------------------------------------------------------
    async def _agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        self._writers.add(writer)
        try:
            await wire.serve_agent(reader, writer, token=self.cfg.token, store=self.store_batch,
                                   seqs=self.seqs, collector=self.cfg.name,
                                   hello_timeout=self.cfg.hello_timeout)
        finally:
            if task is not None:
                self._conns.discard(task)
            self._writers.discard(writer)

    # -- HTTP --------------------------------------------------------------------
    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        status, body = 500, {"error": "internal error"}
        payload: bytes | None = None  # not JSON: /metrics
        ctype = "application/json"
        try:
            line = await _http_line(reader)
            accept = ""
            while True:  # headers: only Accept matters (for /metrics)
                h = await _http_line(reader)
                if h in (b"\r\n", b"\n", b""):
                    break
                name, _, value = h.decode("latin-1").partition(":")
                if name.strip().lower() == "accept":
                    accept = value.strip()
            parts = line.decode("latin-1").split()
            if len(parts) < 2:
                status, body = 400, {"error": "bad request line"}
            elif parts[0] != "GET":
                status, body = 405, {"error": "only GET"}
            elif (urlsplit(parts[1]).path.rstrip("/") or "/") == "/metrics":
                payload, ctype = self.metrics.exposition(accept)
                status = 200
            else:
                status, body = self.handle(parts[1])
        except HopscopeError as exc:
            status, body = 400, {"error": str(exc)}
        except (TimeoutError, OSError, UnicodeError):
            status, body = 400, {"error": "bad request"}
        except Exception:
            log.exception("event=http_failed")
        if payload is None:
            payload = json.dumps(body, separators=(",", ":")).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        head = (f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\nContent-Type: {ctype}"
                f"\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
        with contextlib.suppress(OSError):
            writer.write(head + payload)
            await writer.drain()
        await wire.close_writer(writer)

    def handle(self, target: str) -> tuple[int, dict[str, Any]]:
        """One GET: (status, JSON body)."""
        if (urlsplit(target).path.rstrip("/") or "/") == "/health":
            return 200, {"ok": True, "collector": self.cfg.name, "agents": self.seqs.snapshot(),
                         "nodes": sorted(self.trackers), "batches": self.batches,
                         "backlog": self.backlog, "feed_errors": self.feed_errors,
                         "decode_errors": self.decode_errors,
                         "requests": self.store.count_requests()}
        return api_get(self.store, target)

    # -- life cycle ----------------------------------------------------------------
    async def start(self) -> None:
        self.restore()
        self._tasks.append(self.start_feeder())
        self.writer = BatchWriter(self.cfg.db)
        host, port = self.cfg.listen
        srv = await _listen(self._agent, host, port, "--listen", ssl=self.cfg.ssl_context,
                            limit=wire.STREAM_LIMIT)
        self._servers.append(srv)
        self.agent_port = srv.sockets[0].getsockname()[1]
        if self.cfg.http is not None:  # both bound before either is said: a failure is one line
            h = await _listen(self._http, *self.cfg.http, "--http")
            self._servers.append(h)
            self.http_port = h.sockets[0].getsockname()[1]
        log.info("event=listen what=agents addr=%s:%d tls=%s db=%s", host, self.agent_port,
                 "yes" if self.cfg.ssl_context else "no", self.cfg.db)
        if self.cfg.http is not None:
            log.info("event=listen what=http addr=%s:%d", self.cfg.http[0], self.http_port)
        if self.exporter is not None:
            self.exporter.start()
        self._tasks.append(asyncio.create_task(self._drain_loop()))
        self._tasks.append(asyncio.create_task(self._prune_loop()))

    async def stop(self, started: bool = True) -> None:
        """Stop listening, drop the agents' connections, store what is finished, close
        (``started`` false: after a start that failed, whose error says it all)."""
        self._stopping = True  # acks waiting for room go out: their batches are durable
        if self._room is not None:
            self._room.set()
        for srv in self._servers:
            srv.close()
        for w in list(self._writers):  # the agents see the connection end, and reconnect
            w.transport.abort()
        for t in list(self._conns):
            t.cancel()
        for t in self._tasks:
            t.cancel()
        for t in [*self._tasks, *self._conns]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2)
        self._servers.clear()
        self._tasks.clear()
        try:
            if self.writer is not None:
                await asyncio.to_thread(self.writer.close)
            while self._unfed:  # durable, acked: stitched now rather than at the next start
                self.feed_next()
            self.step()
        finally:
            self.store.close()
            if self.exporter is not None:  # what is queued gets a few seconds to go out
                await asyncio.to_thread(self.exporter.close, 5.0)
        if started:
            log.info("event=stopped requests=%d batches=%d", self.stored_requests,
                     self.batches)

    async def serve_forever(self) -> None:
        """Start; run until SIGTERM or SIGINT; stop cleanly (what is finished is stored)."""
        try:
            await self.start()
        except BaseException:
            await self.stop(started=False)  # a port taken: what start() began goes
            raise
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, done.set)
        try:
            await done.wait()
            log.info("event=signal action=stop")
        finally:
            await self.stop()


async def _http_line(reader: asyncio.StreamReader) -> bytes:
    """One line of an HTTP request head (10 s at most; longer than the stream's 64 KiB
    limit: a client error)."""
    try:
        return await asyncio.wait_for(reader.readline(), 10)
    except ValueError:  # asyncio's LimitOverrunError, as readline() raises it
        raise HopscopeError("request line or header too long") from None


async def _listen(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                   Awaitable[None]],
                  host: str, port: int, opt: str, **kw: Any) -> asyncio.Server:
    """``asyncio.start_server``; a port in use or a name that does not resolve is one line."""
    try:
        return await asyncio.start_server(handler, host, port, **kw)
    except OSError as exc:  # socket.gaierror included
        why = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            why = "address already in use (another collector?)"
        raise HopscopeError(f"{opt} {host}:{port}: cannot listen: {why}") from None


def api_get(s: SqliteStore, target: str) -> tuple[int, dict[str, Any]]:
    """The read side of the HTTP API on a store: (status, JSON body) for one GET target.

    The query CLI calls this directly with ``--db``, so both paths answer alike.
    """
    u = urlsplit(target)
    q = {k: v[-1] for k, v in parse_qs(u.query).items()}
    path = u.path.rstrip("/") or "/"
    anchor = q.get("anchor", "auto")

    def intq(key: str) -> int | None:
        v = q.get(key)
        if v is None or v == "":
            return None
        if not v.lstrip("-").isdigit():
            raise UsageError(f"{key}={v!r}: expected an integer")
        return in_range(int(v), f"{key}={v}")

    if path == "/health":
        return 200, {"ok": True, "requests": s.count_requests()}
    if path == "/requests":
        slower = q.get("slower_than")
        reqs = s.query_requests(
            since_ns=resolve_since(s, q.get("since"), anchor),
            until_ns=intq("until"),
            slower_than_ns=parse_duration(slower, default_unit="ns") if slower else None,
            path=q.get("path") or None, status_class=q.get("status") or None,
            node=q.get("node") or None, limit=intq("limit"))
        return 200, s.envelope(reqs)
    if path.startswith("/trace/"):
        rid = unquote(path[len("/trace/"):])
        env = s.trace(rid)
        if env is None:
            return 404, {"error": f"no request {rid!r} stored"}
        return 200, env
    if path == "/stats":
        by = q.get("by") or None
        return 200, {"by": by, "since_ns": resolve_since(s, q.get("since"), anchor),
                     "hops": s.hop_stats(resolve_since(s, q.get("since"), anchor), by)}
    if path == "/drops":
        return 200, s.envelope([], s.query_drops(resolve_since(s, q.get("since"), anchor)))
    return 404, {"error": f"no such endpoint {path!r}: /requests, /trace/ID, /stats, /drops, "
                          "/health"}
