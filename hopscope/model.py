"""The observation model: one record type for every source.

An :class:`Observation` is one packet seen at one interface of one node (from
a capture, an AF_PACKET socket or a tc program), or one socket event seen by
eBPF. Every source builds the same tuple and hands it to the same stitcher.

Version: :data:`OBS_VERSION`. Fields (all times are integer nanoseconds, in
fields named for their clock):

==============  ===========================================================
``ts_real_ns``  wall clock (Unix epoch) of the node that saw it
``ts_mono_ns``  CLOCK_MONOTONIC of that node, or -1 when unknown (captures)
``node``        node name
``ifname``      interface name, or ``if<index>`` when only the index is known
``point``       observation point (:data:`POINTS`) or ``""`` to infer
``direction``   ``"in"``, ``"out"`` or ``""`` when the source does not say
``kind``        :data:`KIND_PACKET` or a socket event kind
``proto``       IP protocol of the (inner) L4 header: 6 for TCP
``src``/``dst`` (inner) addresses, packed: 4 bytes IPv4, 16 bytes IPv6
``sport``/``dport``  (inner) ports
``seq``/``ack`` TCP sequence and acknowledgement numbers
``flags``       TCP flags byte (:data:`FIN`, :data:`SYN`, ...)
``plen``        TCP payload length (from the IP header, not the snap length)
``ip_id``       (inner) IPv4 identification, -1 for IPv6
``payload``     payload bytes as captured (possibly fewer than ``plen``)
``vni``         VXLAN network identifier, -1 when not encapsulated
``outer_src``/``outer_dst``  outer addresses of a VXLAN packet, else ``b""``
==============  ===========================================================

Observations are plain tuples (a :class:`typing.NamedTuple`); build them
with :func:`make_packet` or, on hot paths, with ``tuple.__new__(Observation,
(...))`` in field order.
"""

from __future__ import annotations

import bisect
import ipaddress
import operator
from collections.abc import Iterable
from typing import Final, NamedTuple

OBS_VERSION: Final = 1

#: Observation points of the hop model.
NIC: Final = "nic"
KERNEL: Final = "kernel"
PROXY: Final = "proxy"
OVERLAY: Final = "overlay"
UNDERLAY: Final = "underlay"
POD: Final = "pod"
POINTS: Final = (NIC, KERNEL, PROXY, OVERLAY, UNDERLAY, POD)

IN: Final = "in"
OUT: Final = "out"

KIND_PACKET: Final = "pkt"
#: eBPF: a data segment reached a socket on the entry port (the ``kernel`` point).
#: Flow client -> server, ``seq``/``plen`` of the segment, ``flags`` its TCP flags.
KIND_QUEUED: Final = "queued"
#: eBPF: the proxy entered the write that sent this segment (the ``proxy`` point).
#: Flow, ``seq`` and ``plen`` as the segment left at ``ifname``.
KIND_WRITE: Final = "write"
#: eBPF: the kernel freed a packet with a drop reason; ``payload`` holds the reason's
#: name (ASCII, e.g. ``b"NETFILTER_DROP"``), then, when the agent could name the firewall
#: rule, a tab and the rule (``b"NETFILTER_DROP\tufw-user-input: -p tcp ... -j DROP"``);
#: ``point`` where it was (``nic`` when the packet came in through the public NIC, else
#: ``kernel``).
KIND_DROP: Final = "drop"
#: eBPF: a TCP socket changed state: ``ack`` old state, ``seq`` new state (kernel numbers).
KIND_STATE: Final = "state"
#: eBPF kprobe: a segment to the entry port went through netfilter's INPUT hook
#: (``nf_hook_slow``: UFW): ``ts_*`` when it entered, ``ack`` how long it took (ns),
#: ``payload`` the verdict (``b"ACCEPT"``, ``b"QUEUED"`` (NFQUEUE), ``b"DROP"``).
KIND_NF: Final = "netfilter"
#: eBPF kprobe: IPVS scheduled a new connection (``ip_vs_schedule``/``ip_vs_conn_new``):
#: the flow before the rewrite (client -> virtual service), ``seq`` its SYN's sequence
#: number, ``payload`` the real server chosen (``b"10.42.2.5:8000"``).
KIND_IPVS: Final = "ipvs"

# TCP flag bits
FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10

TCP: Final = 6
UDP: Final = 17


class Observation(NamedTuple):
    ts_real_ns: int
    ts_mono_ns: int
    node: str
    ifname: str
    point: str
    direction: str
    kind: str
    proto: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    plen: int
    ip_id: int
    payload: bytes
    vni: int
    outer_src: bytes
    outer_dst: bytes


def make_packet(
    ts_real_ns: int,
    node: str,
    ifname: str,
    src: str | bytes,
    sport: int,
    dst: str | bytes,
    dport: int,
    *,
    seq: int = 0,
    ack: int = 0,
    flags: int = ACK,
    payload: bytes = b"",
    plen: int | None = None,
    point: str = "",
    direction: str = "",
    ip_id: int = 0,
    vni: int = -1,
    outer_src: str | bytes = b"",
    outer_dst: str | bytes = b"",
    ts_mono_ns: int = -1,
) -> Observation:
    """Build a TCP packet observation (convenient, not fast: for tests and tools)."""
    return Observation(
        ts_real_ns,
        ts_mono_ns,
        node,
        ifname,
        point,
        direction,
        KIND_PACKET,
        TCP,
        _packed(src),
        _packed(dst),
        sport,
        dport,
        seq,
        ack,
        flags,
        len(payload) if plen is None else plen,
        ip_id,
        payload,
        vni,
        _packed(outer_src),
        _packed(outer_dst),
    )


def _packed(addr: str | bytes) -> bytes:
    if isinstance(addr, bytes):
        return addr
    return ipaddress.ip_address(addr).packed if addr else b""


def addr_str(packed: bytes) -> str:
    """Render a packed address (4 or 16 bytes) as text."""
    if len(packed) == 4:
        return "%d.%d.%d.%d" % (packed[0], packed[1], packed[2], packed[3])
    if len(packed) == 16:
        v6 = ipaddress.IPv6Address(packed)
        return str(v6.ipv4_mapped or v6)
    return ""


def flow_str(src: bytes, sport: int, dst: bytes, dport: int) -> str:
    """``"1.2.3.4:5 -> 6.7.8.9:80"`` (IPv6 addresses in brackets)."""

    def ep(a: bytes, p: int) -> str:
        s = addr_str(a)
        return f"[{s}]:{p}" if ":" in s else f"{s}:{p}"

    return f"{ep(src, sport)} -> {ep(dst, dport)}"


_MONO: Final = operator.itemgetter(1)  # ts_mono_ns


class Reorder:
    """One node's eBPF observations put back in time order (``ts_mono_ns``).

    Events reach user space a little out of order (the CPUs share one ring
    buffer, each stamps its event before it reserves the space), so a reader
    holds the newest back: :meth:`push` adds a batch and returns, sorted, the
    observations up to ``cut_mono_ns`` (the reader's clock minus its reorder
    window), keeping the rest for the next push; :meth:`flush` returns them all.
    The agent does this itself when it decodes; the collector for the raw
    records it decodes for an agent (wire schema v3).
    """

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: list[Observation] = []

    def push(self, obs: Iterable[Observation], cut_mono_ns: int) -> list[Observation]:
        p = self.pending
        p.extend(obs)
        if not p:
            return []
        p.sort(key=_MONO)
        i = bisect.bisect_right(p, cut_mono_ns, key=_MONO)
        if i == len(p):
            self.pending = []
            return p
        ready, self.pending = p[:i], p[i:]
        return ready

    def flush(self) -> list[Observation]:
        p, self.pending = self.pending, []
        p.sort(key=_MONO)
        return p

    def __len__(self) -> int:
        return len(self.pending)
