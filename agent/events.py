"""The agent's events: the Python mirror of ``struct hs_event`` (bpf/hopscope.h).

Decoding is done in bulk, straight from the ring buffer's memory with one
precompiled :class:`struct.Struct` (no ctypes object per event), into the
same :class:`~hopscope.model.Observation` tuples that captures produce.
``tests/test_agent_events.py`` checks this mirror against the header with a
C compiler.
"""

from __future__ import annotations

import mmap
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hopscope.model import (
    IN,
    KERNEL,
    KIND_DROP,
    KIND_IPVS,
    KIND_NF,
    KIND_PACKET,
    KIND_QUEUED,
    KIND_STATE,
    KIND_WRITE,
    NIC,
    OUT,
    OVERLAY,
    POD,
    PROXY,
    UNDERLAY,
    Observation,
)


def find_bpf_dir(here: Path | None = None) -> Path:
    """The directory of the BPF C sources (``hopscope.h``, ``agent.c``, ...).

    An installed wheel carries them as package data, ``hopscope/agent/bpf/``;
    a source checkout (and its editable install) has them in the repository's
    ``bpf/``, beside ``agent/``. The first that holds ``hopscope.h`` wins; when
    neither does, the wheel's place is returned (and loading names it).
    """
    here = here or Path(__file__).resolve().parent
    for cand in (here / "bpf", here.parent / "bpf"):
        if (cand / "hopscope.h").is_file():
            return cand
    return here / "bpf"


BPF_DIR = find_bpf_dir()
HEADER = BPF_DIR / "hopscope.h"

# kinds, directions, roles, counters: as in bpf/hopscope.h
EV_PKT, EV_KERNEL, EV_DROP, EV_STATE, EV_NF, EV_IPVS = 1, 2, 3, 4, 5, 6
#: nf_hook_slow verdicts (HS_NF_*)
NF_VERDICTS = {1: b"ACCEPT", 2: b"QUEUED", 3: b"DROP"}
DIR_IN, DIR_OUT = 0, 1
ROLE_NIC, ROLE_OVERLAY, ROLE_UNDERLAY, ROLE_POD, ROLE_NIC_UNDERLAY = 1, 2, 3, 4, 5
WHY_CONTROL, WHY_HS_ACK, WHY_START, WHY_FOLLOW = 1, 2, 3, 4

#: index -> (source, what) of the per-CPU counters
STATS = (
    ("tc", "seen"), ("tc", "sent"), ("tc", "lost"),
    ("kernel", "sent"), ("kernel", "lost"),
    ("drop", "sent"), ("drop", "lost"),
    ("state", "sent"), ("state", "lost"),
    ("tc", "proxy_writes"), ("tc", "ipv6_skipped"),
    ("flood", "sent"), ("flood", "lost"),
    ("nf", "sent"), ("nf", "lost"), ("ipvs", "sent"), ("ipvs", "lost"),
)
STAT_INDEX = {f"{src}_{what}": i for i, (src, what) in enumerate(STATS)}

#: (field, struct code) in the order of struct hs_event, up to the payload
FIELDS = (
    ("ts_mono_ns", "Q"), ("aux_ns", "Q"), ("netns", "I"), ("ifindex", "I"), ("seq", "I"),
    ("ack", "I"), ("plen", "I"), ("vni", "I"), ("saddr", "4s"), ("daddr", "4s"),
    ("osaddr", "4s"), ("odaddr", "4s"), ("sport", "H"), ("dport", "H"), ("ip_id", "H"),
    ("reason", "H"), ("caplen", "H"), ("kind", "B"), ("dir", "B"), ("tcp_flags", "B"),
    ("proto", "B"), ("why", "B"), ("pad", "B"),
)
EVENT = struct.Struct("<" + "".join(code for _, code in FIELDS))
HDR_SIZE = EVENT.size  # == HS_EVENT_HDR
PAYLOAD_MAX = 2048  # == HS_PAYLOAD_MAX
#: where ``kind`` is in an event (what the agent looks at in records it ships raw)
_KIND = next(i for i, (name, _) in enumerate(FIELDS) if name == "kind")
KIND_AT = struct.calcsize("<" + "".join(code for _, code in FIELDS[:_KIND]))
#: names this mirror's layout in raw batches: a collector decodes only records of its own
LAYOUT = zlib.crc32(";".join(f"{n}:{c}" for n, c in FIELDS).encode() + b";%d" % PAYLOAD_MAX)

NO_VNI = 0xFFFFFFFF
#: the role of a NIC that carries both the public traffic and VXLAN
NIC_UNDERLAY = "nic+underlay"
#: the observation points an interface can have (:class:`Iface`)
IFACE_POINTS = frozenset({NIC, OVERLAY, UNDERLAY, POD, NIC_UNDERLAY})
_ZERO4 = b"\0\0\0\0"

#: kernel TCP states (include/net/tcp_states.h)
TCP_STATES = ("", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
              "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV")


def header_defines(path: Path = HEADER) -> dict[str, int]:
    """The integer ``#define``s of the shared header (for tests and the loader)."""
    out: dict[str, int] = {}
    for m in re.finditer(r"^#define\s+(HS_\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", path.read_text(),
                         re.M):
        out[m.group(1)] = int(m.group(2), 0)
    return out


@dataclass
class Iface:
    """An interface the agent watches: its name and observation point."""

    name: str
    point: str


@dataclass
class Decoder:
    """Turn raw events into observations of one node.

    ``ifaces`` maps ifindex to the interface; ``mono_to_real`` gives the
    current offset (wall clock minus CLOCK_MONOTONIC, ns); ``drop_reasons``
    names the kernel's drop reason numbers (from the tracepoint's format).
    """

    node: str
    ifaces: Mapping[int, Iface]
    mono_to_real: Callable[[], int]
    drop_reasons: Mapping[int, str]

    def decode(self, buf: bytes | mmap.mmap, records: list[tuple[int, int]],
               out: list[Observation]) -> int:
        """Append the observations of ``records`` ((offset, length) of raw events in
        ``buf``) to ``out``; returns how many records could not be decoded."""
        unpack = EVENT.unpack_from
        node = self.node
        ifaces = self.ifaces
        off = self.mono_to_real()
        new = tuple.__new__
        bad = 0
        for at, length in records:
            if length < HDR_SIZE:
                bad += 1
                continue
            (ts, aux, _netns, ifindex, seq, ack, plen, vni, saddr, daddr, osaddr, odaddr, sport,
             dport, ip_id, reason, caplen, kind, dir_, flags, proto, _why, _pad) = unpack(buf, at)
            if kind == EV_PKT:
                itf = ifaces.get(ifindex)
                if itf is None:
                    bad += 1
                    continue
                if caplen > length - HDR_SIZE:
                    caplen = length - HDR_SIZE
                payload = buf[at + HDR_SIZE:at + HDR_SIZE + caplen] if caplen else b""
                d = IN if dir_ == DIR_IN else OUT
                point = itf.point
                if vni == NO_VNI:
                    vni_, os_, od_ = -1, b"", b""
                    if point == NIC_UNDERLAY:
                        point = NIC
                else:
                    vni_, os_, od_ = vni, osaddr, odaddr
                    if point == NIC_UNDERLAY:
                        point = UNDERLAY
                if aux:
                    out.append(new(Observation, (
                        aux + off, aux, node, itf.name, PROXY, OUT, KIND_WRITE, proto, saddr,
                        daddr, sport, dport, seq, ack, flags, plen, ip_id, b"", vni_, os_, od_)))
                out.append(new(Observation, (
                    ts + off, ts, node, itf.name, point, d, KIND_PACKET, proto, saddr, daddr,
                    sport, dport, seq, ack, flags, plen, ip_id, payload, vni_, os_, od_)))
            elif kind == EV_KERNEL:
                out.append(new(Observation, (
                    ts + off, ts, node, "", KERNEL, IN, KIND_QUEUED, proto, saddr, daddr, sport,
                    dport, seq, ack, flags, plen, -1, b"", -1, b"", b"")))
            elif kind == EV_DROP:
                name = self.drop_reasons.get(reason, str(reason))
                itf = ifaces.get(ifindex)
                point = NIC if itf is not None and itf.point in (NIC, NIC_UNDERLAY) else KERNEL
                out.append(new(Observation, (
                    ts + off, ts, node, itf.name if itf else f"if{ifindex}", point, IN, KIND_DROP,
                    proto, saddr, daddr, sport, dport, seq, ack, flags, plen, ip_id,
                    name.encode("ascii", "replace"), -1, b"", b"")))
            elif kind == EV_STATE:
                out.append(new(Observation, (
                    ts + off, ts, node, "", KERNEL, OUT, KIND_STATE, proto, saddr, daddr, sport,
                    dport, reason & 0xFF, reason >> 8, 0, 0, -1, b"", -1, b"", b"")))
            elif kind == EV_NF:
                out.append(new(Observation, (
                    ts + off, ts, node, "", KERNEL, IN, KIND_NF, proto, saddr, daddr, sport,
                    dport, seq, min(aux, 0xFFFFFFFF), flags, plen, ip_id,
                    NF_VERDICTS.get(reason, b"?"), -1, b"", b"")))
            elif kind == EV_IPVS:
                rs = f"{osaddr[0]}.{osaddr[1]}.{osaddr[2]}.{osaddr[3]}:{reason}"
                out.append(new(Observation, (
                    ts + off, ts, node, "", KERNEL, OUT, KIND_IPVS, proto, saddr, daddr, sport,
                    dport, seq, 0, flags, plen, ip_id, rs.encode(), -1, b"", b"")))
            else:
                bad += 1
        return bad


def encode_packet(ob: Observation, ifindex: int, offset_ns: int) -> bytes:
    """The event a tc program would have emitted for a packet observation (the inverse of
    :meth:`Decoder.decode`, whose ``ts_real_ns`` is ``ts_mono_ns + offset_ns``), for
    tests and benchmarks that turn captures into an agent's records."""
    v = {"ts_mono_ns": ob.ts_real_ns - offset_ns, "aux_ns": 0, "netns": 0, "ifindex": ifindex,
         "seq": ob.seq, "ack": ob.ack, "plen": ob.plen,
         "vni": NO_VNI if ob.vni < 0 else ob.vni, "saddr": ob.src, "daddr": ob.dst,
         "osaddr": ob.outer_src or _ZERO4, "odaddr": ob.outer_dst or _ZERO4,
         "sport": ob.sport, "dport": ob.dport, "ip_id": ob.ip_id & 0xFFFF, "reason": 0,
         "caplen": len(ob.payload), "kind": EV_PKT,
         "dir": DIR_OUT if ob.direction == OUT else DIR_IN, "tcp_flags": ob.flags,
         "proto": ob.proto, "why": 0, "pad": 0}
    return EVENT.pack(*(v[name] for name, _ in FIELDS)) + ob.payload


@dataclass(frozen=True)
class RawEvents:
    """Ring buffer records as the agent copied them out (:meth:`RingReader.take`), with
    what decoding them needs: the agent's interfaces and clock offset at the time.

    The agent ships these instead of observations (wire schema v3): decoding and
    packing move from every node to the collector (``bench/agent_overhead.py``).
    """

    records: bytes  # ring records, 8-byte headers included (ringbuf.walk_records)
    ifaces: tuple[tuple[int, str, str], ...]  # (ifindex, name, observation point)
    offset_ns: int  # wall clock minus CLOCK_MONOTONIC
    #: events up to this CLOCK_MONOTONIC time are all in this or earlier batches; later
    #: ones may still come out of order (the reader holds them back to sort them)
    cut_mono_ns: int
    layout: int = LAYOUT

    def decode(self, node: str, out: list[Observation],
               recs: list[tuple[int, int]] | None = None) -> int:
        """Append the records' observations to ``out``; returns the records that could
        not be decoded. ``recs``: :func:`walk_records` of the records, when known. Raises
        ValueError when the records do not tile the bytes."""
        from hopscope.agent.ringbuf import walk_records

        if recs is None:
            recs = walk_records(self.records)
        ifaces = {i: Iface(name, point) for i, name, point in self.ifaces}
        off = self.offset_ns
        return Decoder(node, ifaces, lambda: off, {}).decode(self.records, recs, out)
