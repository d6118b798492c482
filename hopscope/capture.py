"""A streaming capture reader written with :mod:`struct`.

Reads classic pcap (micro- and nanosecond magic, either byte order) and
pcapng (several sections and interfaces, ``if_name``, ``if_tsresol``,
``if_tsoffset``, either byte order; EPB, SPB and the obsolete PB), with the
link types Ethernet (with 802.1Q/802.1ad tags), Linux cooked v1 (SLL) and v2
(SLL2, what ``tcpdump -i any`` writes), raw IP and BSD loopback; IPv4 and
IPv6, TCP, and VXLAN on UDP 8472 and 4789 (the inner TCP packet is the
observation; the outer addresses are kept).

It yields :class:`~hopscope.model.Observation` tuples in batches, one per
TCP packet; everything else (ARP, UDP other than VXLAN, ICMP, IP fragments
past the first) is counted and passed over. Memory stays flat: the file is
read in blocks of :data:`BLOCK` bytes.

No scapy here: dissecting every packet with scapy runs at ~6k packets/s.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Final

from hopscope.errors import CaptureError, NotACaptureError
from hopscope.model import IN, KIND_PACKET, OUT, Observation

log = logging.getLogger(__name__)

BLOCK = 1 << 20
MAX_RECORD: Final = 1 << 18  # a packet record larger than this means a corrupt file
MAX_BLOCK: Final = 1 << 24  # a pcapng block larger than this means a corrupt file
VXLAN_PORTS: Final = frozenset((8472, 4789))

LT_NULL: Final = 0
LT_ETHERNET: Final = 1
LT_RAW: Final = 101
LT_SLL: Final = 113
LT_SLL2: Final = 276
LT_IPV4: Final = 228
LT_IPV6: Final = 229
_RAW_ALIASES: Final = {12: LT_RAW, 14: LT_RAW}
SUPPORTED_LINKTYPES: Final = {
    LT_NULL: "BSD loopback",
    LT_ETHERNET: "Ethernet",
    LT_RAW: "raw IP",
    LT_SLL: "Linux cooked (SLL)",
    LT_SLL2: "Linux cooked v2 (SLL2)",
    LT_IPV4: "raw IPv4",
    LT_IPV6: "raw IPv6",
}

_PCAP_MAGICS: Final = {
    b"\xd4\xc3\xb2\xa1": ("<", 1000),
    b"\xa1\xb2\xc3\xd4": (">", 1000),
    b"\x4d\x3c\xb2\xa1": ("<", 1),
    b"\xa1\xb2\x3c\x4d": (">", 1),
}
_PCAPNG_SHB: Final = b"\x0a\x0d\x0d\x0a"

_IP4: Final = struct.Struct(">BBHHHBBH4s4s")
_IP6: Final = struct.Struct(">IHBB16s16s")
_TCP: Final = struct.Struct(">HHIIBB")
_U16: Final = struct.Struct(">H")
_U16x3: Final = struct.Struct(">HHH")

# Extension headers that may sit between IPv6 and TCP.
_IP6_EXT: Final = frozenset((0, 43, 60, 51))

_new: Final = tuple.__new__

#: SYN-ACKs whose ACK a reader that passes over pure ACKs still waits for, at most
MAX_WANTED_ACKS: Final = 1 << 14


#: the bytes of an Ethernet frame's headers to a VXLAN-encapsulated TCP segment's payload
#: (with the timestamps option): a snap length under it can cut the TCP header
SNAP_HEADERS: Final = 14 + 20 + 8 + 8 + 14 + 20 + 32


@dataclass
class ReadStats:
    """What a reader saw in one file."""

    path: str
    format: str = ""
    packets: int = 0  # records read
    observations: int = 0  # TCP packets handed on
    skipped: int = 0  # records passed over (not TCP, fragments, unknown link)
    bytes_read: int = 0
    truncated: bool = False
    cut: int = 0  # records the snap length cut short (captured < original length)
    cut_max: int = 0  # the most bytes kept of such a record
    interfaces: dict[str, str] = field(default_factory=dict)  # name -> link type
    warnings: list[str] = field(default_factory=list)


def _decode_ip(
    data: bytes,
    l3: int,
    end: int,
    etype: int,
    ts: int,
    node: str,
    ifname: str,
    direction: str,
    vni: int = -1,
    osrc: bytes = b"",
    odst: bytes = b"",
    acks: dict[tuple[str, int, bytes], None] | None = None,
) -> Observation | None:
    """Decode an IPv4/IPv6 packet at ``data[l3:end]`` into an Observation (TCP only).

    With ``acks`` (a reader's, see ``pure_acks``), a pure ACK is passed over
    (None) unless it is the first of its flow at this interface since a SYN-ACK
    the other way, whose flow ``acks`` then holds.
    """
    if etype == 0x0800 and data[l3] == 0x45 and l3 + 40 <= end:
        # the common case, IPv4 without options: its fields read byte by byte (compiled,
        # that is a few instructions each; a struct unpack builds a tuple of objects)
        if data[l3 + 6] & 0x1F or data[l3 + 7]:
            return None  # not the first fragment: no L4 header
        proto = data[l3 + 9]
        if proto == 6:
            l4 = l3 + 20
            tot = (data[l3 + 2] << 8) | data[l3 + 3]
            ps = l4 + (data[l4 + 12] >> 4) * 4
            l4end = l3 + tot if tot else end
            plen = l4end - ps
            flags = data[l4 + 13]
            if plen <= 0 and acks is not None:
                if not flags & 0x07:
                    # a pure ACK (no SYN/FIN/RST), decided before anything is built
                    k = (ifname, vni, data[l3 + 12 : l3 + 24])  # addresses and ports as sent
                    if k not in acks:
                        return None
                    del acks[k]  # the handshake's ACK: the tracker times the handshake with it
                elif flags & 0x12 == 0x12:
                    # a SYN-ACK: want the ACK the other way
                    if len(acks) >= MAX_WANTED_ACKS:
                        del acks[next(iter(acks))]  # the oldest (its ACK carried data, or was lost)
                    acks[(ifname, vni, data[l3 + 16 : l3 + 20] + data[l3 + 12 : l3 + 16]
                          + data[l3 + 22 : l3 + 24] + data[l3 + 20 : l3 + 22])] = None
            return _new(Observation, (
                ts, -1, node, ifname, "", direction, KIND_PACKET, 6,
                data[l3 + 12 : l3 + 16], data[l3 + 16 : l3 + 20],
                (data[l4] << 8) | data[l4 + 1], (data[l4 + 2] << 8) | data[l4 + 3],
                (data[l4 + 4] << 24) | (data[l4 + 5] << 16) | (data[l4 + 6] << 8) | data[l4 + 7],
                (data[l4 + 8] << 24) | (data[l4 + 9] << 16) | (data[l4 + 10] << 8) | data[l4 + 11],
                flags, plen if plen > 0 else 0, (data[l3 + 4] << 8) | data[l3 + 5],
                data[ps : l4end if l4end < end else end] if plen > 0 else b"", vni, osrc, odst))
        if proto == 17 and vni < 0 and l3 + 44 <= end:
            # VXLAN (UDP to 8472 or 4789, the I flag): the inner frame's packet
            dport = (data[l3 + 22] << 8) | data[l3 + 23]
            if (dport == 8472 or dport == 4789) and data[l3 + 28] & 0x08:
                inner = l3 + 36
                if inner + 14 > end:
                    return None
                return _decode_ip(data, inner + 14, end,
                                  (data[inner + 12] << 8) | data[inner + 13], ts, node, ifname,
                                  direction,
                                  (data[l3 + 32] << 16) | (data[l3 + 33] << 8) | data[l3 + 34],
                                  data[l3 + 12 : l3 + 16], data[l3 + 16 : l3 + 20], acks)
        return None
    if etype == 0x0800:
        if end - l3 < 20:
            return None
        vihl, _tos, tot, ip_id, frag, _ttl, proto, _ck, src, dst = _IP4.unpack_from(data, l3)
        if frag & 0x1FFF:
            return None  # not the first fragment: no L4 header
        l4 = l3 + (vihl & 15) * 4
        # A total length of 0 is a TSO super-packet seen before segmentation.
        l4end = l3 + tot if tot else end
    elif etype == 0x86DD:
        if end - l3 < 40:
            return None
        _v, paylen, proto, _h, src, dst = _IP6.unpack_from(data, l3)
        l4 = l3 + 40
        l4end = l4 + paylen
        ip_id = -1
        while proto in _IP6_EXT or proto == 44:
            if l4 + 8 > end:
                return None
            nh = data[l4]
            if proto == 44:  # fragment header
                if _U16.unpack_from(data, l4 + 2)[0] & 0xFFF8:
                    return None
                l4 += 8
            elif proto == 51:
                l4 += (data[l4 + 1] + 2) * 4
            else:
                l4 += (data[l4 + 1] + 1) * 8
            proto = nh
    else:
        return None
    if proto == 6:
        if l4 + 20 > end:
            return None
        sport, dport, seq, ack, doff, flags = _TCP.unpack_from(data, l4)
        ps = l4 + (doff >> 4) * 4
        plen = l4end - ps
        if plen < 0:
            plen = 0
        return _new(
            Observation,
            (ts, -1, node, ifname, "", direction, KIND_PACKET, 6, src, dst, sport, dport,
             seq, ack, flags, plen, ip_id, data[ps:min(l4end, end)] if plen else b"",
             vni, osrc, odst),
        )
    if proto == 17 and vni < 0 and l4 + 24 <= end:
        sport, dport, _ulen = _U16x3.unpack_from(data, l4)
        if dport in VXLAN_PORTS and data[l4 + 8] & 0x08:
            # VXLAN: 8-byte header, then the inner Ethernet frame.
            inner = l4 + 16
            if inner + 14 > end:
                return None
            et = _U16.unpack_from(data, inner + 12)[0]
            vni_ = int.from_bytes(data[l4 + 12 : l4 + 15], "big")
            return _decode_ip(data, inner + 14, end, et, ts, node, ifname, direction,
                              vni_, src, dst, acks)
    return None


def flow_hash(ob: Observation) -> int:
    """16 bits that are the same for both directions of a TCP flow (its inner flow for VXLAN).

    The XOR of the addresses' and ports' even bytes, then of their odd bytes:
    what :func:`_ip_hash` reads from an IPv4 header without building anything.
    """
    hi = (ob.sport ^ ob.dport) >> 8
    lo = (ob.sport ^ ob.dport) & 0xFF
    a = ob.src + ob.dst
    for i in range(0, len(a) - 1, 2):
        hi ^= a[i]
        lo ^= a[i + 1]
    return (hi << 8) | lo


#: :func:`_ip_hash` of a packet that is no one's (not TCP, nor VXLAN around TCP)
NOT_TCP: Final = -2


def _ip_hash(data: bytes, l3: int, end: int) -> int:
    """:func:`flow_hash` from raw IPv4 bytes (VXLAN looked into); :data:`NOT_TCP`; -1 when unsure."""
    if l3 + 24 > end or data[l3] != 0x45:
        return -1
    proto = data[l3 + 9]
    if proto == 17 and data[l3 + 22 : l3 + 24] in (b"\x21\x18", b"\x12\xb5"):  # 8472, 4789
        i = l3 + 50  # UDP 8, VXLAN 8, inner Ethernet 14
        if i + 24 <= end and data[i - 2 : i] == b"\x08\x00" and data[i] == 0x45:
            if data[i + 9] != 6:
                return NOT_TCP
            l3 = i
        else:
            return -1
    elif proto != 6:
        return NOT_TCP
    return (((data[l3 + 12] ^ data[l3 + 14] ^ data[l3 + 16] ^ data[l3 + 18] ^ data[l3 + 20]
              ^ data[l3 + 22]) << 8)
            | (data[l3 + 13] ^ data[l3 + 15] ^ data[l3 + 17] ^ data[l3 + 19] ^ data[l3 + 21]
               ^ data[l3 + 23]))


def _link_hash(lt: int, data: bytes, s: int, e: int) -> int:
    """:func:`_ip_hash` behind link type ``lt``'s header at ``data[s:e]`` (-1 where it cannot look)."""
    if lt == LT_ETHERNET:
        return _ip_hash(data, s + 14, e) if data[s + 12 : s + 14] == b"\x08\x00" else -1
    if lt == LT_SLL2:
        return _ip_hash(data, s + 20, e) if data[s : s + 2] == b"\x08\x00" else -1
    if lt == LT_SLL:
        return _ip_hash(data, s + 16, e) if data[s + 14 : s + 16] == b"\x08\x00" else -1
    if lt == LT_RAW or lt == LT_IPV4:
        return _ip_hash(data, s, e)
    return -1


#: Load a packet adds to its share: its captured bytes plus this (the per-packet work)
PACKET_WEIGHT: Final = 256


class Shares:
    """Which of ``n`` readers of one file takes each TCP flow, the same in all of them.

    A flow's :func:`flow_hash` names a bucket; a bucket belongs, from the first
    packet seen in it, to the share with the least load so far (each packet adds
    its captured bytes plus :data:`PACKET_WEIGHT` to its bucket's share). Every
    reader scans the whole file and calls :meth:`owner` for the same packets in
    the same order, so they agree without talking. Pooled keep-alive
    connections carry a large part of a capture and a fixed split (hash modulo
    n) left one reader with 58 % of the work; the flows that come later even it out.
    """

    __slots__ = ("buckets", "load0", "load1", "loads", "n")

    def __init__(self, n: int) -> None:
        if not 1 <= n < 255:
            raise ValueError(f"shares: n must be 1 to 254, not {n}")
        self.n = n
        self.buckets: list[int] = [255] * 65536
        # the first two shares' loads are plain attributes (compiled: native integers,
        # not a list of int objects to box anew at every packet), the others' in a list
        self.load0 = 0
        self.load1 = 0
        self.loads: list[int] = [0] * n

    def load(self, k: int) -> int:
        """Share ``k``'s load so far."""
        return self.load0 if k == 0 else self.load1 if k == 1 else self.loads[k]

    def owner(self, h: int, weight: int) -> int:
        """The share of bucket ``h`` (assigned now if it has none), charged ``weight``."""
        o = self.buckets[h]
        if o == 255:
            o = 0
            least = self.load0
            for i in range(1, self.n):
                v = self.load(i)
                if v < least:
                    o = i
                    least = v
            self.buckets[h] = o
        if o == 0:
            self.load0 += weight
        elif o == 1:
            self.load1 += weight
        else:
            self.loads[o] += weight
        return o


def _decode_link(link: _Link, data: bytes, s: int, e: int, ts: int, node: str,
                 dr: str, acks: dict[tuple[str, int, bytes], None] | None = None
                 ) -> Observation | None:
    """Decode the frame at ``data[s:e]`` of ``link``'s link type (direction ``dr`` unless it says)."""
    lt = link.linktype
    if lt == LT_SLL2:  # tcpdump -i any
        if e - s < 20:
            return None
        idx = (data[s + 4] << 24) | (data[s + 5] << 16) | (data[s + 6] << 8) | data[s + 7]
        name = link.names.get(idx)
        if name is None:
            name = link.names[idx] = f"if{idx}"
        return _decode_ip(data, s + 20, e, (data[s] << 8) | data[s + 1], ts, node, name,
                          OUT if data[s + 10] == 4 else IN, -1, b"", b"", acks)
    if lt == LT_ETHERNET:
        if e - s < 14:
            return None
        et = (data[s + 12] << 8) | data[s + 13]
        s += 14
        while et == 0x8100 or et == 0x88A8:
            et = (data[s + 2] << 8) | data[s + 3]
            s += 4
        return _decode_ip(data, s, e, et, ts, node, link.ifname, dr, -1, b"", b"",
                          acks if link.ifname else None)
    if lt == LT_SLL:
        if e - s < 16:
            return None
        return _decode_ip(data, s + 16, e, (data[s + 14] << 8) | data[s + 15], ts, node,
                          link.ifname, OUT if data[s + 1] == 4 else IN)
    if lt == LT_RAW or lt == LT_IPV4 or lt == LT_IPV6:
        if e <= s:
            return None
        v = data[s] >> 4
        return _decode_ip(data, s, e, 0x0800 if v == 4 else 0x86DD if v == 6 else 0, ts, node,
                          link.ifname, dr)
    # LT_NULL: BSD loopback, the address family in either byte order
    if e - s < 4:
        return None
    fam = max(int.from_bytes(data[s : s + 4], "little"), int.from_bytes(data[s : s + 4], "big"))
    return _decode_ip(data, s + 4, e, 0x0800 if fam == 2 else 0x86DD, ts, node, link.ifname, dr)


class _Link:
    """Per-interface link-layer state: how to find the L3 header."""

    __slots__ = ("direction_known", "ifname", "linktype", "names", "scale", "snaplen", "tsoffset")

    def __init__(self, linktype: int, ifname: str, scale: tuple[int, int], tsoffset: int = 0,
                 snaplen: int = 0) -> None:
        self.linktype = _RAW_ALIASES.get(linktype, linktype)
        self.ifname = ifname
        self.scale = scale  # (multiplier, divisor): ns = ts * mul // div
        self.tsoffset = tsoffset
        self.snaplen = snaplen
        self.names: dict[int, str] = {}


class CaptureReader:
    """Read one capture file of one node as batches of observations.

    ``shard=(k, n)`` keeps only the flows of shard k of n (see
    :class:`Shares`); the default keeps everything. ``warn`` is called with one line per warning (truncation, corruption,
    unsupported link types); the same lines are kept in :attr:`stats`.
    """

    def __init__(self, path: str | os.PathLike[str], node: str,
                 warn: Callable[[str], None] | None = None,
                 progress: Callable[[int], None] | None = None,
                 shard: tuple[int, int] = (0, 1), directions: bool = True,
                 pure_acks: bool = True) -> None:
        self.path = os.fspath(path)
        self.node = node
        #: read each packet's direction from pcapng's epb_flags (False: leave it "")
        self.directions = directions
        #: False: pass over pure ACKs (no payload, no SYN/FIN/RST; a third of a busy
        #: capture) but a handshake's, which is all a NodeTracker takes from them; not
        #: on shared interface names ("", "any"), whose copies the tracker tells apart
        self.pure_acks = pure_acks
        #: (k, n): keep only the TCP flows that :class:`Shares` gives share k of n,
        #: so that n processes can share one file (every copy of a flow's
        #: packets, VXLAN-encapsulated or not, lands in the same share)
        self.shard = shard
        self.stats = ReadStats(self.path)
        self._warn_cb = warn
        self._progress = progress
        self._warned: set[str] = set()
        self._snaplen0 = 0

    # -- helpers -----------------------------------------------------------
    def _warn(self, key: str, msg: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        self.stats.warnings.append(msg)
        if self._warn_cb is not None:
            log.debug("%s", msg)  # the caller shows it
            self._warn_cb(msg)
        else:
            log.warning("%s", msg)

    def _truncated(self, what: str) -> None:
        self.stats.truncated = True
        self._warn("truncated", f"{self.path}: truncated: the file ends inside {what} after "
                   f"{self.stats.packets} packets; the rest is lost (was the capture still running?)")

    def _open(self) -> BinaryIO:
        try:
            return open(self.path, "rb")
        except IsADirectoryError:
            raise CaptureError(f"{self.path}: is a directory; give capture files") from None
        except OSError as exc:
            raise CaptureError(f"{self.path}: cannot open: {exc.strerror}") from None

    # -- entry point ---------------------------------------------------------
    def __iter__(self) -> Iterator[list[Observation]]:
        with self._open() as f:
            head = f.read(4)
            if head in _PCAP_MAGICS:
                yield from self._pcap(f, head)
            elif head == _PCAPNG_SHB:
                yield from self._pcapng(f, head)
            elif not head:
                raise NotACaptureError(f"{self.path}: empty file, not a capture")
            elif head[:2] == b"\x1f\x8b":
                raise NotACaptureError(f"{self.path}: gzip-compressed; run gunzip on it first")
            else:
                raise NotACaptureError(
                    f"{self.path}: not a pcap or pcapng capture (starts with 0x{head.hex()}); "
                    "give a file written by `tcpdump -w` or `dumpcap -w`")
        st = self.stats
        if st.cut:
            # a snap length (tcpdump -s N): say what it costs, once the file is read
            lost = (", and a VXLAN packet (50 bytes of headers more) whose TCP header it cut is "
                    "left out" if st.cut_max < SNAP_HEADERS else "")
            self._warn("snap", f"{self.path}: {st.cut:,} of {st.packets:,} packets were cut short by "
                       f"the capture's snap length (at most {st.cut_max:,} bytes kept): a request "
                       "head longer than that is read in part, flagged truncated (an id past the "
                       f"cut is lost){lost}; capture whole packets (tcpdump -s 0)")

    # -- classic pcap --------------------------------------------------------
    def _pcap(self, f: BinaryIO, magic: bytes) -> Iterator[list[Observation]]:
        endian, mul = _PCAP_MAGICS[magic]
        rest = f.read(20)
        if len(rest) < 20:
            raise NotACaptureError(f"{self.path}: pcap header cut short ({4 + len(rest)} of 24 bytes)")
        _vmaj, _vmin, _tz, _sig, snaplen, linktype = struct.unpack(endian + "HHiIII", rest)
        # the link type is the low 16 bits; bit 26 says an FCS ends each frame and bits 28-31
        # give its length (the IP header's total length keeps it out of the payload)
        linktype &= 0xFFFF
        self.stats.format = "pcap-" + ("us" if mul == 1000 else "ns")
        ifname = {LT_SLL: "any", LT_SLL2: "any"}.get(linktype, "")
        link = _Link(linktype, ifname, (mul, 1), snaplen=snaplen)
        if not self._link_ok(link):
            return
        self.stats.interfaces[ifname or "(file)"] = SUPPORTED_LINKTYPES[link.linktype]
        rec = struct.Struct(endian + "IIII")
        node = self.node
        ksh, nsh = self.shard
        shares = Shares(nsh)
        acks: dict[tuple[str, int, bytes], None] | None = None if self.pure_acks else {}
        lt = link.linktype
        h = 0
        data = b""
        pos = 0
        done = 24  # bytes before data[0]: the file header, read above
        eof = False
        stats = self.stats
        sec: int
        frac: int
        incl: int
        orig: int
        while True:
            batch: list[Observation] = []
            n = len(data)
            npk = 0
            cut = 0
            cut_max = 0
            while pos + 16 <= n:
                sec, frac, incl, orig = rec.unpack_from(data, pos)
                end = pos + 16 + incl
                if end > n:
                    if incl > MAX_RECORD:
                        self._warn("corrupt", f"{self.path}: corrupt packet record at byte {done + pos} "
                                   f"(length {incl}); stopping there")
                        eof = True
                        pos = n
                    break
                npk += 1
                if incl < orig:
                    cut += 1
                    if incl > cut_max:
                        cut_max = incl
                if nsh > 1:
                    h = _link_hash(lt, data, pos + 16, end)
                    if h == NOT_TCP or (h >= 0 and shares.owner(h, incl + PACKET_WEIGHT) != ksh):
                        pos = end
                        continue
                    if h < 0:
                        # unsure: every reader decodes it, so none may pass over a pure ACK
                        ob = _decode_link(link, data, pos + 16, end,
                                          sec * 1_000_000_000 + frac * mul, node, "")
                        if ob is not None and shares.owner(flow_hash(ob),
                                                           incl + PACKET_WEIGHT) == ksh:
                            batch.append(ob)
                        pos = end
                        continue
                ob = _decode_link(link, data, pos + 16, end, sec * 1_000_000_000 + frac * mul, node,
                                  "", acks)
                if ob is not None:
                    batch.append(ob)
                pos = end
            stats.packets += npk
            stats.skipped += npk - len(batch)  # (other shards' packets included)
            stats.observations += len(batch)
            stats.cut += cut
            if cut_max > stats.cut_max:
                stats.cut_max = cut_max
            if batch:
                yield batch
            if eof:
                if pos < len(data):
                    self._truncated("a packet record")
                return
            done += pos
            data, eof = self._refill(f, data, pos)
            pos = 0

    def _link_ok(self, link: _Link) -> bool:
        if link.linktype in SUPPORTED_LINKTYPES:
            return True
        self._warn(f"lt{link.linktype}", f"{self.path}: interface {link.ifname or '?'} has link type "
                   f"{link.linktype}, which hopscope does not read; its packets are passed over")
        return False

    # -- pcapng --------------------------------------------------------------
    def _pcapng(self, f: BinaryIO, head: bytes) -> Iterator[list[Observation]]:
        self.stats.format = "pcapng"
        stats = self.stats
        node = self.node
        data = head + f.read(BLOCK)
        stats.bytes_read += len(data)
        pos = 0
        eof = False
        endian = "<"
        hdr = struct.Struct("<II")
        # type, length, interface, ts high, ts low, captured, original
        epb = struct.Struct("<IIIIIII")
        opt = struct.Struct("<HHI")
        want_dir = self.directions
        nifs = 0
        # per interface: (link, multiplier, divisor, offset, name if Ethernet else "")
        ifs: list[tuple[_Link, int, int, int, str] | None] = []
        ksh, nsh = self.shard
        shares = Shares(nsh)
        acks: dict[tuple[str, int, bytes], None] | None = None if self.pure_acks else {}
        h = 0
        last_ts = 0
        done = 0
        first = True
        dirs = ("", IN, OUT, "")
        btype: int
        blen: int
        ifid: int
        hi: int
        lo: int
        cap: int
        orig: int
        while True:
            batch: list[Observation] = []
            n = len(data)
            npk = 0
            cut = 0
            cut_max = 0
            while pos + 12 <= n:
                if pos + 32 <= n:
                    btype, blen, ifid, hi, lo, cap, orig = epb.unpack_from(data, pos)
                else:
                    btype, blen = hdr.unpack_from(data, pos)
                end = pos + blen
                if btype == 6 and end <= n and blen >= 32:
                    # Enhanced Packet Block: the hot path
                    first = False
                    npk += 1
                    if cap < orig:
                        cut += 1
                        if cap > cut_max:
                            cut_max = cap
                    info = ifs[ifid] if ifid < nifs else None
                    if info is not None:
                        lk, mul, div, tsoff, ifname = info
                        s = pos + 28
                        # Ethernet carrying IPv4 (the common case) is decoded without a detour
                        fast = ifname and cap >= 34 and data[s + 12] == 8 and data[s + 13] == 0
                        h = -1
                        if nsh > 1:
                            # another process's flow? (decided from the raw bytes)
                            ce = s + cap if s + cap < end - 4 else end - 4
                            h = _ip_hash(data, s + 14, ce) if fast else _link_hash(
                                lk.linktype, data, s, ce)
                            if h == NOT_TCP or (h >= 0 and shares.owner(h, cap + PACKET_WEIGHT) != ksh):
                                pos = end
                                continue
                        last_ts = ((hi << 32) | lo) * mul // div + tsoff if mul != 1 or div != 1 or \
                            tsoff else (hi << 32) | lo
                        oo = s + ((cap + 3) & ~3)
                        if oo > end - 4:
                            oo = end - 4
                        dr = ""
                        if want_dir and oo + 8 <= end - 4:  # epb_flags carries the direction
                            code, olen, val = opt.unpack_from(data, oo)
                            if code == 2 and olen == 4:
                                dr = dirs[val & 3]
                            elif code != 0:
                                dr = self._epb_direction(data, oo, end - 4, endian)
                        pe = s + cap if s + cap < oo else oo
                        if nsh > 1 and h < 0:
                            # unsure: every reader decodes it, so none may pass over a pure ACK
                            ob = _decode_link(lk, data, s, pe, last_ts, node, dr)
                            if ob is not None and shares.owner(flow_hash(ob),
                                                               cap + PACKET_WEIGHT) == ksh:
                                batch.append(ob)
                        else:
                            if fast:
                                ob = _decode_ip(data, s + 14, pe, 0x0800, last_ts, node, ifname, dr,
                                                -1, b"", b"", acks)
                            else:
                                ob = _decode_link(lk, data, s, pe, last_ts, node, dr, acks)
                            if ob is not None:
                                batch.append(ob)
                    pos = end
                    continue
                if btype == 0x0A0D0D0A:  # Section Header Block (palindromic type)
                    bom = data[pos + 8 : pos + 12]
                    if len(bom) < 4:
                        break
                    if bom == b"\x4d\x3c\x2b\x1a":
                        endian = "<"
                    elif bom == b"\x1a\x2b\x3c\x4d":
                        endian = ">"
                    elif first:
                        raise NotACaptureError(f"{self.path}: starts like pcapng but the byte-order "
                                               "magic is wrong; not a capture")
                    else:
                        self._corrupt(done + pos, btype, blen)
                        eof, pos = True, n
                        break
                    hdr = struct.Struct(endian + "II")
                    epb = struct.Struct(endian + "IIIIIII")
                    opt = struct.Struct(endian + "HHI")
                    ifs = []
                    nifs = 0
                    btype, blen = hdr.unpack_from(data, pos)
                    end = pos + blen
                if blen < 12 or blen & 3 or blen > MAX_BLOCK:
                    if first:
                        raise NotACaptureError(f"{self.path}: starts like pcapng but its first block is "
                                               "malformed; not a capture")
                    self._corrupt(done + pos, btype, blen)
                    eof, pos = True, n
                    break
                if end > n:
                    break
                first = False
                if btype == 1:  # Interface Description Block
                    link = self._idb(data, pos, end, endian, len(ifs))
                    if link is not None and self._link_ok(link):
                        ifs.append((link, link.scale[0], link.scale[1], link.tsoffset,
                                    link.ifname if link.linktype == LT_ETHERNET else ""))
                        nifs = len(ifs)
                        stats.interfaces[link.ifname] = SUPPORTED_LINKTYPES[link.linktype]
                        self._snaplen0 = link.snaplen if len(ifs) == 1 else self._snaplen0
                    else:
                        ifs.append(None)
                        nifs = len(ifs)
                elif btype == 3:  # Simple Packet Block: interface 0, no timestamp
                    npk += 1
                    self._warn("spb", f"{self.path}: simple packet blocks carry no timestamp; they get "
                               "the previous packet's time")
                    info = ifs[0] if ifs else None
                    if info is not None:
                        orig = hdr.unpack_from(data, pos + 8)[0]
                        cap = min(orig, self._snaplen0 or orig, blen - 16)
                        ob = _decode_link(info[0], data, pos + 12, pos + 12 + cap, last_ts, node,
                                          "")
                        if ob is not None and (nsh == 1 or shares.owner(
                                flow_hash(ob), cap + PACKET_WEIGHT) == ksh):
                            batch.append(ob)
                elif btype == 2:  # obsolete Packet Block
                    npk += 1
                    ifid = struct.unpack_from(endian + "H", data, pos + 8)[0]
                    hi, lo, cap, _orig = struct.unpack_from(endian + "IIII", data, pos + 12)
                    info = ifs[ifid] if ifid < len(ifs) else None
                    if info is not None:
                        lk, mul, div, tsoff, _e = info
                        last_ts = ((hi << 32) | lo) * mul // div + tsoff
                        ob = _decode_link(lk, data, pos + 28, min(pos + 28 + cap, end - 4), last_ts,
                                          node, "")
                        if ob is not None and (nsh == 1 or shares.owner(
                                flow_hash(ob), cap + PACKET_WEIGHT) == ksh):
                            batch.append(ob)
                # other blocks (NRB, ISB, DSB, custom) carry nothing we need
                pos = end
            stats.packets += npk
            stats.skipped += npk - len(batch)
            stats.observations += len(batch)
            stats.cut += cut
            if cut_max > stats.cut_max:
                stats.cut_max = cut_max
            if batch:
                yield batch
            if eof:
                if pos < len(data):
                    self._truncated("a block")
                return
            done += pos
            data, eof = self._refill(f, data, pos)
            pos = 0

    def _refill(self, f: BinaryIO, data: bytes, pos: int) -> tuple[bytes, bool]:
        """The unread rest of ``data`` and the next block of the file; True at the end.

        From a regular file, the rest is read again with the block (a seek back):
        one copy of the bytes instead of two (the block, then the two joined).
        """
        rest = len(data) - pos
        if rest and f.seekable():
            f.seek(-rest, os.SEEK_CUR)
            data = f.read(BLOCK + rest)
            new = len(data) - rest
        else:
            chunk = f.read(BLOCK)
            new = len(chunk)
            data = data[pos:] + chunk if rest else chunk
        self.stats.bytes_read += new
        if self._progress is not None:
            self._progress(new)
        return data, new <= 0

    def _corrupt(self, at: int, btype: int, blen: int) -> None:
        self._warn("corrupt", f"{self.path}: corrupt block (type {btype:#x}, length {blen}) at byte "
                   f"{at}; stopping there")

    def _idb(self, data: bytes, pos: int, end: int, endian: str, index: int) -> _Link | None:
        linktype, _res, snaplen = struct.unpack_from(endian + "HHI", data, pos + 8)
        ifname = ""
        scale = (1000, 1)  # default resolution: microseconds
        tsoffset = 0
        o = pos + 16
        stop = end - 4
        while o + 4 <= stop:
            code, olen = struct.unpack_from(endian + "HH", data, o)
            if code == 0:
                break
            val = data[o + 4 : o + 4 + olen]
            if code == 2:
                ifname = val.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif code == 9 and olen >= 1:
                r = val[0]
                if r & 0x80:  # 2^-k seconds
                    scale = (1_000_000_000, 1 << (r & 0x7F))
                elif r <= 9:  # 10^-r seconds
                    scale = (10 ** (9 - r), 1)
                else:  # finer than a nanosecond
                    scale = (1, 10 ** (r - 9))
            elif code == 14 and olen == 8:
                tsoffset = struct.unpack_from(endian + "q", val)[0] * 1_000_000_000
            o += 4 + ((olen + 3) & ~3)
        if not ifname:
            ifname = f"if{index}"
        return _Link(linktype, ifname, scale, tsoffset, snaplen)

    @staticmethod
    def _epb_direction(data: bytes, o: int, stop: int, endian: str) -> str:
        while o + 4 <= stop:
            code, olen = struct.unpack_from(endian + "HH", data, o)
            if code == 0:
                return ""
            if code == 2 and olen == 4:
                flags = struct.unpack_from(endian + "I", data, o + 4)[0] & 3
                return IN if flags == 1 else OUT if flags == 2 else ""
            o += 4 + ((olen + 3) & ~3)
        return ""


def _endian_u16(data: bytes, pos: int, endian: str) -> int:
    return int(struct.unpack_from(endian + "H", data, pos)[0])


def read_all(path: str | os.PathLike[str], node: str) -> tuple[list[Observation], ReadStats]:
    """Read a whole capture into a list (for tests and small files)."""
    r = CaptureReader(path, node)
    out: list[Observation] = []
    for batch in r:
        out.extend(batch)
    return out, r.stats
