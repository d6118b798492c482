"""Per-node packet captures of the network replica, as pcapng.

``hopscope testbed capture --out DIR`` writes one file per node,
``DIR/<node>.pcapng``, holding every interface that matters on that node:
the public NIC ``eth0``, the private ``eth1`` when the node has one,
``flannel.1``, ``cni0`` and the host side of each pod's veth. Each interface
has its own Interface Description Block with ``if_name`` (and a description
naming the node and the interface's roles), ``if_tsresol`` = 9
(nanoseconds) and ``if_filter``; each packet is an Enhanced Packet Block
whose ``epb_flags`` say its direction (inbound / outbound). The files are
ready for ``hopscope replay DIR/*.pcapng``.

Why not dumpcap: Debian 12's dumpcap (Wireshark 4.0) writes one pcapng with
one named IDB per ``-i``, but only with microsecond timestamps (it has no
``--time-stamp-precision``). So each interface is captured by ``tcpdump -i
IF -Q in|out --time-stamp-precision=nano -w part.pcap`` inside the node's
namespace (two processes per interface, so the direction is exact), and the
parts are merged into one pcapng per node, by timestamp, streaming (one
record per part in memory).

Start waits until every tcpdump has printed ``listening on``. Stop waits
:data:`DRAIN_SECONDS` first (tcpdump hands packets over in TPACKET_V3
blocks retired after 1 s: a packet still in an open block when tcpdump gets
SIGINT is lost), then sends SIGINT and waits for every tcpdump to flush and
exit. Capturers get ``PR_SET_PDEATHSIG``: if hopscope dies, they stop too.

Python API: :func:`capturing` (a context manager), or
:class:`CaptureSession` with :meth:`~CaptureSession.start` /
:meth:`~CaptureSession.stop`.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import platform
import re
import selectors
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import click

from hopscope.errors import HopscopeError, PrivilegeError, TestbedError, UsageError
from hopscope.testbed.topology import (
    DEFAULT_PREFIX,
    ROLE_NIC,
    ROLE_OVERLAY,
    ROLE_POD,
    ROLE_UNDERLAY,
    Instance,
    load_instance,
)

log = logging.getLogger(__name__)

#: Capture filter: the client side (tcp 80), pod traffic (tcp 8000), VXLAN
#: (udp 8472) and ICMP (cheap; shows unreachables).
DEFAULT_FILTER = "tcp port 80 or tcp port 8000 or udp port 8472 or icmp"
#: Seconds to wait before stopping tcpdump: its TPACKET_V3 block timeout
#: is 1 s, so after this every packet seen before stop() is in user space.
DRAIN_SECONDS = 1.2
#: Kernel capture buffer per tcpdump, KiB.
BUFFER_KIB = 4096
#: Seconds to wait for every capturer to report "listening on".
START_TIMEOUT = 15.0
#: Seconds to wait for one capturer to exit after SIGINT.
STOP_TIMEOUT = 10.0

_DIRECTIONS = ("in", "out")
_PR_SET_PDEATHSIG = 1

# ---------------------------------------------------------------------------
# pcap reading and pcapng writing (plain struct, streaming)
# ---------------------------------------------------------------------------

_PCAP_MAGIC_US = 0xA1B2C3D4
_PCAP_MAGIC_NS = 0xA1B23C4D

_BT_SHB = 0x0A0D0D0A
_BT_IDB = 0x00000001
_BT_EPB = 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D

_OPT_END = 0
_OPT_COMMENT = 1
_SHB_HARDWARE = 2
_SHB_OS = 3
_SHB_USERAPPL = 4
_IF_NAME = 2
_IF_DESCRIPTION = 3
_IF_TSRESOL = 9
_IF_FILTER = 11
_EPB_FLAGS = 2

#: epb_flags direction bits (pcapng spec: 01 inbound, 10 outbound).
_DIR_FLAGS = {"in": 0b01, "out": 0b10}


def _opt(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


def shb_block(comment: str) -> bytes:
    """A Section Header Block (little endian, section length unknown)."""
    opts = (
        _opt(_OPT_COMMENT, comment.encode())
        + _opt(_SHB_HARDWARE, platform.machine().encode())
        + _opt(_SHB_OS, f"{platform.system()} {platform.release()}".encode())
        + _opt(_SHB_USERAPPL, b"hopscope testbed capture")
        + _opt(_OPT_END, b"")
    )
    return _block(_BT_SHB, struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + opts)


def idb_block(linktype: int, snaplen: int, if_name: str, description: str, bpf: str) -> bytes:
    """An Interface Description Block with if_name and if_tsresol = 9 (ns)."""
    opts = _opt(_IF_NAME, if_name.encode())
    if description:
        opts += _opt(_IF_DESCRIPTION, description.encode())
    opts += _opt(_IF_TSRESOL, bytes([9]))
    if bpf:
        opts += _opt(_IF_FILTER, b"\0" + bpf.encode())
    opts += _opt(_OPT_END, b"")
    return _block(_BT_IDB, struct.pack("<HHI", linktype, 0, snaplen) + opts)


def epb_block(if_id: int, ts_ns: int, data: bytes, orig_len: int, flags: int) -> bytes:
    """An Enhanced Packet Block; ``ts_ns`` in units of the IDB's 1 ns."""
    cap = len(data)
    opts = _opt(_EPB_FLAGS, struct.pack("<I", flags)) + _opt(_OPT_END, b"") if flags else b""
    body = (
        struct.pack("<IIIII", if_id, (ts_ns >> 32) & 0xFFFFFFFF, ts_ns & 0xFFFFFFFF, cap, orig_len)
        + data
        + b"\0" * (-cap % 4)
        + opts
    )
    return _block(_BT_EPB, body)


@dataclass(frozen=True)
class PcapHeader:
    linktype: int
    snaplen: int
    nano: bool
    endian: str


def read_pcap_header(f: BinaryIO, path: Path) -> PcapHeader | None:
    """The global header of a classic pcap file; None for an empty file."""
    head = f.read(24)
    if len(head) == 0:
        return None
    if len(head) < 24:
        raise TestbedError(f"capture part {path} is truncated ({len(head)} bytes of header)")
    for endian in ("<", ">"):
        (magic,) = struct.unpack(endian + "I", head[:4])
        if magic in (_PCAP_MAGIC_US, _PCAP_MAGIC_NS):
            _, _, _, _, snaplen, linktype = struct.unpack(endian + "HHiIII", head[4:])
            return PcapHeader(linktype & 0x0FFFFFFF, snaplen, magic == _PCAP_MAGIC_NS, endian)
    raise TestbedError(f"capture part {path} is not a pcap file (magic {head[:4].hex()})")


def iter_pcap(path: Path, if_id: int, flags: int) -> Iterator[tuple[int, int, int, bytes, int]]:
    """Stream ``(ts_ns, if_id, flags, data, orig_len)`` from a classic pcap file.

    A record cut short at the end (a capturer killed mid-write) ends the
    stream quietly.
    """
    with path.open("rb", buffering=1 << 20) as f:
        hdr = read_pcap_header(f, path)
        if hdr is None:
            return
        rec = struct.Struct(hdr.endian + "IIII")
        mult = 1 if hdr.nano else 1000
        read = f.read
        while True:
            rh = read(16)
            if len(rh) < 16:
                return
            sec, frac, incl, orig = rec.unpack(rh)
            data = read(incl)
            if len(data) < incl:
                return
            yield sec * 1_000_000_000 + frac * mult, if_id, flags, data, orig


#: How far back in time (ns) a packet of one capture part may be written
#: after a later one. tcpdump writes packets in the order they reached the
#: ring buffer; with several CPUs that is not quite timestamp order (a few
#: microseconds to milliseconds). Parts are re-sorted within this window.
REORDER_WINDOW_NS = 20_000_000

Record = tuple[int, int, int, bytes, int]


class _Reorder:
    """Sort a nearly sorted record stream within :data:`REORDER_WINDOW_NS`, streaming."""

    def __init__(self, stream: Iterator[Record], window_ns: int = REORDER_WINDOW_NS) -> None:
        self.stream = stream
        self.window_ns = window_ns
        self.max_disorder_ns = 0  # the largest step back seen in the input
        self.late = 0  # records that came later than the window allows

    def __iter__(self) -> Iterator[Record]:
        heap: list[tuple[int, int, Record]] = []
        newest = -1
        last_out = -1
        for seq, rec in enumerate(self.stream):
            ts = rec[0]
            if ts < newest:
                self.max_disorder_ns = max(self.max_disorder_ns, newest - ts)
            else:
                newest = ts
            heapq.heappush(heap, (ts, seq, rec))
            while heap and heap[0][0] <= newest - self.window_ns:
                out = heapq.heappop(heap)[2]
                if out[0] < last_out:
                    self.late += 1
                last_out = max(last_out, out[0])
                yield out
        while heap:
            out = heapq.heappop(heap)[2]
            if out[0] < last_out:
                self.late += 1
            last_out = max(last_out, out[0])
            yield out


@dataclass
class MergeInput:
    """One part file and where its packets go in the merged file."""

    path: Path
    if_id: int
    direction: str  # "in" | "out" | ""


@dataclass
class IfaceOut:
    """One interface of the merged file."""

    name: str
    description: str


def merge_parts(
    parts: list[MergeInput], ifaces: list[IfaceOut], out: Path, *, comment: str, bpf: str
) -> dict[str, int]:
    """Merge classic-pcap parts into one pcapng, by timestamp, streaming.

    Returns packets written per interface name. Interfaces whose parts are
    all empty still get their IDB (so a reader sees what was captured).
    """
    linktypes: dict[int, int] = {}
    snaplens: dict[int, int] = {}
    for part in parts:
        with part.path.open("rb") as f:
            hdr = read_pcap_header(f, part.path)
        if hdr is None:
            continue
        prev = linktypes.setdefault(part.if_id, hdr.linktype)
        if prev != hdr.linktype:
            raise TestbedError(
                f"capture parts of {ifaces[part.if_id].name} have different link types "
                f"({prev} and {hdr.linktype}); capture again"
            )
        snaplens[part.if_id] = max(snaplens.get(part.if_id, 0), hdr.snaplen)
    counts = {i.name: 0 for i in ifaces}
    per_if = [0] * len(ifaces)
    tmp = out.with_name(out.name + ".tmp")
    streams = [_Reorder(iter_pcap(p.path, p.if_id, _DIR_FLAGS.get(p.direction, 0)))
               for p in parts]
    with tmp.open("wb", buffering=1 << 20) as w:
        w.write(shb_block(comment))
        for i, iface in enumerate(ifaces):
            # An interface without packets: Ethernet (1), the usual snap length.
            w.write(idb_block(linktypes.get(i, 1), snaplens.get(i, 262144), iface.name,
                              iface.description, bpf))
        for ts, if_id, flags, data, orig in heapq.merge(*streams, key=lambda r: r[0]):
            w.write(epb_block(if_id, ts, data, orig, flags))
            per_if[if_id] += 1
    tmp.replace(out)
    for i, iface in enumerate(ifaces):
        counts[iface.name] = per_if[i]
    for p, st in zip(parts, streams, strict=True):
        if st.max_disorder_ns:
            log.debug("%s: re-sorted packets up to %.1f us out of order", p.path,
                      st.max_disorder_ns / 1e3)
        if st.late:
            log.warning("%s: %d packet(s) more than %.0f ms out of order; %s is not strictly "
                        "time ordered", p.path, st.late, REORDER_WINDOW_NS / 1e6, out)
    return counts


# ---------------------------------------------------------------------------
# capturers
# ---------------------------------------------------------------------------


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGINT), 0, 0, 0)


@dataclass
class _Capturer:
    node: str
    ifname: str
    direction: str
    path: Path
    cmd: list[str]
    proc: subprocess.Popen[bytes] | None = None
    stderr: bytes = b""
    listening: bool = False

    def describe(self) -> str:
        return f"tcpdump on {self.node} {self.ifname} ({self.direction})"


@dataclass
class NodeResult:
    """What the capture of one node produced."""

    node: str
    file: Path
    packets: dict[str, int]
    dropped: int  # packets the kernel dropped (tcpdump's own count)


@dataclass
class CaptureResult:
    """Files and counters of a finished capture."""

    out_dir: Path
    nodes: dict[str, NodeResult] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def files(self) -> list[Path]:
        return [r.file for r in self.nodes.values()]

    def to_dict(self) -> dict[str, object]:
        return {
            "out_dir": str(self.out_dir),
            "seconds": round(self.seconds, 3),
            "nodes": {
                n: {"file": str(r.file), "packets": r.packets, "dropped": r.dropped}
                for n, r in self.nodes.items()
            },
            "warnings": self.warnings,
        }


def _live_links(ns: str) -> dict[str, list[str]]:
    """Interface name -> flags, inside namespace ``ns``."""
    res = subprocess.run(["ip", "-j", "-n", ns, "link", "show"], capture_output=True,
                         text=True, timeout=10, check=False)
    if res.returncode != 0:
        raise TestbedError(
            f"cannot list the interfaces of namespace {ns}: {res.stderr.strip()}; "
            "is the replica up? (`hopscope testbed status`)"
        )
    return {str(x["ifname"]): list(x.get("flags", [])) for x in json.loads(res.stdout or "[]")}


def _description(inst: Instance, node: str, ifname: str, roles: Iterable[str], peer: str) -> str:
    roles = list(roles)
    what = {
        ROLE_NIC: "public NIC",
        ROLE_UNDERLAY: "VXLAN underlay",
        ROLE_OVERLAY: "Flannel VXLAN device",
        ROLE_POD: "pod network",
    }
    parts = [what.get(r, r) for r in roles]
    if peer and ":" in peer and peer.split(":", 1)[0] in {p.name for p in inst.topology.pods}:
        parts.append(f"host side of pod {peer.split(':', 1)[0]}")
    return f"{node} {ifname}" + (f" ({', '.join(parts)})" if parts else "")


class CaptureSession:
    """Capture every relevant interface of some nodes of a running replica."""

    def __init__(
        self,
        inst: Instance,
        out_dir: Path | str,
        nodes: Iterable[str] | None = None,
        *,
        bpf: str = DEFAULT_FILTER,
        snaplen: int = 0,
        keep_parts: bool = False,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.inst = inst
        self.out_dir = Path(out_dir)
        names = list(nodes) if nodes else inst.topology.node_names()
        for n in names:
            inst.topology.node(n)  # UsageError for an unknown node
        self.nodes = names
        self.bpf = bpf
        self.snaplen = snaplen
        self.keep_parts = keep_parts
        self.start_timeout = start_timeout
        self.parts_dir = self.out_dir / ".hopscope-parts"
        self.capturers: list[_Capturer] = []
        self.ifaces: dict[str, list[IfaceOut]] = {}
        self.result: CaptureResult | None = None
        self._t0 = 0.0
        self._stopped = False

    # -- start ----------------------------------------------------------------
    def _plan(self) -> None:
        topo = self.inst.topology
        for node in self.nodes:
            ns = self.inst.ns(node)
            live = _live_links(ns)
            outs: list[IfaceOut] = []
            for iface in topo.interfaces(node):
                flags = live.get(iface.name)
                if flags is None:
                    log.warning("%s: interface %s is missing; not capturing it", node, iface.name)
                    continue
                if "UP" not in flags:
                    log.warning("%s: interface %s is down; not capturing it", node, iface.name)
                    continue
                outs.append(IfaceOut(iface.name, _description(self.inst, node, iface.name,
                                                              iface.roles, iface.peer)))
                for d in _DIRECTIONS:
                    path = self.parts_dir / node / f"{iface.name}.{d}.pcap"
                    cmd = [
                        "ip", "netns", "exec", ns,
                        "tcpdump", "-i", iface.name, "-Q", d, "-p", "-n",
                        "-s", str(self.snaplen or 262144), "-B", str(BUFFER_KIB),
                        "--time-stamp-precision=nano", "-Z", "root",
                        "-w", str(path), self.bpf,
                    ]
                    self.capturers.append(_Capturer(node, iface.name, d, path, cmd))
            if not outs:
                raise TestbedError(f"no interface to capture on {node} (namespace {ns}); "
                                   "is the replica up? (`hopscope testbed status`)")
            self.ifaces[node] = outs

    def start(self) -> None:
        """Start every capturer; return once all of them are capturing."""
        if os.geteuid() != 0:
            raise PrivilegeError("capturing in the replica's namespaces needs root: "
                                 "run `sudo hopscope testbed capture ...`")
        if shutil.which("tcpdump") is None:
            raise TestbedError("tcpdump is not installed: `apt-get install tcpdump`")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            stale = self.out_dir / f"{node}.pcapng"
            if stale.exists():
                stale.unlink()
        if self.parts_dir.exists():
            shutil.rmtree(self.parts_dir)
        for node in self.nodes:
            (self.parts_dir / node).mkdir(parents=True)
        self._plan()
        try:
            for c in self.capturers:
                c.proc = subprocess.Popen(
                    c.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, start_new_session=True,
                    preexec_fn=_set_pdeathsig,
                )
            self._wait_listening()
        except BaseException:
            self._terminate_all(signal.SIGKILL)
            raise
        self._t0 = time.monotonic()
        log.info("capturing on %d interface(s) of %s", sum(len(v) for v in self.ifaces.values()),
                 ", ".join(self.nodes))

    def _wait_listening(self) -> None:
        sel = selectors.DefaultSelector()
        waiting: dict[int, _Capturer] = {}
        for c in self.capturers:
            assert c.proc is not None and c.proc.stderr is not None
            fd = c.proc.stderr.fileno()
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
            waiting[fd] = c
        deadline = time.monotonic() + self.start_timeout
        try:
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    names = ", ".join(c.describe() for c in list(waiting.values())[:4])
                    raise TestbedError(f"capture did not start within {self.start_timeout:.0f} s "
                                       f"({names} not listening); the machine may be overloaded: "
                                       "try again")
                for key, _ in sel.select(timeout=min(left, 0.5)):
                    fd = int(key.fd)
                    c = waiting[fd]
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    c.stderr += chunk
                    if b"listening on" in c.stderr:
                        c.listening = True
                    if not chunk or c.listening:
                        sel.unregister(fd)
                        del waiting[fd]
                        if not c.listening:
                            assert c.proc is not None
                            rc = c.proc.wait(timeout=5)
                            raise TestbedError(
                                f"{c.describe()} failed (exit {rc}): "
                                f"{c.stderr.decode(errors='replace').strip()}"
                            )
        finally:
            sel.close()
            for c in self.capturers:
                if c.proc is not None and c.proc.stderr is not None:
                    os.set_blocking(c.proc.stderr.fileno(), True)

    # -- stop -----------------------------------------------------------------
    def _terminate_all(self, sig: signal.Signals) -> None:
        for c in self.capturers:
            if c.proc is not None and c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(sig)
        for c in self.capturers:
            if c.proc is None:
                continue
            try:
                _, err = c.proc.communicate(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                _, err = c.proc.communicate(timeout=5)
            c.stderr += err or b""

    def stop(self) -> CaptureResult:
        """Drain, stop every capturer, merge the parts; return the result."""
        if self.result is not None:
            return self.result
        if self._stopped:
            raise TestbedError("capture was already stopped")
        self._stopped = True
        time.sleep(DRAIN_SECONDS)
        self._terminate_all(signal.SIGINT)
        result = CaptureResult(self.out_dir, seconds=time.monotonic() - self._t0)
        dropped: dict[str, int] = dict.fromkeys(self.nodes, 0)
        for c in self.capturers:
            text = c.stderr.decode(errors="replace")
            m = re.search(r"(\d+) packets? dropped by kernel", text)
            if m:
                dropped[c.node] += int(m.group(1))
            elif c.proc is not None and c.proc.returncode not in (0, -signal.SIGINT):
                result.warnings.append(f"{c.describe()} exited {c.proc.returncode}: "
                                       f"{text.strip().splitlines()[-1:]}")
        for node in self.nodes:
            parts = []
            names = [i.name for i in self.ifaces[node]]
            for c in self.capturers:
                if c.node == node and c.path.exists():
                    parts.append(MergeInput(c.path, names.index(c.ifname), c.direction))
            out = self.out_dir / f"{node}.pcapng"
            counts = merge_parts(parts, self.ifaces[node], out,
                                 comment=f"hopscope testbed capture of {node} "
                                         f"(namespace {self.inst.ns(node)})",
                                 bpf=self.bpf)
            result.nodes[node] = NodeResult(node, out, counts, dropped[node])
            if dropped[node]:
                result.warnings.append(f"{node}: the kernel dropped {dropped[node]} packet(s); "
                                       "the capture is incomplete (a slower load helps)")
        if not self.keep_parts:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
        for w in result.warnings:
            log.warning("%s", w)
        self.result = result
        return result

    def abort(self) -> None:
        """Stop every capturer without merging (used on errors)."""
        self._stopped = True
        self._terminate_all(signal.SIGINT)
        if not self.keep_parts:
            shutil.rmtree(self.parts_dir, ignore_errors=True)


@contextlib.contextmanager
def capturing(
    state: Instance,
    out_dir: Path | str,
    nodes: Iterable[str] | None = None,
    *,
    bpf: str = DEFAULT_FILTER,
    snaplen: int = 0,
    keep_parts: bool = False,
) -> Iterator[CaptureSession]:
    """Capture the replica while the ``with`` body runs.

    ``with capturing(inst, "out") as cap: ...`` -- on leaving the block
    (normally or by an exception) capturers are drained, stopped and merged;
    ``cap.result`` then holds the files (``out/<node>.pcapng``). ``bpf`` is
    the capture filter, ``snaplen`` 0 keeps whole packets, ``keep_parts``
    keeps the per-interface pcaps in ``out/.hopscope-parts``.
    """
    session = CaptureSession(state, out_dir, nodes, bpf=bpf, snaplen=snaplen,
                             keep_parts=keep_parts)
    session.start()
    try:
        yield session
    except BaseException:
        try:
            session.stop()
        except HopscopeError as exc:  # the body's error matters more
            log.error("capture could not be finished: %s", exc)
        raise
    session.stop()


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


class _Stop(Exception):
    pass


@click.command("capture")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for <node>.pcapng (created; files there are replaced).")
@click.option("--duration", type=float, default=None,
              help="Seconds to capture (default: until Ctrl-C or SIGTERM).")
@click.option("--nodes", default="", help="Comma-separated nodes (default: all).")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="Replica prefix.")
@click.option("--filter", "bpf", default=DEFAULT_FILTER, show_default=True,
              help="Capture filter (libpcap syntax).")
@click.option("--snaplen", type=int, default=0, help="Snap length (default: whole packets).")
@click.option("--keep-parts", is_flag=True, help="Keep the per-interface pcaps in OUT/.hopscope-parts.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def capture_cmd(out_dir: Path, duration: float | None, nodes: str, prefix: str, bpf: str,
                snaplen: int, keep_parts: bool, as_json: bool) -> None:
    """Capture every interface of each node into OUT/<node>.pcapng (ns timestamps).

    For `hopscope replay OUT/*.pcapng`. Runs for --duration seconds, or
    until Ctrl-C / SIGTERM; then flushes and merges.
    """
    if duration is not None and not 0 < duration < float("inf"):  # (nan too)
        raise UsageError(f"--duration {duration} is not a positive number of seconds: e.g. "
                         "--duration 10")
    inst = load_instance(prefix)
    node_list = [n.strip() for n in nodes.split(",") if n.strip()] or None
    if nodes.strip() and not node_list:
        raise UsageError(f"--nodes {nodes!r}: give node names, e.g. --nodes node1,node2 "
                         "(or leave it out: all)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out_dir}: {exc.strerror or exc}") from None

    phase = {"now": "starting", "requested": False}

    def _on_signal(signum: int, _frame: object) -> None:
        phase["requested"] = True
        if phase["now"] == "waiting":
            phase["now"] = "stopping"
            raise _Stop()
        # while starting: stop right after start; while stopping: already on it

    # Explicit handlers: a shell starts background jobs with SIGINT ignored.
    old_term = signal.signal(signal.SIGTERM, _on_signal)
    old_int = signal.signal(signal.SIGINT, _on_signal)
    session = CaptureSession(inst, out_dir, node_list, bpf=bpf, snaplen=snaplen,
                             keep_parts=keep_parts)
    try:
        session.start()
        click.echo(f"capturing {', '.join(session.nodes)} into {out_dir}"
                   + (f" for {duration:g} s" if duration else "; Ctrl-C to stop"), err=True)
        try:
            phase["now"] = "waiting"
            if not phase["requested"]:
                if duration:
                    time.sleep(duration)
                else:
                    while True:
                        time.sleep(3600)
        except _Stop:
            pass
        phase["now"] = "stopping"
        click.echo("stopping: flushing and merging", err=True)
        result = session.stop()
    except BaseException:
        phase["now"] = "stopping"
        if not session._stopped:
            session.abort()
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    for r in result.nodes.values():
        total = sum(r.packets.values())
        per = ", ".join(f"{k} {v}" for k, v in r.packets.items())
        click.echo(f"{r.file}: {total} packets ({per})" + (f"; {r.dropped} dropped" if r.dropped else ""))
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
