"""Offline replay: captures -> the stitcher -> the hop-model envelope."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import heapq
import ipaddress
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from hopscope.capture import CaptureReader, ReadStats
from hopscope.errors import HopscopeError, UsageError
from hopscope.stitch import Envelope, Stitcher
from hopscope.tcpflow import Cidrs, NodeTracker


@dataclass
class ReplayResult:
    envelope: Envelope
    files: list[ReadStats] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def packets(self) -> int:
        return sum(f.packets for f in self.files)


def node_files(files: Sequence[str], named: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """Pair each capture with its node: ``NAME=FILE`` pairs, else the file's stem."""
    out: list[tuple[str, Path]] = []
    for spec in named:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--node {spec!r}: expected NAME=FILE, e.g. --node node1=/tmp/a.pcap")
        out.append((name, Path(path)))
    for f in files:
        p = Path(f)
        name = p.name.split(".", 1)[0] or p.name
        out.append((name, p))
    seen: dict[str, Path] = {}
    for name, p in out:
        if name in seen:
            raise UsageError(f"two captures for node {name!r} ({seen[name]} and {p}): one capture "
                             "per node; name them with --node NAME=FILE")
        seen[name] = p
    if not out:
        raise UsageError("no capture given: hopscope replay node1.pcap node2.pcap ...")
    return out


def parse_cidrs(pod: str | None, service: str | None) -> Cidrs:
    c = Cidrs()
    try:
        if pod:
            c.pod = ipaddress.IPv4Network(pod, strict=False)
        if service:
            c.service = ipaddress.IPv4Network(service, strict=False)
    except ValueError as exc:
        raise UsageError(f"bad CIDR: {exc}") from None
    return c


class _Progress:
    """Bytes read over bytes to read, on stderr, only on a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = max(1, total)
        self.done = 0
        self.enabled = enabled
        self.t0 = time.monotonic()
        self.last = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        pct = min(100, 100 * self.done // self.total)
        rate = self.done / max(1e-9, now - self.t0) / 1e6
        sys.stderr.write(f"\rreplay: {pct:3d}% of {self.total / 1e6:.1f} MB ({rate:.0f} MB/s)")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.last:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


#: Files smaller than this are read in this process: forking costs more than it saves.
PARALLEL_MIN_BYTES = 4 << 20


def plan_shards(sizes: list[int], jobs: int) -> list[int]:
    """How many processes share each file: spread ``jobs`` over the files, big ones first."""
    shards = [1] * len(sizes)
    if jobs <= 1:
        return shards
    spare = jobs - len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if spare <= 0:
            break
        if sizes[i] >= PARALLEL_MIN_BYTES:
            extra = min(spare, jobs - 1)
            shards[i] += extra
            spare -= extra
    return shards


#: A worker hands over what it settled every this many packets.
TAKE_EVERY = 1 << 15


_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """End this process when ``parent`` ends (however it ends: SIGKILL, SIGTERM, a crash)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


def _worker(task: tuple[str, Path, int, int, Cidrs, frozenset[int]], out: Any, counter: Any,
            parent: int) -> None:
    """In a worker process: read shard k of n of one node's capture, handing over as it goes."""
    _die_with(parent)
    node, path, k, n, cidrs, entry_ports = task
    gc.disable()

    def progress(nbytes: int) -> None:
        if k == 0:
            with counter.get_lock():
                counter.value += nbytes

    try:
        # the stitcher infers direction from each node's role, and needs only a
        # handshake's ACK of the pure ACKs: skip reading epb_flags and the rest
        # warnings: kept in the reader's stats, which the parent shows (shard 0's, once)
        reader = CaptureReader(path, node, warn=lambda _msg: None, shard=(k, n),
                               progress=progress, directions=False, pure_acks=False)
        tracker = NodeTracker(node, cidrs, entry_ports)
        since = 0
        for batch in reader:
            tracker.feed(batch)
            since += len(batch)
            if since >= TAKE_EVERY:
                since = 0
                out.put(("take", node, k, tracker.take(), None))
        out.put(("done", node, k, tracker.take(final=True), reader.stats))
    except BaseException as exc:
        out.put(("error", node, k, None, exc if isinstance(exc, HopscopeError) else
                 HopscopeError(f"{path}: {type(exc).__name__}: {exc}")))


def replay(pairs: Iterable[tuple[str, Path]], *, reference: str | None = None,
           cidrs: Cidrs | None = None, entry_ports: Iterable[int] = (80,),
           warn: Callable[[str], None] | None = None, progress: bool | None = None,
           jobs: int | None = None, stream: bool = False,
           emit: Callable[[dict[str, Any]], None] | None = None) -> ReplayResult:
    """Read each node's capture through one :class:`Stitcher`; return the envelope and stats.

    ``jobs`` processes share the work (default: the CPUs): each node's
    capture is read by its own process, and a large capture by several, each
    taking a share of the TCP flows (:func:`hopscope.capture.flow_hash`).
    The stitcher joins what they hand over as they go, so with ``emit`` the
    requests come out (to ``emit``, one by one) while the captures are still
    being read, and memory stays bounded; the result is the same as in one
    process. With ``stream`` the envelope's ``requests`` is an iterator.
    """
    pairs = list(pairs)
    if reference is not None and reference not in {n for n, _ in pairs}:
        raise UsageError(f"--reference {reference!r} is not one of the nodes given "
                         f"({', '.join(n for n, _ in pairs)})")
    sizes = []
    for _n, p in pairs:
        try:
            sizes.append(os.stat(p).st_size)
        except OSError:
            sizes.append(0)
    if progress is None:
        progress = sys.stderr.isatty()
    prog = _Progress(sum(sizes), progress)
    cidrs = cidrs or Cidrs()
    st = Stitcher([n for n, _ in pairs], reference=reference, cidrs=cidrs, entry_ports=entry_ports)
    res = ReplayResult({})
    t0 = time.perf_counter()

    def _warn(msg: str) -> None:
        res.warnings.append(msg)
        if warn is not None:
            warn(msg)

    jobs = max(1, jobs if jobs is not None else (os.cpu_count() or 1))
    shards = plan_shards(sizes, jobs)
    # The trackers keep many small long-lived objects and make no reference
    # cycles: the cyclic garbage collector would only rescan them, over and
    # over (a quarter of the run time). Reference counting still frees memory.
    gc_was = gc.isenabled()
    gc.disable()
    try:
        if jobs == 1 or all(sz < PARALLEL_MIN_BYTES for sz in sizes) or sum(shards) == 1:
            stats = _run_serial(pairs, st, _warn, prog, emit)
        else:
            stats = _run_pool(pairs, shards, cidrs, st, _warn, prog, emit)
        res.files.extend(stats)
        reqs, drops = st.finish()
        if emit is not None:
            for r in reqs:
                emit(r)
            reqs = iter(())
        res.envelope = st.envelope(reqs if stream else list(reqs), drops)
    finally:
        prog.close()
        if gc_was:
            gc.enable()
    for w in st.warnings:
        _warn(w)
    res.seconds = time.perf_counter() - t0
    return res


def _drain(st: Stitcher, emit: Callable[[dict[str, Any]], None] | None) -> None:
    if emit is not None:
        for r in st.drain():
            emit(r)


def _run_serial(pairs: list[tuple[str, Path]], st: Stitcher, warn: Callable[[str], None],
                prog: _Progress, emit: Callable[[dict[str, Any]], None] | None) -> list[ReadStats]:
    """All captures in this process, read side by side in time order (so the join can drain)."""
    readers = [CaptureReader(path, node, warn=warn, progress=prog, directions=False,
                             pure_acks=False) for node, path in pairs]
    its = [iter(r) for r in readers]
    trackers = [NodeTracker(node, st.cidrs, st.entry_ports) for node, _ in pairs]
    # the next batch comes from the capture that is furthest behind
    heap: list[tuple[int, int]] = [(-(1 << 62), i) for i in range(len(pairs))]
    since = 0
    while heap:
        _t, i = heapq.heappop(heap)
        batch = next(its[i], None)
        if batch is None:
            st.add(pairs[i][0], trackers[i].take(final=True), watermark=1 << 62)
            continue
        trackers[i].feed(batch)
        heapq.heappush(heap, (batch[-1].ts_real_ns, i))
        since += len(batch)
        if since >= TAKE_EVERY and emit is not None:
            since = 0
            for (node, _p), tr in zip(pairs, trackers, strict=True):
                st.add(node, tr.take())
            _drain(st, emit)
    return [r.stats for r in readers]


#: Hand-overs a worker may have waiting before it blocks (bounds the parent's memory).
QUEUE_DEPTH = 2


def _run_pool(pairs: list[tuple[str, Path]], shards: list[int], cidrs: Cidrs, st: Stitcher,
              warn: Callable[[str], None], prog: _Progress,
              emit: Callable[[dict[str, Any]], None] | None) -> list[ReadStats]:
    """One process per (capture, shard), all at once; the parent joins what they hand over.

    The parent always reads from the worker that is furthest behind (the lowest
    watermark): the join can only finish requests up to that point, so what the
    others hand over would wait in memory. Each worker has its own short queue
    and blocks when it is full, so the pending state stays bounded however
    uneven the shares are, and the CPU goes to the worker that holds the others up.
    """
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    tasks = [(node, path, k, n, cidrs, st.entry_ports)
             for (node, path), n in zip(pairs, shards, strict=True)
             for k in range(n)]
    keys = [(t[0], t[2]) for t in tasks]
    queues = {key: ctx.Queue(maxsize=QUEUE_DEPTH) for key in keys}
    me = os.getpid()
    procs = {key: ctx.Process(target=_worker, args=(task, queues[key], counter, me), daemon=True)
             for key, task in zip(keys, tasks, strict=True)}
    wm: dict[tuple[str, int], int] = dict.fromkeys(keys, -(1 << 62))
    active = set(keys)
    stats: dict[str, ReadStats] = {}
    try:
        for p in procs.values():
            p.start()
        while active:
            key = min(active, key=lambda k: wm[k])
            try:
                kind, node, k, state, extra = queues[key].get(timeout=0.2)
            except queue.Empty:
                prog(counter.value - prog.done)
                if not procs[key].is_alive() and queues[key].empty():
                    raise HopscopeError("a replay worker died without a word (out of memory?); "
                                        "try --jobs 1") from None
                continue
            if kind == "error":
                raise extra
            if kind == "done":
                active.discard(key)
                wm[key] = 1 << 62
                if k == 0 and extra is not None:
                    stats[node] = extra
            else:
                wm[key] = state.last_ts
            st.add(node, state, watermark=min(v for (n, _k), v in wm.items() if n == node))
            _drain(st, emit)
            prog(counter.value - prog.done)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)
    for s in (stats[n] for n, _ in pairs if n in stats):
        for w in s.warnings:
            warn(w)
    return [stats[n] for n, _ in pairs if n in stats]


class JsonWriter:
    """Write the envelope as one JSON document, a request at a time.

    Pass :meth:`request` as ``emit`` to :func:`replay`; then :meth:`close`
    with the envelope (whose ``requests`` may hold the rest).
    """

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.n = 0

    def request(self, r: dict[str, Any]) -> None:
        # orjson: a tenth of the json module's time on these dicts; compact JSON, non-ASCII
        # characters written as UTF-8 (not escaped). The document starts with the first
        # request: a replay that fails before (a capture that cannot be read) prints none.
        self.out.write(("," if self.n else '{"requests":[') + orjson.dumps(r).decode())
        self.n += 1

    def close(self, env: Envelope) -> None:
        for r in env["requests"]:
            self.request(r)
        self.out.write("]" if self.n else '{"requests":[]')
        for k, v in env.items():
            if k != "requests":
                self.out.write(f",{orjson.dumps(k).decode()}:{orjson.dumps(v).decode()}")
        self.out.write("}\n")


def summary_line(res: ReplayResult) -> str:
    env: dict[str, Any] = res.envelope
    return (f"{res.packets} packets in {len(res.files)} captures, {len(env['requests'])} requests, "
            f"{len(env['drops'])} drops, {res.seconds:.2f} s "
            f"({res.packets / max(res.seconds, 1e-9) / 1000:.0f}k packets/s)")
