"""The collector's Prometheus metrics (``GET /metrics`` on the HTTP API).

Everything is kept as integers (nanoseconds, counts) in plain dicts and
lists, updated on the collector's event loop: once per **stitched request**
(its hops and sub-hops into the histograms, its status, its flags), once per
drop, once per batch (ingest counters, the agent's ``lost`` map and clock
sample) and once per drain (clock offsets); never per observation.
:class:`CollectorMetrics` is a prometheus-client *collector*: at scrape time
it turns that state into metric families, converting nanoseconds to seconds
there and only there, and the library's registry and text exposition
(:func:`prometheus_client.exposition.choose_encoder`) write the answer.

Histogram buckets (:data:`BUCKETS_NS`): 1, 2.5 and 5 per decade from 1 µs to
10 s (22 edges, then ``+Inf``), for hops from a few microseconds (``encap``,
``deliver`` in the replica) to seconds (a slow ``app``, a UFW hold).
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

#: Histogram bucket upper bounds, integer nanoseconds: 1 µs .. 10 s, 1-2.5-5 per decade.
BUCKETS_NS: tuple[int, ...] = (
    *(v for e in range(3, 10) for v in (10 ** e, 25 * 10 ** e // 10, 5 * 10 ** e)), 10 ** 10)

_LE = [floatToGoString(b / 1e9) for b in BUCKETS_NS] + ["+Inf"]

_S = 1e9  # ns per second, for exposition only


class _Hist:
    """One label set's histogram: per-bucket counts (not cumulative), integer ns sum."""

    __slots__ = ("counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_NS) + 1)
        self.sum_ns = 0

    def observe(self, v: int) -> None:
        self.counts[bisect_left(BUCKETS_NS, v)] += 1
        self.sum_ns += v

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for le, c in zip(_LE, self.counts, strict=True):
            acc += c
            out.append((le, float(acc)))
        return out


@dataclass
class _Agent:
    node: str
    batches: int = 0
    observations: int = 0
    clock_samples: int = 0
    lost: Mapping[str, int] = field(default_factory=dict)
    wall_minus_mono_ns: int | None = None
    last_batch_ns: int = 0


def _histogram(name: str, doc: str, labels: list[str],
               data: Mapping[tuple[str, ...], _Hist]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=labels)
    for key, h in sorted(data.items()):
        fam.add_metric(list(key), h.buckets(), h.sum_ns / _S)
    return fam


def _counter(name: str, doc: str, labels: list[str],
             data: Mapping[tuple[str, ...], int]) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=labels)
    for key, v in sorted(data.items()):
        fam.add_metric(list(key), float(v))
    return fam


class CollectorMetrics:
    """The collector's metrics state, and the prometheus-client collector exposing it.

    ``registry`` holds this collector, the process collector (CPU, memory,
    file descriptors of the collector process) and whatever else registers
    (the OTLP exporter's counters).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # label values -> state; keys (hop, dir, node), (ingress_node, pod_node),
        # (status, ingress_node), (flag,), (node, point, kind, reason)
        self.hops: dict[tuple[str, ...], _Hist] = {}
        self.totals: dict[tuple[str, ...], _Hist] = {}
        self.requests: dict[tuple[str, ...], int] = {}
        self.flags: dict[tuple[str, ...], int] = {}
        self.drops: dict[tuple[str, ...], int] = {}
        self.completed_late = 0  # stored requests a node's late data completed
        self.agents: dict[str, _Agent] = {}
        self.reference = ""
        self.offsets: dict[str, tuple[int, int]] = {}
        #: () -> (batches, bytes) acked and waiting for the stitcher, and feed errors so far
        self.feed_state: Callable[[], tuple[int, int, int]] | None = None
        self.registry.register(self)
        if process:
            ProcessCollector(namespace="hopscope_collector", registry=self.registry)

    # -- updates (the collector's event loop) ------------------------------------
    def observe_requests(self, requests: Iterable[Mapping[str, Any]]) -> None:
        """Once per stitched request: hops and sub-hops, total, status, flags."""
        hops, totals, counts, flags = self.hops, self.totals, self.requests, self.flags
        for r in requests:
            for h in r.get("hops") or ():
                for x in (h, *(h.get("children") or ())):  # a hop, then its sub-hops
                    key = (x["name"], x["dir"], x["node"])
                    hist = hops.get(key)
                    if hist is None:
                        hist = hops[key] = _Hist()
                    hist.observe(int(x["duration_ns"]))
            ingress = str(r.get("ingress_node") or "none")
            total = r.get("total_ns")
            if total is not None:
                tkey = (ingress, str(r.get("pod_node") or "none"))
                th = totals.get(tkey)
                if th is None:
                    th = totals[tkey] = _Hist()
                th.observe(int(total))
            skey = (str(r.get("status") or "none"), ingress)
            counts[skey] = counts.get(skey, 0) + 1
            for f in r.get("flags") or ():
                fkey = (str(f),)
                flags[fkey] = flags.get(fkey, 0) + 1

    def observe_drops(self, drops: Iterable[Mapping[str, Any]]) -> None:
        for d in drops:
            key = (str(d.get("node") or ""), str(d.get("point") or ""),
                   str(d.get("kind") or ""), str(d.get("reason") or "unknown"))
            self.drops[key] = self.drops.get(key, 0) + 1

    def set_offsets(self, envelope: Mapping[str, Any]) -> None:
        """The stitcher's current clock offsets (``Stitcher.envelope`` shape)."""
        self.reference = str(envelope.get("reference") or "")
        self.offsets = {str(n): (int(o["offset_ns"]), int(o["error_ns"]))
                        for n, o in (envelope.get("clock_offsets") or {}).items()}

    def observe_batch(self, agent: str, node: str, observations: int,
                      clock: list[tuple[int, int]], lost: Mapping[str, int]) -> None:
        """Once per stored batch: ingest counters, the agent's loss counters and clock."""
        a = self.agents.get(agent)
        if a is None:
            a = self.agents[agent] = _Agent(node)
        a.node = node
        a.batches += 1
        a.observations += observations
        a.last_batch_ns = time.time_ns()
        if lost:
            a.lost = lost  # cumulative since the agent started: the latest map is the value
        if clock:
            a.clock_samples += len(clock)
            mono, real = clock[-1]
            a.wall_minus_mono_ns = real - mono

    # -- exposition -----------------------------------------------------------------
    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) for ``GET /metrics`` with this ``Accept`` header."""
        encoder, ctype = choose_encoder(accept)
        return encoder(self.registry), ctype

    def collect(self) -> Iterator[Metric]:
        yield _histogram(
            "hopscope_hop_duration_seconds",
            "Duration of each hop of stitched requests (top-level hops and the eBPF sub-hops "
            "kernel_in/proxy/service_nat), by hop name, direction and node (A->B for wire).",
            ["hop", "dir", "node"], self.hops)
        yield _histogram(
            "hopscope_request_duration_seconds",
            "Total of stitched requests: request complete at the ingress NIC to the first "
            "response byte leaving it (requests without a response are not observed).",
            ["ingress_node", "pod_node"], self.totals)
        yield _counter("hopscope_requests", "Stitched requests, by HTTP status code ('none': "
                       "no response) and ingress node.", ["status", "ingress_node"],
                       self.requests)
        yield _counter("hopscope_request_flags", "Stitched requests carrying each flag "
                       "(retransmit, incomplete, no_response, ...).", ["flag"], self.flags)
        yield _counter("hopscope_requests_completed_late", "Stored requests that a node's "
                       "late data completed (stitched again, more complete, and replaced).",
                       [], {(): self.completed_late})
        yield _counter("hopscope_drops", "Drops: connections or requests that died, by the "
                       "node and point that saw them last, kind and kernel reason ('unknown' "
                       "when only captures saw it).", ["node", "point", "kind", "reason"],
                       self.drops)
        off = GaugeMetricFamily("hopscope_clock_offset_seconds",
                                "Each node's clock minus the reference node's, as estimated "
                                "from cross-node traffic by the stitcher (a node whose "
                                "offset is not known yet is left out).",
                                labels=["node", "reference"])
        err = GaugeMetricFamily("hopscope_clock_offset_error_seconds",
                                "Half-width of the interval bounding each node's clock offset.",
                                labels=["node", "reference"])
        for node, (o, e) in sorted(self.offsets.items()):
            if e < 0:  # unknown (error_ns -1): no cross-node traffic with the reference yet
                continue
            off.add_metric([node, self.reference], o / _S)
            err.add_metric([node, self.reference], e / _S)
        yield off
        yield err
        agents = sorted(self.agents.items())
        batches = CounterMetricFamily("hopscope_ingest_batches", "Batches stored, per agent "
                                      "(duplicates are not counted).", labels=["agent", "node"])
        obs = CounterMetricFamily("hopscope_ingest_observations", "Observations stored, per "
                                  "agent.", labels=["agent", "node"])
        lost = CounterMetricFamily("hopscope_agent_lost_events", "Events the agent lost, by "
                                   "source, as the agent counts them since it started (resets "
                                   "when the agent restarts).", labels=["agent", "node", "source"])
        samples = CounterMetricFamily("hopscope_agent_clock_samples", "Clock samples "
                                      "(monotonic, wall) received from the agent.",
                                      labels=["agent", "node"])
        wall = GaugeMetricFamily("hopscope_agent_wall_minus_monotonic_seconds", "The agent "
                                 "node's wall clock minus its monotonic clock at its latest "
                                 "clock sample: a jump is a wall clock step.",
                                 labels=["agent", "node"])
        last = GaugeMetricFamily("hopscope_agent_last_batch_timestamp_seconds", "When the "
                                 "agent's latest batch was stored (the collector's wall clock, "
                                 "Unix seconds).", labels=["agent", "node"])
        for agent, a in agents:
            lab = [agent, a.node]
            batches.add_metric(lab, float(a.batches))
            obs.add_metric(lab, float(a.observations))
            samples.add_metric(lab, float(a.clock_samples))
            last.add_metric(lab, a.last_batch_ns / _S)
            if a.wall_minus_mono_ns is not None:
                wall.add_metric(lab, a.wall_minus_mono_ns / _S)
            for src, n in sorted(a.lost.items()):
                lost.add_metric([*lab, src], float(n))
        yield from (batches, obs, lost, samples, wall, last)
        if self.feed_state is not None:
            nb, nbytes, errors = self.feed_state()
            yield GaugeMetricFamily("hopscope_feed_backlog_batches", "Batches acked (durable) "
                                    "and waiting for the stitcher.", value=float(nb))
            yield GaugeMetricFamily("hopscope_feed_backlog_bytes", "Their bodies' bytes (the "
                                    "acks wait above --feed-backlog).", value=float(nbytes))
            yield CounterMetricFamily("hopscope_feed_errors", "Batches the stitcher's feed "
                                      "failed on (stored; a restart stitches them again).",
                                      value=float(errors))
