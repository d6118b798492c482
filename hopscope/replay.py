"""Offline replay: captures -> the stitcher -> the hop-model envelope."""

from __future__ import annotations

import gc
import ipaddress
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hopscope.capture import CaptureReader, ReadStats
from hopscope.errors import UsageError
from hopscope.stitch import Envelope, Stitcher
from hopscope.tcpflow import Cidrs, NodeTracker, TrackerState


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


# Set in a forked worker by the pool initializer: the shared byte counter.
_progress_counter: Any = None


def _init_worker(counter: Any) -> None:
    global _progress_counter
    _progress_counter = counter
    gc.disable()


def _track(task: tuple[str, Path, int, int, Cidrs]) -> tuple[str, int, TrackerState, ReadStats]:
    """In a worker: read shard k of n of one node's capture into a NodeTracker."""
    node, path, k, n, cidrs = task
    counter = _progress_counter

    def progress(nbytes: int) -> None:
        if counter is not None and k == 0:
            with counter.get_lock():
                counter.value += nbytes

    # the stitcher infers direction from each node's role: skip reading epb_flags
    reader = CaptureReader(path, node, shard=(k, n), progress=progress, directions=False)
    tracker = NodeTracker(node, cidrs)
    for batch in reader:
        tracker.feed(batch)
    tracker.flush()
    return node, k, tracker.export(), reader.stats


def replay(pairs: Iterable[tuple[str, Path]], *, reference: str | None = None,
           cidrs: Cidrs | None = None, entry_ports: Iterable[int] = (80,),
           warn: Callable[[str], None] | None = None, progress: bool | None = None,
           jobs: int | None = None, stream: bool = False) -> ReplayResult:
    """Read each node's capture through one :class:`Stitcher`; return the envelope and stats.

    ``jobs`` processes share the work (default: the CPUs): each node's
    capture is read by its own process, and a large capture by several, each
    taking a share of the TCP flows (:func:`hopscope.capture.flow_hash`);
    the per-node trackers' sightings are merged before the join, so the
    result is the same as in one process. With ``stream`` the envelope's
    ``requests`` is an iterator (see :meth:`Stitcher.result_stream`).
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
        if jobs == 1 or sum(shards) == 1 or all(sz < PARALLEL_MIN_BYTES for sz in sizes):
            for node, path in pairs:
                reader = CaptureReader(path, node, warn=_warn, progress=prog, directions=False)
                tracker = st.tracker(node)
                for batch in reader:
                    tracker.feed(batch)
                res.files.append(reader.stats)
        else:
            _run_pool(pairs, shards, cidrs, st, res, _warn, prog, jobs)
        res.envelope = st.result_stream() if stream else st.result()
    finally:
        prog.close()
        if gc_was:
            gc.enable()
    for w in st.warnings:
        _warn(w)
    res.seconds = time.perf_counter() - t0
    return res


def _run_pool(pairs: list[tuple[str, Path]], shards: list[int], cidrs: Cidrs, st: Stitcher,
              res: ReplayResult, warn: Callable[[str], None], prog: _Progress, jobs: int) -> None:
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    tasks = [(node, path, k, n, cidrs) for (node, path), n in zip(pairs, shards, strict=True)
             for k in range(n)]
    done: dict[tuple[str, int], tuple[TrackerState, ReadStats]] = {}
    with ctx.Pool(min(jobs, len(tasks)), initializer=_init_worker, initargs=(counter,)) as pool:
        pending = pool.imap_unordered(_track, tasks)
        while True:
            try:
                node, k, state, rstats = pending.next(timeout=0.2)
            except mp.TimeoutError:
                prog(counter.value - prog.done)
                continue
            except StopIteration:
                break
            done[(node, k)] = (state, rstats)
    prog(counter.value - prog.done)
    # merge in a fixed order, so that the result does not depend on which worker ended first
    for (node, _path), n in zip(pairs, shards, strict=True):
        for k in range(n):
            state, rstats = done[(node, k)]
            st.tracker(node).absorb(state)
            if k == 0:
                res.files.append(rstats)
                for w in rstats.warnings:
                    warn(w)


def write_json(env: Envelope, out: IO[str]) -> None:
    """Write the envelope as one JSON document, a request at a time (``requests`` may be lazy)."""
    sep = (",", ":")
    out.write('{"requests":[')
    for i, r in enumerate(env["requests"]):
        if i:
            out.write(",")
        out.write(json.dumps(r, separators=sep))
    out.write("]")
    for k, v in env.items():
        if k != "requests":
            out.write(f",{json.dumps(k)}:{json.dumps(v, separators=sep)}")
    out.write("}\n")


def summary_line(res: ReplayResult) -> str:
    env: dict[str, Any] = res.envelope
    return (f"{res.packets} packets in {len(res.files)} captures, {len(env['requests'])} requests, "
            f"{len(env['drops'])} drops, {res.seconds:.2f} s "
            f"({res.packets / max(res.seconds, 1e-9) / 1000:.0f}k packets/s)")
