"""Write packet observations back out as a pcapng file, for Wireshark and tshark.

An observation keeps a packet's headers as fields and at most the first bytes
of its payload, so the frames are rebuilt: Ethernet (zero MACs), IPv4 (with
its id and a correct header checksum), TCP (ports, sequence numbers, flags;
no options, checksum 0), the payload bytes that were kept; a VXLAN packet
gets its outer Ethernet, IPv4 and UDP and the VXLAN header around that
(outer UDP port 4789, IANA's VXLAN port, which Wireshark decodes as VXLAN
without being told; an observation does not keep flannel's 8472). Each
record's original length is the packet's full length, so truncation shows
as such (``[Packet size limited during capture]``). One interface block per ``node/interface``; every packet has
its direction (``epb_flags``) and a comment (its observation point, and
whatever the caller adds).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from hopscope.model import IN, Observation

IPV4_LEN = 4

LINKTYPE_ETHERNET = 1
VXLAN_PORT = 4789
SNAPLEN = 0xFFFF

_ETH = b"\0" * 12
_ETH_IP4 = _ETH + b"\x08\x00"


def _opt(code: int, value: bytes) -> bytes:
    pad = -len(value) % 4
    return struct.pack("<HH", code, len(value)) + value + b"\0" * pad


def _block(btype: int, body: bytes) -> bytes:
    n = 12 + len(body)
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


def _ip_checksum(hdr: bytes) -> int:
    s = sum(struct.unpack(f">{len(hdr) // 2}H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ipv4(src: bytes, dst: bytes, proto: int, ip_id: int, l4len: int) -> bytes:
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + l4len, ip_id & 0xFFFF, 0x4000, 64, proto, 0,
                      src, dst)
    return hdr[:10] + struct.pack(">H", _ip_checksum(hdr)) + hdr[12:]


def frame(o: Observation) -> tuple[bytes, int]:
    """The rebuilt Ethernet frame of a packet observation (IPv4), and its original length."""
    if len(o.src) != IPV4_LEN:
        raise ValueError("only IPv4 packets can be rebuilt")
    tcp = struct.pack(">HHIIBBHHH", o.sport, o.dport, o.seq, o.ack, 5 << 4, o.flags, 0xFFFF, 0, 0)
    ip = _ipv4(o.src, o.dst, 6, max(o.ip_id, 0), 20 + o.plen) + tcp
    kept = o.payload[:o.plen]
    inner = _ETH_IP4 + ip
    full = len(inner) + o.plen
    if o.vni >= 0 and len(o.outer_src) == IPV4_LEN:
        udp_len = 8 + 8 + full
        head = (_ETH_IP4 + _ipv4(o.outer_src, o.outer_dst, 17, 0, udp_len)
                + struct.pack(">HHHH", VXLAN_PORT, VXLAN_PORT, udp_len, 0)
                + struct.pack(">II", 0x08000000, (o.vni & 0xFFFFFF) << 8))
        return head + inner + kept, len(head) + full
    return inner + kept, full


class PcapngWriter:
    """Append packets to a pcapng stream; interfaces are declared on first use."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.ifaces: dict[str, int] = {}
        self.packets = 0
        shb = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + _opt(4, b"hopscope") + _opt(0, b"")
        f.write(_block(0x0A0D0D0A, shb))

    def _iface(self, name: str) -> int:
        idx = self.ifaces.get(name)
        if idx is None:
            idx = self.ifaces[name] = len(self.ifaces)
            body = (struct.pack("<HHI", LINKTYPE_ETHERNET, 0, SNAPLEN) + _opt(2, name.encode())
                    + _opt(9, b"\x09") + _opt(0, b""))  # if_tsresol: nanoseconds
            self.f.write(_block(1, body))
        return idx

    def write(self, o: Observation, comment: str = "") -> None:
        """One packet observation (its wall-clock time, ``ts_real_ns``)."""
        data, orig = frame(o)
        idx = self._iface(f"{o.node}/{o.ifname}")
        ts = o.ts_real_ns
        opts = _opt(2, struct.pack("<I", 1 if o.direction == IN else 2))  # epb_flags
        note = o.point + (f": {comment}" if comment else "")
        opts += _opt(1, note.encode()) + _opt(0, b"")
        body = struct.pack("<IIIII", idx, ts >> 32, ts & 0xFFFFFFFF, len(data), orig)
        self.f.write(_block(6, body + data + b"\0" * (-len(data) % 4) + opts))
        self.packets += 1


def write_pcapng(path: str | Path, packets: Iterable[Observation],
                 comment: Callable[[Observation], str] | None = None) -> int:
    """Write ``packets`` (IPv4 packet observations, in any order) to ``path`` sorted by
    time; returns how many were written. Written to a temporary name, then renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        w = PcapngWriter(f)
        for o in sorted(packets, key=lambda o: o.ts_real_ns):
            w.write(o, comment(o) if comment else "")
    tmp.replace(path)
    return w.packets
