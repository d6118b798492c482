"""The agent's packets from AF_PACKET capture: for nodes where BPF cannot load.

One ``AF_PACKET`` socket per agent (all interfaces of the node's network
namespace), a ``TPACKET_V3`` ring mapped into memory and read block by block,
and a classic BPF socket filter so that only the packets that matter reach
Python, truncated to their headers and the first bytes of payload:

* IPv4 TCP on the interfaces the agent watches (chosen by ifindex in the
  filter; the filter is rebuilt when interfaces come and go), and on the
  underlay the TCP inside VXLAN (UDP 8472/4789); at the public NIC only
  the entry port's connections (not the agent's own to the collector);
* with SYN, FIN or RST set, or carrying payload;
* pure ACKs only where the stitcher uses them: arriving at the public NIC
  (the handshake's last packet; the tc classifier keeps per-flow state to
  pick that one, a socket filter cannot).

The observations are those the tc classifiers and ``hopscope replay``
produce; the stitcher is the same. Timestamps of AF_PACKET are wall clock
(``CLOCK_REALTIME``); ``ts_mono_ns`` is derived with the agent's sampled
offset. Packets the kernel could not queue (ring full) are counted from
``PACKET_STATISTICS`` as ``capture_lost``.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import select
import socket
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from hopscope.agent.events import PAYLOAD_MAX, Iface

from hopscope.capture import _decode_ip
from hopscope.errors import HopscopeError, PrivilegeError
from hopscope.model import IN, NIC, OUT, UNDERLAY, Observation

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
SO_ATTACH_FILTER = 26
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
PACKET_OUTGOING = 4

#: bytes kept of each packet: Ethernet + IPv4 + TCP headers at their largest,
#: VXLAN's outer headers, and as much payload as the tc classifier sends at most (every
#: segment of a 1,500-byte MTU whole, a head of 2 KB in it)
SNAPLEN = 14 + 60 + 60 + 50 + PAYLOAD_MAX
VXLAN_PORTS = (8472, 4789)
#: 128 blocks of 64 KiB: a block is handed over when full or BLOCK_TIMEOUT_MS after its
#: first packet, so a trickle of packets takes one block per timeout; many small blocks
#: give the agent's loop ~0.6 s of slack even then, and thousands of packets at a burst
BLOCK_SIZE = 1 << 16
BLOCK_NR = 128
FRAME_SIZE = 2048
BLOCK_TIMEOUT_MS = 5

NIC_UNDERLAY = "nic+underlay"

_BLOCK = struct.Struct("<8xIII")  # (version, offset_to_priv) block_status, num_pkts, first
_PKT = struct.Struct("<IIIIIIHH")  # next, sec, nsec, snaplen, len, status, mac, net
_SLL = struct.Struct("<HHiHBB")  # family, protocol, ifindex, hatype, pkttype, halen
_SLL_AT = 48  # TPACKET_ALIGN(sizeof(struct tpacket3_hdr))
_STATS = struct.Struct("<III")  # tp_packets, tp_drops, tp_freeze_q_cnt
_U16 = struct.Struct(">H")


class CaptureError(HopscopeError):
    """The AF_PACKET capture could not be set up."""


# --------------------------------------------------------------------------------------
# classic BPF: a small assembler with labels, and the agent's filter


# opcodes (linux/filter.h, linux/bpf_common.h)
LD, LDX, ALU, JMP, RET, MISC = 0x00, 0x01, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
ABS, IND, MSH = 0x20, 0x40, 0xA0
ADD, SUB, LSH, RSH = 0x00, 0x10, 0x60, 0x70
JA, JEQ, JGT, JSET = 0x00, 0x10, 0x20, 0x40
K, X = 0x00, 0x08
TAX = 0x00
SKF_AD_OFF = -0x1000
SKF_AD_PKTTYPE = 4
SKF_AD_IFINDEX = 8


@dataclass(frozen=True)
class Insn:
    code: int
    jt: int | str = 0
    jf: int | str = 0
    k: int | str = 0


@dataclass(frozen=True)
class Label:
    name: str


def assemble(prog: Iterable[Insn | Label]) -> list[tuple[int, int, int, int]]:
    """Resolve labels: ``jt``/``jf`` (and ``k`` of ``ja``) may name a label ahead."""
    insns: list[Insn] = []
    where: dict[str, int] = {}
    for p in prog:
        if isinstance(p, Label):
            if p.name in where:
                raise ValueError(f"label {p.name} defined twice")
            where[p.name] = len(insns)
        else:
            insns.append(p)
    out = []
    for i, ins in enumerate(insns):

        def rel(t: int | str, i: int = i) -> int:
            if isinstance(t, int):
                return t
            if t not in where:
                raise ValueError(f"no label {t}")
            d = where[t] - i - 1
            if d < 0:
                raise ValueError(f"jump back to {t} (classic BPF jumps only forward)")
            return d

        jt, jf = rel(ins.jt), rel(ins.jf)
        k = rel(ins.k) if ins.code == JMP | JA else ins.k
        assert isinstance(k, int)
        if jt > 255 or jf > 255:
            raise ValueError(f"conditional jump at {i} too far ({jt}, {jf}): use ja")
        out.append((ins.code, jt, jf, k & 0xFFFFFFFF))
    if len(out) > 4096:
        raise ValueError(f"filter too long ({len(out)} instructions)")
    return out


def _tcp_block(l3: int, pure_ack_in: bool, accept: str, drop: str, port: int | None = None
               ) -> list[Insn | Label]:
    """IPv4 TCP at ``l3`` (the frame's bytes): accept with control flags or payload.

    The Ethernet type in front of ``l3`` has been checked already. ``pure_ack_in``
    also accepts payload-less ACKs that arrive (not those sent). ``port``: only
    segments from or to it (the entry port, at the public NIC)."""
    p: list[Insn | Label] = [
        Insn(LD | B | ABS, k=l3 + 9), Insn(JMP | JEQ | K, 0, drop, 6),
        Insn(LD | H | ABS, k=l3 + 6), Insn(JMP | JSET | K, drop, 0, 0x1FFF),  # a later fragment
        Insn(LDX | B | MSH, k=l3),  # X = IHL * 4
    ]
    if port is not None:  # source port, else destination port
        p += [Insn(LD | H | IND, k=l3), Insn(JMP | JEQ | K, 2, 0, port),
              Insn(LD | H | IND, k=l3 + 2), Insn(JMP | JEQ | K, 0, drop, port)]
    p += [
        Insn(LD | B | IND, k=l3 + 13), Insn(JMP | JSET | K, accept, 0, 0x07),  # SYN FIN RST
        Insn(LD | B | IND, k=l3 + 12), Insn(ALU | RSH | K, k=4), Insn(ALU | LSH | K, k=2),
        Insn(ALU | ADD | X), Insn(MISC | TAX),  # X = IP + TCP header length
        Insn(LD | H | ABS, k=l3 + 2), Insn(ALU | SUB | X),  # A = payload length
        Insn(JMP | JGT | K, accept, 0, 0),
    ]
    if pure_ack_in:
        p += [Insn(LD | W | ABS, k=SKF_AD_OFF + SKF_AD_PKTTYPE),
              Insn(JMP | JEQ | K, drop, accept, PACKET_OUTGOING)]
    else:
        p.append(Insn(JMP | JA, k=drop))
    return p


def socket_filter(roles: Mapping[int, str], snaplen: int = SNAPLEN, entry_port: int = 80
                  ) -> list[tuple[int, int, int, int]]:
    """The classic BPF program for interfaces ``roles`` (ifindex -> observation point).

    At the public NIC only the ``entry_port``'s connections pass (as the tc classifier
    does): the node's other traffic there, the agent's own batches to the collector
    among it, is not a request of the model."""
    groups: dict[str, list[int]] = {}
    for idx, point in sorted(roles.items()):
        groups.setdefault(point, []).append(idx)
    p: list[Insn | Label] = [Insn(LD | W | ABS, k=SKF_AD_OFF + SKF_AD_IFINDEX)]
    for point, idxs in groups.items():
        for idx in idxs:  # jeq, else skip the ja: no limit on how far the block is
            p += [Insn(JMP | JEQ | K, 0, 1, idx), Insn(JMP | JA, k=f"role-{point}")]
    p.append(Insn(JMP | JA, k="drop"))
    for point in groups:
        p.append(Label(f"role-{point}"))
        tag = point.replace("+", "_")
        if point in (UNDERLAY, NIC_UNDERLAY):
            inner = 14 + 20 + 8 + 8 + 14  # outer IPv4 without options, UDP, VXLAN, Ethernet
            p += [
                Insn(LD | H | ABS, k=12), Insn(JMP | JEQ | K, 0, "drop", 0x0800),
                Insn(LD | B | ABS, k=14 + 9),
                Insn(JMP | JEQ | K, 0, f"{tag}-tcp" if point == NIC_UNDERLAY else "drop", 17),
                Insn(LD | B | ABS, k=14), Insn(JMP | JEQ | K, 0, "drop", 0x45),
                Insn(LD | H | ABS, k=14 + 20 + 2),
                Insn(JMP | JEQ | K, 1, 0, VXLAN_PORTS[0]),
                Insn(JMP | JEQ | K, 0, "drop", VXLAN_PORTS[1]),
                Insn(LD | H | ABS, k=inner - 2), Insn(JMP | JEQ | K, 0, "drop", 0x0800),
                *_tcp_block(inner, False, "accept", "drop"),
            ]
            if point == NIC_UNDERLAY:
                p += [Label(f"{tag}-tcp"), *_tcp_block(14, True, "accept", "drop", entry_port)]
        else:
            p += [Insn(LD | H | ABS, k=12), Insn(JMP | JEQ | K, 0, "drop", 0x0800),
                  *_tcp_block(14, point == NIC, "accept", "drop",
                              entry_port if point == NIC else None)]
    p += [Label("accept"), Insn(RET | K, k=snaplen), Label("drop"), Insn(RET | K, k=0)]
    return assemble(p)


def attach_filter(sock: socket.socket, prog: list[tuple[int, int, int, int]]) -> None:
    """``SO_ATTACH_FILTER`` (replaces the socket's filter atomically)."""
    raw = b"".join(struct.pack("<HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# --------------------------------------------------------------------------------------
# the capture source


class CaptureSource:
    """Packets of the node's interfaces from one TPACKET_V3 ring.

    ``set_interfaces`` (re)builds the filter; ``drain`` turns every block the
    kernel has handed over into observations; ``stats`` counts what the
    kernel queued (``capture_sent``) and could not (``capture_lost``).
    """

    def __init__(self, node: str, mono_to_real: Callable[[], int],
                 block_size: int = BLOCK_SIZE, block_nr: int = BLOCK_NR,
                 entry_port: int = 80) -> None:
        self.node = node
        self.entry_port = entry_port
        self.mono_to_real = mono_to_real
        self.ifaces: dict[int, Iface] = {}
        self.block_size = block_size
        self.block_nr = block_nr
        self.sent = 0
        self.lost = 0
        self.observations = 0
        self.other = 0  # packets the filter passed that are not TCP after all
        self._next = 0
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except PermissionError as exc:  # 77: a restart does not grant the capability
            raise PrivilegeError(f"cannot open an AF_PACKET socket: {exc.strerror} (needs "
                                 "CAP_NET_RAW: run as root or as the hopscope-agent unit)") from exc
        except OSError as exc:
            raise CaptureError(f"cannot open an AF_PACKET socket: {exc.strerror} "
                               "(needs CAP_NET_RAW)") from exc
        try:
            # a filter that passes nothing until the interfaces are known
            attach_filter(self.sock, [(RET | K, 0, 0, 0)])
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            frames = block_size // FRAME_SIZE * block_nr
            req = struct.pack("<7I", block_size, block_nr, FRAME_SIZE, frames, BLOCK_TIMEOUT_MS,
                              0, 0)
            self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            self.ring = mmap.mmap(self.sock.fileno(), block_size * block_nr, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            self.sock.close()
            raise CaptureError(f"cannot set up the TPACKET_V3 ring: {exc}") from exc
        # the ring as 32-bit words: a block goes back to the kernel with one 4-byte store of
        # its status (struct.pack_into would store it a byte at a time; see ringbuf.u64_word)
        self._words = memoryview(self.ring).cast("I")
        self._poll = select.epoll()
        self._poll.register(self.sock.fileno(), select.EPOLLIN)
        self._stats()  # reset the kernel's counters (they count from socket creation)
        self.sent = self.lost = 0

    def set_interfaces(self, ifaces: Mapping[int, Iface]) -> None:
        self.ifaces = dict(ifaces)
        attach_filter(self.sock, socket_filter({i: f.point for i, f in self.ifaces.items()},
                                               entry_port=self.entry_port))

    def wait(self, timeout: float) -> bool:
        return bool(self._poll.poll(timeout))

    def drain(self, out: list[Observation]) -> int:
        """Append the observations of every block ready; returns how many packets were read."""
        ring = self.ring
        n = 0
        for _ in range(self.block_nr):
            base = self._next * self.block_size
            status, num, first = _BLOCK.unpack_from(ring, base)
            if not status & TP_STATUS_USER:
                break
            self._block(ring, base, num, first, out)
            n += num
            self._words[(base + 8) >> 2] = TP_STATUS_KERNEL
            self._next = (self._next + 1) % self.block_nr
        return n

    def flush(self, out: list[Observation]) -> int:
        """:meth:`drain`, the block still being filled included: the kernel hands a block
        over when it is full or BLOCK_TIMEOUT_MS after its first packet, so the last
        packets before a stop wait for that (at most twice the timeout here)."""
        n = self.drain(out)
        if self.wait(2 * BLOCK_TIMEOUT_MS / 1000):
            n += self.drain(out)
        return n

    def _block(self, ring: mmap.mmap, base: int, num: int, first: int,
               out: list[Observation]) -> None:
        off = self.mono_to_real()
        node = self.node
        ifaces = self.ifaces
        unpack, sll, u16 = _PKT.unpack_from, _SLL.unpack_from, _U16.unpack_from
        new = tuple.__new__
        at = base + first
        for _ in range(num):
            nxt, sec, nsec, snap, _len, _st, mac, _net = unpack(ring, at)
            _fam, _proto, ifindex, _hatype, pkttype, _halen = sll(ring, at + _SLL_AT)
            itf = ifaces.get(ifindex)
            s = at + mac
            e = s + snap
            if itf is not None and snap >= 14:
                ts = sec * 1_000_000_000 + nsec
                d = OUT if pkttype == PACKET_OUTGOING else IN
                et = u16(ring, s + 12)[0]
                # a copy of the packet's bytes: the decoder takes bytes (compiled, it checks)
                o = _decode_ip(ring[s + 14 : e], 0, snap - 14, et, ts, node, itf.name, d)
                if o is not None:
                    point = itf.point
                    if point == NIC_UNDERLAY:
                        point = UNDERLAY if o.vni >= 0 else NIC
                    out.append(new(Observation, (ts, ts - off, node, itf.name, point, *o[5:])))
                else:
                    self.other += 1
            if not nxt:
                break
            at += nxt
        self.observations += num

    def _stats(self) -> None:
        try:
            raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS.size)
        except OSError:
            return
        packets, drops, _freeze = _STATS.unpack(raw)
        # tp_packets counts the dropped ones too; reading resets both
        self.sent += packets - drops
        self.lost += drops

    def stats(self) -> dict[str, int]:
        self._stats()
        return {"capture_sent": self.sent, "capture_lost": self.lost}

    def close(self) -> None:
        self._stats()
        self._poll.close()
        self._words.release()
        self.ring.close()
        self.sock.close()
