"""Offline replay: captures -> the stitcher -> the hop-model envelope."""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hopscope.capture import CaptureReader, ReadStats
from hopscope.errors import UsageError
from hopscope.stitch import Envelope, Stitcher
from hopscope.tcpflow import Cidrs


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


def replay(pairs: Iterable[tuple[str, Path]], *, reference: str | None = None,
           cidrs: Cidrs | None = None, entry_ports: Iterable[int] = (80,),
           warn: Callable[[str], None] | None = None, progress: bool | None = None) -> ReplayResult:
    """Read each node's capture through one :class:`Stitcher`; return the envelope and stats."""
    pairs = list(pairs)
    if reference is not None and reference not in {n for n, _ in pairs}:
        raise UsageError(f"--reference {reference!r} is not one of the nodes given "
                         f"({', '.join(n for n, _ in pairs)})")
    total = 0
    for _n, p in pairs:
        with contextlib.suppress(OSError):
            total += os.stat(p).st_size
    if progress is None:
        progress = sys.stderr.isatty()
    prog = _Progress(total, progress)
    st = Stitcher([n for n, _ in pairs], reference=reference, cidrs=cidrs, entry_ports=entry_ports)
    res = ReplayResult({})
    t0 = time.perf_counter()

    def _warn(msg: str) -> None:
        res.warnings.append(msg)
        if warn is not None:
            warn(msg)

    # The stitcher keeps many small long-lived objects and makes no reference
    # cycles: the cyclic garbage collector would only rescan them, over and
    # over (a quarter of the run time). Reference counting still frees memory.
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for node, path in pairs:
            reader = CaptureReader(path, node, warn=_warn, progress=prog)
            tracker = st.tracker(node)
            for batch in reader:
                tracker.feed(batch)
            res.files.append(reader.stats)
        res.envelope = st.result()
    finally:
        prog.close()
        if gc_was:
            gc.enable()
    for w in st.warnings:
        _warn(w)
    res.seconds = time.perf_counter() - t0
    return res


def summary_line(res: ReplayResult) -> str:
    env: dict[str, Any] = res.envelope
    return (f"{res.packets} packets in {len(res.files)} captures, {len(env['requests'])} requests, "
            f"{len(env['drops'])} drops, {res.seconds:.2f} s "
            f"({res.packets / max(res.seconds, 1e-9) / 1000:.0f}k packets/s)")
