#!/usr/bin/env python3
"""Generate a realistic capture of one busy k3s ingress node, fast.

The capture is what ``dumpcap -i eth0 -i flannel.1 -i cni0 -i veth... -i lo``
(pcapng, the default) or ``tcpdump -i any --time-stamp-precision=nano``
(classic pcap, ``LINKTYPE_LINUX_SLL2``, ``--format pcap``) would record on
``node1``: the node whose public NIC receives Cloudflare's requests, whose
Traefik (host network) forwards them to the ``api`` pods, two of them on
``node2`` (through Flannel VXLAN, VNI 1, UDP 8472, over the same ``eth0``) and
one on ``node1`` itself (through ``cni0`` and the pod's veth).

Per request: the Cloudflare handshake on new connections (about 70 % of the
requests reuse a keep-alive connection; 48 connections are open before the
capture starts, so their handshakes are not in it), the request at ``eth0``
(about 600 bytes of headers, a unique ``CF-Ray``; half of the POST/PATCH
bodies in a segment of their own), Traefik's upstream request at
``flannel.1`` and its VXLAN copy on ``eth0`` (or at ``cni0`` and the veth),
the response segments back (1398-byte segments on the 1450-MTU pod network,
1448-byte segments towards Cloudflare), ACKs every second segment, the
response at ``eth0``, and FINs when Cloudflare closes (30 % of the
connections, after a request). Traefik keeps a pool of upstream keep-alive
connections (LIFO, as Go's ``http.Transport``); a new one starts with a
handshake over the overlay. About 1 % of the requests carry an unknown Host
and Traefik answers them itself (``404 page not found``, no upstream).

Background noise, to be skipped by a reader: ARP (``eth0``, ``cni0``), DNS
over UDP 53 (the host's resolver on ``eth0``; a pod asking CoreDNS on
``node2`` through its veth, ``cni0``, ``flannel.1`` and VXLAN, so UDP also
appears *inside* VXLAN), kubelet HTTP/1.1 health probes to ``10.42.0.x:8080``
(``cni0`` and veth, from ``10.42.0.1`` like Traefik's own requests to local
pods, ``Connection: close``), an SSH session on port 22 and k3s' TLS on
``lo``.

Speed: scapy builds a handful of templates once (:func:`build_templates`);
every packet is then a copy of a template stamped with :mod:`struct` (ports,
sequence numbers, IP id, TTL, TCP timestamps) around a payload (CF-Ray and
all), with correct IPv4, TCP and UDP checksums (:func:`csum`: one
``int.from_bytes`` and one modulo). The outer UDP checksum of VXLAN is 0, as
Linux sends it.

Packets are kept in a heap and written in timestamp order: an event at time
``t`` only creates packets at ``t`` or later, so everything before ``t`` can
be written. The file holds exactly ``--packets`` packets, the first ones in
time, as ``-c N`` would: requests in flight at the end are cut.

Next to the capture, ``<capture>.json`` records how it was made and how many
packets of each kind it holds.

Usage::

    python bench/_gencap.py                       # bench/out/ingress-220000.pcapng
    python bench/_gencap.py --format pcap         # bench/out/ingress-220000.pcap
    python bench/_gencap.py --double              # 2 x --packets (flat-memory check)
    python bench/_gencap.py --packets 1000 -o /tmp/small.pcapng
"""

from __future__ import annotations

import argparse
import dataclasses
import email.utils
import heapq
import json
import random
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

GENERATOR_VERSION = 1
DEFAULT_PACKETS = 220_000
FORMATS = ("pcapng", "pcap")
OUT_DIR = Path(__file__).resolve().parent / "out"

# --------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------


def _ip(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


NODE1_S, NODE2_S, GATEWAY_S = "178.104.247.152", "178.104.247.161", "172.31.1.1"
NODE1 = _ip(NODE1_S)  # eth0 of node1 (captured): public NIC and VXLAN underlay
NODE2 = _ip(NODE2_S)  # eth0 of node2
FLANNEL1 = _ip("10.42.0.0")  # flannel.1 of node1: Traefik's source towards node2's pods
CNI0_S = "10.42.0.1"
CNI0 = _ip(CNI0_S)  # cni0 of node1: source towards node1's pods (Traefik, kubelet)
RESOLVER = _ip("185.12.64.1")
COREDNS_SVC = _ip("10.43.0.10")
COREDNS_POD = _ip("10.42.1.5")  # on node2
DNS_CLIENT_POD = "10.42.0.44"
ADMIN = _ip("203.0.113.50")
LOCALHOST = _ip("127.0.0.1")

MAC_NODE1_S, MAC_GW_S, MAC_CNI0_S = "96:00:03:a1:5e:01", "d2:74:7f:6e:37:e3", "f6:7e:12:9a:40:c3"
MAC_NODE1 = _mac(MAC_NODE1_S)
MAC_GW = _mac(MAC_GW_S)
MAC_CNI0 = _mac(MAC_CNI0_S)
MAC_VTEP1 = _mac("4a:2f:1c:8e:90:11")  # flannel.1 on node1
MAC_VTEP2 = _mac("be:61:07:d3:2a:52")  # flannel.1 on node2
MAC_BCAST = b"\xff" * 6

HOST = "api.myhoneydue.com"
API_PORT = 8000
PROBE_PORT = 8080
VXLAN_PORT = 8472
VNI = 1
MSS_EDGE = 1448  # 1500 MTU, 12 bytes of TCP timestamps
MSS_POD = 1398  # 1450 MTU on flannel.1 / cni0 (VXLAN takes 50 bytes)

#: (ip, node) of the api pods; the weights pick where a request goes.
API_PODS = (("10.42.1.17", 2), ("10.42.1.23", 2), ("10.42.0.31", 1))
API_POD_WEIGHTS = (0.37, 0.37, 0.26)
REMOTE_PODS = frozenset(ip for ip, node in API_PODS if node == 2)


@dataclass(frozen=True, slots=True)
class Iface:
    name: str
    if_id: int  # pcapng interface id (order of the IDBs)
    ifindex: int  # Linux ifindex (SLL2)
    hatype: int  # ARPHRD_*


IFACES = (
    Iface("eth0", 0, 2, 1),
    Iface("flannel.1", 1, 4, 1),
    Iface("cni0", 2, 5, 1),
    Iface("veth3f2a9c1e", 3, 7, 1),  # api pod 10.42.0.31
    Iface("vethb81d04a7", 4, 8, 1),  # metrics-server 10.42.0.12
    Iface("veth5c0e9d12", 5, 9, 1),  # worker 10.42.0.44
    Iface("lo", 6, 1, 772),
)
ETH0, FLANNEL, CNI, VETH_API, VETH_METRICS, VETH_WORKER, LO = IFACES

#: Local pods (node1): ip -> (veth, MAC)
LOCAL_PODS = {
    "10.42.0.31": (VETH_API, _mac("0a:58:0a:2a:00:1f")),
    "10.42.0.12": (VETH_METRICS, _mac("0a:58:0a:2a:00:0c")),
    "10.42.0.44": (VETH_WORKER, _mac("0a:58:0a:2a:00:2c")),
}

CF_PREFIXES = ("162.158.", "172.68.", "172.69.", "172.70.", "172.71.", "141.101.", "108.162.")
COLOS = ("FRA", "AMS", "CDG", "LHR", "MUC", "WAW", "VIE", "ARN")

# --------------------------------------------------------------------------
# Checksums and templates
# --------------------------------------------------------------------------


def csum(data: bytes | bytearray) -> int:
    """Internet checksum (RFC 1071) of ``data``, for data that is not all zeros.

    The ones' complement sum of the 16-bit words equals the big-endian value
    of the data modulo 0xFFFF (as 2**16 = 1 mod 0xFFFF), 0 standing for
    0xFFFF; the checksum is its complement.
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    r = int.from_bytes(data, "big") % 0xFFFF
    return 0xFFFF - r if r else 0


# TCP flag bits
F_FIN, F_SYN, F_RST, F_PSH, F_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

_IP_STAMP = struct.Struct("!HHHB")  # at 2: total length, id, flags+fragment, ttl
_ADDRS = struct.Struct("!4s4s")  # at 12
_TCP_STAMP = struct.Struct("!HHII")  # at 20: ports, seq, ack
_U16 = struct.Struct("!H")
_U32X2 = struct.Struct("!II")
_UDP_HDR = struct.Struct("!HHHH")
_VXLAN_OUTER = struct.Struct("!BBHHHBBH4s4sHHHHII")  # IPv4 + UDP + VXLAN headers


class TcpTpl:
    """An IPv4+TCP header (no payload) built by scapy, and where to stamp it."""

    __slots__ = ("flags", "hdr", "seq_inc", "tcp_len", "ts_off")

    def __init__(self, raw: bytes) -> None:
        if (raw[0] & 0x0F) != 5:
            raise ValueError("templates carry no IP options")
        doff = (raw[32] >> 4) * 4
        self.tcp_len = doff
        self.flags = raw[33]
        self.seq_inc = 1 if self.flags & (F_SYN | F_FIN) else 0
        i, end, ts_off = 40, 20 + doff, -1
        while i < end:  # find the timestamps option
            kind = raw[i]
            if kind == 1:
                i += 1
                continue
            if kind == 0:
                break
            if kind == 8:
                ts_off = i + 2
            i += raw[i + 1]
        if ts_off < 0:
            raise ValueError("templates carry TCP timestamps")
        self.ts_off = ts_off
        hdr = bytearray(raw)
        hdr[10:12] = hdr[36:38] = b"\0\0"  # checksums are computed per copy, over zeros
        self.hdr = bytes(hdr)


@dataclass(slots=True)
class Templates:
    syn: TcpTpl  # Cloudflare's SYN, MSS 1460
    synack: TcpTpl
    syn_pod: TcpTpl  # on the pod network, MSS 1410
    synack_pod: TcpTpl
    ack: TcpTpl
    psh: TcpTpl
    fin: TcpTpl
    arp: list[tuple[Iface, bool, bytes]]  # (iface, outgoing, whole Ethernet frame), pairs
    dns_host: list[tuple[bytes, bytes]]  # (query, response) IPv4+UDP+DNS, stamped per use
    dns_pod: list[tuple[bytes, bytes]]


def build_templates() -> Templates:
    """Build the packet templates with scapy (once, a few milliseconds)."""
    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import ARP, Ether
    from scapy.packet import Padding

    def syn_opts(mss: int) -> list[tuple[str, Any]]:
        return [("MSS", mss), ("SAckOK", b""), ("Timestamp", (0, 0)), ("NOP", None), ("WScale", 7)]

    ts_opts: list[tuple[str, Any]] = [("NOP", None), ("NOP", None), ("Timestamp", (0, 0))]

    def tcp(flags: str, window: int, options: list[tuple[str, Any]]) -> TcpTpl:
        pkt = IP(src="0.0.0.0", dst="0.0.0.0", flags="DF", ttl=64) / TCP(
            sport=1, dport=1, flags=flags, window=window, options=options
        )
        return TcpTpl(bytes(pkt))

    bcast = "ff:ff:ff:ff:ff:ff"
    pad = Padding(load=b"\0" * 18)  # frames received from the NIC are padded to 60 bytes
    arp = [
        (
            ETH0,
            True,
            Ether(dst=bcast, src=MAC_NODE1_S)
            / ARP(op=1, hwsrc=MAC_NODE1_S, psrc=NODE1_S, pdst=GATEWAY_S),
        ),
        (
            ETH0,
            False,
            Ether(dst=MAC_NODE1_S, src=MAC_GW_S)
            / ARP(op=2, hwsrc=MAC_GW_S, psrc=GATEWAY_S, hwdst=MAC_NODE1_S, pdst=NODE1_S)
            / pad,
        ),
    ]
    for pod, (_veth, pmac) in LOCAL_PODS.items():
        pm = pmac.hex(":")
        arp.append(
            (
                CNI,
                True,
                Ether(dst=bcast, src=MAC_CNI0_S)
                / ARP(op=1, hwsrc=MAC_CNI0_S, psrc=CNI0_S, pdst=pod),
            )
        )
        arp.append(
            (
                CNI,
                False,
                Ether(dst=MAC_CNI0_S, src=pm)
                / ARP(op=2, hwsrc=pm, psrc=pod, hwdst=MAC_CNI0_S, pdst=CNI0_S),
            )
        )

    def dns_pair(src: str, dst: str, ttl_r: int, name: str, answer: str) -> tuple[bytes, bytes]:
        qd = DNSQR(qname=name, qtype="A")
        q = IP(src=src, dst=dst, ttl=64) / UDP(sport=1, dport=53) / DNS(id=0, rd=1, qd=qd)
        an = DNSRR(rrname=name, type="A", ttl=30, rdata=answer)
        r = (
            IP(src=dst, dst=src, ttl=ttl_r)
            / UDP(sport=53, dport=1)
            / DNS(id=0, qr=1, rd=1, ra=1, qd=qd, an=an)
        )
        return bytes(q), bytes(r)

    host_names = (
        ("registry-1.docker.io.", "54.227.20.253"),
        ("api.github.com.", "140.82.121.6"),
        ("o4505.ingest.sentry.io.", "34.120.195.249"),
        ("ntp.hetzner.com.", "213.239.239.164"),
    )
    pod_names = (
        ("postgres.default.svc.cluster.local.", "10.43.20.5"),
        ("redis.default.svc.cluster.local.", "10.43.77.12"),
        ("api.default.svc.cluster.local.", "10.43.112.45"),
    )
    return Templates(
        syn=tcp("S", 64240, syn_opts(1460)),
        synack=tcp("SA", 65160, syn_opts(1460)),
        syn_pod=tcp("S", 62370, syn_opts(1410)),
        synack_pod=tcp("SA", 62230, syn_opts(1410)),
        ack=tcp("A", 502, ts_opts),
        psh=tcp("PA", 502, ts_opts),
        fin=tcp("FA", 502, ts_opts),
        arp=[(i, o, bytes(f)) for i, o, f in arp],
        dns_host=[dns_pair(NODE1_S, "185.12.64.1", 55, n, a) for n, a in host_names],
        dns_pod=[dns_pair(DNS_CLIENT_POD, "10.43.0.10", 64, n, a) for n, a in pod_names],
    )


# --------------------------------------------------------------------------
# Links and the writer
# --------------------------------------------------------------------------

#: Kinds of packets, counted in the sidecar.
CATS = (
    "client",  # Cloudflare <-> Traefik at eth0
    "upstream",  # Traefik <-> pod, inner packets (flannel.1, cni0, veth)
    "vxlan",  # VXLAN copies on eth0 (of upstream packets and of pod DNS)
    "arp",
    "dns",
    "probe",
    "ssh",
    "lo",
)
C_CLIENT, C_UP, C_VXLAN, C_ARP, C_DNS, C_PROBE, C_SSH, C_LO = range(len(CATS))
#: Marker kind: the segment that carries a Cloudflare request's first byte.
C_REQ_FIRST = -1

PKTTYPE_HOST, PKTTYPE_BROADCAST, PKTTYPE_OUTGOING = 0, 1, 4


@dataclass(frozen=True, slots=True)
class Link:
    """How one interface frames a packet in one direction."""

    iface: Iface
    outgoing: bool
    eth: bytes  # Ethernet header (pcapng frames), ends with the EtherType
    sll2: bytes  # SLL2 header (pcap frames)
    epb_opts: bytes  # pcapng EPB options (epb_flags + opt_endofopt), or b""


_SLL2 = struct.Struct("!HHIHBB8s")


def make_link(
    iface: Iface,
    outgoing: bool,
    dst_mac: bytes,
    src_mac: bytes,
    ethertype: int = 0x0800,
    *,
    epb_flags: bool = True,
) -> Link:
    broadcast = dst_mac == MAC_BCAST
    if iface.hatype == 772:  # loopback: libpcap keeps the incoming copy only
        pkttype = PKTTYPE_HOST
    elif outgoing:
        pkttype = PKTTYPE_OUTGOING
    else:
        pkttype = PKTTYPE_BROADCAST if broadcast else PKTTYPE_HOST
    sll2 = _SLL2.pack(ethertype, 0, iface.ifindex, iface.hatype, pkttype, 6, src_mac + b"\0\0")
    eth = dst_mac + src_mac + _U16.pack(ethertype)
    opts = b""
    if epb_flags:
        # bits 0-1: 01 inbound, 10 outbound; bits 2-4: 001 unicast, 011 broadcast
        flags = (2 if outgoing else 1) | ((3 if broadcast else 1) << 2)
        opts = struct.pack("<HHI", 2, 4, flags) + b"\0\0\0\0"
    return Link(iface, outgoing, eth, sll2, opts)


_EPB = struct.Struct("<IIIIIII")
_PCAP_REC = struct.Struct("<IIII")
_TAIL = struct.Struct("<I")
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")


def _opt(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) & 3)


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


def pcapng_header() -> bytes:
    """Section header and one interface description per interface (if_tsresol=9)."""
    shb_opts = (
        _opt(2, b"x86_64")
        + _opt(3, b"Linux 6.1.0-27-amd64")
        + _opt(4, f"hopscope bench/_gencap.py v{GENERATOR_VERSION}".encode())
        + b"\0\0\0\0"
    )
    out = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + shb_opts)
    for iface in IFACES:  # LINKTYPE_ETHERNET everywhere, lo included (dumpcap -i lo)
        opts = _opt(2, iface.name.encode()) + _opt(9, b"\x09") + b"\0\0\0\0"
        out += _block(1, struct.pack("<HHI", 1, 0, 262144) + opts)
    return out


def pcap_header() -> bytes:
    """Nanosecond magic, v2.4, snaplen 262144, LINKTYPE_LINUX_SLL2."""
    return struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 276)


class Writer:
    """Holds pending packets in a heap; writes them in time order, up to ``limit``."""

    def __init__(self, out: BinaryIO, fmt: str, limit: int) -> None:
        self.out = out
        self.limit = limit
        self.written = 0
        self.heap: list[tuple[int, int, int, bytes]] = []
        self.n = 0
        self.counts = [0] * len(CATS)
        self.requests_started = 0  # Cloudflare requests whose first segment was written
        self.first_ts = -1
        self.last_ts = -1
        self.push: Callable[[int, Link, bytes, int], None] = (
            self._push_pcapng if fmt == "pcapng" else self._push_pcap
        )

    def _push_pcapng(self, ts: int, link: Link, l3: bytes, cat: int) -> None:
        frame = link.eth + l3
        caplen = len(frame)
        opts = link.epb_opts
        total = 32 + caplen + (-caplen & 3) + len(opts)
        block = b"".join(
            (
                _EPB.pack(6, total, link.iface.if_id, ts >> 32, ts & 0xFFFFFFFF, caplen, caplen),
                frame,
                _PADS[caplen & 3],
                opts,
                _TAIL.pack(total),
            )
        )
        self.n += 1
        heapq.heappush(self.heap, (ts, self.n, cat, block))

    def _push_pcap(self, ts: int, link: Link, l3: bytes, cat: int) -> None:
        caplen = 20 + len(l3)
        rec = _PCAP_REC.pack(ts // 1_000_000_000, ts % 1_000_000_000, caplen, caplen)
        self.n += 1
        heapq.heappush(self.heap, (ts, self.n, cat, rec + link.sll2 + l3))

    def flush_before(self, t: int) -> None:
        """Write every pending packet earlier than ``t`` (while under the limit)."""
        heap, write, counts = self.heap, self.out.write, self.counts
        pop = heapq.heappop
        while heap and heap[0][0] < t and self.written < self.limit:
            ts, _n, cat, block = pop(heap)
            write(block)
            if cat < 0:
                cat = C_CLIENT
                self.requests_started += 1
            counts[cat] += 1
            self.written += 1
            if self.first_ts < 0:
                self.first_ts = ts
            self.last_ts = ts

    @property
    def full(self) -> bool:
        return self.written >= self.limit


# --------------------------------------------------------------------------
# TCP connections
# --------------------------------------------------------------------------

#: The copies of a packet at the capture, in time order: (link, delay after the
#: previous copy in ns (plus up to as much jitter), wrapped in VXLAN).
Copies = tuple[tuple[Link, int, bool], ...]


class Half:
    """One direction of a TCP connection: the sender's state."""

    __slots__ = (
        "copies",
        "dport",
        "dst",
        "ipid",
        "peer",
        "pseudo",
        "seq",
        "sport",
        "src",
        "tsbase",
        "ttl",
        "vx_sport",
    )

    def __init__(
        self,
        src: bytes,
        sport: int,
        dst: bytes,
        dport: int,
        ttl: int,
        copies: Copies,
        rng: random.Random,
    ) -> None:
        self.src, self.sport, self.dst, self.dport = src, sport, dst, dport
        self.ttl = ttl  # as seen at the capture
        self.copies = copies
        self.seq = rng.getrandbits(32)  # next sequence number (not wrapped)
        self.ipid = rng.getrandbits(16)
        self.tsbase = rng.getrandbits(32)  # TCP timestamp clock (ms) offset
        self.pseudo = src + dst + b"\x00\x06"
        self.vx_sport = 32768 + rng.randrange(28232)  # Linux: flow hash in the local port range
        self.peer: Half = self


Side = tuple[bytes, int, int, Copies]  # address, port, TTL at the capture, copies of what it sends


def tcp_conn(a: Side, b: Side, rng: random.Random) -> tuple[Half, Half]:
    """Both halves of a connection between ``a`` and ``b``."""
    ab = Half(a[0], a[1], b[0], b[1], a[2], a[3], rng)
    ba = Half(b[0], b[1], a[0], a[1], b[2], b[3], rng)
    ab.peer, ba.peer = ba, ab
    return ab, ba


class Stamper:
    """Builds packets from templates and pushes their copies to the writer."""

    def __init__(self, writer: Writer, rng: random.Random) -> None:
        self.w = writer
        self.rng = rng
        self.vx_ipid = [rng.getrandbits(16), rng.getrandbits(16)]  # node2 -> node1, node1 -> node2
        self.inner_eth = (MAC_VTEP1 + MAC_VTEP2 + b"\x08\x00", MAC_VTEP2 + MAC_VTEP1 + b"\x08\x00")

    def tcp(self, h: Half, tpl: TcpTpl, payload: bytes, t: int, ack: int = -1) -> bytes:
        """The IPv4 packet of one segment sent by ``h`` at ``t`` (advances ``h``).

        It acknowledges everything the peer sent so far, or ``ack`` when given
        (an ACK generated after the peer's later segments).
        """
        hdr = bytearray(tpl.hdr)
        tcp_len = tpl.tcp_len + len(payload)
        h.ipid = (h.ipid + 1) & 0xFFFF
        _IP_STAMP.pack_into(hdr, 2, 20 + tcp_len, h.ipid, 0x4000, h.ttl)
        _ADDRS.pack_into(hdr, 12, h.src, h.dst)
        peer = h.peer
        ms = t // 1_000_000
        if tpl.flags & F_ACK:
            ack = (peer.seq if ack < 0 else ack) & 0xFFFFFFFF
            tsecr = (peer.tsbase + ms - 1) & 0xFFFFFFFF
        else:
            ack = tsecr = 0
        _TCP_STAMP.pack_into(hdr, 20, h.sport, h.dport, h.seq & 0xFFFFFFFF, ack)
        _U32X2.pack_into(hdr, tpl.ts_off, (h.tsbase + ms) & 0xFFFFFFFF, tsecr)
        h.seq += len(payload) + tpl.seq_inc
        _U16.pack_into(hdr, 36, csum(h.pseudo + _U16.pack(tcp_len) + hdr[20:] + payload))
        _U16.pack_into(hdr, 10, csum(hdr[:20]))
        return bytes(hdr) + payload

    def vxlan(self, inner_ip: bytes, outgoing: bool, sport: int) -> bytes:
        """Wrap an inner IPv4 packet as Flannel does (UDP 8472, VNI 1, UDP checksum 0)."""
        inner = self.inner_eth[outgoing] + inner_ip
        udp_len = 16 + len(inner)
        ipid = self.vx_ipid[outgoing] = (self.vx_ipid[outgoing] + 1) & 0xFFFF
        src, dst = (NODE1, NODE2) if outgoing else (NODE2, NODE1)
        hdr = bytearray(
            _VXLAN_OUTER.pack(
                0x45,
                0,
                20 + udp_len,
                ipid,
                0,
                64,
                17,
                0,
                src,
                dst,
                sport,
                VXLAN_PORT,
                udp_len,
                0,
                0x08000000,
                VNI << 8,
            )
        )
        _U16.pack_into(hdr, 10, csum(hdr[:20]))
        return bytes(hdr) + inner

    def emit(self, h: Half, ip: bytes, t: int, cat: int) -> None:
        """Push every copy of ``ip`` (sent by ``h``), the first one at ``t``."""
        push, rnd = self.w.push, self.rng.random
        for link, delay, wrap in h.copies:
            if delay:
                t += delay + int(rnd() * delay)
            if wrap:
                push(t, link, self.vxlan(ip, link.outgoing, h.vx_sport), C_VXLAN)
            else:
                push(t, link, ip, cat)
                if cat == C_REQ_FIRST:
                    cat = C_CLIENT

    def seg(self, h: Half, tpl: TcpTpl, payload: bytes, t: int, cat: int, ack: int = -1) -> None:
        self.emit(h, self.tcp(h, tpl, payload, t, ack), t, cat)


# --------------------------------------------------------------------------
# HTTP messages
# --------------------------------------------------------------------------

_UAS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.6478.71 Mobile Safari/537.36",
    "HoneyDue/3.4.1 (com.myhoneydue.app; build:412; iOS 17.5.1) Alamofire/5.9.1",
    "okhttp/4.12.0",
)
_COUNTRIES = ("DE", "US", "GB", "FR", "NL", "AT", "PL", "SE")
_ROUTES = (
    ("GET", "/api/tasks/?page={n}", 30),
    ("GET", "/api/tasks/{id}/", 20),
    ("POST", "/api/tasks/", 10),
    ("PATCH", "/api/tasks/{id}/", 8),
    ("DELETE", "/api/tasks/{id}/", 2),
    ("GET", "/api/users/me/", 15),
    ("GET", "/api/notifications/?unread=1", 15),
)
_ROUTE_CHOICES = [(m, p) for m, p, w in _ROUTES for _ in range(w)]


class Http:
    """Request and response bytes; every request has a unique CF-Ray."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.n = 0
        self._date_s = -1
        self._date = ""
        parts: list[str] = []
        size = 0
        words = (
            "title",
            "done",
            "due",
            "assignee",
            "notes",
            "priority",
            "home",
            "garden",
            "kitchen",
            "repair",
        )
        values = ("true", "false", "null", "3")
        while size < 80_000:
            w = [rng.choice(words) for _ in range(4)]
            item = f'{{"id":{rng.randrange(10**6)},"{w[0]}":"{w[1]} {w[2]}","{w[3]}":{rng.choice(values)}}},'
            parts.append(item)
            size += len(item)
        self.blob = ("[" + "".join(parts)).encode()

    def date(self, t: int) -> str:
        s = t // 1_000_000_000
        if s != self._date_s:
            self._date_s = s
            self._date = email.utils.formatdate(s, usegmt=True)
        return self._date

    def ray(self) -> str:
        self.n += 1
        # multiplying by an odd constant is a bijection mod 2**64: the rays are unique
        v = (self.n * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        return f"{v:016x}-{self.rng.choice(COLOS)}"

    def request(self, cf_ip: bytes, host: str) -> tuple[bytes, bytes, str, bytes]:
        """(request headers at eth0, body, method, whole request as Traefik sends it upstream)."""
        rng = self.rng
        method, path = rng.choice(_ROUTE_CHOICES)
        path = path.format(n=rng.randrange(1, 20), id=rng.randrange(1000, 99999))
        ray = self.ray()
        client = f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        cf = ".".join(map(str, cf_ip))
        ua = rng.choice(_UAS)
        country = rng.choice(_COUNTRIES)
        token = f"{rng.getrandbits(160):040x}"
        body = b""
        if method in ("POST", "PATCH"):
            notes = "x" * rng.randrange(20, 300)
            due = f"2026-0{rng.randrange(1, 9)}-1{rng.randrange(10)}"
            body = f'{{"title":"{token[:12]}","due":"{due}","notes":"{notes}"}}'.encode()
        clen = f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n" if body else ""
        edge = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Keep-Alive\r\n"
            f"Accept-Encoding: gzip, br\r\nCF-RAY: {ray}\r\nX-Forwarded-For: {client}\r\n"
            f'CF-Visitor: {{"scheme":"https"}}\r\nX-Forwarded-Proto: https\r\n'
            f"CF-Connecting-IP: {client}\r\nCDN-Loop: cloudflare; loops=1\r\nCF-IPCountry: {country}\r\n"
            f"{clen}user-agent: {ua}\r\naccept: application/json\r\naccept-language: en-US,en;q=0.9\r\n"
            f"authorization: Token {token}\r\n\r\n"
        ).encode()
        # Go's net/http canonicalizes header names ("Cf-Ray"); Traefik adds X-Forwarded-*
        up = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {ua}\r\n{clen}"
            f"Accept: application/json\r\nAccept-Encoding: gzip, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
            f"Authorization: Token {token}\r\nCdn-Loop: cloudflare; loops=1\r\n"
            f"Cf-Connecting-Ip: {client}\r\nCf-Ipcountry: {country}\r\nCf-Ray: {ray}\r\n"
            f'Cf-Visitor: {{"scheme":"https"}}\r\nX-Forwarded-For: {client}, {cf}\r\n'
            f"X-Forwarded-Host: {host}\r\nX-Forwarded-Port: 80\r\nX-Forwarded-Proto: https\r\n"
            f"X-Forwarded-Server: traefik-6d8f9c7b5-x2k4p\r\nX-Real-Ip: {cf}\r\n\r\n"
        ).encode()
        return edge, body, method, up + body

    def response(self, method: str, t: int) -> tuple[bytes, bytes]:
        """(response as the pod sends it, as Traefik sends it on to Cloudflare)."""
        rng = self.rng
        if method == "DELETE":
            status, body = "204 No Content", b""
        else:
            x = rng.random()
            if x < 0.03:
                status, body = "404 Not Found", b'{"detail":"Not found."}'
            else:
                status = "201 Created" if method == "POST" else "200 OK"
                if x < 0.63:
                    size = rng.randrange(60, 1100)
                elif x < 0.93:
                    size = rng.randrange(1500, 6000)
                else:
                    size = rng.randrange(8000, 40000)
                start = rng.randrange(len(self.blob) - size)
                body = self.blob[start : start + size]
        date = self.date(t)
        if body:
            pod = (
                f"HTTP/1.1 {status}\r\ndate: {date}\r\nserver: uvicorn\r\ncontent-length: {len(body)}\r\n"
                "content-type: application/json\r\nvary: Accept, Cookie\r\nallow: GET, POST, HEAD, OPTIONS\r\n\r\n"
            )
            edge = (
                f"HTTP/1.1 {status}\r\nAllow: GET, POST, HEAD, OPTIONS\r\nContent-Length: {len(body)}\r\n"
                f"Content-Type: application/json\r\nDate: {date}\r\nServer: uvicorn\r\nVary: Accept, Cookie\r\n\r\n"
            )
        else:
            pod = f"HTTP/1.1 {status}\r\ndate: {date}\r\nserver: uvicorn\r\nvary: Accept, Cookie\r\n\r\n"
            edge = f"HTTP/1.1 {status}\r\nDate: {date}\r\nServer: uvicorn\r\nVary: Accept, Cookie\r\n\r\n"
        return pod.encode() + body, edge.encode() + body

    def traefik_404(self, t: int) -> bytes:
        return (
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"X-Content-Type-Options: nosniff\r\nDate: {self.date(t)}\r\nContent-Length: 19\r\n\r\n"
            "404 page not found\n"
        ).encode()


def chunks(data: bytes, mss: int) -> list[bytes]:
    return [data[i : i + mss] for i in range(0, len(data), mss)] or [b""]


# --------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------

US = 1_000
MS = 1_000_000
T0 = 1_795_766_400_000_000_000  # 2026-11-27 00:00:00 UTC


class ClientConn:
    """A Cloudflare connection to Traefik (port 80)."""

    __slots__ = ("cf", "free_at", "ip", "node", "rtt")

    def __init__(self, cf: Half, node: Half, ip: bytes, rtt: int) -> None:
        self.cf, self.node, self.ip, self.rtt = cf, node, ip, rtt
        self.free_at = 0


class UpConn:
    """A Traefik connection to a pod (port 8000)."""

    __slots__ = ("free_at", "pod", "traefik")

    def __init__(self, traefik: Half, pod: Half) -> None:
        self.traefik, self.pod = traefik, pod
        self.free_at = 0


class Traffic:
    """The node's traffic, as event handlers (one call: one request or one noise event)."""

    def __init__(self, writer: Writer, seed: int, epb_flags: bool) -> None:
        self.rng = rng = random.Random(seed)
        self.tpl = build_templates()
        self.s = Stamper(writer, rng)
        self.w = writer
        self.http = Http(rng)
        self.new_conns = 0

        def lk(iface: Iface, out: bool, dst: bytes, src: bytes, ethertype: int = 0x0800) -> Link:
            return make_link(iface, out, dst, src, ethertype, epb_flags=epb_flags)

        self.eth_in = lk(ETH0, False, MAC_NODE1, MAC_GW)
        self.eth_out = lk(ETH0, True, MAC_GW, MAC_NODE1)
        self.fl_out = lk(FLANNEL, True, MAC_VTEP2, MAC_VTEP1)
        self.fl_in = lk(FLANNEL, False, MAC_VTEP1, MAC_VTEP2)
        self.lo_link = lk(LO, False, b"\0" * 6, b"\0" * 6)
        self.arp_links = [(lk(i, o, f[0:6], f[6:12], 0x0806), f[14:]) for i, o, f in self.tpl.arp]
        # the copies of a packet sent to / received from each pod
        self.to_pod: dict[str, Copies] = {}
        self.from_pod: dict[str, Copies] = {}
        for ip in REMOTE_PODS:
            self.to_pod[ip] = ((self.fl_out, 0, False), (self.eth_out, 3 * US, True))
            self.from_pod[ip] = ((self.eth_in, 0, True), (self.fl_in, 3 * US, False))
        for ip, (veth, pmac) in LOCAL_PODS.items():
            self.to_pod[ip] = (
                (lk(CNI, True, pmac, MAC_CNI0), 0, False),
                (lk(veth, True, pmac, MAC_CNI0), US, False),
            )
            self.from_pod[ip] = (
                (lk(veth, False, MAC_CNI0, pmac), 0, False),
                (lk(CNI, False, MAC_CNI0, pmac), US, False),
            )
        self.edge_in: Copies = ((self.eth_in, 0, False),)
        self.edge_out: Copies = ((self.eth_out, 0, False),)
        self.cf_ips = [
            _ip(f"{rng.choice(CF_PREFIXES)}{rng.randrange(256)}.{rng.randrange(1, 255)}")
            for _ in range(48)
        ]
        self.idle: list[ClientConn] = []  # Cloudflare connections ready for a request
        self.busy: list[tuple[int, int, ClientConn]] = []  # (free_at, n, conn)
        self.busy_n = 0
        self.pools: dict[str, list[UpConn]] = {ip: [] for ip, _ in API_PODS}
        self.pod_ips = [ip for ip, _ in API_PODS]
        self.used_ports: set[int] = set()
        self.ssh_conn: tuple[Half, Half] | None = None
        self.lo_conn: tuple[Half, Half] | None = None
        self.warm_up()

    def warm_up(self) -> None:
        """Connections opened before the capture started (their handshakes are not in it)."""
        for _ in range(48):
            self.idle.append(self.new_client_conn())
        for pod in self.pod_ips:
            self.pools[pod].extend(self.new_up_conn(pod) for _ in range(6))
        self.new_conns = 0

    # -- helpers ---------------------------------------------------------

    def lognorm(self, median_ns: float, sigma: float) -> int:
        return int(median_ns * self.rng.lognormvariate(0.0, sigma))

    def ephemeral(self) -> int:
        rng, used = self.rng, self.used_ports
        while True:
            p = 32768 + rng.randrange(28232)
            if p not in used:
                used.add(p)
                if len(used) > 20000:
                    used.clear()
                return p

    def handshake(
        self,
        c: Half,
        s: Half,
        t: int,
        rtt: int,
        server_here: bool,
        syn: TcpTpl,
        synack: TcpTpl,
        cat: int,
    ) -> int:
        """SYN from ``c`` at ``t``; returns when ``c``'s first data segment is seen.

        ``server_here``: the capture is on the server's side (the SYN-ACK leaves
        at once, the ACK comes an RTT later); else on the client's side.
        """
        st, turn = self.s, 10 * US + self.lognorm(8 * US, 0.3)
        st.seg(c, syn, b"", t, cat)
        t += turn if server_here else rtt
        st.seg(s, synack, b"", t, cat)
        t += rtt if server_here else turn
        st.seg(c, self.tpl.ack, b"", t, cat)
        return t + 2 * US

    def send(
        self, h: Half, data: bytes, mss: int, t: int, gap: int, cat: int
    ) -> list[tuple[int, int]]:
        """Send ``data`` as segments ``gap`` ns apart; returns (first-copy time, end seq) of each."""
        st, psh, ack = self.s, self.tpl.psh, self.tpl.ack
        segs = chunks(data, mss)
        last = len(segs) - 1
        sent = []
        for i, chunk in enumerate(segs):
            ts = t + i * gap
            st.seg(h, psh if i == last else ack, chunk, ts, cat)
            sent.append((ts, h.seq))
        return sent

    def ack_every_other(
        self, h: Half, arrivals: Sequence[tuple[int, int]], delay: int, cat: int
    ) -> int:
        """``h`` ACKs every second segment and the last one of ``arrivals`` (time, end seq).

        Returns the last ACK's time.
        """
        st, ack = self.s, self.tpl.ack
        n = len(arrivals)
        last = 0
        for i in range(1, n + 1):
            if i % 2 == 0 or i == n:
                t, end = arrivals[i - 1]
                last = max(last + US, t + delay + self.lognorm(15 * US, 0.4))
                st.seg(h, ack, b"", last, cat, end)
        return last

    # -- connections -----------------------------------------------------

    def new_client_conn(self) -> ClientConn:
        rng = self.rng
        cf_ip = rng.choice(self.cf_ips)
        rtt = self.lognorm(1.6 * MS, 0.5)
        cf, node = tcp_conn(
            (cf_ip, 10000 + rng.randrange(55000), 57, self.edge_in),
            (NODE1, 80, 64, self.edge_out),
            rng,
        )
        self.new_conns += 1
        return ClientConn(cf, node, cf_ip, rtt)

    def client_conn(self, t: int) -> tuple[ClientConn, int]:
        """A Cloudflare connection for a request at ``t``, and when the request arrives."""
        busy, idle = self.busy, self.idle
        while busy and busy[0][0] <= t:
            idle.append(heapq.heappop(busy)[2])
        rng = self.rng
        if idle and rng.random() >= 0.3:
            i = rng.randrange(len(idle))
            conn = idle[i]
            idle[i] = idle[-1]
            idle.pop()
            return conn, t
        conn = self.new_client_conn()
        return conn, self.handshake(
            conn.cf, conn.node, t, conn.rtt, True, self.tpl.syn, self.tpl.synack, C_CLIENT
        )

    def new_up_conn(self, pod: str) -> UpConn:
        remote = pod in REMOTE_PODS
        traefik, podh = tcp_conn(
            (FLANNEL1 if remote else CNI0, self.ephemeral(), 64, self.to_pod[pod]),
            (_ip(pod), API_PORT, 63 if remote else 64, self.from_pod[pod]),  # node2 routes: TTL 63
            self.rng,
        )
        return UpConn(traefik, podh)

    def up_conn(self, pod: str, t: int) -> tuple[UpConn, int]:
        """Traefik's connection to ``pod`` at ``t`` (LIFO reuse, else a new one), and when it may send."""
        pool = self.pools[pod]
        best = None
        for uc in pool:
            if uc.free_at <= t and (best is None or uc.free_at > best.free_at):
                best = uc
        if best is not None:
            return best, t
        uc = self.new_up_conn(pod)
        pool.append(uc)
        rtt = self.lognorm(450 * US, 0.3) if pod in REMOTE_PODS else self.lognorm(40 * US, 0.3)
        tpl = self.tpl
        return uc, self.handshake(
            uc.traefik, uc.pod, t, rtt, False, tpl.syn_pod, tpl.synack_pod, C_UP
        )

    # -- a request -------------------------------------------------------

    def request(self, t: int) -> None:
        rng, st, tpl, http = self.rng, self.s, self.tpl, self.http
        conn, t0 = self.client_conn(t)
        cf, node = conn.cf, conn.node
        unknown_host = rng.random() < 0.01
        edge_req, body, method, up_req = http.request(
            conn.ip, "old.myhoneydue.com" if unknown_host else HOST
        )
        # the request at eth0; half of the bodies follow in a segment of their own
        if body and rng.random() < 0.5:
            st.seg(cf, tpl.psh, edge_req, t0, C_REQ_FIRST)
            t0 += self.lognorm(30 * US, 0.5)
            st.seg(cf, tpl.psh, body, t0, C_CLIENT)
        else:
            st.seg(cf, tpl.psh, edge_req + body, t0, C_REQ_FIRST)
        t_read = t0 + self.lognorm(150 * US, 0.6)  # Traefik reads, routes, picks a connection

        if unknown_host:
            t_resp = t_read + self.lognorm(30 * US, 0.3)
            edge_sent = self.send(
                node, http.traefik_404(t_resp), MSS_EDGE, t_resp, 12 * US, C_CLIENT
            )
        else:
            pod = rng.choices(self.pod_ips, API_POD_WEIGHTS)[0]
            remote = pod in REMOTE_PODS
            uc, t_up = self.up_conn(pod, t_read)
            one_way = self.lognorm(220 * US, 0.3) if remote else self.lognorm(20 * US, 0.3)
            decap = 6 * US if remote else 2 * US  # first copy to the last (flannel.1 / cni0)
            app = self.lognorm(3.5 * MS, 0.8)
            up_sent = self.send(uc.traefik, up_req, MSS_POD, t_up, 10 * US, C_UP)
            t_at_pod = up_sent[-1][0] + one_way
            if app > 40 * MS:  # the pod's delayed ACK fires before the response
                st.seg(uc.pod, tpl.ack, b"", t_at_pod + 40 * MS + one_way, C_UP)
            pod_resp, edge_resp = http.response(method, t_up)
            t_r = t_at_pod + app + one_way  # first response byte back on node1
            resp_sent = self.send(uc.pod, pod_resp, MSS_POD, t_r, 12 * US, C_UP)
            uc.free_at = self.ack_every_other(uc.traefik, resp_sent, decap + 5 * US, C_UP) + 1
            # Traefik streams the response on to Cloudflare as it arrives
            t_out0 = resp_sent[0][0] + decap + self.lognorm(60 * US, 0.5)
            segs = chunks(edge_resp, MSS_EDGE)
            n_up, n_edge = len(resp_sent), len(segs)
            edge_sent = []
            tprev = 0
            for i, chunk in enumerate(segs):
                # the upstream segment this one waits for
                k = min(n_up - 1, (i + 1) * n_up // n_edge)
                ts = max(t_out0 + i * 12 * US, resp_sent[k][0] + decap + 20 * US, tprev + 2 * US)
                tprev = ts
                st.seg(node, tpl.psh if i == n_edge - 1 else tpl.ack, chunk, ts, C_CLIENT)
                edge_sent.append((ts, node.seq))
        # Cloudflare ACKs the response, then keeps the connection or closes it
        last_ack = self.ack_every_other(cf, [(x + conn.rtt, e) for x, e in edge_sent], 0, C_CLIENT)
        if rng.random() < 0.3:
            t_fin = last_ack + self.lognorm(3 * MS, 1.0)
            st.seg(cf, tpl.fin, b"", t_fin, C_CLIENT)
            t_fin += self.lognorm(40 * US, 0.4)
            st.seg(node, tpl.fin, b"", t_fin, C_CLIENT)
            st.seg(cf, tpl.ack, b"", t_fin + conn.rtt, C_CLIENT)
        else:
            conn.free_at = last_ack + self.lognorm(2 * MS, 1.2)
            self.busy_n += 1
            heapq.heappush(self.busy, (conn.free_at, self.busy_n, conn))

    # -- noise -----------------------------------------------------------

    def arp(self, t: int) -> None:
        i = self.rng.randrange(0, len(self.arp_links), 2)
        (lq, q), (lr, r) = self.arp_links[i], self.arp_links[i + 1]
        self.w.push(t, lq, q, C_ARP)
        self.w.push(t + self.lognorm(200 * US, 0.5), lr, r, C_ARP)

    def udp(
        self, tpl: bytes, src: bytes, dst: bytes, sport: int, dport: int, txid: int, ttl: int
    ) -> bytes:
        """A DNS template stamped with addresses, ports, transaction id and TTL."""
        p = bytearray(tpl)
        _U16.pack_into(p, 4, self.rng.getrandbits(16))
        p[8] = ttl
        _U16.pack_into(p, 10, 0)
        _ADDRS.pack_into(p, 12, src, dst)
        _UDP_HDR.pack_into(p, 20, sport, dport, len(p) - 20, 0)
        _U16.pack_into(p, 28, txid)
        c = csum(src + dst + b"\x00\x11" + _U16.pack(len(p) - 20) + p[20:])
        _U16.pack_into(p, 26, c or 0xFFFF)
        _U16.pack_into(p, 10, csum(p[:20]))
        return bytes(p)

    def dns(self, t: int) -> None:
        rng, push, udp = self.rng, self.w.push, self.udp
        txid = rng.getrandbits(16)
        port = 32768 + rng.randrange(28232)
        if rng.random() < 0.35:  # the host's resolver, on eth0
            q, r = rng.choice(self.tpl.dns_host)
            push(t, self.eth_out, udp(q, NODE1, RESOLVER, port, 53, txid, 64), C_DNS)
            push(
                t + self.lognorm(900 * US, 0.4),
                self.eth_in,
                udp(r, RESOLVER, NODE1, 53, port, txid, 55),
                C_DNS,
            )
            return
        # a pod on node1 asks CoreDNS: Service 10.43.0.10 at its veth and cni0,
        # DNATed to the CoreDNS pod on node2 from flannel.1 on
        q, r = rng.choice(self.tpl.dns_pod)
        pod = _ip(DNS_CLIENT_POD)
        (veth_in, _, _), (cni_in, _, _) = self.from_pod[DNS_CLIENT_POD]
        (cni_out, _, _), (veth_out, _, _) = self.to_pod[DNS_CLIENT_POD]
        q_svc = udp(q, pod, COREDNS_SVC, port, 53, txid, 64)
        q_pod = udp(q, pod, COREDNS_POD, port, 53, txid, 63)
        push(t, veth_in, q_svc, C_DNS)
        push(t + 1 * US, cni_in, q_svc, C_DNS)
        push(t + 9 * US, self.fl_out, q_pod, C_DNS)
        push(
            t + 13 * US,
            self.eth_out,
            self.s.vxlan(q_pod, True, 32768 + rng.randrange(28232)),
            C_VXLAN,
        )
        t += self.lognorm(700 * US, 0.4)
        r_pod = udp(r, COREDNS_POD, pod, 53, port, txid, 63)
        r_svc = udp(r, COREDNS_SVC, pod, 53, port, txid, 62)
        push(t, self.eth_in, self.s.vxlan(r_pod, False, 32768 + rng.randrange(28232)), C_VXLAN)
        push(t + 6 * US, self.fl_in, r_pod, C_DNS)
        push(t + 12 * US, cni_out, r_svc, C_DNS)
        push(t + 13 * US, veth_out, r_svc, C_DNS)

    def probe(self, t: int) -> None:
        """A kubelet HTTP probe: new connection, GET, 200, close (``Connection: close``)."""
        rng, st, tpl = self.rng, self.s, self.tpl
        pod = rng.choice(list(LOCAL_PODS))
        kubelet, podh = tcp_conn(
            (CNI0, self.ephemeral(), 64, self.to_pod[pod]),
            (_ip(pod), PROBE_PORT, 64, self.from_pod[pod]),
            rng,
        )
        rtt = self.lognorm(30 * US, 0.3)
        t = self.handshake(kubelet, podh, t, rtt, False, tpl.syn_pod, tpl.synack_pod, C_PROBE)
        path = rng.choice(("/healthz", "/readyz", "/livez"))
        req = (
            f"GET {path} HTTP/1.1\r\nHost: {pod}:{PROBE_PORT}\r\nUser-Agent: kube-probe/1.30\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n"
        )
        st.seg(kubelet, tpl.psh, req.encode(), t, C_PROBE)
        # the pod answers and closes; kubelet closes its side
        t += self.lognorm(600 * US, 0.5)
        resp = b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
        st.seg(podh, tpl.psh, resp + b'{"status":"ok"}', t, C_PROBE)
        t += self.lognorm(40 * US, 0.3)
        st.seg(podh, tpl.fin, b"", t, C_PROBE)
        t += rtt
        st.seg(kubelet, tpl.fin, b"", t, C_PROBE)
        st.seg(podh, tpl.ack, b"", t + rtt, C_PROBE)

    def ssh(self, t: int) -> None:
        """A keystroke and its echo in an interactive SSH session."""
        rng, st, tpl = self.rng, self.s, self.tpl
        if self.ssh_conn is None:
            self.ssh_conn = tcp_conn(
                (ADMIN, 51234, 52, self.edge_in), (NODE1, 22, 64, self.edge_out), rng
            )
        admin, node = self.ssh_conn
        st.seg(admin, tpl.psh, rng.randbytes(36), t, C_SSH)
        t += self.lognorm(80 * US, 0.4)
        st.seg(node, tpl.psh, rng.randbytes(rng.choice((36, 36, 52, 100, 244))), t, C_SSH)
        st.seg(admin, tpl.ack, b"", t + self.lognorm(25 * MS, 0.3), C_SSH)

    def loopback(self, t: int) -> None:
        """k3s agent <-> supervisor TLS records on lo."""
        rng, st, tpl = self.rng, self.s, self.tpl
        if self.lo_conn is None:
            lo: Copies = ((self.lo_link, 0, False),)
            self.lo_conn = tcp_conn((LOCALHOST, 41876, 64, lo), (LOCALHOST, 6444, 64, lo), rng)
        a, b = self.lo_conn
        n = rng.choice((38, 85, 320, 1100))
        st.seg(a, tpl.psh, b"\x17\x03\x03" + _U16.pack(n) + rng.randbytes(n), t, C_LO)
        t += self.lognorm(150 * US, 0.5)
        m = rng.choice((38, 200, 2400))
        for part in chunks(b"\x17\x03\x03" + _U16.pack(m) + rng.randbytes(m), 32768):
            st.seg(b, tpl.psh, part, t, C_LO)
        st.seg(a, tpl.ack, b"", t + 40 * US, C_LO)


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

#: Mean events per second: requests, then the noise.
RATES = (
    ("request", 2000.0),
    ("dns", 80.0),
    ("probe", 10.0),
    ("ssh", 25.0),
    ("arp", 3.0),
    ("loopback", 60.0),
)


@dataclass(slots=True)
class Result:
    path: str
    format: str
    packets: int
    seed: int
    epb_flags: bool
    generator_version: int
    seconds: float
    bytes: int
    requests: int  # Cloudflare requests whose first segment is in the file
    new_connections: int
    capture_span_s: float
    counts: dict[str, int]


def default_path(packets: int, fmt: str) -> Path:
    return OUT_DIR / f"ingress-{packets}.{fmt}"


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def generate(
    path: Path,
    packets: int = DEFAULT_PACKETS,
    fmt: str = "pcapng",
    seed: int = 1,
    epb_flags: bool = True,
) -> Result:
    """Write a capture of exactly ``packets`` packets to ``path``, and its sidecar."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    if packets < 1:
        raise ValueError("packets must be positive")
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb", buffering=1 << 20) as f:
        f.write(pcapng_header() if fmt == "pcapng" else pcap_header())
        w = Writer(f, fmt, packets)
        tr = Traffic(w, seed, epb_flags and fmt == "pcapng")
        rng = tr.rng
        handlers: dict[str, Callable[[int], None]] = {
            "request": tr.request,
            "dns": tr.dns,
            "probe": tr.probe,
            "ssh": tr.ssh,
            "arp": tr.arp,
            "loopback": tr.loopback,
        }
        rates = dict(RATES)
        events = [(T0 + int(rng.expovariate(r) * 1e9), name) for name, r in RATES]
        heapq.heapify(events)
        while not w.full:
            t, name = heapq.heappop(events)
            w.flush_before(t)
            if w.full:
                break
            handlers[name](t)
            heapq.heappush(events, (t + 1 + int(rng.expovariate(rates[name]) * 1e9), name))
        size = f.tell()
    tmp.replace(path)
    res = Result(
        path=str(path),
        format=fmt,
        packets=w.written,
        seed=seed,
        epb_flags=epb_flags and fmt == "pcapng",
        generator_version=GENERATOR_VERSION,
        seconds=round(time.perf_counter() - started, 3),
        bytes=size,
        requests=w.requests_started,
        new_connections=tr.new_conns,
        capture_span_s=round((w.last_ts - w.first_ts) / 1e9, 3),
        counts=dict(zip(CATS, w.counts, strict=True)),
    )
    meta_path(path).write_text(json.dumps(dataclasses.asdict(res), indent=2) + "\n")
    return res


def read_meta(path: Path) -> dict[str, Any] | None:
    """The sidecar of a generated capture, or None."""
    try:
        data = json.loads(meta_path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_fresh(path: Path, packets: int, fmt: str, seed: int, epb_flags: bool) -> bool:
    """Whether ``path`` was generated, by this version, with these options (and is whole)."""
    meta = read_meta(path)
    try:
        size = path.stat().st_size
    except OSError:
        return False
    return meta is not None and meta == {
        **meta,
        "packets": packets,
        "format": fmt,
        "seed": seed,
        "epb_flags": epb_flags,
        "generator_version": GENERATOR_VERSION,
        "bytes": size,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Generate a realistic capture of one busy k3s ingress node (see the module docstring)."
    )
    ap.add_argument(
        "--packets",
        type=int,
        default=DEFAULT_PACKETS,
        help="packets in the file (default %(default)s)",
    )
    ap.add_argument(
        "--format",
        choices=FORMATS,
        default="pcapng",
        help="pcapng (named interfaces, the default) or pcap (SLL2)",
    )
    ap.add_argument(
        "--pcap", action="store_const", const="pcap", dest="format", help="same as --format pcap"
    )
    ap.add_argument(
        "--double", action="store_true", help="write 2 x --packets (for the flat-memory check)"
    )
    ap.add_argument(
        "-o",
        "--output",
        type=Path,
        help="output file (default bench/out/ingress-<packets>.<format>)",
    )
    ap.add_argument(
        "--seed", type=int, default=1, help="random seed: same seed, same file (default 1)"
    )
    ap.add_argument(
        "--no-epb-flags", action="store_true", help="pcapng: leave out epb_flags (no direction)"
    )
    ap.add_argument(
        "--if-stale",
        action="store_true",
        help="(re)generate only when the file is missing or its sidecar does not match these options",
    )
    ap.add_argument(
        "--print-path",
        action="store_true",
        help="print the capture's path on stdout (and the summary on stderr)",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="print no summary")
    args = ap.parse_args(argv)
    packets = args.packets * (2 if args.double else 1)
    path = args.output or default_path(packets, args.format)
    epb_flags = not args.no_epb_flags and args.format == "pcapng"
    if args.if_stale and is_fresh(path, packets, args.format, args.seed, epb_flags):
        if args.print_path:
            print(path)
        return 0
    try:
        res = generate(path, packets, args.format, args.seed, epb_flags)
    except (OSError, ValueError) as exc:
        print(f"_gencap: {exc}", file=sys.stderr)
        return 1
    if args.print_path:
        print(path)
    if not args.quiet:
        kinds = ", ".join(f"{k} {v}" for k, v in res.counts.items())
        print(
            f"{res.path}: {res.packets} packets ({res.bytes / 1e6:.1f} MB, {res.format}) in {res.seconds:.2f} s "
            f"({res.packets / max(res.seconds, 1e-9):,.0f} packets/s); {res.requests} requests, "
            f"{res.new_connections} new connections, {res.capture_span_s:.2f} s of traffic\n  {kinds}",
            file=sys.stderr if args.print_path else sys.stdout,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
