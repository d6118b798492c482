"""A bounded rolling buffer of the node's recent packets, to export a request's later.

The agent feeds it every packet observation of either source (tc or
AF_PACKET). It keeps at most ``max_packets``, oldest out first, indexed by
TCP flow (both directions, and the same inner flow at every interface: the
client's connection at the NIC, the proxy's upstream connection on the
overlay, the underlay (VXLAN) and the pod's veth). Payload is kept only for
segments that start an HTTP message (they name the request: its CF-Ray or
X-Request-Id travels with the request through the proxy); other segments keep
their headers only. :meth:`PacketBuffer.request` finds a request's flows by
its id and returns their packets from the request's start (or the
connection's SYN, when it is the connection's first request) to the next
request on the same connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from hopscope.model import KIND_PACKET, SYN, Observation

#: the first bytes of a segment that starts an HTTP/1.x message (as bpf/tc.c checks)
STARTS = (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"PATC", b"OPTI", b"CONN", b"TRAC",
          b"HTTP")

FlowKey = tuple[bytes, int, bytes, int]


def flow_key(o: Observation) -> FlowKey:
    """The same key for both directions of a (inner) TCP flow."""
    a, b = (o.src, o.sport), (o.dst, o.dport)
    return (*a, *b) if a <= b else (*b, *a)


def is_start(payload: bytes) -> bool:
    return payload[:4] in STARTS


class PacketBuffer:
    def __init__(self, max_packets: int = 20_000) -> None:
        if max_packets < 1:
            raise ValueError("max_packets must be at least 1")
        self.max_packets = max_packets
        self._order: deque[tuple[FlowKey, bool]] = deque()  # (flow, is a start), oldest first
        self._flows: dict[FlowKey, deque[Observation]] = {}
        self._starts: deque[Observation] = deque()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._order)

    def add(self, obs: Iterable[Observation]) -> None:
        new = tuple.__new__
        flows, order, starts = self._flows, self._order, self._starts
        for o in obs:
            if o.kind != KIND_PACKET:
                continue
            start = False
            if o.payload:
                if o.payload[:4] in STARTS:
                    start = True
                    starts.append(o)
                else:
                    o = new(Observation, (*o[:17], b"", *o[18:]))
            k = flow_key(o)
            q = flows.get(k)
            if q is None:
                q = flows[k] = deque()
            q.append(o)
            order.append((k, start))
            if len(order) > self.max_packets:
                self._evict()

    def _evict(self) -> None:
        k, start = self._order.popleft()
        q = self._flows[k]
        q.popleft()
        if not q:
            del self._flows[k]
        if start:
            self._starts.popleft()
        self.evicted += 1

    def request(self, request_id: str, until_real_ns: int) -> list[Observation]:
        """The packets of the request ``request_id`` held now, in time order (none if its
        start has left the buffer)."""
        rid = request_id.encode()
        firsts: dict[FlowKey, Observation] = {}
        for o in self._starts:
            if rid in o.payload:
                k = flow_key(o)
                if k not in firsts:
                    firsts[k] = o
        out: list[Observation] = []
        for k, first in firsts.items():
            q = self._flows.get(k)
            if q:
                out += _window(q, first, rid, until_real_ns)
        out.sort(key=lambda o: o.ts_real_ns)
        return out


def _window(q: Iterable[Observation], first: Observation, rid: bytes, until: int
            ) -> list[Observation]:
    """The packets of one flow that belong to the request that ``first`` starts (its
    earliest copy: the flow may cross several interfaces of the node)."""
    client = (first.src, first.sport)
    t0 = first.ts_real_ns
    lo, hi = t0, until
    pending: list[Observation] = []  # since the SYN, while no other request started
    out: list[Observation] = []
    for o in q:
        ts = o.ts_real_ns
        other_start = (o.payload and (o.src, o.sport) == client and is_start(o.payload)
                       and rid not in o.payload)
        if ts < lo:
            if other_start:
                pending = []  # an earlier request on this connection: not ours
            elif pending or (o.flags & SYN and (o.src, o.sport) == client):
                pending.append(o)  # the handshake (its copies at every interface) and after
            continue
        if other_start and ts > t0:
            hi = min(hi, ts)
        if ts >= hi:
            break
        out.append(o)
    return pending + out
