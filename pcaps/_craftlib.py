"""Machinery for ``pcaps/craft.py``: a small, deterministic network timeline.

Nothing here is part of hopscope. It models just enough of the real path
(Cloudflare edge -> node public NIC -> Traefik on the host network -> pod IP
through Flannel VXLAN or the local ``cni0`` bridge -> pod, and back) to write
captures whose every timestamp was chosen by hand:

* :class:`End` / :class:`Conn`: one TCP connection with Linux-like behaviour
  (SYN options MSS/SACK/TS/WS, timestamps on every segment, a per-socket IPv4
  id that increments on every packet including retransmissions, SYN-ACK and
  RST with id 0, ACK numbers that only cover bytes that have *arrived* at the
  sending socket by the time it sends).
* :class:`Cluster`: nodes with their interfaces, and the paths a packet takes
  (``client_in``/``client_out`` on the public NIC, ``up_xnode``/``down_xnode``
  through flannel.1 + VXLAN on the underlay + flannel.1 + cni0 + veth,
  ``up_local``/``down_local`` through cni0 + veth).  Every copy a capture
  would hold is recorded as a :class:`Frame` on the node that saw it.
* Writers for pcapng (either byte order, any ``if_tsresol``, optional
  ``epb_flags``, optional multi-section) and classic pcap (micro- or
  nanosecond magic; Ethernet, Linux cooked v1/v2, raw IP), all with
  ``struct``.

Packets are built once with scapy (which computes the IP and TCP checksums);
copies seen after a routing step get their TTL stamped with :func:`set_ttl`.
"""

from __future__ import annotations

import socket
import struct
import zlib
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

US = 1_000
MS = 1_000_000
S = 1_000_000_000

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276

PACKET_HOST = 0
PACKET_OTHERHOST = 3
PACKET_OUTGOING = 4

SNAPLEN = 262144
VXLAN_PORT = 8472


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def set_ttl(ip: bytes, ttl: int) -> bytes:
    """The same IPv4 packet with another TTL (header checksum recomputed)."""
    if ip[8] == ttl:
        return ip
    ihl = (ip[0] & 0x0F) * 4
    h = bytearray(ip[:ihl])
    h[8] = ttl
    h[10:12] = b"\0\0"
    h[10:12] = struct.pack("!H", _csum(bytes(h)))
    return bytes(h) + ip[ihl:]


def set_ip_id(ip: bytes, ip_id: int) -> bytes:
    """The same IPv4 packet with another identification (checksum recomputed)."""
    ihl = (ip[0] & 0x0F) * 4
    h = bytearray(ip[:ihl])
    h[4:6] = struct.pack("!H", ip_id)
    h[10:12] = b"\0\0"
    h[10:12] = struct.pack("!H", _csum(bytes(h)))
    return bytes(h) + ip[ihl:]


def tcp_addrs(ip: bytes) -> tuple[str, str, int, int]:
    """(src, dst, sport, dport) of an IPv4/TCP packet, without dissecting it."""
    ihl = (ip[0] & 0x0F) * 4
    sport, dport = struct.unpack("!HH", ip[ihl : ihl + 4])
    return socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), sport, dport


def http_date(epoch_ns: int) -> str:
    return formatdate(epoch_ns // S, usegmt=True)


# ---------------------------------------------------------------------------
# TCP


@dataclass
class End:
    """One side of a TCP connection, as its kernel would behave."""

    ip: str
    port: int
    isn: int
    ip_id: int  # next IPv4 id this socket uses
    ts_off: int  # TCP timestamp clock offset (ms ticks)
    win: int  # window field after the handshake (scaled)
    syn_win: int = 64240
    mss: int = 1460
    wscale: int = 7
    ttl: int = 64  # TTL of its packets where they are first captured
    lead: int = 0  # capture time - send time (the one-way delay to the capture point)
    nxt: int = 0
    last_send: int = -(2**62)  # segments are built in the order the socket sends them


class Seg:
    """A TCP segment: its IPv4 bytes as sent (TTL ``ttl0``) and metadata."""

    __slots__ = ("ack", "arrival", "end", "flags", "ip0", "ip_id", "payload", "sender", "seq", "ts_val", "ttl0")

    def __init__(self, sender: End, ip0: bytes, seq: int, ack: int, flags: str, payload: bytes, ts_val: int, ip_id: int, ttl0: int):
        self.sender = sender
        self.ip0 = ip0
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.payload = payload
        self.ts_val = ts_val
        self.ip_id = ip_id
        self.ttl0 = ttl0
        self.end = (seq + len(payload) + (1 if ("S" in flags or "F" in flags) else 0)) & 0xFFFFFFFF
        self.arrival: int | None = None  # when the peer's socket has it (true time)

    def ip(self, ttl: int | None = None) -> bytes:
        return self.ip0 if ttl is None else set_ttl(self.ip0, ttl)


class Conn:
    """A TCP connection between ``a`` (the active opener) and ``b``."""

    def __init__(self, a: End, b: End, *, established: bool = False):
        self.a, self.b = a, b
        self.sent: dict[int, list[Seg]] = {id(a): [], id(b): []}
        a.nxt, b.nxt = a.isn, b.isn
        # A connection already open when the capture started: both sides have
        # seen each other's SYN and the last timestamp.
        self.pre = established

    def peer(self, me: End) -> End:
        return self.b if me is self.a else self.a

    def _ack_ecr(self, me: End, t_send: int) -> tuple[int | None, int]:
        peer = self.peer(me)
        arrived = [s for s in self.sent[id(peer)] if s.arrival is not None and s.arrival <= t_send]
        if self.pre:
            cur = peer.isn
            ecr = (t_send // MS + peer.ts_off - 3) & 0xFFFFFFFF
        elif any("S" in s.flags for s in arrived):
            cur = (peer.isn + 1) & 0xFFFFFFFF
            ecr = 0
        else:
            return None, 0
        for s in sorted(arrived, key=lambda s: (s.seq - peer.isn) & 0xFFFFFFFF):
            if "S" in s.flags:
                continue
            if (s.seq - peer.isn) & 0xFFFFFFFF <= (cur - peer.isn) & 0xFFFFFFFF:
                if (s.end - peer.isn) & 0xFFFFFFFF > (cur - peer.isn) & 0xFFFFFFFF:
                    cur = s.end
        if arrived:
            ecr = max(arrived, key=lambda s: s.arrival).ts_val  # type: ignore[arg-type, return-value]
        return cur, ecr

    def send(self, me: End, t: int, flags: str = "A", payload: bytes = b"", *, seq: int | None = None, ip_id: int | None = None) -> Seg:
        """``me`` sends a segment that is first captured at true time ``t``."""
        t_send = t - me.lead
        assert t_send >= me.last_send, f"{me.ip}:{me.port} sends at {t_send} after a segment sent at {me.last_send}"
        me.last_send = t_send
        if seq is None:
            seq = me.nxt
            me.nxt = (me.nxt + len(payload) + (1 if ("S" in flags or "F" in flags) else 0)) & 0xFFFFFFFF
        ack, ecr = self._ack_ecr(me, t_send)
        if "A" in flags:
            assert ack is not None, "ACK flag before the peer's SYN arrived"
        ts_val = (t_send // MS + me.ts_off) & 0xFFFFFFFF
        if "S" in flags:
            opts: list[Any] = [("MSS", me.mss), ("SAckOK", b""), ("Timestamp", (ts_val, ecr)), ("NOP", None), ("WScale", me.wscale)]
            window = me.syn_win
        else:
            opts = [("NOP", None), ("NOP", None), ("Timestamp", (ts_val, ecr))]
            window = me.win
        if ip_id is None:
            ip_id = me.ip_id
            me.ip_id = (me.ip_id + 1) & 0xFFFF
        peer = self.peer(me)
        pkt = IP(src=me.ip, dst=peer.ip, id=ip_id, flags="DF", ttl=me.ttl) / TCP(
            sport=me.port, dport=peer.port, seq=seq, ack=(ack if "A" in flags else 0), flags=flags, window=window, options=opts
        )
        if payload:
            pkt = pkt / Raw(payload)
        seg = Seg(me, bytes(pkt), seq, ack or 0, flags, payload, ts_val, ip_id, me.ttl)
        self.sent[id(me)].append(seg)
        return seg

    def syn(self, t: int) -> Seg:
        return self.send(self.a, t, "S")

    def synack(self, t: int) -> Seg:
        # Linux answers from the request socket: IPv4 id 0, DF.
        return self.send(self.b, t, "SA", ip_id=0)

    def refuse(self, t: int, syn: Seg) -> Seg:
        """``b`` has no listener: RST|ACK, seq 0, window 0, no options, id 0."""
        b = self.b
        pkt = IP(src=b.ip, dst=self.a.ip, id=0, flags="DF", ttl=b.ttl) / TCP(
            sport=b.port, dport=self.a.port, seq=0, ack=(syn.seq + 1) & 0xFFFFFFFF, flags="RA", window=0
        )
        seg = Seg(b, bytes(pkt), 0, syn.seq + 1, "RA", b"", 0, 0, b.ttl)
        self.sent[id(b)].append(seg)
        return seg

    def write(self, me: End, t0: int, data: bytes, mss_payload: int, gap: int, sizes: list[int] | None = None) -> list[tuple[int, Seg]]:
        """One write of ``data``, cut into segments ``gap`` ns apart; PSH on the last."""
        if sizes is None:
            sizes = []
            rest = len(data)
            while rest > 0:
                sizes.append(min(rest, mss_payload))
                rest -= sizes[-1]
        assert sum(sizes) == len(data), (sizes, len(data))
        out = []
        off = 0
        for i, n in enumerate(sizes):
            assert 0 < n <= mss_payload, (n, mss_payload)
            flags = "PA" if i == len(sizes) - 1 else "A"
            out.append((t0 + i * gap, self.send(me, t0 + i * gap, flags, data[off : off + n])))
            off += n
        return out


# ---------------------------------------------------------------------------
# Nodes and paths


@dataclass
class Iface:
    name: str
    index: int
    mac: bytes


@dataclass
class Pod:
    ip: str
    mac: bytes
    veth: str


@dataclass
class Frame:
    t: int  # true time, ns since the scenario's epoch base
    order: int
    ifname: str
    direction: str  # "in" / "out"
    src_mac: bytes
    dst_mac: bytes
    l3: bytes
    tag: str | None = None


@dataclass
class Node:
    name: str
    hostname: str
    public_ip: str
    pub_if: str
    pub_mac: bytes
    pub_gw_mac: bytes
    ul_if: str
    ul_ip: str
    ul_mac: bytes
    ul_gw_mac: bytes
    ul_hops: int  # routers between the nodes on the underlay (outer TTL decrement)
    vtep_mac: bytes
    flannel_ip: str
    cni_ip: str
    cni_mac: bytes
    ifaces: dict[str, Iface]
    pods: dict[str, Pod]
    clock_offset_ns: int = 0
    frames: list[Frame] = field(default_factory=list)

    def add(self, t: int, ifname: str, direction: str, src_mac: bytes, dst_mac: bytes, l3: bytes, tag: str | None = None) -> int:
        assert ifname in self.ifaces, (self.name, ifname)
        self.frames.append(Frame(t, len(self.frames), ifname, direction, src_mac, dst_mac, l3, tag))
        return t


class Cluster:
    def __init__(self, nodes: dict[str, Node], base_epoch_ns: int):
        self.nodes = nodes
        self.base = base_epoch_ns
        self._outer: list[tuple[int, str, str, list[Frame]]] = []
        # (from, to, point, t_out, t_in): every copy that left one node and reached another
        self.crossings: list[tuple[str, str, str, int, int]] = []

    # -- helpers
    def finalize(self) -> None:
        """Give the outer IPv4 headers of VXLAN packets their ids in send order.

        Linux takes the id of an unfragmentable-but-not-DF UDP packet from a
        per-destination counter; packets are built here per request, not in
        time order, so the ids are stamped once every packet is known.
        """
        groups: dict[tuple[str, str], list[tuple[int, int, list[Frame]]]] = {}
        for i, (t_out, a, b, frames) in enumerate(self._outer):
            groups.setdefault((a, b), []).append((t_out, i, frames))
        for (a, b), items in groups.items():
            start = zlib.crc32(f"outer-id {a} {b}".encode()) & 0xFFFF
            for n, (_, _, frames) in enumerate(sorted(items, key=lambda x: (x[0], x[1]))):
                for f in frames:
                    f.l3 = set_ip_id(f.l3, (start + n) & 0xFFFF)
        self._outer = []

    @staticmethod
    def _vxlan_sport(a: Node, seg: Seg) -> int:
        # Linux hashes the inner flow (symmetrically) with a per-boot seed
        # into the local port range 32768..60999.
        src, dst, sport, dport = tcp_addrs(seg.ip0)
        flow = sorted([(src, sport), (dst, dport)])
        return 32768 + zlib.crc32(f"{a.name} {flow}".encode()) % (60999 - 32768 + 1)

    def _vxlan(self, a: Node, b: Node, inner_ip: bytes, sport: int) -> bytes:
        inner = b.vtep_mac + a.vtep_mac + b"\x08\x00" + inner_ip
        pkt = IP(src=a.ul_ip, dst=b.ul_ip, id=0, ttl=64) / UDP(sport=sport, dport=VXLAN_PORT, chksum=0) / VXLAN(flags=0x08, vni=1) / Raw(inner)
        return bytes(pkt)

    def pod_node(self, pod_ip: str) -> tuple[Node, Pod]:
        for n in self.nodes.values():
            if pod_ip in n.pods:
                return n, n.pods[pod_ip]
        raise KeyError(pod_ip)

    # -- the public NIC
    def client_in(self, node: Node, t: int, seg: Seg, tag: str | None = None) -> int:
        node.add(t, node.pub_if, "in", node.pub_gw_mac, node.pub_mac, seg.ip(), tag)
        seg.arrival = t + 4 * US
        return t

    def client_out(self, node: Node, t: int, seg: Seg, conn: Conn, tag: str | None = None) -> int:
        node.add(t, node.pub_if, "out", node.pub_mac, node.pub_gw_mac, seg.ip(), tag)
        seg.arrival = t + conn.a.lead  # the client end's one-way delay
        return t

    def noise(self, node: Node, t: int, ifname: str, direction: str, seg: Seg) -> None:
        if direction == "in":
            node.add(t, ifname, "in", node.pub_gw_mac, node.pub_mac, seg.ip())
        else:
            node.add(t, ifname, "out", node.pub_mac, node.pub_gw_mac, seg.ip())
        seg.arrival = t

    # -- Traefik (host network on A) -> pod on B through VXLAN
    def up_xnode(self, a: Node, t: int, seg: Seg, encap: int, wire: int, decap: int, deliver: int, veth_lag: int, stop: str | None = None, tag: str | None = None) -> dict[str, int]:
        b, pod = self.pod_node(tcp_addrs(seg.ip0)[1])
        assert b is not a
        seen: dict[str, int] = {}
        seen["A.overlay"] = a.add(t, "flannel.1", "out", a.vtep_mac, b.vtep_mac, seg.ip(64), tag)
        if stop == "A.overlay":
            return seen
        outer = self._vxlan(a, b, seg.ip(64), self._vxlan_sport(a, seg))
        seen["A.underlay"] = a.add(t + encap, a.ul_if, "out", a.ul_mac, a.ul_gw_mac, outer, tag)
        copies = [a.frames[-1]]
        self._outer.append((t + encap, a.name, b.name, copies))
        if stop == "A.underlay":
            return seen
        t_in = t + encap + wire
        seen["B.underlay"] = b.add(t_in, b.ul_if, "in", b.ul_gw_mac, b.ul_mac, set_ttl(outer, 64 - b.ul_hops), tag)
        copies.append(b.frames[-1])
        self.crossings.append((a.name, b.name, "underlay", t + encap, t_in))
        if stop == "B.underlay":
            return seen
        seen["B.overlay"] = b.add(t_in + decap, "flannel.1", "in", a.vtep_mac, b.vtep_mac, seg.ip(64), tag)
        self.crossings.append((a.name, b.name, "overlay", t, t_in + decap))
        seen["B.pod"] = b.add(t_in + decap + deliver, "cni0", "out", b.cni_mac, pod.mac, seg.ip(63), tag)
        seen["B.veth"] = b.add(t_in + decap + deliver + veth_lag, pod.veth, "out", b.cni_mac, pod.mac, seg.ip(63), tag)
        seg.arrival = seen["B.veth"] + 2 * US
        return seen

    # -- pod on B -> Traefik on A through VXLAN
    def down_xnode(self, a: Node, t: int, seg: Seg, bridge_lag: int, route: int, encap: int, wire: int, decap: int, tag: str | None = None) -> dict[str, int]:
        b, pod = self.pod_node(tcp_addrs(seg.ip0)[0])
        assert b is not a and route > bridge_lag
        seen: dict[str, int] = {}
        seen["B.pod"] = b.add(t, pod.veth, "in", pod.mac, b.cni_mac, seg.ip(64), tag)
        seen["B.cni0"] = b.add(t + bridge_lag, "cni0", "in", pod.mac, b.cni_mac, seg.ip(64), tag)
        seen["B.overlay"] = b.add(t + route, "flannel.1", "out", b.vtep_mac, a.vtep_mac, seg.ip(63), tag)
        outer = self._vxlan(b, a, seg.ip(63), self._vxlan_sport(b, seg))
        seen["B.underlay"] = b.add(t + route + encap, b.ul_if, "out", b.ul_mac, b.ul_gw_mac, outer, tag)
        t_in = t + route + encap + wire
        seen["A.underlay"] = a.add(t_in, a.ul_if, "in", a.ul_gw_mac, a.ul_mac, set_ttl(outer, 64 - a.ul_hops), tag)
        self._outer.append((t + route + encap, b.name, a.name, [b.frames[-1], a.frames[-1]]))
        self.crossings.append((b.name, a.name, "underlay", t + route + encap, t_in))
        seen["A.overlay"] = a.add(t_in + decap, "flannel.1", "in", b.vtep_mac, a.vtep_mac, seg.ip(63), tag)
        self.crossings.append((b.name, a.name, "overlay", t + route, t_in + decap))
        seg.arrival = seen["A.overlay"] + 2 * US
        return seen

    # -- Traefik on A -> pod on A (cni0, then the pod's veth)
    def up_local(self, a: Node, t: int, seg: Seg, veth_lag: int, tag: str | None = None) -> dict[str, int]:
        b, pod = self.pod_node(tcp_addrs(seg.ip0)[1])
        assert b is a
        seen = {"A.pod": a.add(t, "cni0", "out", a.cni_mac, pod.mac, seg.ip(64), tag)}
        seen["A.veth"] = a.add(t + veth_lag, pod.veth, "out", a.cni_mac, pod.mac, seg.ip(64), tag)
        seg.arrival = seen["A.veth"] + 2 * US
        return seen

    # -- pod on A -> Traefik on A (the pod's veth, then cni0)
    def down_local(self, a: Node, t: int, seg: Seg, bridge_lag: int, tag: str | None = None) -> dict[str, int]:
        b, pod = self.pod_node(tcp_addrs(seg.ip0)[0])
        assert b is a
        seen = {"A.pod": a.add(t, pod.veth, "in", pod.mac, a.cni_mac, seg.ip(64), tag)}
        seen["A.cni0"] = a.add(t + bridge_lag, "cni0", "in", pod.mac, a.cni_mac, seg.ip(64), tag)
        seg.arrival = seen["A.cni0"] + 2 * US
        return seen

    # -- clock bounds, as hop-model.md defines them, from the true times
    def check_symmetric(self) -> None:
        """Assert that the midpoint estimate of every node pair is exact.

        For each pair and each choice of points (underlay<->underlay,
        overlay<->overlay) the smallest one-way delay must be the same in
        both directions; then the interval ``[max(t3 - t4), min(t2 - t1)]``
        has the true offset as its midpoint.
        """
        best: dict[tuple[str, str, str], int] = {}
        for src, dst, point, t_out, t_in in self.crossings:
            k = (src, dst, point)
            best[k] = min(best.get(k, t_in - t_out), t_in - t_out)
        for (src, dst, point), d in best.items():
            back = best.get((dst, src, point))
            assert back is not None, f"no {dst}->{src} crossing at {point}"
            assert back == d, f"asymmetric min delay {src}<->{dst} at {point}: {d} vs {back}"


# ---------------------------------------------------------------------------
# Writers


def _frame_bytes(node: Node, f: Frame, linktype: int) -> bytes:
    if linktype == LINKTYPE_ETHERNET:
        return f.dst_mac + f.src_mac + b"\x08\x00" + f.l3
    if linktype == LINKTYPE_RAW:
        return f.l3
    iface = node.ifaces[f.ifname]
    if f.direction == "out":
        pkttype = PACKET_OUTGOING
    else:
        # A frame addressed to another MAC than the receiving device's own is
        # PACKET_OTHERHOST: the host side of a veth sees the pod's frames to
        # the bridge's MAC that way.
        pkttype = PACKET_HOST if f.dst_mac == iface.mac else PACKET_OTHERHOST
    if linktype == LINKTYPE_LINUX_SLL:
        return struct.pack("!HHH", pkttype, 1, 6) + f.src_mac + b"\0\0" + b"\x08\x00" + f.l3
    if linktype == LINKTYPE_LINUX_SLL2:
        return struct.pack("!HHIHBB", 0x0800, 0, iface.index, 1, pkttype, 6) + f.src_mac + b"\0\0" + f.l3
    raise ValueError(linktype)


def _captured(node: Node, base: int) -> list[tuple[int, Frame]]:
    """Frames in file order: by captured timestamp (the node's clock), stable."""
    out = [(base + f.t + node.clock_offset_ns, f) for f in node.frames]
    out.sort(key=lambda x: (x[0], x[1].order))
    return out


def write_pcap(path: str, node: Node, base: int, *, nsec: bool, linktype: int) -> None:
    magic = 0xA1B23C4D if nsec else 0xA1B2C3D4
    parts = [struct.pack("<IHHiIII", magic, 2, 4, 0, 0, SNAPLEN, linktype)]
    for ts, f in _captured(node, base):
        data = _frame_bytes(node, f, linktype)
        sec, frac = divmod(ts, S)
        if not nsec:
            assert frac % 1000 == 0, f"{path}: timestamp {ts} is not a whole microsecond"
            frac //= 1000
        parts.append(struct.pack("<IIII", sec, frac, len(data), len(data)) + data)
    with open(path, "wb") as fh:
        fh.write(b"".join(parts))


def _opt(e: str, code: int, value: bytes) -> bytes:
    pad = (-len(value)) % 4
    return struct.pack(e + "HH", code, len(value)) + value + b"\0" * pad


def _block(e: str, btype: int, body: bytes) -> bytes:
    assert len(body) % 4 == 0
    total = 12 + len(body)
    return struct.pack(e + "II", btype, total) + body + struct.pack(e + "I", total)


SHB_OS = "Linux 6.1.0-28-amd64"
SHB_APP = "Dumpcap (Wireshark) 4.0.17 (Git v4.0.17 packaged as 4.0.17-0+deb12u3)"


@dataclass
class Section:
    """One pcapng section: byte order, interfaces (in IDB order) and their
    resolution (None: no if_tsresol option, the default microseconds), and
    the captured-time window [t_from, t_to) of the packets it holds."""

    endian: str = "<"
    ifnames: list[str] | None = None
    tsresol: int | None = 9
    t_from: int | None = None
    t_to: int | None = None


def write_pcapng(
    path: str,
    node: Node,
    base: int,
    *,
    sections: list[Section] | None = None,
    epb_flags: bool = True,
    isb: bool = True,
    cut_tag: str | None = None,
    cut_into: int = 0,
) -> dict[str, int]:
    """Write ``node``'s frames; returns the file offset of each tagged EPB.

    ``cut_tag``: stop the file ``cut_into`` bytes inside the EPB of the
    frame tagged so (a capture cut in the middle of a block).
    """
    if sections is None:
        sections = [Section()]
    frames = _captured(node, base)
    out = bytearray()
    offsets: dict[str, int] = {}
    for sec in sections:
        e = sec.endian
        names = sec.ifnames or list(node.ifaces)
        shb_opts = _opt(e, 2, b"Intel Xeon Processor (Skylake, IBRS)") + _opt(e, 3, SHB_OS.encode()) + _opt(e, 4, SHB_APP.encode()) + _opt(e, 0, b"")
        out += _block(e, 0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1) + shb_opts)
        for name in names:
            opts = _opt(e, 2, name.encode())
            if sec.tsresol is not None:
                opts += _opt(e, 9, bytes([sec.tsresol]))
            opts += _opt(e, 12, SHB_OS.encode()) + _opt(e, 0, b"")
            out += _block(e, 1, struct.pack(e + "HHI", LINKTYPE_ETHERNET, 0, SNAPLEN) + opts)
        unit = 10 ** (9 - (sec.tsresol if sec.tsresol is not None else 6))
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        count: dict[str, int] = {}
        for ts, f in frames:
            if sec.t_from is not None and ts < base + sec.t_from:
                continue
            if sec.t_to is not None and ts >= base + sec.t_to:
                continue
            assert ts % unit == 0, f"{path}: timestamp {ts} not a multiple of {unit} ns"
            v = ts // unit
            data = _frame_bytes(node, f, LINKTYPE_ETHERNET)
            pad = (-len(data)) % 4
            opts = b""
            if epb_flags:
                opts = _opt(e, 2, struct.pack(e + "I", 1 if f.direction == "in" else 2)) + _opt(e, 0, b"")
            body = struct.pack(e + "IIIII", names.index(f.ifname), v >> 32, v & 0xFFFFFFFF, len(data), len(data)) + data + b"\0" * pad + opts
            if f.tag is not None:
                offsets[f.tag] = len(out)
            if cut_tag is not None and f.tag == cut_tag:
                blk = _block(e, 6, body)
                assert 0 < cut_into < len(blk)
                out += blk[:cut_into]
                with open(path, "wb") as fh:
                    fh.write(bytes(out))
                return offsets
            out += _block(e, 6, body)
            first.setdefault(f.ifname, v)
            last[f.ifname] = v
            count[f.ifname] = count.get(f.ifname, 0) + 1
        if isb:
            for i, name in enumerate(names):
                if name not in first:
                    continue
                v = last[name]
                opts = (
                    _opt(e, 2, struct.pack(e + "II", first[name] >> 32, first[name] & 0xFFFFFFFF))
                    + _opt(e, 3, struct.pack(e + "II", v >> 32, v & 0xFFFFFFFF))
                    + _opt(e, 4, struct.pack(e + "Q", count[name]))
                    + _opt(e, 5, struct.pack(e + "Q", 0))
                    + _opt(e, 0, b"")
                )
                out += _block(e, 5, struct.pack(e + "III", i, v >> 32, v & 0xFFFFFFFF) + opts)
    assert cut_tag is None, f"tag {cut_tag} not found"
    with open(path, "wb") as fh:
        fh.write(bytes(out))
    return offsets


# ---------------------------------------------------------------------------
# HTTP messages as Cloudflare, Traefik v3 (Go net/http) and the Go api write them

HOST = "api.myhoneydue.com"
USER_AGENT = "HoneyDue/2.4.1 (com.myhoneydue.app; build:412; iOS 18.1.1) Alamofire/5.9.1"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


def canonical(name: str) -> str:
    return "-".join(p[:1].upper() + p[1:].lower() for p in name.split("-"))


def cf_request(method: str, path: str, *, ray: str, user_ip: str, token: str, body: bytes = b"", extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A request as a Cloudflare edge sends it to the origin (SSL=Flexible)."""
    h = [
        ("Host", HOST),
        ("Connection", "Keep-Alive"),
        ("Accept-Encoding", "gzip, br"),
        ("X-Forwarded-For", user_ip),
        ("CF-Ray", ray),
        ("X-Forwarded-Proto", "https"),
        ("CF-Visitor", '{"scheme":"https"}'),
    ]
    if body:
        h.append(("Content-Length", str(len(body))))
        h.append(("content-type", "application/json"))
    h += [
        ("user-agent", USER_AGENT),
        ("accept", "application/json"),
        ("accept-language", "en-US,en;q=0.9"),
        ("authorization", f"Token {token}"),
        *extra,
        ("CF-Connecting-IP", user_ip),
        ("CDN-Loop", "cloudflare; loops=1"),
        ("CF-IPCountry", "US"),
    ]
    return _message(f"{method} {path} HTTP/1.1", h, body)


def _message(first: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    return (first + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode() + body


def parse_headers(msg: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = msg.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    return lines[0], [tuple(x.split(": ", 1)) for x in lines[1:]], body  # type: ignore[misc]


def traefik_request(client_msg: bytes, *, edge_ip: str, server: str) -> bytes:
    """What Traefik v3 (Go's ReverseProxy, Cloudflare's ranges trusted) sends upstream."""
    first, headers, body = parse_headers(client_msg)
    method, path, _ = first.split(" ")
    hs: dict[str, str] = {}
    for k, v in headers:
        if k.lower() in HOP_BY_HOP:
            continue
        hs[canonical(k)] = v
    host = hs.pop("Host")
    ua = hs.pop("User-Agent")
    cl = hs.pop("Content-Length", None)
    hs["X-Forwarded-For"] = hs["X-Forwarded-For"] + ", " + edge_ip
    hs["X-Forwarded-Host"] = host
    hs["X-Forwarded-Port"] = "80"
    hs.setdefault("X-Forwarded-Proto", "http")
    hs["X-Forwarded-Server"] = server
    hs["X-Real-Ip"] = edge_ip
    out = [("Host", host), ("User-Agent", ua)]
    if cl is not None:
        out.append(("Content-Length", cl))
    out += sorted(hs.items())
    return _message(f"{method} {path} HTTP/1.1", out, body)


REASONS = {200: "OK", 201: "Created", 502: "Bad Gateway", 504: "Gateway Timeout"}


def chunked(body: bytes, sizes: list[int]) -> bytes:
    assert sum(sizes) == len(body)
    out, off = [], 0
    for n in sizes:
        out.append(b"%x\r\n" % n + body[off : off + n] + b"\r\n")
        off += n
    return b"".join(out) + b"0\r\n\r\n"


def app_response(status: int, body: bytes, date: str, *, chunk_sizes: list[int] | None = None) -> bytes:
    """The api pod's response (Go net/http behind Echo)."""
    h = [("Content-Type", "application/json"), ("Vary", "Origin"), ("Date", date)]
    if chunk_sizes is None:
        h.append(("Content-Length", str(len(body))))
        payload = body
    else:
        h.append(("Transfer-Encoding", "chunked"))
        payload = chunked(body, chunk_sizes)
    return _message(f"HTTP/1.1 {status} {REASONS[status]}", h, payload)


def traefik_response(status: int, body: bytes, date: str, *, chunk_sizes: list[int] | None = None) -> bytes:
    """Traefik's copy of the pod's response, as Go's server writes it to Cloudflare."""
    h = [("Content-Type", "application/json"), ("Date", date), ("Vary", "Origin")]
    if chunk_sizes is None:
        h.insert(0, ("Content-Length", str(len(body))))
        payload = body
    else:
        h.append(("Transfer-Encoding", "chunked"))
        payload = chunked(body, chunk_sizes)
    return _message(f"HTTP/1.1 {status} {REASONS[status]}", h, payload)


def traefik_error(status: int, date: str) -> bytes:
    """Traefik answering by itself (502 on ECONNREFUSED, 504 on a dial timeout)."""
    body = REASONS[status].encode()
    h = [("Date", date), ("Content-Length", str(len(body))), ("Content-Type", "text/plain; charset=utf-8")]
    return _message(f"HTTP/1.1 {status} {REASONS[status]}", h, body)


# ---------------------------------------------------------------------------
# One request/response exchange through the whole path


@dataclass
class Paths:
    """Default latencies (ns) for the segments of a scenario that are not the
    measured ones (handshakes, pure ACKs, later segments of a message).

    They are the minimum of every crossing in the scenario, in both
    directions, so that the clock-offset estimate is exact (see
    :meth:`Cluster.check_symmetric`)."""

    encap: int = 31_004
    wire: int = 118_000
    decap: int = 18_902
    deliver: int = 27_511
    veth_lag: int = 2_117
    bridge_lag: int = 1_904
    route: int = 22_406
    synack_lat: int = 21_344  # node1 answering a SYN on the public NIC
    pod_synack: int = 11_020  # the pod's kernel answering a SYN
    ack_lat: int = 5_331  # a kernel sending the handshake ACK
    up_gap: int = 1_850  # between the segments of one upstream write
    resp_gap: int = 4_112  # between the pod's response segments
    client_gap: int = 1_206  # between Traefik's segments to the client
    traefik_ack: int = 14_207  # Traefik's kernel ACKing response data
    client_ack: int = 27_118  # node1 ACKing a client segment (quick ACK)
    pod_ack: int = 38_774  # the pod's kernel ACKing the request (quick ACK)
    client_seg_gap: int = 1_100  # between Cloudflare's segments of one request
    cf_ack_jitter: int = 301  # Cloudflare's ACKs: 2 x one-way + this x (segment number)


@dataclass
class Req:
    ray: str
    method: str
    path: str
    status: int
    client_msg: bytes  # Cloudflare -> node1
    up_msg: bytes  # Traefik -> pod
    resp_up: bytes  # pod -> Traefik
    resp_client: bytes  # Traefik -> Cloudflare
    client_sizes: list[int] | None = None
    client_gaps: list[int] | None = None  # before each later client segment
    up_sizes: list[int] | None = None
    resp_up_sizes: list[int] | None = None
    resp_client_sizes: list[int] | None = None


def body_runs(msg: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """Where a message's body bytes are on the wire: ([(wire, body, length)], end of the
    last data run or of the terminating chunk)."""
    h = headers_end(msg)
    head = msg[:h].lower()
    if b"transfer-encoding: chunked" not in head:
        return [(h, 0, len(msg) - h)], len(msg)
    runs, off, body = [], h, 0
    while True:
        eol = msg.index(b"\r\n", off)
        n = int(msg[off:eol], 16)
        if n == 0:
            return runs, off  # the terminating chunk starts here
        runs.append((eol + 2, body, n))
        body += n
        off = eol + 2 + n + 2


def upstream_needed(up: bytes, down: bytes, wire_end: int) -> int:
    """The upstream byte Traefik must have read before it can send ``down[:wire_end]``."""
    d_runs, d_term = body_runs(down)
    u_runs, _ = body_runs(up)
    if wire_end > d_term and d_term < len(down) and down[d_term:d_term + 1] == b"0":
        return len(up) - 1  # the terminating chunk: Traefik saw the upstream one
    if wire_end >= len(down) and d_term == len(down):
        return len(up) - 1
    body = 0
    for w, b, n in d_runs:
        if wire_end > w:
            body = b + min(n, wire_end - w)
    if body == 0:
        return headers_end(up) - 1
    for w, b, n in u_runs:
        if b <= body - 1 < b + n:
            return w + (body - 1 - b)
    raise AssertionError("body offset beyond the upstream message")


def headers_end(msg: bytes) -> int:
    return msg.index(b"\r\n\r\n") + 4


def seg_index(sizes: list[int], offset: int) -> int:
    """Index of the segment that holds byte ``offset``."""
    acc = 0
    for i, n in enumerate(sizes):
        acc += n
        if offset < acc:
            return i
    raise ValueError(offset)


def split(n: int, mss: int) -> list[int]:
    out = []
    while n > 0:
        out.append(min(n, mss))
        n -= out[-1]
    return out


CROSS_HOPS = [
    ("ingress", "request", "A", "nic_complete", "A.overlay"),
    ("encap", "request", "A", "A.overlay", "A.underlay"),
    ("wire", "request", "A->B", "A.underlay", "B.underlay"),
    ("decap", "request", "B", "B.underlay", "B.overlay"),
    ("deliver", "request", "B", "B.overlay", "B.pod_complete"),
    ("app", "server", "B", "B.pod_complete", "B.pod_resp"),
    ("route", "response", "B", "B.pod_resp", "B.overlay_r"),
    ("encap", "response", "B", "B.overlay_r", "B.underlay_r"),
    ("wire", "response", "B->A", "B.underlay_r", "A.underlay_r"),
    ("decap", "response", "A", "A.underlay_r", "A.overlay_r"),
    ("egress", "response", "A", "A.overlay_r", "nic_resp"),
]


def hops_from_moments(moments: dict[str, int], a: str, b: str | None) -> list[dict[str, Any]]:
    """The tiling hops of hop-model.md from the moments (true times) of one request."""

    def node(x: str) -> str:
        return x.replace("A", a).replace("B", b or "")

    if b is None:  # no upstream request: Traefik answered by itself
        names = [("ingress+egress", "request+response", "A", "nic_complete", "nic_resp")]
    elif b != a:
        names = CROSS_HOPS
    else:
        names = [("ingress", "request", "A", "nic_complete", "A.pod_first")]
        if moments["A.pod_complete"] != moments["A.pod_first"]:
            names.append(("deliver", "request", "A", "A.pod_first", "A.pod_complete"))
        names += [
            ("app", "server", "A", "A.pod_complete", "A.pod_resp"),
            ("egress", "response", "A", "A.pod_resp", "nic_resp"),
        ]
    hops = []
    for name, d, n, frm, to in names:
        dur = moments[to] - moments[frm]
        assert dur > 0, (name, frm, to, dur)
        hops.append({"name": name, "dir": d, "node": node(n), "duration_ns": dur})
    assert sum(h["duration_ns"] for h in hops) == moments["nic_resp"] - moments["nic_complete"]
    if "edge_rtt" in moments:
        hops.append({"name": "edge_rtt", "dir": "request", "node": a, "duration_ns": moments["edge_rtt"]})
    return hops


def client_handshake(cl: Cluster, a: Node, conn: Conn, t_syn: int, P: Paths, edge_rtt: int) -> tuple[int, int]:
    """SYN in, SYN-ACK out, ACK in on the public NIC. Returns (t_synack, t_ack)."""
    cl.client_in(a, t_syn, conn.syn(t_syn))
    t_sa = t_syn + P.synack_lat
    cl.client_out(a, t_sa, conn.synack(t_sa), conn)
    t_ack = t_sa + edge_rtt
    cl.client_in(a, t_ack, conn.send(conn.a, t_ack, "A"))
    return t_sa, t_ack


def upstream_handshake(cl: Cluster, a: Node, up: Conn, t: int, P: Paths) -> int:
    """Traefik's connect() to the pod; returns the time its final ACK leaves (at overlay/pod)."""
    b, _ = cl.pod_node(up.b.ip)
    syn = up.syn(t)
    if b is a:
        seen = cl.up_local(a, t, syn, P.veth_lag)
        t_sa = seen["A.veth"] + P.pod_synack
        sa = up.synack(t_sa)
        back = cl.down_local(a, t_sa, sa, P.bridge_lag)
        t_ack = back["A.cni0"] + P.ack_lat
        cl.up_local(a, t_ack, up.send(up.a, t_ack, "A"), P.veth_lag)
    else:
        seen = cl.up_xnode(a, t, syn, P.encap, P.wire, P.decap, P.deliver, P.veth_lag)
        t_sa = seen["B.veth"] + P.pod_synack
        sa = up.synack(t_sa)
        back = cl.down_xnode(a, t_sa, sa, P.bridge_lag, P.route, P.encap, P.wire, P.decap)
        t_ack = back["A.overlay"] + P.ack_lat
        cl.up_xnode(a, t_ack, up.send(up.a, t_ack, "A"), P.encap, P.wire, P.decap, P.deliver, P.veth_lag)
    return t_ack


def exchange(
    cl: Cluster,
    P: Paths,
    a: Node,
    client: Conn,
    up: Conn,
    req: Req,
    tm: dict[str, int],
    *,
    new_up: bool = False,
    ack_client: tuple[int, ...] = (),
    pod_ack: bool = False,
    cf_acks: bool = True,
    tag: str | None = None,
) -> dict[str, Any]:
    """Place every packet of one request and return its expected record.

    ``tm`` is the request's timing table (ns): ``t`` (request complete at
    the public NIC), then the hop durations (``ingress``, ``encap``,
    ``wire``, ``decap``, ``deliver``, ``app``, ``route``, ``encap_r``,
    ``wire_r``, ``decap_r``, ``egress``; same node: ``ingress``, ``app``,
    ``egress``), optionally ``syn`` (when Traefik connects, after ``t``) and
    ``rto`` (the first upstream segment is lost after node A's underlay and
    retransmitted ``rto`` later, with ``encap2`` as its encapsulation time).
    """
    b, _pod = cl.pod_node(up.b.ip)
    cross = b is not a
    m: dict[str, int] = {}

    # Cloudflare -> public NIC
    c_sizes = req.client_sizes or split(len(req.client_msg), client.a.mss - 12)
    k = seg_index(c_sizes, headers_end(req.client_msg) - 1)
    gaps = req.client_gaps or [P.client_seg_gap] * (len(c_sizes) - 1)
    times = [0] * len(c_sizes)
    times[k] = tm["t"]
    for i in range(k - 1, -1, -1):
        times[i] = times[i + 1] - gaps[i]
    for i in range(k + 1, len(c_sizes)):
        times[i] = times[i - 1] + gaps[i - 1]
    off = 0
    for i, n in enumerate(c_sizes):
        flags = "PA" if i == len(c_sizes) - 1 else "A"
        seg = client.send(client.a, times[i], flags, req.client_msg[off : off + n])
        cl.client_in(a, times[i], seg, tag=(f"{tag}.client.{i}" if tag else None))
        off += n
        if i in ack_client:
            t_ack = times[i] + P.client_ack
            assert i == len(c_sizes) - 1 or t_ack < times[i + 1]
            cl.client_out(a, t_ack, client.send(client.b, t_ack, "A"), client)
        if i == 0:
            # not pipelined: Cloudflare had the whole previous response when it sent this
            assert seg.ack == client.b.nxt, f"{req.ray}: sent before the previous response arrived at the edge"
    m["nic_complete"] = tm["t"]

    # Traefik -> pod
    t_u = tm["t"] + tm["ingress"]
    if new_up:
        t_last = upstream_handshake(cl, a, up, tm["t"] + tm["syn"], P)
        assert t_last + 10 * US < t_u, "upstream request before the handshake completed"
    u_sizes = req.up_sizes or split(len(req.up_msg), up.a.mss - 12)
    ku = seg_index(u_sizes, headers_end(req.up_msg) - 1)
    segs = up.write(up.a, t_u, req.up_msg, up.a.mss - 12, P.up_gap, u_sizes)
    for i, (t, seg) in enumerate(segs):
        if cross:
            if i == 0 and "rto" in tm:
                lost = cl.up_xnode(a, t, seg, tm["encap"], 0, 0, 0, 0, stop="A.underlay")
                m["A.overlay"], m["A.underlay"] = lost["A.overlay"], lost["A.underlay"]
                t2 = t + tm["rto"]
                seg2 = up.send(up.a, t2, seg.flags, seg.payload, seq=seg.seq)
                seen = cl.up_xnode(a, t2, seg2, tm["encap2"], tm["wire2"], tm["decap"], tm["deliver"], P.veth_lag)
                m["B.underlay"], m["B.overlay"] = seen["B.underlay"], seen["B.overlay"]
                m["B.pod_first"] = seen["B.pod"]
            else:
                seen = cl.up_xnode(a, t, seg, tm["encap"], tm["wire"], tm["decap"], tm["deliver"], P.veth_lag)
                if i == 0:
                    for key in ("A.overlay", "A.underlay", "B.underlay", "B.overlay"):
                        m[key] = seen[key]
                    m["B.pod_first"] = seen["B.pod"]
            if i == ku:
                m["B.pod_complete"] = seen["B.pod"]
        else:
            seen = cl.up_local(a, t, seg, P.veth_lag)
            if i == 0:
                m["A.pod_first"] = seen["A.pod"]
            if i == ku:
                m["A.pod_complete"] = seen["A.pod"]
    pod_complete = m["B.pod_complete" if cross else "A.pod_complete"]
    if cross:
        assert m["B.pod_complete"] - m["B.overlay"] == tm["deliver"] + (ku * P.up_gap if "rto" not in tm else 0), "deliver"

    # the pod
    t_r = pod_complete + tm["app"]
    if pod_ack:
        t_pa = pod_complete + P.pod_ack
        assert t_pa < t_r
        ack = up.send(up.b, t_pa, "A")
        if cross:
            cl.down_xnode(a, t_pa, ack, P.bridge_lag, P.route, P.encap, P.wire, P.decap)
        else:
            cl.down_local(a, t_pa, ack, P.bridge_lag)
    r_sizes = req.resp_up_sizes or split(len(req.resp_up), up.b.mss - 12)
    rsegs = up.write(up.b, t_r, req.resp_up, up.b.mss - 12, P.resp_gap, r_sizes)
    arrivals = []
    for i, (t, seg) in enumerate(rsegs):
        if cross:
            seen = cl.down_xnode(a, t, seg, P.bridge_lag, tm["route"], tm["encap_r"], tm["wire_r"], tm["decap_r"])
            arrivals.append(seen["A.overlay"])
            if i == 0:
                m["B.pod_resp"] = seen["B.pod"]
                m["B.overlay_r"] = seen["B.overlay"]
                m["B.underlay_r"] = seen["B.underlay"]
                m["A.underlay_r"] = seen["A.underlay"]
                m["A.overlay_r"] = seen["A.overlay"]
        else:
            seen = cl.down_local(a, t, seg, P.bridge_lag)
            arrivals.append(seen["A.cni0"])
            if i == 0:
                m["A.pod_resp"] = seen["A.pod"]
    # Traefik's kernel ACKs every second segment (and the last one)
    if len(rsegs) > 1:
        last_ack = None
        for i in range(len(rsegs)):
            if i % 2 == 1 or i == len(rsegs) - 1:
                t_ack = arrivals[i] + P.traefik_ack
                if up._ack_ecr(up.a, t_ack)[0] == last_ack:
                    continue  # nothing new to acknowledge
                ack = up.send(up.a, t_ack, "A")
                last_ack = ack.ack
                if cross:
                    cl.up_xnode(a, t_ack, ack, P.encap, P.wire, P.decap, P.deliver, P.veth_lag)
                else:
                    cl.up_local(a, t_ack, ack, P.veth_lag)

    # Traefik -> Cloudflare
    first_in = m["A.overlay_r" if cross else "A.pod_resp"]
    t_c = first_in + tm["egress"]
    m["nic_resp"] = t_c
    rc_sizes = req.resp_client_sizes or split(len(req.resp_client), client.b.mss - 12)
    # causality: a client segment leaves after the upstream bytes it carries arrived
    csegs = []
    off = 0
    t = t_c
    for i, n in enumerate(rc_sizes):
        if i:
            t += P.client_gap
        need = seg_index(r_sizes, upstream_needed(req.resp_up, req.resp_client, off + n))
        assert t > arrivals[need], f"{req.ray}: client segment {i} leaves before upstream segment {need} arrived"
        csegs.append((t, n, off))
        off += n
    for i, (t, n, off) in enumerate(csegs):
        flags = "PA" if i == len(csegs) - 1 else "A"
        seg = client.send(client.b, t, flags, req.resp_client[off : off + n])
        cl.client_out(a, t, seg, client, tag=(f"{tag}.resp.{i}" if tag else None))
    if cf_acks:
        lead = client.a.lead
        for i, (t, _, _) in enumerate(csegs):
            if i % 2 == 1 or i == len(csegs) - 1:
                t_in = t + 2 * lead + P.cf_ack_jitter * (i + 1)
                cl.client_in(a, t_in, client.send(client.a, t_in, "A"))

    rec = {
        "request_id": req.ray,
        "method": req.method,
        "path": req.path,
        "status": req.status,
        "ingress_node": a.name,
        "pod_node": b.name,
        "total_ns": m["nic_resp"] - m["nic_complete"],
        "_moments": m,
    }
    return rec
