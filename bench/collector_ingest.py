#!/usr/bin/env python3
"""Collector ingest speed: batches decoded, stored and stitched, beside a bare msgpack loop.

The batches are built once, as an agent builds them: a generated capture
(``_gencap.py``, one busy ingress node) read with
:class:`~hopscope.capture.CaptureReader` (``directions=False``, as the
agent reads), cut into batches of ``--batch`` observations, each framed
with :func:`hopscope.collector.wire.encode_batch` (``check=True``). Then,
on the same bytes, in the same run, interleaved (every repeat runs every
stage once, so that a drift of the machine's speed hits them all), best of
``--repeat``:

* ``encode``: :func:`~hopscope.collector.wire.encode_batch` of every batch
  (``check=True``), as an agent encodes what it ships: the agent's side;
  ``encode v1 rows``: the same as schema v1, for comparison;
* ``bare Unpacker``: ``msgpack.Unpacker(use_list=False)`` iterated over the
  frames' bodies (length prefixes stripped): msgpack's C unpacker building
  Python objects and nothing else. The limit;
* ``bare Unpacker, v1 rows``: the same over the same observations framed as
  schema v1 (one array per observation): the limit of the row format;
* ``decode``: :class:`~hopscope.collector.wire.FrameDecoder` fed the stream
  in ``--read`` byte slices (as from a socket): framing, msgpack, the
  checks of every column (:class:`~hopscope.collector.wire.ObsColumns`, no
  Observation built); each batch dropped once decoded;
* ``decode + rows``: the same, and every batch's Observation tuples built,
  as a node's tracker gets them;
* ``decode v1 rows``: the decoder over the v1 stream: the per-field checks
  and Observation tuples of the row format;
* ``decode, then store``: decode + the collector's de-duplication
  (:class:`~hopscope.collector.wire.SeqTracker`) + ``put_batches`` of the
  received body, one SQLite (WAL, ``synchronous=NORMAL``) transaction per
  batch, all on one thread: what the collector did before it had a writer
  thread, for comparison;
* ``ingest``: what the collector does before it acks, with its own code:
  the stream written into one end of a socket pair (after a hello), the
  other end served by :func:`wire.serve_agent
  <hopscope.collector.wire.serve_agent>` storing through a
  :class:`~hopscope.collector.writer.BatchWriter` (decode on the event
  loop, the batch and the agent's seq committed by the writer thread
  meanwhile); timed from the first byte sent to the last batch's ack, into a
  new database in a temporary directory;
* ``ingest + stitch``: the same, storing through :meth:`Collector.store_batch
  <hopscope.collector.server.Collector.store_batch>` (the writer, the ack,
  then the collector's feeder task hands each batch to the node's
  :class:`~hopscope.tcpflow.NodeTracker`, the acks waiting while more than
  ``feed_backlog`` bytes wait for it) and, every
  ``--drain-every`` batches, :meth:`Collector.step
  <hopscope.collector.server.Collector.step>` as the drain loop calls it
  (``take()``, ``Stitcher.add()``, ``drain()``, finished requests, drops
  and offsets stored); at the end the node is flushed as an idle node is
  (``take(final=True)``, final drain), so every request is stored.

Speeds are observations per second; ``stitched req/s`` is requests stored
per second of the stage. ``x bare`` is the stage's speed over the bare
Unpacker's (1.00 = as fast as msgpack alone). Target (issue 5): ingest
>= 500k observations/s.

    python bench/collector_ingest.py                    # bench/out/ingress-220000.pcapng
    python bench/collector_ingest.py --packets 50000 --repeat 5
    python bench/collector_ingest.py --json > ingest.json   # the table goes to stderr
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hopscope.agent import events as ev
from hopscope.agent.ringbuf import ring_records
from hopscope.collector import wire
from hopscope.collector.server import Collector, CollectorConfig
from hopscope.collector.store import SqliteStore
from hopscope.collector.wire import Batch, FrameDecoder, SeqTracker, encode_batch
from hopscope.collector.writer import BatchWriter

from hopscope.capture import CaptureReader
from hopscope.model import Observation
from hopscope.tcpflow import SKIP, point_for_ifname

HERE = Path(__file__).resolve().parent
GENCAP = HERE / "_gencap.py"
DEFAULT_PACKETS = 220_000
AGENT = "agent-node1"
NODE = "node1"
TARGET = 500_000  # observations/s ingested (issue 5)
TOKEN = b"bench-token-0123456789abcdef"


# --------------------------------------------------------------------------
# The batches


def ensure_capture(packets: int) -> Path:
    """``bench/out/ingress-<packets>.pcapng``, generated (in a child) if missing or stale."""
    proc = subprocess.run(
        [sys.executable, str(GENCAP), "--packets", str(packets), "--if-stale", "--print-path"],
        cwd=HERE.parent, stdout=subprocess.PIPE, text=True, check=True)
    return Path(proc.stdout.strip().splitlines()[-1])


def chunks(reader: CaptureReader, size: int, limit: int | None) -> Iterator[list[Observation]]:
    """The reader's observations in lists of ``size`` (as the agent cuts them)."""
    buf: list[Observation] = []
    left = limit if limit is not None else -1
    for b in reader:
        if left >= 0:
            b = b[:left]
            left -= len(b)
        buf.extend(b)
        while len(buf) >= size:
            yield buf[:size]
            buf = buf[size:]
        if left == 0:
            break
    if buf:
        yield buf


def read_batches(path: Path, batch: int, limit: int | None) -> list[list[Observation]]:
    """The capture's observations, cut into batches as the agent cuts them."""
    return list(chunks(CaptureReader(path, NODE, directions=False), batch, limit))


def build_frames(batches: list[list[Observation]], version: int = wire.SCHEMA_VERSION,
                 check: bool = True) -> list[bytes]:
    """Framed batches as the agent spools them (``check``: as the agent checks them)."""
    t0 = 1_795_000_000_000_000_000
    return [encode_batch(AGENT, seq, NODE, t0 + seq * 1_000_000, obs, lost={"ring": 0},
                         check=check, version=version) for seq, obs in enumerate(batches)]


def build_raw_frames(batches: list[list[Observation]]) -> tuple[list[bytes], int]:
    """The same packets as an agent's ring buffer records (wire v3: the collector decodes
    them), and how many: those of interfaces that are not a point (``lo``) are left out."""
    names = sorted({o.ifname for b in batches for o in b})
    points = {n: point_for_ifname(n) for n in names}
    ifaces = tuple((i + 2, n, p if p in ("overlay", "pod") else "nic+underlay")
                   for i, (n, p) in enumerate(points.items()) if p != SKIP)
    index = {n: i for i, n, _ in ifaces}
    off = 1_700_000_000_000_000_000
    t0 = 1_795_000_000_000_000_000
    frames, n = [], 0
    for seq, obs in enumerate(batches):
        evs = [ev.encode_packet(o, index[o.ifname], off) for o in obs if o.ifname in index]
        n += len(evs)
        raw = ev.RawEvents(ring_records(evs), ifaces, off, obs[-1].ts_real_ns - off)
        frames.append(encode_batch(AGENT, seq, NODE, t0 + seq * 1_000_000, [],
                                   lost={"ring": 0}, raw=raw))
    return frames, n


# --------------------------------------------------------------------------
# The stages


@dataclass
class Stage:
    name: str
    run: Callable[[], dict[str, float]]  # one timed pass -> {"seconds": ..., extras}
    best: dict[str, float] = field(default_factory=dict)
    runs: list[float] = field(default_factory=list)


def timed(fn: Callable[[], dict[str, float] | None]) -> Callable[[], dict[str, float]]:
    def run() -> dict[str, float]:
        gc.collect()
        t0 = time.perf_counter()
        extra = fn() or {}
        return {"seconds": time.perf_counter() - t0, **extra}
    return run


class Bench:
    def __init__(self, frames: list[bytes], frames_v1: list[bytes], n: int, read: int,
                 drain_every: int, tmp: str | None, frames_v3: list[bytes], n3: int) -> None:
        self.nframes = len(frames)
        self.n = n
        self.n3 = n3
        self.stream_v3 = b"".join(frames_v3)
        mv3 = memoryview(self.stream_v3)
        self.reads_v3 = [mv3[i:i + read] for i in range(0, len(mv3), read)]
        self.requests_v3 = 0
        self.drain_every = drain_every
        self.tmp = tmp
        self.stream = b"".join(frames)
        self.bodies = b"".join(f[4:] for f in frames)
        self.bodies_v1 = b"".join(f[4:] for f in frames_v1)
        self.v1_bytes = len(self.bodies_v1) + 4 * len(frames_v1)
        mv = memoryview(self.stream)
        self.reads = [mv[i:i + read] for i in range(0, len(self.stream), read)]
        mv1 = memoryview(b"".join(frames_v1))
        self.reads_v1 = [mv1[i:i + read] for i in range(0, len(mv1), read)]
        self.db_bytes = 0
        self.commits = 0
        self.requests = 0
        self.drops = 0

    def frames_in(self, v1: bool = False, v3: bool = False) -> Iterator[Batch]:
        """Every batch frame, as the collector's connection reads them."""
        d = FrameDecoder()
        for r in (self.reads_v1 if v1 else self.reads_v3 if v3 else self.reads):
            for f in d.feed(r):
                assert isinstance(f, Batch)
                yield f
        d.eof()

    # -- (1) the limit
    def bare(self, v1: bool = False) -> None:
        bodies = self.bodies_v1 if v1 else self.bodies
        u = msgpack.Unpacker(use_list=False, raw=False, max_buffer_size=len(bodies))
        u.feed(bodies)
        for _ in u:
            pass

    # -- (2)
    def decode(self, rows: bool = False, v1: bool = False, v3: bool = False
               ) -> dict[str, float]:
        """``rows``: build every batch's Observation tuples too, as a tracker's feed() does
        (v1 builds them while decoding; v3 decodes the raw records then)."""
        k = 0
        for f in self.frames_in(v1, v3):
            k += len(list(f.obs)) if rows else wire.batch_size(f)
        assert k == (self.n3 if v3 else self.n), (k, self.n3 if v3 else self.n)
        return {}

    # -- (3) decode and store on one thread, no pipeline
    def inline(self) -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="hopscope-ingest-", dir=self.tmp) as d:
            store = SqliteStore(Path(d) / "collector.db")
            seqs = SeqTracker(store.agent_seqs())
            gc.collect()
            t0 = time.perf_counter()
            for f in self.frames_in():
                if seqs.is_new(f.agent, f.seq):
                    store.put_batches([(f.agent, f.seq, f.node, f.body)])
                    seqs.commit(f.agent, f.seq)
            secs = time.perf_counter() - t0
            nb = store.db.execute("SELECT count(*) FROM batches").fetchone()[0]
            assert nb == self.nframes, (nb, self.nframes)
            store.close()
        return {"seconds": secs}

    # -- (4) and (5): the collector's own connection code, over a socket pair
    async def _serve(self, store: Callable[[Batch], Any], v3: bool = False) -> float:
        """The stream through ``wire.serve_agent``, from the first byte sent to the last ack.

        The agent's end is a plain blocking socket in a thread of its own (as an agent is
        another process): it sends the hello and the stream, and reads the acks."""
        a, b = socket.socketpair()
        seqs = SeqTracker()
        last = self.nframes - 1
        times: dict[str, float] = {}

        def agent() -> None:
            b.sendall(wire.encode(wire.Hello(AGENT, NODE, TOKEN, 1)))
            dec = FrameDecoder(wire.HELLO_MAX_FRAME)
            got: list[Any] = []
            while not got:
                got = dec.feed(b.recv(65536))
            assert isinstance(got[0], wire.Welcome) and got[0].acked == -1, got
            times["t0"] = time.perf_counter()
            sender = threading.Thread(target=b.sendall,
                                      args=(self.stream_v3 if v3 else self.stream,))
            sender.start()
            acked = -1
            while acked < last:
                data = b.recv(65536)
                assert data, "the collector closed the connection"
                for f in dec.feed(data):
                    assert isinstance(f, wire.Ack), f
                    acked = f.seq
            times["t1"] = time.perf_counter()
            sender.join()
            b.sendall(wire.encode(wire.Bye("done")))

        try:
            sr, sw = await asyncio.open_connection(sock=a, limit=wire.STREAM_LIMIT)
            server = asyncio.create_task(wire.serve_agent(
                sr, sw, token=TOKEN, store=store, seqs=seqs, collector="bench"))
            await asyncio.to_thread(agent)
            await server
        finally:
            a.close()
            b.close()
        return times["t1"] - times["t0"]

    def ingest(self) -> dict[str, float]:
        """Decode here, store in the writer thread: what the collector does before it acks,
        on the stream in memory (as the bare Unpacker reads it)."""
        with tempfile.TemporaryDirectory(prefix="hopscope-ingest-", dir=self.tmp) as d:
            db = Path(d) / "collector.db"
            SqliteStore(db).close()
            writer = BatchWriter(db)
            seqs = SeqTracker()
            left = [self.nframes]
            errors: list[BaseException] = []
            all_done = threading.Event()
            room = threading.Semaphore(wire.MAX_INFLIGHT)  # as one agent's connection

            def done(exc: BaseException | None) -> None:  # in the writer thread
                if exc is not None:
                    errors.append(exc)
                room.release()
                left[0] -= 1
                if not left[0]:
                    all_done.set()

            try:
                gc.collect()
                t0 = time.perf_counter()
                for f in self.frames_in():
                    if seqs.is_new(f.agent, f.seq):
                        seqs.submitted(f.agent, f.seq)
                        room.acquire()
                        writer.submit(f, done)
                all_done.wait()
                secs = time.perf_counter() - t0
            finally:
                writer.close()
            assert not errors, errors
            self.commits = writer.commits
            self._check_stored(db)
            self.db_bytes = db_size(Path(d))
        return {"seconds": secs}

    def _check_stored(self, db: Path) -> None:
        store = SqliteStore(db, readonly=True)
        nb = store.db.execute("SELECT count(*) FROM batches").fetchone()[0]
        assert nb == self.nframes, (nb, self.nframes)
        store.close()

    def socket_ingest(self) -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="hopscope-ingest-", dir=self.tmp) as d:
            db = Path(d) / "collector.db"
            SqliteStore(db).close()  # the schema, as the collector's own connection makes it
            writer = BatchWriter(db)
            try:
                gc.collect()
                secs = asyncio.run(self._serve(writer.queue))
            finally:
                writer.close()
            self._check_stored(db)
        return {"seconds": secs}

    def stitch(self, v3: bool = False) -> dict[str, float]:
        """Collector.store_batch and its feeder, as served (``v3``: the raw records)."""
        with tempfile.TemporaryDirectory(prefix="hopscope-ingest-", dir=self.tmp) as d:
            col = Collector(CollectorConfig(db=str(Path(d) / "collector.db"), token=TOKEN))
            col.writer = BatchWriter(col.cfg.db)
            every = self.drain_every
            t_step = 0.0
            k = 0

            feed = col.feed_next

            def stepped() -> None:  # the feeder's step, and the drain loop's every N batches
                nonlocal k, t_step
                feed()
                k += 1
                if k % every == 0:  # as the drain loop would, between batches
                    c = time.perf_counter()
                    col.step()
                    t_step += time.perf_counter() - c

            col.feed_next = stepped  # type: ignore[method-assign]

            async def run() -> float:  # Collector.store_batch and its feeder task, as served
                feeder = col.start_feeder()
                try:
                    return await self._serve(col.store_batch, v3)
                finally:
                    feeder.cancel()

            gc.collect()
            t0 = time.perf_counter()
            try:
                t_serve = asyncio.run(run())
            finally:
                col.writer.close()
            while col.backlog:  # what was acked but not fed yet
                col.feed_next()
            a = time.perf_counter()
            col.cfg.idle_flush = 0.0  # end of input: flush the node as an idle one
            col.step()
            t_step += time.perf_counter() - a
            secs = time.perf_counter() - t0
            if v3:
                self.requests_v3 = col.stored_requests
            else:
                self.requests = col.stored_requests
            assert col.store.count_requests() == col.stored_requests
            self.drops = int(col.store.db.execute("SELECT count(*) FROM drops").fetchone()[0])
            col.store.close()
        return {"seconds": secs, "serve": t_serve, "step": t_step,
                "requests": float(col.stored_requests)}


def db_size(d: Path) -> int:
    """Bytes under ``d``: the database, its WAL, the batch segments."""
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


# --------------------------------------------------------------------------
# Report


def report(res: dict[str, Any], out: TextIO) -> None:
    n = res["observations"]
    p = print
    p(f"{n:,} observations from {res['capture']} in {res['batches']} batches of"
      f" {res['batch']:,}; {res['wire_bytes']:,} bytes on the wire"
      f" ({res['wire_bytes'] / n:.0f} per observation; {res['wire_bytes_v1'] / n:.0f} as v1"
      f" rows); best of {res['repeat']};"
      f" step every {res['drain_every']} batches", file=out)
    p(f"Python {res['python']}, msgpack {res['msgpack']}, SQLite {res['sqlite']};"
      f" database in {res['db_dir']}", file=out)
    p(f"{'stage':24} {'seconds':>9} {'obs/s':>12} {'MB/s wire':>10} {'stitched req/s':>15}"
      f" {'x bare':>7}", file=out)
    bare = res["stages"]["bare Unpacker"]["seconds"]
    for name, st in res["stages"].items():
        s = st["seconds"]
        rq = f"{st['requests'] / s:15,.0f}" if "requests" in st else f"{'':15}"
        v = "v1" if "v1" in name else "v3" if "v3" in name else ""
        nb = res[f"wire_bytes_{v}" if v else "wire_bytes"]
        k = res["observations_v3"] if v == "v3" else n
        p(f"{name:24} {s:9.4f} {k / s:12,.0f} {nb / s / 1e6:10.1f} {rq}"
          f" {bare / s:7.2f}", file=out)
    st = res["stages"]["ingest + stitch"]
    p(f"ingest + stitch, best run: through serve_agent to the last ack {st['serve']:.3f} s;"
      f" steps {st['step']:.3f} s in all (take/add/drain/store requests); {int(st['requests']):,}"
      f" requests, {res['drops']:,} drops stored", file=out)
    ing = res["stages"]["ingest"]["seconds"]
    dec = res["stages"]["decode"]["seconds"]
    inl = res["stages"]["decode, then store"]["seconds"]
    p(f"ingest: {res['batches']} batches in {res['commits']} commits; decode alone is"
      f" {dec / ing:.0%} of it, decode then store on one thread {inl / ing:.0%};"
      f" database {res['db_bytes'] / 1e6:.1f} MB", file=out)
    ok = n / ing >= TARGET
    p(f"target ingest >= {TARGET:,} obs/s: {'met' if ok else 'NOT met'}"
      f" ({n / ing:,.0f}); ingest + stitch: {n / st['seconds']:,.0f} obs/s,"
      f" {st['requests'] / st['seconds']:,.0f} requests/s", file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--capture", type=Path,
                    help="capture to read (default: the generated bench/out/ingress-<packets>.pcapng)")
    ap.add_argument("--packets", type=int, default=DEFAULT_PACKETS,
                    help="packets of the generated capture (default %(default)s)")
    ap.add_argument("--limit", type=int, help="use only the first N observations")
    ap.add_argument("--batch", type=int, default=1000, help="observations per batch (default 1000)")
    ap.add_argument("--drain-every", type=int, default=25,
                    help="Collector.step() every N batches (default 25)")
    ap.add_argument("--repeat", type=int, default=3, help="best of K passes (default 3)")
    ap.add_argument("--read", type=int, default=64 << 10, help="bytes per feed() (socket read)")
    ap.add_argument("--dir", help="where the temporary databases go (default: the temp dir)")
    ap.add_argument("--json", action="store_true",
                    help="print the results as JSON on stdout (the table goes to stderr)")
    a = ap.parse_args(argv)
    if a.batch < 1 or a.repeat < 1 or a.drain_every < 1 or a.read < 1:
        ap.error("--batch, --repeat, --drain-every and --read must be >= 1")
    # the collector's own log lines (stitch warnings, stored counts) are not the subject
    logging.getLogger("hopscope").setLevel(logging.ERROR)

    path = a.capture or ensure_capture(a.packets)
    t0 = time.perf_counter()
    batches = read_batches(path, a.batch, a.limit)
    n = sum(map(len, batches))
    frames, frames_v1 = build_frames(batches), build_frames(batches, 1)
    frames_v3, n3 = build_raw_frames(batches)
    if not n:
        print(f"{path}: no observations", file=sys.stderr)
        return 1
    prep = time.perf_counter() - t0
    b = Bench(frames, frames_v1, n, a.read, a.drain_every, a.dir, frames_v3, n3)
    nframes = len(frames)
    del frames, frames_v1, frames_v3  # the bench keeps the streams and the bodies only

    stages = [
        Stage("encode", timed(lambda: {"bytes": len(b"".join(build_frames(batches)))})),
        Stage("encode v1 rows", timed(lambda: {"bytes": len(b"".join(build_frames(batches, 1)))})),
        Stage("bare Unpacker", timed(b.bare)),
        Stage("bare Unpacker, v1 rows", timed(lambda: b.bare(v1=True))),
        Stage("decode", timed(b.decode)),
        Stage("decode + rows", timed(lambda: b.decode(rows=True))),
        Stage("decode v1 rows", timed(lambda: b.decode(rows=True, v1=True))),
        Stage("decode, then store", b.inline),
        Stage("ingest", b.ingest),
        Stage("ingest over a socket", b.socket_ingest),
        Stage("ingest + stitch", b.stitch),
        Stage("decode + rows, v3 raw", timed(lambda: b.decode(rows=True, v3=True))),
        Stage("ingest + stitch, v3 raw", lambda: b.stitch(v3=True)),
    ]
    for _ in range(a.repeat):
        for s in stages:
            r = s.run()
            s.runs.append(r["seconds"])
            if not s.best or r["seconds"] < s.best["seconds"]:
                s.best = r

    res: dict[str, Any] = {
        "capture": str(path), "observations": n, "batches": nframes, "batch": a.batch,
        "wire_bytes": len(b.stream), "wire_bytes_v1": b.v1_bytes, "repeat": a.repeat,
        "wire_bytes_v3": len(b.stream_v3), "observations_v3": n3,
        "drain_every": a.drain_every,
        "read": a.read, "prepare_seconds": round(prep, 3),
        "python": platform.python_version(), "msgpack": ".".join(map(str, msgpack.version)),
        "sqlite": sqlite3.sqlite_version, "db_dir": a.dir or tempfile.gettempdir(),
        "db_bytes": b.db_bytes, "commits": b.commits, "drops": b.drops, "target_obs_per_s": TARGET,
        "cpus": os.cpu_count(),
        "stages": {s.name: {**s.best, "obs_per_s": (n3 if "v3" in s.name else n)
                            / s.best["seconds"],
                            "runs": [round(x, 4) for x in s.runs]} for s in stages},
    }
    ing = res["stages"]["ingest"]["obs_per_s"]
    res["target_met"] = ing >= TARGET
    st = res["stages"]["ingest + stitch"]
    st["requests_per_s"] = st["requests"] / st["seconds"]
    report(res, sys.stderr if a.json else sys.stdout)
    if a.json:
        json.dump(res, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
