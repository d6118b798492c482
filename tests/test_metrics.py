"""The collector's ``/metrics``: reference captures shipped by agents, scraped, parsed.

Every number is checked against ``hopscope.replay.replay`` of the same
captures (the stitched requests the collector stores), so the histograms
come from real stitched requests, not from hand-made ones.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from hopscope.agent.ship import ShipConfig, ShipResult, ship
from hopscope.collector.metrics import BUCKETS_NS, CollectorMetrics
from hopscope.collector.server import Collector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from test_collector import TOKEN, _cfg, _pairs, _replayed, _run, _settled

# -- helpers (test_otlp.py uses them too; the collector's tests' own, renamed) -------

pairs, replayed, run, collector_cfg, settled = _pairs, _replayed, _run, _cfg, _settled


async def ship_case(c: Collector, case: str) -> dict[str, ShipResult]:
    """One agent per node ships the case's captures; returns when all are stitched."""
    ps = pairs(case)
    res = await asyncio.gather(*(ship(ShipConfig(
        capture=str(p), node=n, host="127.0.0.1", port=c.agent_port, token=TOKEN, batch=20,
        backoff_max=0.2, wait=20.0)) for n, p in ps))
    await settled(c, {n for n, _ in ps})
    return {n: r for (n, _), r in zip(ps, res, strict=True)}


async def scrape(c: Collector, accept: str | None = None) -> tuple[str, str]:
    """GET /metrics on the collector's HTTP API: (content type, body)."""
    def fetch() -> tuple[str, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{c.http_port}/metrics")
        if accept:
            req.add_header("Accept", accept)
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.headers["Content-Type"], r.read().decode()
    return await asyncio.to_thread(fetch)


def samples(text: str) -> dict[str, list[Sample]]:
    """Parsed exposition: family name -> its samples (and checks that it parses)."""
    return {f.name: list(f.samples) for f in text_string_to_metric_families(text)}


def value(fams: dict[str, list[Sample]], family: str, sample: str, **labels: str) -> float:
    hits = [s.value for s in fams[family] if s.name == sample and s.labels == labels]
    assert len(hits) == 1, (family, sample, labels, fams[family])
    return hits[0]


def _hop_durations(env: dict[str, Any]) -> dict[tuple[str, str, str], list[int]]:
    out: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for r in env["requests"]:
        for h in r["hops"]:
            out[(h["name"], h["dir"], h["node"])].append(h["duration_ns"])
            for ch in h["children"]:
                out[(ch["name"], ch["dir"], ch["node"])].append(ch["duration_ns"])
    return out


def _check_histogram(fams: dict[str, list[Sample]], family: str, labels: dict[str, str],
                     durations: list[int]) -> None:
    """Counts, sum and every cumulative bucket of one series equal the durations'."""
    assert value(fams, family, family + "_count", **labels) == len(durations)
    assert value(fams, family, family + "_sum", **labels) == pytest.approx(
        sum(durations) / 1e9, rel=1e-9, abs=1e-12)
    buckets = {s.labels["le"]: s.value for s in fams[family]
               if s.name == family + "_bucket" and
               {k: v for k, v in s.labels.items() if k != "le"} == labels}
    assert len(buckets) == len(BUCKETS_NS) + 1
    assert buckets["+Inf"] == len(durations)
    for edge in BUCKETS_NS:
        le = next(k for k in buckets if k != "+Inf" and abs(float(k) * 1e9 - edge) < 1e-3)
        assert buckets[le] == sum(d <= edge for d in durations), (labels, le)


# --------------------------------------------------------------------------


def test_an_unknown_clock_offset_is_left_out() -> None:
    """error_ns -1 (no cross-node traffic with the reference yet) is not an error bound."""
    m = CollectorMetrics(process=False)
    m.set_offsets({"reference": "node1", "clock_offsets": {"node2": {"offset_ns": 1_500_000, "error_ns": 20_000},
                                     "node3": {"offset_ns": 0, "error_ns": -1}}})
    fams = samples(m.exposition()[0].decode())
    for name, want in (("hopscope_clock_offset_seconds", 0.0015),
                       ("hopscope_clock_offset_error_seconds", 2e-05)):
        got = {s.labels["node"]: s.value for s in fams[name]}
        assert got == {"node2": pytest.approx(want)}, (name, got)


def test_bucket_edges() -> None:
    assert BUCKETS_NS[0] == 1_000 and BUCKETS_NS[-1] == 10_000_000_000
    assert len(BUCKETS_NS) == 22  # 1, 2.5, 5 per decade over 7 decades, then 10 s
    assert list(BUCKETS_NS) == sorted(set(BUCKETS_NS))
    m = CollectorMetrics(process=False)
    # an observation exactly on an edge is in that edge's bucket (le is inclusive)
    m.observe_requests([{"request_id": "x", "status": 200, "ingress_node": "n1",
                         "pod_node": "n1", "start_ns": 0, "total_ns": 2_500, "flags": [],
                         "hops": [{"name": "app", "dir": "server", "node": "n1",
                                   "start_ns": 0, "duration_ns": 2_500, "children": []}]}])
    body, ctype = m.exposition()
    assert ctype.startswith("text/plain")
    fams = samples(body.decode())
    lab = {"hop": "app", "dir": "server", "node": "n1"}
    _check_histogram(fams, "hopscope_hop_duration_seconds", lab, [2_500])
    b = {s.labels["le"]: s.value for s in fams["hopscope_hop_duration_seconds"]
         if s.name.endswith("_bucket")}
    assert b["1e-06"] == 0 and b["2.5e-06"] == 1


def test_metrics_cross_node_public(tmp_path: Path) -> None:
    want = replayed("cross-node-public")
    assert any(r["ingress_node"] != r["pod_node"] for r in want["requests"])

    async def go() -> tuple[tuple[str, str], tuple[str, str], dict[str, ShipResult]]:
        c = Collector(collector_cfg(tmp_path))
        await c.start()
        try:
            res = await ship_case(c, "cross-node-public")
            plain = await scrape(c)
            om = await scrape(c, "application/openmetrics-text; version=1.0.0")
        finally:
            await c.stop()
        return plain, om, res

    (ctype, text), (om_type, om_text), shipped = run(go)
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
    assert om_type.startswith("application/openmetrics-text") and om_text.endswith("# EOF\n")
    fams = samples(text)
    for name in ("hopscope_hop_duration_seconds", "hopscope_request_duration_seconds",
                 "hopscope_requests", "hopscope_drops", "hopscope_clock_offset_seconds",
                 "hopscope_clock_offset_error_seconds", "hopscope_ingest_batches",
                 "hopscope_ingest_observations", "hopscope_agent_lost_events"):
        assert name in fams, name
    assert all(n.startswith(("hopscope_", "python_")) for n in fams), sorted(fams)

    # one histogram series per (hop, dir, node) of the stitched requests, with their numbers
    hops = _hop_durations(want)
    series = {(s.labels["hop"], s.labels["dir"], s.labels["node"])
              for s in fams["hopscope_hop_duration_seconds"] if s.name.endswith("_count")}
    assert series == set(hops)
    assert ("wire", "request", "node1->node2") in series
    for (hop, dir_, node), durs in hops.items():
        _check_histogram(fams, "hopscope_hop_duration_seconds",
                         {"hop": hop, "dir": dir_, "node": node}, durs)
    totals: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in want["requests"]:
        totals[(r["ingress_node"], r["pod_node"] or "none")].append(r["total_ns"])
    for (a, b), durs in totals.items():
        _check_histogram(fams, "hopscope_request_duration_seconds",
                         {"ingress_node": a, "pod_node": b}, durs)

    statuses = Counter((str(r["status"]), r["ingress_node"]) for r in want["requests"])
    got = {(s.labels["status"], s.labels["ingress_node"]): s.value
           for s in fams["hopscope_requests"] if s.name == "hopscope_requests_total"}
    assert got == statuses

    off = want["clock_offsets"]["node2"]
    assert value(fams, "hopscope_clock_offset_seconds", "hopscope_clock_offset_seconds",
                 node="node2", reference="node1") == pytest.approx(off["offset_ns"] / 1e9)
    assert value(fams, "hopscope_clock_offset_error_seconds",
                 "hopscope_clock_offset_error_seconds", node="node2",
                 reference="node1") == pytest.approx(off["error_ns"] / 1e9)

    for node, r in shipped.items():
        agent = f"hopscope-agent@{node}"
        assert value(fams, "hopscope_ingest_batches", "hopscope_ingest_batches_total",
                     agent=agent, node=node) == r.batches
        assert value(fams, "hopscope_ingest_observations", "hopscope_ingest_observations_total",
                     agent=agent, node=node) == r.observations
        # the shipper's cumulative loss counters, as the agent reported them
        for src in ("spool_batches", "spool_bytes"):
            assert value(fams, "hopscope_agent_lost_events", "hopscope_agent_lost_events_total",
                         agent=agent, node=node, source=src) == 0
        assert value(fams, "hopscope_agent_last_batch_timestamp_seconds",
                     "hopscope_agent_last_batch_timestamp_seconds", agent=agent,
                     node=node) == pytest.approx(time.time(), abs=120)
    assert "hopscope_otlp_queue_requests" not in fams  # no exporter configured


def test_metrics_drops_statuses_flags(tmp_path: Path) -> None:
    want = replayed("drops")
    assert want["drops"]

    async def go() -> str:
        c = Collector(collector_cfg(tmp_path))
        await c.start()
        try:
            await ship_case(c, "drops")
            return (await scrape(c))[1]
        finally:
            await c.stop()

    fams = samples(run(go))
    drops = Counter((d["node"], d["point"], d["kind"], d.get("reason") or "unknown")
                    for d in want["drops"])
    got = {(s.labels["node"], s.labels["point"], s.labels["kind"], s.labels["reason"]): s.value
           for s in fams["hopscope_drops"] if s.name == "hopscope_drops_total"}
    assert got == drops
    statuses = Counter(str(r["status"] or "none") for r in want["requests"])
    got_st: Counter[str] = Counter()
    for s in fams["hopscope_requests"]:
        if s.name == "hopscope_requests_total":
            got_st[s.labels["status"]] += int(s.value)
    assert got_st == statuses and {"502", "504"} <= set(got_st)
    flags = Counter(f for r in want["requests"] for f in r["flags"])
    got_fl = {s.labels["flag"]: s.value for s in fams["hopscope_request_flags"]
              if s.name == "hopscope_request_flags_total"}
    assert got_fl == flags and got_fl.get("no_upstream") == 2
    for (hop, dir_, node), durs in _hop_durations(want).items():
        _check_histogram(fams, "hopscope_hop_duration_seconds",
                         {"hop": hop, "dir": dir_, "node": node}, durs)


def test_restart_does_not_count_twice(tmp_path: Path) -> None:
    """A restarted collector re-stitches its raw batches; what it had stored is not counted."""
    want = replayed("cross-node-public")

    async def go() -> tuple[str, str]:
        c = Collector(collector_cfg(tmp_path))
        await c.start()
        try:
            await ship_case(c, "cross-node-public")
            before = (await scrape(c))[1]
        finally:
            await c.stop()
        c2 = Collector(collector_cfg(tmp_path))
        await c2.start()  # restore(): the kept raw batches go through the stitcher again
        try:
            await settled(c2, {"node1", "node2"})
            assert c2.store.count_requests() == len(want["requests"])
            return before, (await scrape(c2))[1]
        finally:
            await c2.stop()

    before, after = run(go)
    n = sum(s.value for s in samples(before)["hopscope_requests"]
            if s.name == "hopscope_requests_total")
    assert n == len(want["requests"])
    fams = samples(after)
    assert not [s for s in fams["hopscope_requests"] if s.name == "hopscope_requests_total"]
    assert not [s for s in fams["hopscope_hop_duration_seconds"] if s.name.endswith("_count")]
    # the offsets are current, whether or not the requests were new
    assert value(fams, "hopscope_clock_offset_seconds", "hopscope_clock_offset_seconds",
                 node="node2", reference="node1") == pytest.approx(
        want["clock_offsets"]["node2"]["offset_ns"] / 1e9)
