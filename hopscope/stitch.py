"""The stitcher: per-node sightings -> per-request hop timings.

One :class:`Stitcher` takes every node's observations (each node's in time
order), runs a :class:`~hopscope.tcpflow.NodeTracker` per node, then joins
the sightings across Traefik (by request id), across DNAT and VXLAN (the
upstream connection's inner 4-tuple and sequence space), and across nodes
(with clock offsets estimated from the traffic itself). It produces the JSON
envelope of the hop model (``docs/hop-model.md``). Replay, the agent and
the collector all use this class.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from hopscope.model import NIC, OVERLAY, POD, UNDERLAY, Observation, flow_str
from hopscope.tcpflow import PODNET, Cidrs, NodeTracker, Sighting, SynRecord, TrackerState

log = logging.getLogger(__name__)

#: A request whose response had not started this long before the capture
#: ended is "in flight", not unanswered.
GRACE_NS: Final = 1_000_000_000
#: An upstream request without an id is matched to a client request that
#: completed at most this long before it.
MATCH_WINDOW_NS: Final = 30_000_000_000

#: Clock offsets are estimated per window of this much time (a sample counts in the
#: window of its sender's clock), each from the samples of the windows within
#: OFFSET_SPAN on either side (fewer when those contradict each other), so that clocks
#: that drift apart over hours (NTP slews them) are followed, not averaged into bounds
#: that contradict each other.
OFFSET_WINDOW_NS: Final = 10_000_000_000
OFFSET_SPAN: Final = 3

_POINT_ORDER: Final = {NIC: 0, OVERLAY: 1, UNDERLAY: 2, POD: 3}

Hop = dict[str, Any]
_NONE: Final = [-1, -1, -1, 0]  # a point that did not see the message
Envelope = dict[str, Any]


@dataclass
class Offset:
    """A node's clock minus the reference node's clock."""

    offset_ns: int
    error_ns: int
    samples: int = 0


@dataclass
class _Bounds:
    lo: int | None = None  # offset(B) - offset(A) >= lo
    hi: int | None = None  # offset(B) - offset(A) <= hi
    samples: int = 0

    def upper(self, v: int) -> None:
        self.hi = v if self.hi is None or v < self.hi else self.hi
        self.samples += 1

    def lower(self, v: int) -> None:
        self.lo = v if self.lo is None or v > self.lo else self.lo
        self.samples += 1


class _Group:
    """One upstream request message, every place it was seen."""

    __slots__ = ("a", "b", "by", "claimed", "key", "n_agg", "rid", "sightings")

    def __init__(self) -> None:
        self.key: tuple[object, ...] = ()
        self.n_agg = -1  # how many sightings the last agg() saw
        self.sightings: list[Sighting] = []
        self.rid = ""
        self.claimed = False
        self.by: dict[tuple[str, str], list[int]] = {}
        self.a = ""  # the sending node (Traefik's)
        self.b = ""  # the pod's node

    def agg_if_needed(self) -> None:
        if self.n_agg != len(self.sightings):
            self.agg()

    def agg(self) -> None:
        """Per (node, point): earliest first, complete and response-first over interfaces."""
        self.n_agg = len(self.sightings)
        by: dict[tuple[str, str], list[int]] = {}
        for s in self.sightings:
            v = by.get((s.node, s.point))
            if v is None:
                by[(s.node, s.point)] = [s.first, s.complete, s.resp_first, s.status]
                continue
            for i, t in ((0, s.first), (1, s.complete), (2, s.resp_first)):
                if t >= 0 and (v[i] < 0 or t < v[i]):
                    v[i] = t
            if not v[3]:
                v[3] = s.status
        self.by = by
        pods = sorted({n for (n, p) in by if p == POD})
        self.b = pods[0] if pods else ""
        if len(pods) > 1:
            log.debug("upstream request %s seen at the pod point of several nodes: %s", self.rid, pods)

    def t(self, node: str, point: str, i: int) -> int:
        v = self.by.get((node, point))
        return v[i] if v is not None else -1


class _Late:
    """A request that came out incomplete, kept for a node's late data (``late_ns``)."""

    __slots__ = ("c", "due", "g", "keys", "rid", "t")

    def __init__(self, c: Sighting | None, g: _Group | None, rid: str, t: int) -> None:
        self.c = c  # the client request (None: an orphan upstream request)
        self.g = g  # its upstream request (None: none was seen yet)
        self.rid = rid
        self.t = t  # when it started, reference time (kept until t + late_ns)
        self.due = -(1 << 62)  # late data: the latest of it, reference time
        self.keys: list[tuple[object, ...]] = []


@dataclass
class StitchStats:
    nodes: dict[str, dict[str, int]] = field(default_factory=dict)
    requests: int = 0
    passed_over_requests: int = 0


#: A request is finished this long (node time) after its response started on
#: every node: late copies from other nodes have arrived by then.
LINGER_NS = 1_000_000_000
#: An upstream request nobody claimed is given up (or reported without its
#: client side) this long after it was seen; connection attempts likewise.
HORIZON_NS = 60_000_000_000
#: At most this many incomplete requests are kept for late data (``late_ns``).
LATE_MAX = 5_000  # about 4 KB each (its sightings)


class Stitcher:
    """Stitch observations of several nodes into requests, incrementally.

    ``nodes`` names the nodes in order; the first is the clock reference
    unless ``reference`` says otherwise.

    Two ways in: :meth:`feed` observations to the stitcher's own per-node
    trackers, or :meth:`add` what trackers elsewhere (other processes, the
    agents) handed over with :meth:`NodeTracker.take`. Two ways out:
    :meth:`drain` returns the requests that are settled on every node (each
    node's watermark has passed them), freeing their state, so memory stays
    bounded on a long stream; :meth:`result` drains everything at the end.
    """

    def __init__(self, nodes: Iterable[str] = (), *, reference: str | None = None,
                 cidrs: Cidrs | None = None, entry_ports: Iterable[int] = (80,),
                 grace_ns: int = GRACE_NS, late_ns: int = 0) -> None:
        self.cidrs = cidrs or Cidrs()
        self.trackers: dict[str, NodeTracker] = {}
        self.nodes: list[str] = []
        self.reference = reference
        self.entry_ports = frozenset(entry_ports)
        self.grace_ns = grace_ns
        # the module's defaults, per instance (compiled, a class constant could not be changed)
        self.linger_ns = LINGER_NS
        self.horizon_ns = HORIZON_NS
        self.late_max = LATE_MAX
        self.warnings: list[str] = []
        self._warned: set[str] = set()
        self.stats = StitchStats()
        self._offs: dict[str, Offset] = {}
        self._sh: dict[str, int] = {}
        # pending state
        self._wm: dict[str, int] = {}  # per node: everything up to here has been handed over
        self._last: dict[str, int] = {}  # per node: the latest time seen
        self._clients: list[Sighting] = []
        #: the client requests being linked (_drain's), and the ids of those and of the ones
        #: still to come: an upstream request with one of them is theirs, not a truncated
        #: client's (made by _link when one needs it)
        self._ready: list[Sighting] = []
        self._awaited: set[str] | None = None
        self._groups: dict[tuple[object, ...], _Group] = {}
        self._by_rid: dict[str, list[_Group]] = defaultdict(list)
        self._no_id: dict[tuple[str, str], list[_Group]] = defaultdict(list)
        self._syns: dict[tuple[object, ...], list[SynRecord]] = defaultdict(list)
        self._hs: dict[tuple[object, ...], dict[tuple[str, str], int]] = defaultdict(dict)
        self._synacks: dict[tuple[str, object], set[str]] = defaultdict(set)
        #: upstream flow -> (sender, pod node, when: reference time), oldest first
        self._ends: dict[object, tuple[str, str, int]] = {}
        self._votes: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        #: per node pair, per window (OFFSET_WINDOW_NS): the bounds its samples gave
        self._pairs: dict[tuple[str, str], dict[int, _Bounds]] = defaultdict(dict)
        self._newest_w = 0  # the latest window with a sample
        self._offs_at: dict[int, tuple[dict[str, Offset], dict[str, int]]] = {}  # cache
        #: eBPF drops: (node, flow) -> {(point, reason): [first ts (node clock), packets]}
        self._kdrops: dict[tuple[str, tuple[bytes, int, bytes, int]],
                           dict[tuple[str, str], list[int]]] = {}
        #: a request that came out ``incomplete`` (or without its upstream request) is
        #: kept this long (reference time, 0: not kept); when a node's sightings of it
        #: come after all (an agent that was cut off ships its spool), it comes out
        #: again, more complete, with the same id (the collector keeps the better one)
        self.late_ns = late_ns
        self._late: dict[tuple[object, ...], _Late] = {}  # by the upstream request's key
        self._late_rid: dict[str, _Late] = {}
        self._late_all: dict[_Late, None] = {}  # oldest first
        self._revived: dict[_Late, None] = {}  # late data came: to come out again
        #: when a dict (the collector's): request id -> the clock offsets its hops used
        #: (``clock_offsets`` as the envelope carries them), for each request drained
        self.offsets_used: dict[str, dict[str, dict[str, int]]] | None = None
        self.drops = []
        for n in nodes:
            self._node(n)

    def _node(self, node: str) -> None:
        if node not in self._wm:
            self.nodes.append(node)
            self._wm[node] = -(1 << 62)
            self._last[node] = 0
            self.stats.nodes[node] = {"packets": 0, "passed_over": 0, "sightings": 0}

    @property
    def ref(self) -> str:
        return self.reference or (self.nodes[0] if self.nodes else "")

    def tracker(self, node: str) -> NodeTracker:
        t = self.trackers.get(node)
        if t is None:
            t = self.trackers[node] = NodeTracker(node, self.cidrs, self.entry_ports)
            self._node(node)
        return t

    def feed(self, node: str, batch: Iterable[Observation]) -> None:
        self.tracker(node).feed(batch)

    def poll(self) -> list[dict[str, Any]]:
        """Take what the own trackers settled, and drain the requests that are done."""
        for node, t in self.trackers.items():
            self.add(node, t.take())
        return self.drain()

    # -- input ---------------------------------------------------------------
    def add(self, node: str, st: TrackerState, watermark: int | None = None) -> None:
        """What a tracker of ``node`` handed over (see :meth:`NodeTracker.take`)."""
        self._node(node)
        ns = self.stats.nodes[node]
        ns["packets"] += st.packets
        ns["passed_over"] += st.passed_over
        ns["sightings"] += len(st.sightings)
        wm = st.last_ts if watermark is None else watermark
        self._wm[node] = max(self._wm[node], wm)
        self._last[node] = max(self._last[node], st.last_ts)
        for s in st.sightings:
            if s.complete < 0:
                self.stats.passed_over_requests += 1
            elif s.point == NIC:
                if s.flow[3] in self.entry_ports:
                    self._clients.append(s)
                else:
                    self.stats.passed_over_requests += 1
            else:
                key = (s.flow, s.seq0)
                g = self._groups.get(key)
                if g is None:
                    if self._late_all and self._revive(s, key):
                        continue
                    g = self._groups[key] = _Group()
                    g.key = key
                g.sightings.append(s)
                if not g.rid and s.rid:
                    g.rid = s.rid
                    self._by_rid[s.rid].append(g)
                elif not g.rid and len(g.sightings) == 1:
                    self._no_id[(s.method, s.path)].append(g)
        for r in st.syns:
            self._syns[(r.flow, r.isn)].append(r)
        for ts, point, dflow, reason in st.kdrops:
            kd = self._kdrops.setdefault((node, dflow), {}).setdefault((point, reason), [ts, 0])
            kd[0] = min(kd[0], ts)
            kd[1] += 1
        for (hflow, kind), lst in st.handshakes.items():
            d = self._hs[(hflow, kind)]
            for point, ifname, ts in lst:
                if point == PODNET:
                    v = self._votes[(node, ifname)]
                    point = OVERLAY if v[0] > v[1] else POD
                k = (node, point)
                if k not in d or ts < d[k]:
                    d[k] = ts
                if kind == "synack":
                    self._synacks[(node, hflow)].add(point)
            ab = self._ends.get(hflow)
            if ab is not None:
                self._crossing(ab[0], ab[1], d, kind == "syn")

    # -- output --------------------------------------------------------------
    def result(self) -> Envelope:
        """Stitch everything fed so far into the envelope (requests as a list)."""
        env = self.result_stream()
        env["requests"] = list(env["requests"])
        return env

    def result_stream(self) -> Envelope:
        """Everything, at the end of input: the envelope, ``requests`` as an iterator."""
        for node, t in self.trackers.items():
            self.add(node, t.take(final=True))
        reqs, drops = self._drain(final=True, lazy=True)
        return self.envelope(reqs, drops)

    def envelope(self, requests: Iterable[dict[str, Any]], drops: list[dict[str, Any]]) -> Envelope:
        return {
            "requests": requests,
            "drops": drops,
            "clock_offsets": self._clock_json(self._offs),
            "reference": self.ref,
        }

    def _clock_json(self, offs: dict[str, Offset]) -> dict[str, dict[str, int]]:
        return {n: {"offset_ns": o.offset_ns, "error_ns": o.error_ns}
                for n, o in offs.items() if n != self.ref}

    def drain(self, final: bool = False) -> list[dict[str, Any]]:
        """Requests settled on every node (their state is freed); drops go to :attr:`drops`."""
        reqs, drops = self._drain(final=final, lazy=False)
        self.drops.extend(drops)
        return list(reqs)

    drops: list[dict[str, Any]]

    def finish(self) -> tuple[Iterator[dict[str, Any]], list[dict[str, Any]]]:
        """End of input for :meth:`add` users: the rest of the requests, and all drops."""
        reqs, drops = self._drain(final=True, lazy=True)
        self.drops.extend(drops)
        all_drops = sorted(self.drops, key=lambda d: (d["first_ns"], d["flow"]))
        self.drops = []
        return reqs, all_drops

    def _horizon(self) -> int:
        """In reference time: every node has handed over everything before this."""
        if not self._wm:
            return -(1 << 62)
        return min(wm - self._sh.get(n, 0) for n, wm in self._wm.items())

    def _drain(self, final: bool, lazy: bool) -> tuple[Iterator[dict[str, Any]], list[dict[str, Any]]]:
        sh = self._sh
        horizon = (1 << 62) if final else self._horizon()
        linger, far = self.linger_ns, self.horizon_ns
        ready: list[Sighting] = []
        keep: list[Sighting] = []
        for c in self._clients:
            if final:
                ready.append(c)
                continue
            start = c.complete - sh.get(c.node, 0)
            # done: answered (or reset) and every node is past its response, or too old
            answered = c.settled and (c.resp_first >= 0 or c.reset_ts >= 0 or c.status)
            t = c.resp_first - sh.get(c.node, 0) if c.resp_first >= 0 else start
            if (answered and t + linger <= horizon) or start + far <= horizon:
                ready.append(c)
            else:
                keep.append(c)
        self._clients = keep
        ready.sort(key=lambda c: c.complete)
        self._ready, self._awaited = ready, None
        # clients with an id first (theirs is known), then those without, by the end of
        # their window (Traefik's answer), each taking the first unclaimed upstream request
        # in it: concurrent requests of one line can be forwarded out of the order they
        # came in (one held in UFW or Traefik), and the first to come is not the first to
        # claim (the earliest end first takes what only its window holds)
        by: dict[int, _Group | None] = {}
        for c in sorted(ready, key=lambda c: (0, c.complete) if c.rid else (
                1, (c.resp_first if c.resp_first >= 0 else c.complete + MATCH_WINDOW_NS)
                - sh.get(c.node, 0))):
            by[id(c)] = self._link(c) or self._link_late(c)
        linked: list[tuple[Sighting, _Group | None]] = [(c, by[id(c)]) for c in ready]
        self._ready, self._awaited = [], None
        revived = self._due(final, horizon)
        # orphans: upstream requests with an id that no client request claimed
        orphans: list[_Group] = []
        for key, g in list(self._groups.items()):
            if g.claimed:
                continue
            if final or min(s.first - sh.get(s.node, 0) for s in g.sightings) + far <= horizon:
                self._settle_group(g)
                del self._groups[key]
                self._unindex(g)
                if g.rid:
                    orphans.append(g)
        # samples of the messages that crossed between nodes, then the clocks
        for _c, lg in linked:
            if lg is not None:
                self._samples(lg)
        for og in orphans:
            self._samples(og)
        for late in revived:
            if late.g is not None:
                self._samples(late.g)
        self._offs, self._sh = self._offsets_at(self._newest_w)  # the latest
        sh = self._sh
        if not final:
            self._prune_windows()
        drops = self._drops_syn(final, horizon)
        drops += [d for c, g in linked if (d := self._drop_unanswered(c, g, sh)) is not None]
        drops.sort(key=lambda d: (d["first_ns"], d["flow"]))
        order: list[tuple[int, int, Sighting, _Group | None]] = [
            (c.complete - sh.get(c.node, 0), 0, c, g) for c, g in linked]
        order += [(self._orphan_start(g, sh), 1, g.sightings[0], g) for g in orphans]
        order.sort(key=lambda x: (x[0], x[1], x[2].rid))
        self.stats.requests += len(order)
        keep_late = self.late_ns > 0
        used = self.offsets_used

        def requests() -> Iterator[dict[str, Any]]:
            for _start, orphan, c, g in order:
                offs, shw = self._offsets_at(c.first // OFFSET_WINDOW_NS)  # at its time
                if orphan:
                    assert g is not None
                    rec = self._orphan(g, shw)
                    if keep_late:
                        self._keep_late(None, g, rec)
                else:
                    rec = self._request(c, g, shw, offs)
                    if keep_late:
                        self._keep_late(c, g, rec)
                if used is not None:
                    used[rec["request_id"]] = self._clock_json(offs)
                yield rec
            for late in revived:  # once more, with the late data
                if late.g is None:
                    continue
                first = late.c if late.c is not None else late.g.sightings[0]
                offs, shw = self._offsets_at(first.first // OFFSET_WINDOW_NS)
                rec = (self._request(late.c, late.g, shw, offs) if late.c is not None
                       else self._orphan(late.g, shw))
                self._forget_late(late)
                if keep_late:
                    self._keep_late(late.c, late.g, rec)
                if used is not None:
                    used[rec["request_id"]] = self._clock_json(offs)
                yield rec

        if lazy:
            return requests(), drops
        return iter(list(requests())), drops

    def _warn(self, msg: str) -> None:
        """Kept in :attr:`warnings` for the caller to show (once each)."""
        if msg in self._warned:
            return
        self._warned.add(msg)
        self.warnings.append(msg)
        log.info("%s", msg)

    # -- linking -------------------------------------------------------------
    def _link(self, c: Sighting) -> _Group | None:
        """The upstream request of client request ``c`` (across Traefik), claimed."""
        found: _Group | None = None
        if c.rid:
            cands = [x for x in self._by_rid.get(c.rid, ()) if not x.claimed]
            if cands:
                for x in cands:
                    x.agg_if_needed()
                found = min(cands, key=lambda x: _first_on(x, c.node, c.complete))
        else:
            # the upstream request starts after the client's request is complete, and
            # before Traefik answers it
            end = c.resp_first if c.resp_first >= 0 else c.complete + MATCH_WINDOW_NS
            best = -1
            pool: Iterable[_Group] = self._no_id.get((c.method, c.path), ())
            if c.flags is not None and "truncated" in c.flags:
                # its CF-Ray may be in the bytes the source left out, the upstream's not
                # (Go writes header names in order: Cf-Ray before Cookie): any unclaimed
                # upstream request of the same line that this node sent (not one that only
                # passed through it to its pod) and no client request with an id awaits,
                # found the slow way (this is rare)
                awaited = self._awaited
                if awaited is None:
                    awaited = self._awaited = {x.rid for x in (*self._ready, *self._clients)
                                               if x.rid}
                pool = [x for x in self._groups.values()
                        if x.sightings[0].method == c.method and x.sightings[0].path == c.path
                        and x.rid not in awaited and self._sent_by(x, c.node)]
            for x in pool:
                if x.claimed:
                    continue
                t0 = min((s.first for s in x.sightings if s.node == c.node), default=-1)
                if c.complete <= t0 <= end and (found is None or t0 < best):
                    found, best = x, t0
        if found is None:
            return None
        found.claimed = True
        found.a = c.node
        self._settle_group(found)
        self._groups.pop(found.key, None)
        self._unindex(found)
        return found

    # -- late data (late_ns) ---------------------------------------------------
    def _keep_late(self, c: Sighting | None, g: _Group | None, rec: dict[str, Any]) -> None:
        """Keep a request that came out without some node's part of it, for a while."""
        flags = rec["flags"]
        if "incomplete" not in flags and "no_upstream" not in flags:
            return
        rid = c.rid if c is not None else (g.rid if g is not None else "")
        if g is None and not rid:
            return  # nothing that late data could be matched by
        late = _Late(c, g, rid, int(rec["start_ns"]))
        if g is not None:
            late.keys.append(g.key)
            self._late[g.key] = late
        if rid:
            old = self._late_rid.get(rid)
            if old is not None:
                self._forget_late(old)
            self._late_rid[rid] = late
        self._late_all[late] = None
        while len(self._late_all) > self.late_max:
            self._forget_late(next(iter(self._late_all)))

    def _forget_late(self, late: _Late) -> None:
        self._late_all.pop(late, None)
        self._revived.pop(late, None)
        for k in late.keys:
            if self._late.get(k) is late:
                del self._late[k]
        if late.rid and self._late_rid.get(late.rid) is late:
            del self._late_rid[late.rid]

    def _revive(self, s: Sighting, key: tuple[object, ...]) -> bool:
        """A late sighting of a request that came out incomplete: it joins that request."""
        late = self._late.get(key)
        if late is None:
            if not s.rid:
                return False
            # by id only for a client request that came out without any upstream request
            # (one with the same id and another key is another message: a retry)
            late = self._late_rid.get(s.rid)
            if late is None or late.g is not None or late.c is None:
                return False
            g = late.g = _Group()
            g.key, g.rid, g.claimed, g.a = key, s.rid, True, late.c.node
            late.keys.append(key)
            self._late[key] = late
        assert late.g is not None
        late.g.sightings.append(s)
        t = s.resp_first if s.resp_first >= 0 else s.first
        late.due = max(late.due, t - self._sh.get(s.node, 0))
        self._revived[late] = None
        return True

    def _link_late(self, c: Sighting) -> _Group | None:
        """A client request whose upstream request came out earlier without it (an orphan)."""
        late = self._late_rid.get(c.rid) if c.rid and self._late_rid else None
        if late is None or late.c is not None or late.g is None:
            return None
        g = late.g
        self._forget_late(late)
        g.claimed = True
        g.a = c.node
        self._settle_group(g)
        return g

    def _due(self, final: bool, horizon: int) -> list[_Late]:
        """The kept requests whose late data is settled (settled now); expire the old."""
        out: list[_Late] = []
        for late in list(self._revived):
            if final or late.due + self.linger_ns <= horizon:
                del self._revived[late]
                if late.g is not None:
                    self._settle_group(late.g)
                out.append(late)
        if self._late_all:
            sh = self._sh
            now = max((t - sh.get(n, 0) for n, t in self._last.items()), default=0)
            for late in list(self._late_all):
                if late.t + self.late_ns > now:
                    break
                if late not in self._revived:
                    self._forget_late(late)
        return out

    def _unindex(self, g: _Group) -> None:
        """Forget a group in the look-up indexes (an id may have shown up only later)."""
        lists = [self._by_rid.get(g.rid)] if g.rid else []
        s0 = g.sightings[0]
        lists.append(self._no_id.get((s0.method, s0.path)))
        for lst in lists:
            if lst is not None:
                with contextlib.suppress(ValueError):
                    lst.remove(g)
        if g.rid and not self._by_rid.get(g.rid, True):
            del self._by_rid[g.rid]
        if not self._no_id.get((s0.method, s0.path), True):
            del self._no_id[(s0.method, s0.path)]

    def _settle_group(self, g: _Group) -> None:
        """Resolve unnamed pod-network points, then aggregate per (node, point).

        Per message: of its copies on one node, the one nearest in time to the
        message's VXLAN copy there is the overlay (flannel.1); the others are
        pod copies (cni0, veth); with no VXLAN copy all are pod copies. Each
        decision is a vote for its interface (used for handshakes and SYNs).
        """
        by_node: dict[str, list[Sighting]] = defaultdict(list)
        for s in g.sightings:
            if s.point == PODNET or s.point == UNDERLAY:
                by_node[s.node].append(s)
        for node, ss in by_node.items():
            pn = [s for s in ss if s.point == PODNET]
            if not pn:
                continue
            ul = [s.first for s in ss if s.point == UNDERLAY]
            best = min(pn, key=lambda s: abs(s.first - ul[0])) if ul else None
            for s in pn:
                s.point = OVERLAY if s is best else POD
                self._votes[(node, s.ifname)][0 if s is best else 1] += 1
        g.agg()
        if not g.a:
            g.a = self._sender(g)

    # -- clocks --------------------------------------------------------------
    def _crossing(self, a: str, b: str, times: dict[tuple[str, str], int], forward: bool) -> None:
        """One segment that went a -> b (forward) or b -> a, with its times per (node, point)."""
        src, dst = (a, b) if forward else (b, a)
        ts = _last(times, src)
        tr = _first(times, dst)
        if ts >= 0 and tr >= 0:
            wins = self._pairs[(a, b)]
            w = ts // OFFSET_WINDOW_NS
            bd = wins.get(w)
            if bd is None:
                bd = wins[w] = _Bounds()
                self._newest_w = max(self._newest_w, w)
            if forward:
                bd.upper(tr - ts)
            else:
                bd.lower(ts - tr)
            if self._offs_at:
                self._offs_at.clear()

    def _samples(self, g: _Group) -> None:
        a, b = g.a, g.b
        if not a or not b or a == b:
            return
        flow = g.sightings[0].flow
        if flow not in self._ends:
            s0 = g.sightings[0]
            self._ends[flow] = (a, b, s0.first - self._sh.get(s0.node, 0))
            # let go by age with the handshakes (_expire_handshakes), and bounded (about
            # 350 B an entry) however fast connections come
            if len(self._ends) > 50_000:
                for k in list(self._ends)[:25_000]:
                    del self._ends[k]
            # the connection's handshake: SYN a -> b, SYN-ACK b -> a
            for kind in ("syn", "synack"):
                d = self._hs.get((flow, kind))
                if d:
                    self._crossing(a, b, d, kind == "syn")
        req = {k: v[0] for k, v in g.by.items() if v[0] >= 0}
        resp = {k: v[2] for k, v in g.by.items() if v[2] >= 0}
        self._crossing(a, b, req, True)
        self._crossing(a, b, resp, False)

    def _offsets_at(self, w: int) -> tuple[dict[str, Offset], dict[str, int]]:
        """The offsets for window ``w`` (and each node's shift), from the samples of the
        windows around it: OFFSET_SPAN on either side, or fewer when those contradict
        each other (the clocks drift apart faster than the bounds are wide)."""
        got = self._offs_at.get(w)
        if got is None:
            offs = None
            for span in (OFFSET_SPAN, 1):
                offs = self._offsets(self._window_bounds(w, span), strict=True)
                if offs is not None:
                    break
            if offs is None:
                offs = self._offsets(self._window_bounds(w, 0), strict=False)
            assert offs is not None
            got = self._offs_at[w] = (offs, {n: o.offset_ns for n, o in offs.items()})
        return got

    def _window_bounds(self, w: int, span: int) -> dict[tuple[str, str], _Bounds]:
        """Each pair's bounds over the windows within ``span`` of ``w`` (its nearest window
        when none of them has a sample)."""
        out: dict[tuple[str, str], _Bounds] = {}
        for pair, wins in self._pairs.items():
            if not wins:
                continue
            sel = [bd for x in range(w - span, w + span + 1) if (bd := wins.get(x)) is not None]
            if not sel:
                sel = [wins[min(wins, key=lambda x: abs(x - w))]]
            c = out[pair] = _Bounds()
            for bd in sel:
                if bd.hi is not None and (c.hi is None or bd.hi < c.hi):
                    c.hi = bd.hi
                if bd.lo is not None and (c.lo is None or bd.lo > c.lo):
                    c.lo = bd.lo
                c.samples += bd.samples
        return out

    def _prune_windows(self) -> None:
        """Forget windows older than any request still to come out may need (each pair
        keeps its newest)."""
        sh = self._sh
        now = max((t - sh.get(n, 0) for n, t in self._last.items()), default=0)
        oldest = (now - self.horizon_ns - self.linger_ns - self.late_ns) // OFFSET_WINDOW_NS \
            - OFFSET_SPAN - 1
        for wins in self._pairs.values():
            old = [x for x in wins if x < oldest]
            if old and len(old) == len(wins):
                old.remove(max(old))
            for x in old:
                del wins[x]

    def _offsets(self, pairs: dict[tuple[str, str], _Bounds],
                 strict: bool) -> dict[str, Offset] | None:
        """Offsets that satisfy every node pair's bounds at once.

        Each pair bounds ``offset(b) - offset(a)`` to ``[lo, hi]``: difference
        constraints. With ``offset(ref) = 0`` the largest and the smallest solution
        come from shortest paths (Bellman-Ford, a handful of nodes); the solutions
        form a convex set whose integer points are closed under the floor of a
        midpoint, so the midpoint of those two is a solution too. Thus no hop
        between any two nodes is negative, also between nodes linked only through
        a third. ``error_ns`` is half the spread between the two solutions.
        Bounds that contradict each other: None when ``strict``, else a warning and
        each pair's midpoint.
        """
        ref = self.ref
        edges: list[tuple[str, str, int]] = []  # x[v] - x[u] <= w
        for (a, b), bd in pairs.items():
            if bd.hi is not None:
                edges.append((a, b, bd.hi))
            if bd.lo is not None:
                edges.append((b, a, -bd.lo))
            if bd.lo is not None and bd.hi is not None and bd.lo > bd.hi:
                if strict:
                    return None
                self._warn(f"clock offset {a}->{b}: the traffic's bounds disagree (clock "
                           "drift faster than the bounds are wide?)")
        nodes = list(dict.fromkeys([ref, *self.nodes]))
        upper = _shortest(ref, nodes, edges)
        lower_d = _shortest(ref, nodes, [(v, u, w) for u, v, w in edges])
        if upper is None or lower_d is None:
            if strict:
                return None
            self._warn("clock offsets: the bounds between nodes contradict each other; "
                       "using each pair's midpoint")
            return self._offsets_by_pairs(pairs)
        out: dict[str, Offset] = {}
        for n in nodes:
            u, d = upper.get(n), lower_d.get(n)
            samples = sum(bd.samples for (a, b), bd in pairs.items() if n in (a, b))
            if u is not None and d is not None:
                lo = -d
                out[n] = Offset((u + lo) // 2, (u - lo + 1) // 2, samples)
            elif u is not None or d is not None:
                # traffic in one direction only: the bound itself, error unknown beyond it
                self._warn(f"clock offset of {n}: traffic in one direction only; "
                           "the offset is a bound")
                out[n] = Offset(u if u is not None else -d, 0, samples)  # type: ignore[operator]
            else:
                out[n] = Offset(0, -1)
        return out

    def _offsets_by_pairs(self, pairs: dict[tuple[str, str], _Bounds]) -> dict[str, Offset]:
        """The fallback for contradictory bounds: each pair's midpoint, chained from ref."""
        ref = self.ref
        edges: dict[str, list[tuple[str, int, int, int]]] = defaultdict(list)
        for (a, b), bd in pairs.items():
            if bd.lo is None or bd.hi is None:
                continue
            mid = (bd.lo + bd.hi) // 2
            err = (abs(bd.hi - bd.lo) + 1) // 2
            edges[a].append((b, mid, err, bd.samples))
            edges[b].append((a, -mid, err, bd.samples))
        out: dict[str, Offset] = {ref: Offset(0, 0)}
        todo = [ref]
        while todo:
            a = todo.pop(0)
            for b, off, err, samples in sorted(edges.get(a, ()), key=lambda e: e[2]):
                if b not in out:
                    out[b] = Offset(out[a].offset_ns + off, out[a].error_ns + err, samples)
                    todo.append(b)
        for n in self.nodes:
            if n not in out:
                out[n] = Offset(0, -1)
        return out

    @staticmethod
    def _skewed(a: str, b: str, offs: dict[str, Offset]) -> bool:
        """Whether the clocks of a and b demonstrably differ (0 is outside the estimate's bound)."""
        oa, ob = offs.get(a), offs.get(b)
        if oa is None or ob is None or oa.error_ns < 0 or ob.error_ns < 0:
            return False
        return abs(ob.offset_ns - oa.offset_ns) > oa.error_ns + ob.error_ns

    @staticmethod
    def _sent_by(g: _Group, node: str) -> bool:
        """Could ``node`` have sent upstream request ``g``? Seen there at the overlay and
        the underlay: if encapsulated there (the overlay first), not decapsulated; seen
        there at pod points only: if no other node saw it. Unknown counts as yes."""
        ov = ul = -1
        other = False
        for s in g.sightings:
            if s.node != node:
                other = True
            elif s.point == OVERLAY and (ov < 0 or s.first < ov):
                ov = s.first
            elif s.point == UNDERLAY and (ul < 0 or s.first < ul):
                ul = s.first
        if ov >= 0 and ul >= 0:
            return ov <= ul
        return ov >= 0 or ul >= 0 or not other

    def _sender(self, g: _Group) -> str:
        """The node that sent an upstream request: a node seeing it, other than the pod's."""
        nodes = {n for (n, _p) in g.by if n != g.b}
        return next(iter(nodes)) if len(nodes) == 1 else ""

    # -- one request ---------------------------------------------------------
    def _request(self, c: Sighting, g: _Group | None, sh: dict[str, int],
                 offs: dict[str, Offset]) -> dict[str, Any]:
        a = c.node
        flags: set[str] = set(c.flags or ())
        if g is None:
            chain: list[tuple[str, str, str, int]] = [
                ("", "", a, c.complete), ("ingress+egress", "request+response", a, c.resp_first)]
            flags.add("no_upstream")
            b = ""
        else:
            for s in g.sightings:
                if s.flags:
                    flags |= s.flags
            b = g.b
            chain = self._chain(a, b, g, c)
        hops, complete = _tile(chain, sh)
        if not complete:
            flags.add("incomplete")
        if c.kernel_ts >= 0 or g is not None:
            self._sub_hops(c, g, hops, sh)
        rid = c.rid or (g.rid if g is not None else "")
        if not rid:
            rid = _derived_id(c)
            flags.add("derived_id")
        end = self._last.get(a, 0)
        if c.resp_first < 0:
            if end - c.complete < self.grace_ns:
                flags.add("in_flight")
            else:
                flags.add("no_response")
        if c.reset_ts >= 0 and c.resp_first < 0:
            flags.add("reset")
        if b and b != a and self._skewed(a, b, offs):
            flags.add("clock_skew_corrected")
        if c.edge_synack >= 0 and c.edge_ack >= 0:
            hops.append(_hop("edge_rtt", "request", a, c.edge_synack - sh.get(a, 0),
                             c.edge_ack - c.edge_synack))
        status = c.status or (g.by.get((b, POD), [0, 0, 0, 0])[3] if g is not None and b else 0)
        start = c.complete - sh.get(a, 0)
        total = c.resp_first - c.complete if c.resp_first >= 0 else None
        return {
            "request_id": rid,
            "method": c.method,
            "path": c.path,
            "host": c.host,
            "status": status or None,
            "ingress_node": a,
            "pod_node": b or None,
            "start_ns": start,
            "total_ns": total,
            "hops": hops,
            "flags": sorted(flags),
        }

    @staticmethod
    def _sub_hops(c: Sighting, g: _Group | None, hops: list[Hop], sh: dict[str, int]) -> None:
        """eBPF's split of ``ingress``: ``kernel_in``, ``proxy``, ``service_nat``."""
        ing = next((h for h in hops if h["name"] == "ingress"), None)
        if ing is None:
            return
        a = c.node
        proxy = -1
        if g is not None:
            for s in g.sightings:
                if s.node == a and s.proxy_ts >= 0 and (proxy < 0 or s.proxy_ts < proxy):
                    proxy = s.proxy_ts
        if c.kernel_ts < 0 and proxy < 0:
            return
        end = ing["start_ns"] + ing["duration_ns"] + sh.get(a, 0)  # back to a's clock
        chain = [("", "", a, c.complete), ("kernel_in", "request", a, c.kernel_ts),
                 ("proxy", "request", a, proxy), ("service_nat", "request", a, end)]
        known = [t for t in (c.complete, c.kernel_ts, proxy, end) if t >= 0]
        if known != sorted(known):
            return  # out of order: a mismatched event; better no split than a wrong one
        ing["children"] = _tile(chain, sh)[0]
        ep, by = _endpoint(g, a)
        for h in ing["children"]:
            parts = h["name"].split("+")  # merged where a boundary was not seen
            if parts[-1] == "service_nat" and ep:
                h["endpoint"] = ep
                if by:
                    h["endpoint_by"] = by
            if parts[0] == "kernel_in" and c.nf_ts >= 0 and c.nf_ns >= 0:
                # UFW's own time: the completing segment in netfilter's INPUT hook (kprobe)
                nf = _hop("netfilter", "request", a, c.nf_ts - sh.get(a, 0), c.nf_ns)
                nf["verdict"] = c.nf_verdict
                h["children"] = [nf]

    def _chain(self, a: str, b: str, g: _Group, c: Sighting) -> list[tuple[str, str, str, int]]:
        """The boundaries of a request's path: (hop ending here, dir, node, local time)."""
        t = g.t
        if b == a:
            first = t(a, POD, 0)
            complete = t(a, POD, 1)
            chain = [("", "", a, c.complete), ("ingress", "request", a, first)]
            if complete != first or first < 0:
                chain.append(("deliver", "request", a, complete))
            chain += [("app", "server", a, t(a, POD, 2)),
                      ("egress", "response", a, c.resp_first)]
            return chain
        bb = b or "?"
        by = g.by
        none = _NONE
        a_ov, a_ul = by.get((a, OVERLAY), none), by.get((a, UNDERLAY), none)
        b_ul, b_ov, b_pod = by.get((b, UNDERLAY), none), by.get((b, OVERLAY), none), \
            by.get((b, POD), none)
        return [
            ("", "", a, c.complete),
            ("ingress", "request", a, a_ov[0]),
            ("encap", "request", a, a_ul[0]),
            ("wire", "request", bb, b_ul[0]),
            ("decap", "request", bb, b_ov[0]),
            ("deliver", "request", bb, b_pod[1]),
            ("app", "server", bb, b_pod[2]),
            ("route", "response", bb, b_ov[2]),
            ("encap", "response", bb, b_ul[2]),
            ("wire", "response", a, a_ul[2]),
            ("decap", "response", a, a_ov[2]),
            ("egress", "response", a, c.resp_first),
        ]

    def _orphan_start(self, g: _Group, sh: dict[str, int]) -> int:
        return int(self._orphan(g, sh)["start_ns"])

    def _orphan(self, g: _Group, sh: dict[str, int]) -> dict[str, Any]:
        """An upstream request with an id whose client side no capture saw."""
        s0 = min(g.sightings, key=lambda s: (s.first - sh.get(s.node, 0)))
        b = g.b
        a = g.a or self._sender(g)
        if not a:
            # no sender seen: the same node if the request never crossed the overlay
            crossed = any(p in (OVERLAY, UNDERLAY) for (_n, p) in g.by)
            a = "?" if crossed else b or s0.node
        fake = Sighting(a, "", NIC, s0.flow, s0.seq0, -1)
        chain = self._chain(a, b, g, fake) if b else []
        # drop the missing nic ends: the path starts and ends where it was seen
        chain = [x for x in chain if x[3] >= 0]
        if chain:
            chain[0] = ("", "", chain[0][2], chain[0][3])
        hops, _ = _tile(chain, sh) if len(chain) > 1 else ([], True)
        flags: set[str] = {"incomplete"}
        for s in g.sightings:
            if s.flags:
                flags |= s.flags
        start = chain[0][3] - sh.get(chain[0][2], 0) if chain else (
            s0.first - sh.get(s0.node, 0))
        status = g.by.get((b, POD), [0, 0, 0, 0])[3] if b else 0
        return {
            "request_id": g.rid, "method": s0.method, "path": s0.path, "host": s0.host,
            "status": status or None, "ingress_node": None, "pod_node": b or None,
            "start_ns": start, "total_ns": None, "hops": hops, "flags": sorted(flags),
        }

    # -- drops ---------------------------------------------------------------
    def _drops_syn(self, final: bool, horizon: int) -> list[dict[str, Any]]:
        """Connection attempts that died, once every node has reported them."""
        sh = self._sh
        drops: list[dict[str, Any]] = []

        def ref_t(node: str, t: int) -> int:
            return t - sh.get(node, 0)

        for key, rs in list(self._syns.items()):
            first = min(ref_t(r.node, r.first) for r in rs)
            if not final and first + self.horizon_ns > horizon:
                continue
            del self._syns[key]
            rs = [r for r in rs if r.packets >= 2 or r.refused
                  or self._last.get(r.node, 0) - r.first >= self.grace_ns]
            if not rs:
                continue  # the capture ended right after it
            flow = key[0]
            client = min(rs, key=lambda r: ref_t(r.node, r.first)).node
            answered_at = self._synacks.get((client, flow), set())
            if answered_at - {UNDERLAY}:
                # the SYN-ACK reached the client's node past the underlay, at another
                # interface (with br_netfilter it crosses cni0 un-NATed): not a drop
                continue
            for r in rs:
                if r.point == PODNET:
                    v = self._votes[(r.node, r.ifname)]
                    r.point = OVERLAY if v[0] > v[1] else POD
            if answered_at:
                # answered, but the SYN-ACK died on the way in (VXLAN never decapsulated)
                last = next(r for r in rs if r.node == client)
                node, point = client, UNDERLAY
            else:
                last = max(rs, key=lambda r: (ref_t(r.node, r.first),
                                              _POINT_ORDER.get(r.point, 0)))
                node, point, first = last.node, last.point, ref_t(last.node, last.first)
            reason = self._kernel_reason(node, last.flow)
            drops.append({
                "node": node, "point": point,
                "kind": "refused" if any(r.refused for r in rs) else "syn_unanswered",
                **(_reason_rule(reason) if reason else {}),  # the contract's key order
                "flow": flow_str(*last.flow), "packets": last.packets,
                "first_ns": first,
            })
        drops += self._kernel_drops(final, horizon)
        if final and not self.late_ns:
            self._synacks.clear()
            self._hs.clear()
        else:
            self._expire_handshakes()
        return drops

    def _expire_handshakes(self) -> None:
        """Forget handshakes, and the connections' ends, older than ``2 * horizon_ns`` (or
        ``late_ns``): a connection's clock samples are taken when its first request
        settles, SYNs are judged after ``horizon_ns``. Oldest first (insertion order), so
        each drain costs what expires."""
        hs = self._hs
        if not hs and not self._ends:
            return
        sh = self._sh
        now = max((t - sh.get(n, 0) for n, t in self._last.items()), default=0)
        keep = max(2 * self.horizon_ns, self.late_ns)
        while hs:
            key = next(iter(hs))
            d = hs[key]
            if d and min(ts - sh.get(n, 0) for (n, _p), ts in d.items()) + keep > now:
                break
            del hs[key]
            if key[1] == "synack":
                for n, _p in d:
                    self._synacks.pop((n, key[0]), None)
        ends = self._ends
        while ends:
            flow = next(iter(ends))
            if ends[flow][2] + keep > now:
                break
            del ends[flow]

    def _kernel_reason(self, node: str, flow: tuple[bytes, int, bytes, int]) -> str:
        """The drop reason eBPF saw first for a flow's packets on ``node`` (used up)."""
        by = self._kdrops.pop((node, flow), None)
        if not by:
            return ""
        return min(by.items(), key=lambda kv: kv[1][0])[0][1]

    def _kernel_drops(self, final: bool, horizon: int) -> list[dict[str, Any]]:
        """Drops eBPF saw that no unanswered connection explains, once past the horizon."""
        out: list[dict[str, Any]] = []
        sh = self._sh
        wait = self.horizon_ns + self.linger_ns
        for (node, flow), by in list(self._kdrops.items()):
            first = min(ts for ts, _n in by.values()) - sh.get(node, 0)
            if not final and first + wait > horizon:
                continue
            del self._kdrops[(node, flow)]
            for (point, reason), (ts, n) in by.items():
                out.append({"node": node, "point": point, "kind": "dropped",
                            **_reason_rule(reason), "flow": flow_str(*flow), "packets": n,
                            "first_ns": ts - sh.get(node, 0)})
        return out

    def _drop_unanswered(self, c: Sighting, g: _Group | None,
                         sh: dict[str, int]) -> dict[str, Any] | None:
        if c.resp_first >= 0 or self._last.get(c.node, 0) - c.complete < self.grace_ns:
            return None

        def ref_t(node: str, t: int) -> int:
            return t - sh.get(node, 0)

        seen: list[Sighting] = [c] + (g.sightings if g is not None else [])
        last_s = max(seen, key=lambda s: (ref_t(s.node, s.first), _POINT_ORDER.get(s.point, 0)))
        reset = any(s.reset_ts >= 0 for s in seen)
        return {
            "node": last_s.node, "point": last_s.point,
            "kind": "reset" if reset else "request_unanswered",
            "flow": flow_str(*last_s.flow), "packets": 1,
            "first_ns": ref_t(c.node, c.complete),
            "request_id": c.rid or _derived_id(c),
        }


# -- helpers ----------------------------------------------------------------

def _endpoint(g: _Group | None, a: str) -> tuple[str, str]:
    """The pod address the Service rewrite chose (``ip:port``) and how it is known:
    ``"ipvs"`` when IPVS's scheduling was seen on the ingress node ``a`` (kprobe), else
    ``""``: the upstream flow's destination past the rewrite (at a pod or overlay point,
    iptables DNAT or IPVS alike)."""
    if g is None:
        return "", ""
    for s in g.sightings:
        if s.node == a and s.ipvs_endpoint:
            return s.ipvs_endpoint, "ipvs"
    for point in (POD, OVERLAY):
        for s in g.sightings:
            if s.point == point:
                return flow_str(*s.flow).split(" -> ")[1], ""
    return "", ""


def _reason_rule(text: str) -> dict[str, str]:
    """A kernel drop's ``reason`` (and ``rule``, after a tab, when the agent named it)."""
    reason, _, rule = text.partition("\t")
    return {"reason": reason, "rule": rule} if rule else {"reason": reason}


def _last(times: dict[tuple[str, str], int], node: str) -> int:
    """When a segment left ``node``: its underlay copy, else its overlay copy, else the pod's."""
    for p in (UNDERLAY, OVERLAY, POD):
        v = times.get((node, p), -1)
        if v >= 0:
            return v
    return -1


_first = _last  # arriving: the underlay copy is also the earliest


def _shortest(src: str, nodes: list[str], edges: list[tuple[str, str, int]]) -> dict[str, int] | None:
    """Bellman-Ford distances from ``src`` (unreachable nodes left out); None on a negative cycle."""
    dist: dict[str, int] = {src: 0}
    for _ in range(len(nodes)):
        changed = False
        for u, v, w in edges:
            du = dist.get(u)
            if du is not None and (v not in dist or du + w < dist[v]):
                dist[v] = du + w
                changed = True
        if not changed:
            return dist
    return None


def _first_on(g: _Group, node: str, after: int) -> int:
    """Sort key: the group's earliest time on ``node`` at or after ``after`` (else far)."""
    ts = [v[0] for (n, _p), v in g.by.items() if n == node and v[0] >= after]
    return min(ts) if ts else 1 << 62


def _hop(name: str, dir_: str, node: str, start: int, dur: int) -> Hop:
    return {"name": name, "dir": dir_, "node": node, "start_ns": start, "duration_ns": dur,
            "children": []}


def _tile(chain: list[tuple[str, str, str, int]], sh: dict[str, int]) -> tuple[list[Hop], bool]:
    """Hops between consecutive known boundaries; unknown ones merge their neighbours.

    Returns the hops and whether every boundary was known.
    """
    hops: list[Hop] = []
    if not chain or chain[0][3] < 0:
        return hops, False
    prev_node = chain[0][2]
    prev_t = chain[0][3] - sh.get(prev_node, 0)
    merged: list[tuple[str, str]] = []  # (name, dir) of hops whose end was not seen
    for name, dir_, node, t in chain[1:]:
        if t < 0:
            merged.append((name, dir_))
            continue
        if merged:
            merged.append((name, dir_))
            name = "+".join(n for n, _ in merged)
            dir_ = "+".join(dict.fromkeys(d for _, d in merged))
            merged = []
        tr = t - sh.get(node, 0)
        hops.append({"name": name, "dir": dir_,
                     "node": node if node == prev_node else f"{prev_node}->{node}",
                     "start_ns": prev_t, "duration_ns": tr - prev_t, "children": []})
        prev_t = tr
        prev_node = node
    complete = len(hops) == len(chain) - 1
    return hops, complete


def _derived_id(c: Sighting) -> str:
    import hashlib  # here: 4 ms of every start, for requests without an id only

    h = hashlib.blake2b(digest_size=8)
    h.update(f"{c.node}|{flow_str(*c.flow)}|{c.seq0}".encode())
    return "h-" + h.hexdigest()
