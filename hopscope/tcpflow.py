"""Per-node TCP reassembly and HTTP/1.1 message boundaries.

A :class:`NodeTracker` takes one node's observations in time order and
turns them into :class:`Sighting` records: one per HTTP request seen on one
TCP connection at one interface, with the moments the stitcher needs (the
first copy of the request's first segment, the segment that completed its
headers, the first byte of its response) and the handshake times. It also
records connections that died (:class:`SynRecord`).

Per packet the work is a dictionary look-up and a few integer operations;
bytes are looked at only while a message's headers are being read (or a
chunked body is being framed). Memory grows with open connections: closed
ones are dropped at once, idle ones after :data:`IDLE_NS`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final

from hopscope.model import (
    KIND_DROP,
    KIND_IPVS,
    KIND_NF,
    KIND_PACKET,
    KIND_QUEUED,
    KIND_WRITE,
    NIC,
    OVERLAY,
    POD,
    UNDERLAY,
    Observation,
)

log = logging.getLogger(__name__)

M32: Final = 0xFFFFFFFF
HALF32: Final = 0x80000000
IDLE_NS: Final = 300 * 1_000_000_000
#: A request still waiting for its response after this long (node time) is handed
#: over anyway, so that it does not hold back everything after it.
SETTLE_NS: Final = 60 * 1_000_000_000
#: eBPF events wait this long (before the oldest sighting still open) for their sighting
EVENT_KEEP_NS: Final = 2 * 1_000_000_000
MAX_HEAD: Final = 64 * 1024
MAX_PENDING: Final = 512
SYNC_TRIES: Final = 8
#: segments held while a direction waits for a message's start to find its place again
SYNC_HELD: Final = 16

#: Interface names that several interfaces share in a capture (SLL v1, merged Ethernet).
SHARED_IFNAMES: Final = frozenset(("", "any"))

#: A point to be resolved by the stitcher: pod-network traffic on an
#: interface whose name does not say whether it is flannel.1 or cni0/veth.
PODNET: Final = "podnet"
SKIP: Final = "skip"

# Half-connection states
IDLE, HEAD, BODY, CHUNKED, UNTIL_CLOSE, SYNC, DEAD = range(7)

_METHODS: Final = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"PATCH ", b"OPTIONS ",
            b"CONNECT ", b"TRACE ")
_STARTS: Final = (*_METHODS, b"HTTP/1.")

_NIC_PREFIXES: Final = ("eth", "en", "eno", "ens", "enp", "bond", "wl", "wan")
_OVERLAY_PREFIXES: Final = ("flannel", "vxlan", "fl-")
_POD_PREFIXES: Final = ("cni", "veth", "cbr", "cali", "lxc", "tap")


def point_for_ifname(ifname: str) -> str:
    """The observation point an interface name implies, or "" when it does not say."""
    if ifname == "lo":
        return SKIP
    if ifname.startswith(_OVERLAY_PREFIXES):
        return OVERLAY
    if ifname.startswith(_POD_PREFIXES):
        return POD
    if ifname.startswith(_NIC_PREFIXES) and not ifname.startswith("if"):
        return NIC
    return ""


@dataclass
class Cidrs:
    """The cluster's pod and service networks (k3s defaults)."""

    pod: ipaddress.IPv4Network = field(default_factory=lambda: ipaddress.IPv4Network("10.42.0.0/16"))
    service: ipaddress.IPv4Network = field(default_factory=lambda: ipaddress.IPv4Network("10.43.0.0/16"))

    def in_pod(self, a: bytes) -> bool:
        return len(a) == 4 and (int.from_bytes(a, "big") & int(self.pod.netmask)) == int(
            self.pod.network_address)

    def in_service(self, a: bytes) -> bool:
        return len(a) == 4 and (int.from_bytes(a, "big") & int(self.service.netmask)) == int(
            self.service.network_address)


class Sighting:
    """One HTTP request on one connection at one interface of one node.

    Sightings cross between processes (replay's workers): they pickle as one
    flat tuple (:meth:`__reduce__`): compiled, four times faster than the
    generic path through the attributes (and a little faster interpreted).
    """

    def __init__(self, node: str, ifname: str, point: str, flow: tuple[bytes, int, bytes, int],
                 seq0: int, first: int) -> None:
        self.node = node
        self.ifname = ifname
        self.point = point
        self.flow = flow  # client -> server at this point
        self.seq0 = seq0  # sequence number of the request's first byte
        self.first = first  # first copy of the first segment
        self.complete = -1  # segment that completed the headers
        self.resp_first = -1  # first byte of the response
        self.status = 0
        self.method = ""
        self.path = ""
        self.host = ""
        self.rid = ""  # CF-Ray, else X-Request-Id, else ""
        self.flags: set[str] | None = None
        self.edge_synack = -1  # handshake, on the first request of a connection
        self.edge_ack = -1
        self.reset_ts = -1
        self.complete_end = -1  # sequence number after the segment that completed the headers
        #: eBPF: the completing segment reached the proxy's socket (``kernel`` point)
        self.kernel_ts = -1
        #: eBPF: the proxy entered the write that sent this (upstream) request
        self.proxy_ts = -1
        #: eBPF kprobe: the completing segment in netfilter's INPUT hook: entry, ns, verdict
        self.nf_ts = -1
        self.nf_ns = -1
        self.nf_verdict = ""
        #: the connection's SYN sequence number (-1: handshake not seen)
        self.isn = -1
        #: eBPF kprobe: the real server IPVS chose for this (upstream) connection, and when
        self.ipvs_endpoint = ""
        self.ipvs_ts = -1
        #: nothing will change it any more (response headers seen, or the connection ended)
        self.settled = False

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (_sighting, (
            self.node, self.ifname, self.point, self.flow, self.seq0, self.first, self.complete,
            self.resp_first, self.status, self.method, self.path, self.host, self.rid, self.flags,
            self.edge_synack, self.edge_ack, self.reset_ts, self.complete_end, self.kernel_ts,
            self.proxy_ts, self.nf_ts, self.nf_ns, self.nf_verdict, self.isn, self.ipvs_endpoint,
            self.ipvs_ts, self.settled))

    def flag(self, f: str) -> None:
        if self.flags is None:
            self.flags = {f}
        else:
            self.flags.add(f)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return (f"Sighting({self.node}/{self.ifname}/{self.point} {self.method} {self.path} "
                f"rid={self.rid} first={self.first} complete={self.complete} "
                f"resp={self.resp_first} status={self.status})")


def _sighting(node: str, ifname: str, point: str, flow: tuple[bytes, int, bytes, int], seq0: int,
              first: int, complete: int, resp_first: int, status: int, method: str, path: str,
              host: str, rid: str, flags: set[str] | None, edge_synack: int, edge_ack: int,
              reset_ts: int, complete_end: int, kernel_ts: int, proxy_ts: int, nf_ts: int,
              nf_ns: int, nf_verdict: str, isn: int, ipvs_endpoint: str, ipvs_ts: int,
              settled: bool) -> Sighting:
    """A :class:`Sighting` from its pickled state (:meth:`Sighting.__reduce__`)."""
    s = Sighting(node, ifname, point, flow, seq0, first)
    s.complete = complete
    s.resp_first = resp_first
    s.status = status
    s.method = method
    s.path = path
    s.host = host
    s.rid = rid
    s.flags = flags
    s.edge_synack = edge_synack
    s.edge_ack = edge_ack
    s.reset_ts = reset_ts
    s.complete_end = complete_end
    s.kernel_ts = kernel_ts
    s.proxy_ts = proxy_ts
    s.nf_ts = nf_ts
    s.nf_ns = nf_ns
    s.nf_verdict = nf_verdict
    s.isn = isn
    s.ipvs_endpoint = ipvs_endpoint
    s.ipvs_ts = ipvs_ts
    s.settled = settled
    return s


@dataclass
class SynRecord:
    """A connection attempt that was never answered (or answered with a reset)."""

    node: str
    ifname: str
    point: str
    flow: tuple[bytes, int, bytes, int]
    isn: int
    first: int
    packets: int
    refused: bool


@dataclass
class TrackerState:
    """What a :class:`NodeTracker` found, to be merged into another (see :meth:`NodeTracker.absorb`)."""

    sightings: list[Sighting]
    syns: list[SynRecord]
    handshakes: dict[tuple[object, ...], list[tuple[str, str, int]]]
    packets: int
    passed_over: int
    last_ts: int  # the tracker's watermark: it has seen everything up to here
    #: eBPF drop events: (ts, point, flow as sent, reason)
    kdrops: list[tuple[int, str, tuple[bytes, int, bytes, int], str]] = field(
        default_factory=list)


class _Half:
    """One direction of a connection at one interface."""

    __slots__ = ("body_left", "buf", "chunk", "client", "cut", "dup", "fin", "head_end",
                 "head_ts", "hole", "msg", "nxt", "pending", "state", "tries")

    def __init__(self) -> None:
        self.nxt = -1  # next expected sequence number, -1 until known
        self.state = IDLE
        self.buf = b""
        self.body_left = 0
        self.chunk: _Chunked | None = None
        self.msg: Sighting | None = None  # the message being read (requests) or answered
        self.pending: dict[int, tuple[int, int, bytes, int]] | None = None
        self.client = -1  # 1 client side, 0 server side, -1 unknown
        self.dup: deque[tuple[int, int]] = deque(maxlen=32)  # (seq, ip id) recently seen
        self.fin = False
        self.tries = 0
        #: the head in ``buf`` misses bytes the source did not keep: the next bytes go on
        #: from an unknown place in it (a blank line is not looked for across the join)
        self.hole = False
        #: the head being read lost bytes (the source's cut, a capture's gap): what it says
        #: of its body's length may have been among them
        self.cut = False
        #: a head not yet ended: when its first segment, or the latest one the source cut
        #: short, was seen (where it ended, if its blank line was among the bytes left out)
        self.head_ts = -1
        self.head_end = -1  # the sequence number after that segment


class _Chunked:
    """An incremental parser of the chunked transfer coding (framing only)."""

    __slots__ = ("left", "line", "trailer")

    def __init__(self) -> None:
        self.left = 0  # data bytes (plus CRLF) left in the current chunk
        self.line = b""
        self.trailer = False

    def feed(self, data: bytes) -> int:
        """Consume bytes; return -1 while the body goes on, else the bytes used when it ends."""
        i = 0
        n = len(data)
        while i < n:
            if self.left:
                take = min(self.left, n - i)
                self.left -= take
                i += take
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self.line += data[i:]
                if len(self.line) > 4096:
                    raise ValueError("chunk size line too long")
                return -1
            line = (self.line + data[i:j]).strip()
            self.line = b""
            i = j + 1
            if self.trailer:
                if not line:
                    return i
                continue
            size = int(line.split(b";", 1)[0] or b"0", 16)
            if size == 0:
                self.trailer = True
            else:
                self.left = size + 2
        return -1


class _Stream:
    """A TCP connection at one interface of one node."""

    __slots__ = ("flow", "halves", "hs_ack", "ifname", "isn", "keys", "last", "nreq", "point",
                 "refused", "sparse", "syn_count", "syn_first", "synack", "unanswered")

    def __init__(self, ifname: str, point: str) -> None:
        self.ifname = ifname
        #: a live source that sends only the segments that matter (message starts,
        #: control): a segment ahead that starts a message means skipped bytes
        self.sparse = False
        self.point = point
        self.halves = (_Half(), _Half())
        self.keys: tuple[tuple[object, ...], tuple[object, ...]] | None = None
        self.flow: tuple[bytes, int, bytes, int] | None = None  # client -> server
        self.syn_first = -1
        self.syn_count = 0
        self.isn = 0
        self.synack = -1
        self.hs_ack = -1
        self.refused = False
        self.unanswered: deque[Sighting] = deque()
        self.nreq = 0
        self.last = 0


class NodeTracker:
    """Turn one node's observations (in time order) into request sightings."""

    def __init__(self, node: str, cidrs: Cidrs | None = None,
                 entry_ports: Iterable[int] | None = None) -> None:
        self.node = node
        self.cidrs = cidrs or Cidrs()
        #: at the public NIC only connections from or to these ports make sightings (None:
        #: every port): the node's other TCP there (an agent's batches to its collector hold
        #: request heads) would make requests that are never answered, each holding the
        #: watermark back for SETTLE_NS
        self.entry_ports: frozenset[int] | None = (
            frozenset(entry_ports) if entry_ports is not None else None)
        self.sightings: list[Sighting] = []
        self.syns: list[SynRecord] = []
        self._streams: dict[tuple[object, ...], tuple[_Stream, int]] = {}
        self._ifpoint: dict[str, str] = {}
        self._copies: dict[tuple[object, ...], int] = {}
        self._copies_old: dict[tuple[object, ...], int] = {}
        self._dmx_flows: dict[tuple[object, ...], list[int]] = {}
        self.packets = 0
        self.passed_over = 0
        self._taken_packets = 0
        self._taken_passed = 0
        self._siblings: dict[tuple[object, ...], list[Sighting]] = {}
        self.last_ts = 0
        self._next_sweep = 0
        #: handshake packets of pod-network connections, for clock offsets:
        #: (client->server flow, "syn" | "synack") -> [(point, ifname, first ts), ...]
        self.handshakes: dict[tuple[object, ...], list[tuple[str, str, int]]] = {}
        # eBPF events, joined to sightings when they are handed over
        self._queued: dict[tuple[bytes, int, bytes, int], list[tuple[int, int, int]]] = {}
        self._writes: dict[tuple[object, ...], int] = {}
        #: kprobes: flow -> [(seq, plen, entry ts, ns, verdict)]; SYN seq -> (server, ts)
        self._nf: dict[tuple[bytes, int, bytes, int], list[tuple[int, int, int, int, str]]] = {}
        self._ipvs: dict[int, tuple[str, int]] = {}
        self._ev_order: deque[tuple[int, int, object]] = deque()  # (ts, which, key) to expire
        self._kdrops: list[tuple[int, str, tuple[bytes, int, bytes, int], str]] = []

    # -- the hot path --------------------------------------------------------
    def feed(self, batch: Iterable[Observation]) -> None:
        streams = self._streams
        npk = 0
        ts = self.last_ts
        for ob in batch:
            (ts, _m, _n, ifname, _point, _d, kind, _p, src, dst, sport, dport, seq, _a, flags, plen,
             ipid, payload, vni, _os, _od) = ob
            if kind != KIND_PACKET:
                self._event(ob)  # a socket, proxy or drop event: not a packet
                continue
            npk += 1
            if ifname in SHARED_IFNAMES and vni < 0:
                ifname = self._demux(ob)
            e = streams.get((ifname, vni, src, sport, dst, dport))
            if e is None:
                if not (plen or flags & 0x02) or flags & 0x04:
                    self.passed_over += 1
                    continue
                e = self._new_stream(ob, ifname)
                if e is None:
                    self.passed_over += 1
                    continue
            st, d = e
            st.last = ts
            if flags & 0x07:  # SYN, FIN or RST
                if self._control(st, d, ts, seq, flags):
                    continue
            if not plen:
                if st.synack >= 0 and st.hs_ack < 0 and st.halves[d].client == 1:
                    st.hs_ack = ts
                continue
            h = st.halves[d]
            if seq == h.nxt and not h.pending:
                state = h.state
                if state == BODY and plen < h.body_left:
                    # the fast path: in-order body bytes of a Content-Length message
                    h.body_left -= plen
                    h.nxt = (seq + plen) & M32
                    h.dup.append((seq, ipid))
                    continue
                if state == IDLE or state == HEAD:
                    # in order: straight to the message state machine
                    h.dup.append((seq, ipid))
                    self._consume(st, d, h, ts, seq, payload, plen)
                    h.nxt = (seq + plen) & M32
                    continue
            if h.state != DEAD:
                self._data(st, d, h, ts, seq, plen, ipid, payload)
        self.packets += npk
        self.last_ts = ts
        if ts >= self._next_sweep:
            self._sweep(ts)

    # -- eBPF events -------------------------------------------------------------
    def _event(self, ob: Observation) -> None:
        """A socket, proxy or drop event (see :mod:`hopscope.model`)."""
        kind = ob.kind
        ts = ob.ts_real_ns
        if kind == KIND_QUEUED:
            flow = (ob.src, ob.sport, ob.dst, ob.dport)
            lst = self._queued.get(flow)
            if lst is None:
                lst = self._queued[flow] = []
            lst.append((ob.seq, ob.plen, ts))
            self._ev_order.append((ts, 0, flow))
        elif kind == KIND_WRITE:
            key = (ob.src, ob.sport, ob.dst, ob.dport, ob.seq)
            if key not in self._writes:
                self._writes[key] = ts
                self._ev_order.append((ts, 1, key))
        elif kind == KIND_DROP:
            self._kdrops.append((ts, ob.point, (ob.src, ob.sport, ob.dst, ob.dport),
                                 ob.payload.decode("ascii", "replace")))
        elif kind == KIND_NF:
            flow = (ob.src, ob.sport, ob.dst, ob.dport)
            nl = self._nf.get(flow)
            if nl is None:
                nl = self._nf[flow] = []
            nl.append((ob.seq, ob.plen, ts, ob.ack, ob.payload.decode("ascii", "replace")))
            self._ev_order.append((ts, 2, flow))
        elif kind == KIND_IPVS:
            self._ipvs[ob.seq] = (ob.payload.decode("ascii", "replace"), ts)
            self._ev_order.append((ts, 3, ob.seq))
        # other kinds (socket states) are counted by their source, not stitched

    def _join_events(self, s: Sighting) -> None:
        if s.point == NIC:
            lst = self._queued.get(s.flow) if s.complete_end >= 0 else None
            if lst:
                last = (s.complete_end - 1) & M32
                best = -1
                for seq, plen, ts in lst:
                    if ((last - seq) & M32) < plen and (best < 0 or ts < best):
                        best = ts
                s.kernel_ts = best
            nl = self._nf.get(s.flow) if s.complete_end >= 0 else None
            if nl:
                last = (s.complete_end - 1) & M32
                for seq, plen, ts, ns, verdict in nl:
                    if ((last - seq) & M32) < plen and (s.nf_ts < 0 or ts < s.nf_ts):
                        s.nf_ts, s.nf_ns, s.nf_verdict = ts, ns, verdict
        else:
            f = s.flow
            s.proxy_ts = self._writes.get((f[0], f[1], f[2], f[3], s.seq0), -1)
            if s.isn >= 0 and s.isn in self._ipvs:
                s.ipvs_endpoint, s.ipvs_ts = self._ipvs[s.isn]

    def _expire_events(self, before: int) -> None:
        order = self._ev_order
        while order and order[0][0] < before:
            _ts, which, key = order.popleft()
            if which == 1:
                self._writes.pop(key, None)  # type: ignore[call-overload]
            elif which == 3:
                self._ipvs.pop(key, None)  # type: ignore[call-overload]
            elif which == 2:
                nl = self._nf.get(key)  # type: ignore[call-overload]
                if nl is not None:
                    del nl[0]
                    if not nl:
                        del self._nf[key]  # type: ignore[arg-type]
            else:
                lst = self._queued.get(key)  # type: ignore[call-overload]
                if lst is not None:
                    del lst[0]
                    if not lst:
                        del self._queued[key]  # type: ignore[arg-type]

    def _demux(self, ob: Observation) -> str:
        """Tell apart the copies of one packet on interfaces a capture does not name.

        Linux cooked v1 (``tcpdump -i any``) and Ethernet captures merged
        from several interfaces give every copy the same (empty) name. The
        n-th copy of a pod-network packet (same addresses, ports, sequence
        number and IP id) was seen at the n-th interface on its way, so it
        goes to a virtual interface ``<name>#<n>``.
        """
        c = self.cidrs
        if not (c.in_pod(ob.src) or c.in_pod(ob.dst)):
            return ob.ifname
        # Number copies in path order: the first direction seen of a flow (its
        # SYN, towards the pod) meets the interfaces in one order, the other
        # direction in the reverse order.
        fwd_key = (ob.src, ob.sport, ob.dst, ob.dport)
        ncopies = self._dmx_flows.get(fwd_key)
        forward = True
        if ncopies is None:
            ncopies = self._dmx_flows.get((ob.dst, ob.dport, ob.src, ob.sport))
            if ncopies is None:
                if len(self._dmx_flows) > 65536:
                    self._dmx_flows.clear()
                ncopies = self._dmx_flows[fwd_key] = [0]
            else:
                forward = False
        k = (fwd_key, ob.seq, ob.ip_id, ob.flags, ob.plen)
        n = (self._copies.get(k) or self._copies_old.get(k, 0)) + 1
        self._copies[k] = n
        if len(self._copies) > 65536:  # keep two generations: copies are close in time
            self._copies_old = self._copies
            self._copies = {}
        if forward:
            if n > ncopies[0]:
                ncopies[0] = n
        elif n <= ncopies[0]:
            n = ncopies[0] + 1 - n
        return f"{ob.ifname}#{n}"

    # -- streams ---------------------------------------------------------------
    def _new_stream(self, ob: Observation, ifname: str) -> tuple[_Stream, int] | None:
        point = ob.point
        if not point:
            if ob.vni >= 0:
                point = UNDERLAY
            else:
                point = self._ifpoint.get(ifname, "?")
                if point == "?":
                    point = self._ifpoint[ifname] = point_for_ifname(ifname)
                if not point:  # unnamed interface: decide by content
                    c = self.cidrs
                    if c.in_service(ob.dst) or c.in_service(ob.src):
                        point = SKIP  # pre-DNAT copies (lo): not a point of the model
                    elif c.in_pod(ob.src) or c.in_pod(ob.dst):
                        point = PODNET
                    else:
                        point = NIC
        if point == SKIP:
            return None
        ports = self.entry_ports
        if point == NIC and ports is not None and ob.sport not in ports \
                and ob.dport not in ports:
            return None
        st = _Stream(ifname, point)
        st.sparse = ob.ts_mono_ns >= 0
        k1 = (ifname, ob.vni, ob.src, ob.sport, ob.dst, ob.dport)
        k2 = (ifname, ob.vni, ob.dst, ob.dport, ob.src, ob.sport)
        st.keys = (k1, k2)
        e = (st, 0)
        self._streams[k1] = e
        self._streams[k2] = (st, 1)
        return e

    def _close(self, st: _Stream) -> None:
        if st.keys is not None:
            for k in st.keys:
                self._streams.pop(k, None)
            st.keys = None
        for d in (0, 1):
            h = st.halves[d]
            if h.client == 1 and h.msg is not None:
                # a request's head cut short on a connection that ends had ended (at cni0
                # with br_netfilter, whose answer crosses on another 4-tuple; an answer's
                # status came with its first segment)
                self._end_cut_head(st, d, h, h.msg)
        for s in st.unanswered:
            s.settled = True
        if st.syn_count and st.synack < 0 and st.flow is not None:
            self.syns.append(SynRecord(self.node, st.ifname, st.point, st.flow, st.isn,
                                       st.syn_first, st.syn_count, st.refused))

    def _sweep(self, now: int) -> None:
        """Forget connections idle for IDLE_NS (their sightings stay)."""
        self._next_sweep = now + IDLE_NS // 4
        stale = {id(st): st for st, _ in self._streams.values() if now - st.last > IDLE_NS}
        for st in stale.values():
            self._close(st)

    def flush(self) -> None:
        """End of input: close every connection (records unanswered SYNs)."""
        for st in list({id(st): st for st, _ in self._streams.values()}.values()):
            self._close(st)

    def _settle_siblings(self, s: Sighting) -> None:
        """The request's copies at the other interfaces of its point (cni0 and the veth)
        are done too: with br_netfilter the response crosses cni0 un-NATed, on
        another 4-tuple, and would never settle them."""
        for sib in self._siblings.pop((s.flow, s.seq0, s.point), ()):
            sib.settled = True

    def take(self, final: bool = False) -> TrackerState:
        """Hand over what is settled: sightings that will not change, finished
        connection attempts, handshakes, and the counts since the last take.

        The returned ``last_ts`` is a watermark: every sighting that starts
        before it has been handed over, now or earlier (a request still waiting
        for its response holds the watermark back, for :data:`SETTLE_NS` at
        most). With ``final`` every connection is closed first, and
        everything goes.
        """
        if final:
            self.flush()
        keep: list[Sighting] = []
        done: list[Sighting] = []
        low = self.last_ts
        old = self.last_ts - SETTLE_NS
        events = bool(self._queued or self._writes or self._nf or self._ipvs)
        for s in self.sightings:
            if s.settled or final or s.first < old:
                s.settled = True
                if events:
                    self._join_events(s)
                done.append(s)
            else:
                keep.append(s)
                if s.first < low:
                    low = s.first
        if final or not keep:
            self._siblings.clear()
        elif len(self._siblings) > 4 * len(keep) + 1024:
            self._siblings = {k: v for k, v in self._siblings.items()
                              if any(not x.settled for x in v)}
        self.sightings = keep
        if self._ev_order:
            self._expire_events(low - EVENT_KEEP_NS if not final else 1 << 62)
        kdrops, self._kdrops = self._kdrops, []
        state = TrackerState(done, self.syns, self.handshakes,
                             self.packets - self._taken_packets,
                             self.passed_over - self._taken_passed, low, kdrops)
        self.syns = []
        self.handshakes = {}
        self._taken_packets = self.packets
        self._taken_passed = self.passed_over
        return state

    # -- SYN / FIN / RST -------------------------------------------------------
    def _control(self, st: _Stream, d: int, ts: int, seq: int, flags: int) -> bool:
        """Handle the control flags; True when the packet needs no further work."""
        h = st.halves[d]
        if flags & 0x02:  # SYN
            if flags & 0x10:  # SYN-ACK: this side is the server
                h.client = 0
                st.halves[1 - d].client = 1
                if st.flow is None:
                    st.flow = _flow_of(st, 1 - d)
                if st.synack < 0:
                    st.synack = ts
                    if st.point != NIC:
                        self._handshake(st, "synack", ts)
                h.nxt = (seq + 1) & M32
            else:
                h.client = 1
                st.halves[1 - d].client = 0
                if st.syn_count == 0 or seq != st.isn:
                    if st.syn_count and seq != st.isn:  # a new connection on a reused 4-tuple
                        st.syn_count = 0
                        st.synack = -1
                        st.hs_ack = -1
                        st.nreq = 0
                        for hh in st.halves:
                            hh.nxt = -1
                            hh.state = IDLE
                            hh.buf = b""
                    st.syn_first = ts
                    st.isn = seq
                    st.flow = _flow_of(st, d)
                    if st.point != NIC:
                        self._handshake(st, "syn", ts)
                st.syn_count += 1
                h.nxt = (seq + 1) & M32
            return True
        if flags & 0x04:  # RST
            if st.synack < 0 and st.syn_count and h.client == 0:
                st.refused = True
            for s in st.unanswered:
                if s.reset_ts < 0:
                    s.reset_ts = ts
            self._close(st)
            return True
        # FIN: the data it may carry is handled by the caller; the FIN ends the
        # message of a response delimited by the connection's close.
        h.fin = True
        if h.state == UNTIL_CLOSE:
            h.state = IDLE
        if st.halves[1 - d].fin:
            self._close(st)
        return False

    def _handshake(self, st: _Stream, kind: str, ts: int) -> None:
        lst = self.handshakes.get((st.flow, kind))
        if lst is None:
            lst = self.handshakes[(st.flow, kind)] = []
        lst.append((st.point, st.ifname, ts))

    # -- payload -------------------------------------------------------------
    def _data(self, st: _Stream, d: int, h: _Half, ts: int, seq: int, plen: int, ipid: int,
              payload: bytes) -> None:
        if h.nxt < 0 or h.state == SYNC:
            # No handshake seen (capture started mid-connection) or lost sync:
            # wait for a segment that starts a message.
            if payload.startswith(_METHODS):
                if h.client < 0:
                    h.client = 1
                    st.halves[1 - d].client = 0
            elif payload.startswith(b"HTTP/1."):
                if h.client < 0:
                    h.client = 0
                    st.halves[1 - d].client = 1
            else:
                h.tries += 1
                if h.tries > SYNC_TRIES and st.nreq == 0:
                    h.state = DEAD
                elif h.nxt >= 0:
                    # held, a few: the next message's start may come after its own next
                    # segments (reordered), which then continue it
                    if h.pending is None or len(h.pending) >= SYNC_HELD:
                        h.pending = {}
                    h.pending[seq] = (ts, plen, payload, ipid)
                return
            if st.flow is None:
                st.flow = _flow_of(st, d if h.client == 1 else 1 - d)
            h.nxt = seq
            h.state = IDLE
            h.buf = b""
            if h.pending:
                # of the segments held, those after this start continue it
                h.pending = {k: v for k, v in h.pending.items()
                             if 0 < (k - seq) & M32 < HALF32} or None
        diff = (seq - h.nxt) & M32
        if diff == 0:
            h.dup.append((seq, ipid))
            self._consume(st, d, h, ts, seq, payload, plen)
            h.nxt = (seq + plen) & M32
            if h.pending:
                # this segment fills a hole: later bytes had arrived first
                if st.unanswered:
                    st.unanswered[-1 if h.client == 1 else 0].flag("out_of_order")
                self._drain(st, d, h, ts)
            return
        if diff >= HALF32:  # behind: a retransmission or a second copy
            back = (h.nxt - seq) & M32
            if (seq, ipid) in h.dup and ipid >= 0:
                return  # the same packet again (another copy): not a retransmission
            self._flag_retransmit(st, d, h)
            if back >= plen:
                return
            # partly new: keep the new tail
            payload = payload[back:]
            seq = h.nxt
            plen -= back
            h.dup.append((seq, ipid))
            self._consume(st, d, h, ts, seq, payload, plen)
            h.nxt = (seq + plen) & M32
            if h.pending:
                self._drain(st, d, h, ts)
            return
        # ahead: out of order (or a segment this capture missed)
        if st.sparse and payload.startswith(_STARTS):
            # a live source left out the bytes in between (a body): not a loss
            if h.state == HEAD and h.msg is not None:
                # a head cut short (its blank line among the bytes left out) had ended
                h.msg.flag("truncated")
                self._end_cut_head(st, d, h, h.msg)
            h.state = IDLE
            h.buf = b""
            h.nxt = seq
            h.pending = None
            self._consume(st, d, h, ts, seq, payload, plen)
            h.nxt = (seq + plen) & M32
            return
        if h.pending is None:
            h.pending = {}
        if seq not in h.pending:
            h.pending[seq] = (ts, plen, payload, ipid)
        if len(h.pending) > MAX_PENDING:
            self._skip_gap(st, d, h)

    def _drain(self, st: _Stream, d: int, h: _Half, fill_ts: int) -> None:
        pend = h.pending
        assert pend is not None
        while pend:
            item = pend.pop(h.nxt, None)
            if item is None:
                # drop what is now entirely old
                for s in [s for s in pend if (s - h.nxt) & M32 >= HALF32]:
                    ts, plen, payload, ipid = pend.pop(s)
                    back = (h.nxt - s) & M32
                    if back < plen:
                        pend[h.nxt] = (ts, plen - back, payload[back:], ipid)
                if h.nxt not in pend:
                    return
                continue
            ts, plen, payload, ipid = item
            seq = h.nxt
            h.dup.append((seq, ipid))
            self._consume(st, d, h, ts, seq, payload, plen, fill_ts)
            h.nxt = (seq + plen) & M32

    def _skip_gap(self, st: _Stream, d: int, h: _Half) -> None:
        """The capture lost a segment for good: skip to the earliest held one."""
        pend = h.pending
        assert pend is not None
        nxt = min(pend, key=lambda s: (s - h.nxt) & M32)
        gap = (nxt - h.nxt) & M32
        log.debug("%s/%s: skipping a %d-byte gap", self.node, st.ifname, gap)
        if h.state == BODY and gap < h.body_left:
            h.body_left -= gap
        elif h.state != HEAD:
            h.state = SYNC
        # in a head, read on past the hole: the message keeps its first line (and what
        # headers survive), flagged, rather than vanishing without a request or a drop
        m = h.msg if h.client == 1 else (st.unanswered[0] if st.unanswered else None)
        if m is not None:
            m.flag("capture_gap")
        if h.state == HEAD:
            h.cut = True
        h.nxt = nxt
        ts = pend[nxt][0]
        if h.state == SYNC:
            ts, plen, payload, ipid = pend.pop(nxt)
            self._data(st, d, h, ts, nxt, plen, ipid, payload)
        self._drain(st, d, h, ts)

    def _flag_retransmit(self, st: _Stream, d: int, h: _Half) -> None:
        if h.client == 1:
            m = h.msg if h.msg is not None else (st.unanswered[-1] if st.unanswered else None)
        else:
            m = h.msg
        if m is not None:
            m.flag("retransmit")

    def _consume(self, st: _Stream, d: int, h: _Half, ts: int, seq: int, data: bytes,
                 plen: int, done_ts: int = -1) -> None:
        """Advance the message state machine over ``plen`` in-order bytes.

        ``ts`` is when this segment was seen (a message starting in it starts
        then); ``done_ts`` is when its bytes became contiguous (a segment
        held out of order completes headers only when the hole is filled).
        """
        if done_ts < ts:
            done_ts = ts
        pos = 0
        short = plen - len(data)  # bytes the capture did not keep (snap length)
        while pos < plen:
            state = h.state
            if state == IDLE:
                self._start(st, d, h, ts, (seq + pos) & M32, data, pos)
                state = h.state
                if state == DEAD or state == SYNC:
                    return
            if state == HEAD:
                if not h.buf:
                    # the headers start in this segment: look for their end in place
                    i = data.find(b"\r\n\r\n", pos)
                    if i >= 0:
                        self._headers(st, d, h, done_ts, data[pos : i + 4], (seq + plen) & M32)
                        pos = i + 4
                        continue
                m = h.msg
                if pos == 0 and (h.buf or h.hole) and m is not None and m.flags is not None \
                        and data.startswith(_METHODS if h.client == 1 else b"HTTP/1."):
                    # a head cut short, then a segment that starts the next message: the
                    # cut head's blank line was among the bytes left out (seen where the
                    # response that would have ended it is not: a request's copy at cni0)
                    self._end_cut_head(st, d, h, m)
                    if h.state == IDLE:
                        continue
                old = len(h.buf)
                # after bytes left out (the buffer ends with a whole line): a line end that
                # starts these bytes ends a line not seen, and is no blank line
                skip = 2 if h.hole and data.startswith(b"\r\n", pos) else 0
                h.buf += data[pos + skip :]
                i = h.buf.find(b"\r\n\r\n", old if h.hole else max(0, old - 3))
                h.hole = False
                if i < 0:
                    if short > 0 or old == 0:
                        h.head_ts = done_ts
                        h.head_end = (seq + plen) & M32
                    if short > 0:
                        # the source kept only the first bytes of a segment in the head (a
                        # snap length; a live source's 2,047 bytes a segment): read on past
                        # the rest, as past a capture's gap, with the complete lines only (a
                        # line cut short could hold a wrong CF-Ray), flagged
                        h.buf = _whole_lines(h.buf)
                        h.cut = True
                        if m is not None:
                            m.flag("truncated")
                        h.hole = True
                    elif len(h.buf) > MAX_HEAD:
                        h.state = DEAD
                    if h.client == 0 and m is not None and m.status == 0:
                        # an answer's head that goes on past its first segment: its status
                        # is known now (its line came whole), should the rest come late or
                        # not at all (bytes a live source left out, a connection that idles
                        # on past the settling time)
                        j = h.buf.find(b"\r\n")
                        if j > 0:
                            m.status = _parse_head(h.buf[: j + 2] + b"\r\n")[3]
                    return
                used = i + 4 - old + skip
                self._headers(st, d, h, done_ts, h.buf[: i + 4], (seq + plen) & M32)
                h.buf = b""
                pos += used
                continue
            if state == BODY:
                take = min(h.body_left, plen - pos)
                h.body_left -= take
                pos += take
                if h.body_left == 0:
                    h.state = IDLE
                continue
            if state == CHUNKED:
                ch = h.chunk
                assert ch is not None
                if pos >= len(data):
                    # bytes the capture did not keep: count them blindly
                    if ch.left:
                        ch.left = max(0, ch.left - (plen - pos))
                        return
                    h.state = SYNC
                    return
                try:
                    used = ch.feed(data[pos:])
                except ValueError:
                    h.state = SYNC
                    return
                if used < 0:
                    if short > 0:
                        # the bytes the capture did not keep: counted blindly in a chunk's
                        # data, else (a size line cut) the framing is lost
                        if ch.left >= short:
                            ch.left -= short
                        else:
                            h.state = SYNC
                    return
                pos += used
                h.chunk = None
                h.state = IDLE
                continue
            if state == UNTIL_CLOSE:
                return
            return

    def _start(self, st: _Stream, d: int, h: _Half, ts: int, seq: int, data: bytes,
               pos: int) -> None:
        """A message starts with this segment, at ``data[pos:]``."""
        kept = pos < len(data)  # False when the snap length cut it
        if not kept and st.sparse:
            # a live source sends a message's start with its bytes: these it cut, a body's
            h.state = IDLE
            return
        if h.client < 0:
            if data.startswith(_METHODS, pos):
                h.client = 1
                st.halves[1 - d].client = 0
            elif data.startswith(b"HTTP/1.", pos):
                h.client = 0
                st.halves[1 - d].client = 1
            else:
                h.state = DEAD
                return
        if st.flow is None:
            st.flow = _flow_of(st, d if h.client == 1 else 1 - d)
        if h.client == 1:
            if kept and not data.startswith(_METHODS, pos):
                if st.nreq:
                    h.state = SYNC
                else:  # not HTTP: pass the whole connection over
                    h.state = st.halves[1 - d].state = DEAD
                return
            s = Sighting(self.node, st.ifname, st.point, st.flow, seq, ts)
            if st.syn_count:
                s.isn = st.isn
            if st.synack >= 0:
                if st.hs_ack < 0:
                    st.hs_ack = ts  # the handshake's ACK carried the request
                if st.nreq == 0:
                    s.edge_synack = st.synack
                    s.edge_ack = st.hs_ack
            st.nreq += 1
            h.msg = s
            st.unanswered.append(s)
            self.sightings.append(s)
            if st.point == POD or st.point == PODNET:
                self._siblings.setdefault((st.flow, seq, st.point), []).append(s)
        else:
            if kept and not data.startswith(b"HTTP/", pos):
                h.state = SYNC
                return
            # the response answers the oldest unanswered request
            m = h.msg = st.unanswered[0] if st.unanswered else None
            if m is not None:
                # a request whose head is still open has ended: a server answers once it
                # has read the head; what ended it was left out (a live source that met
                # its segments out of order follows none of them) or not captured
                hc = st.halves[1 - d]
                if hc.state == HEAD and hc.msg is m:
                    if not hc.cut:
                        m.flag("truncated" if st.sparse else "capture_gap")
                    self._end_cut_head(st, 1 - d, hc, m)
                if m.resp_first < 0:
                    m.resp_first = ts
        h.state = HEAD
        h.buf = b""
        h.hole = False
        h.cut = False

    def _end_cut_head(self, st: _Stream, d: int, h: _Half, m: Sighting) -> None:
        """End the head ``h`` reads for ``m`` if the source cut bytes from it.

        Called when something later shows that the head has ended, its blank line among
        the bytes left out (a snap length, a live source's 2,047 bytes of a segment, a
        capture's gap): the response to a request, the next message on the same side, the
        connection's end. It ended in its first segment or the latest one the source cut
        short (a head longer than that in one GRO or GSO segment ends in it); it says what
        its whole lines say, and no line cut short.
        """
        if h.state != HEAD or h.msg is not m or m.flags is None or (
                "truncated" not in m.flags and "capture_gap" not in m.flags):
            return
        head = _whole_lines(h.buf)
        head += b"\r\n" if head.endswith(b"\r\n") else b"\r\n\r\n"
        self._headers(st, d, h, h.head_ts, head, h.head_end)
        # where its body ends is not known (some of it may be in the buffer): the next
        # message is found by its start
        h.state = IDLE
        h.chunk = None
        h.body_left = 0

    def _headers(self, st: _Stream, d: int, h: _Half, ts: int, head: bytes, end: int) -> None:
        """The message's headers are complete (in the segment seen at ``ts``, ending at ``end``)."""
        _is_req, chunked, clen, status, method, path, host, rid = _parse_head(head)
        m = h.msg
        if h.client == 1:
            if m is not None:
                m.complete = ts
                m.complete_end = end
                m.method = method
                m.path = path
                m.host = host
                m.rid = rid
            h.msg = None
            self._body(h, chunked, clen)
            return
        # a response
        if 100 <= status < 200 and status != 101:
            # interim (100 Continue): the real response is still to come
            if m is not None:
                m.resp_first = -1
            h.state = IDLE
            return
        req_method = ""
        if st.unanswered:
            done = st.unanswered.popleft()
            done.status = status
            done.settled = True
            if st.point == POD or st.point == PODNET:
                self._settle_siblings(done)
            req_method = done.method
        h.msg = None
        if req_method == "HEAD" or status in (204, 304) or status == 101:
            h.state = IDLE if status != 101 else DEAD
            return
        if not chunked and clen < 0:
            # delimited by the connection's close; or, when the head lost lines, its
            # length unknown: the next message is found by its start
            h.state = IDLE if h.cut else UNTIL_CLOSE
            return
        self._body(h, chunked, clen)

    @staticmethod
    def _body(h: _Half, chunked: bool, clen: int) -> None:
        if chunked:
            h.chunk = _Chunked()
            h.state = CHUNKED
        elif clen > 0:
            h.body_left = clen
            h.state = BODY
        else:
            h.state = IDLE


_CONTENT_LENGTH: Final = b"content-length"
_TRANSFER_ENCODING: Final = b"transfer-encoding"
_HOST: Final = b"host"
_CF_RAY: Final = b"cf-ray"
_X_REQUEST_ID: Final = b"x-request-id"


def _whole_lines(buf: bytes) -> bytes:
    """``buf`` up to its last line end (all of it when it has none: a first line cut)."""
    j = buf.rfind(b"\r\n")
    return buf[: j + 2] if j >= 0 else buf


@lru_cache(maxsize=8192)
def _parse_head(head: bytes) -> tuple[bool, bool, int, int, str, str, str, str]:
    """Parse a header block once (the same bytes cross several points).

    Returns (is_request, chunked, content_length (-1 when absent), status, method,
    path, host, request id). One pass over the lines; a line is looked at only
    when its first letter and the character after a wanted name's length could
    make it that header (compiled: about 12k instructions a head of this
    traffic, against 16k for a ``find`` per header on the lower-cased block).
    """
    lines = head.split(b"\r\n")
    first = lines[0]
    cl = te = host = cf = xr = b""
    seen = 0  # bits: 1 content-length, 2 transfer-encoding, 4 host, 8 cf-ray, 16 x-request-id
    for k in range(1, len(lines)):
        line = lines[k]
        if not line:
            break  # the blank line: the end of the head
        c = line[0] | 0x20
        if c == 99:  # c: content-length, cf-ray
            if not seen & 1:
                i = _value_at(line, _CONTENT_LENGTH)
                if i >= 0:
                    seen |= 1
                    cl = line[i:]
                    continue
            if not seen & 8:
                i = _value_at(line, _CF_RAY)
                if i >= 0:
                    seen |= 8
                    cf = line[i:].strip()
        elif c == 104:  # h
            if not seen & 4:
                i = _value_at(line, _HOST)
                if i >= 0:
                    seen |= 4
                    host = line[i:].strip()
        elif c == 116:  # t
            if not seen & 2:
                i = _value_at(line, _TRANSFER_ENCODING)
                if i >= 0:
                    seen |= 2
                    te = line[i:].lower()
        elif c == 120 and not seen & 16:  # x
            i = _value_at(line, _X_REQUEST_ID)
            if i >= 0:
                seen |= 16
                xr = line[i:].strip()
    chunked = seen & 2 != 0 and b"chunked" in te
    clen = -1
    if seen & 1 and not chunked:  # RFC 9112 6.3: Transfer-Encoding overrides Content-Length
        try:
            clen = int(cl)
        except ValueError:
            clen = 0
    if first.startswith(b"HTTP/"):
        parts = first.split(b" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            status = 0
        return False, chunked, clen, status, "", "", "", ""
    parts = first.split(b" ")
    rid = cf or xr
    return (True, chunked, max(clen, 0), 0, parts[0].decode("ascii", "replace"),
            parts[1].decode("utf-8", "replace") if len(parts) > 1 else "",
            host.decode("utf-8", "replace"), rid.decode("utf-8", "replace"))


def _value_at(line: bytes, name: bytes) -> int:
    """Where the value starts if header ``line`` is ``name`` (lower case), else -1.

    Any case; white space before the colon is tolerated, as the regular
    grammar's neighbours (proxies, Go's server) do.
    """
    n = len(name)
    if len(line) <= n:
        return -1
    c = line[n]
    if (c != 58 and c != 32 and c != 9) or line[:n].lower() != name:  # 58: ':'
        return -1
    if c == 58:
        return n + 1
    j = line.find(b":", n)
    if j < 0 or line[n:j].strip():
        return -1
    return j + 1


def _flow_of(st: _Stream, client_dir: int) -> tuple[bytes, int, bytes, int]:
    assert st.keys is not None
    k = st.keys[client_dir]
    return (k[2], k[3], k[4], k[5])  # type: ignore[return-value]


__all__ = ["PODNET", "Cidrs", "NodeTracker", "Sighting", "SynRecord", "TrackerState",
           "point_for_ifname"]
