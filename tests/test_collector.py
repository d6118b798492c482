"""The collector path end to end, in-process on 127.0.0.1 (ephemeral ports, temp dirs).

Agents ship the reference captures to a collector; what it stores is
compared with ``hopscope.replay.replay`` of the same captures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sqlite3
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
from click.testing import CliRunner
from hopscope.agent.ship import ShipConfig, ship
from hopscope.collector import wire
from hopscope.collector.server import Collector, CollectorConfig
from hopscope.collector.store import SqliteStore, parse_duration, resolve_since

from hopscope.cli import main
from hopscope.errors import AuthFailed, HopscopeError, UsageError
from hopscope.render import fmt_ns
from hopscope.replay import replay

ROOT = Path(__file__).resolve().parent.parent
PCAPS = ROOT / "pcaps"
TOKEN = b"0123456789abcdef0123456789abcdef"
T = TypeVar("T")


def _pairs(case: str) -> list[tuple[str, Path]]:
    return [(p.stem, p) for p in sorted((PCAPS / case).glob("*.pcapng"))]


def _replayed(case: str) -> dict[str, Any]:
    return replay(_pairs(case), jobs=1, reference="node1").envelope


def _run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)
    return asyncio.run(bounded())


def _cfg(tmp: Path, port: int = 0, **kw: Any) -> CollectorConfig:
    base: dict[str, Any] = dict(db=str(tmp / "collector.db"), token=TOKEN,
                                listen=("127.0.0.1", port), http=("127.0.0.1", 0),
                                reference="node1", drain_every=0.05, idle_flush=0.5)
    base.update(kw)
    return CollectorConfig(**base)


def _ship_cfg(c: Collector, node: str, capture: Path, **kw: Any) -> ShipConfig:
    base: dict[str, Any] = dict(capture=str(capture), node=node, host="127.0.0.1",
                                port=c.agent_port, token=TOKEN, batch=20, backoff_max=0.2,
                                wait=20.0)
    base.update(kw)
    return ShipConfig(**base)


async def _settled(c: Collector, nodes: set[str], timeout: float = 15) -> None:
    """Until every node was flushed (idle) and a drain ran after that."""
    t0 = time.monotonic()
    while not nodes <= c.flushed:
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"nodes {nodes - c.flushed} never settled")
        await asyncio.sleep(0.05)
    await asyncio.sleep(3 * c.cfg.drain_every)


async def _get(c: Collector, target: str) -> Any:
    def fetch() -> Any:
        url = f"http://127.0.0.1:{c.http_port}{target}"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    return await asyncio.to_thread(fetch)


async def _collect(tmp: Path, case: str, **kw: Any) -> tuple[Collector, dict[str, Any]]:
    """Ship every capture of a case with one agent per node; (collector, stored envelope)."""
    c = Collector(_cfg(tmp, **kw))
    await c.start()
    pairs = _pairs(case)
    await asyncio.gather(*(ship(_ship_cfg(c, n, p)) for n, p in pairs))
    await _settled(c, {n for n, _ in pairs})
    env = await _get(c, "/requests?since=10m&limit=100000")
    return c, env


def _cli(*args: str) -> Any:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


# --------------------------------------------------------------------------


def test_cross_node_trace_matches_replay(tmp_path: Path) -> None:
    want = _replayed("cross-node-public")
    assert any(r["ingress_node"] != r["pod_node"] for r in want["requests"])

    async def go() -> tuple[list[Any], dict[str, Any]]:
        c, env = await _collect(tmp_path, "cross-node-public")
        try:
            traces = [await _get(c, f"/trace/{r['request_id']}") for r in want["requests"]]
            health = await _get(c, "/health")
            url = f"http://127.0.0.1:{c.http_port}"
            via_http = json.loads(await asyncio.to_thread(
                _cli, "requests", "--collector", url, "--since", "10m", "--json"))
            assert via_http["requests"] == want["requests"]
            missing = await asyncio.to_thread(
                CliRunner().invoke, main, ["trace", "nope", "--collector", url])
            assert missing.exit_code == 1 and "no request 'nope' stored" in missing.output
        finally:
            await c.stop()
        assert health["ok"] and health["requests"] == len(want["requests"])
        return traces, env

    traces, env = _run(go)
    assert env["requests"] == want["requests"]
    for t, r in zip(traces, want["requests"], strict=True):
        assert t["requests"] == [r]
        assert set(t) == {"requests", "drops", "clock_offsets", "reference"}
        # the offsets this request's hops used (one window: the replay's)
        assert t["clock_offsets"] == want["clock_offsets"] and want["clock_offsets"]
    # the CLI straight from the database: same request, same hops
    cross = next(r for r in want["requests"] if r["ingress_node"] != r["pod_node"])
    db = str(tmp_path / "collector.db")
    out = json.loads(_cli("trace", cross["request_id"], "--db", db, "--json"))
    assert out["requests"] == [cross]
    text = _cli("trace", cross["request_id"], "--db", db)
    assert cross["request_id"] in text and "wire" in text and "node1->node2" in text
    off = want["clock_offsets"]["node2"]
    assert "Clock offsets used (node minus node1):" in text
    assert f"node2: {fmt_ns(off['offset_ns'])} ± {fmt_ns(off['error_ns'])}" in text


def test_replica_three_agents_match_replay(tmp_path: Path) -> None:
    want = _replayed("replica-clean")

    async def go() -> dict[str, Any]:
        c, env = await _collect(tmp_path, "replica-clean")
        await c.stop()
        return env

    env = _run(go)
    got = {r["request_id"]: r for r in env["requests"]}
    assert len(env["requests"]) == len(got) == len(want["requests"])
    for r in want["requests"]:
        g = got[r["request_id"]]
        assert [(h["name"], h["dir"], h["node"]) for h in g["hops"]] == \
               [(h["name"], h["dir"], h["node"]) for h in r["hops"]]
        assert g == r


@pytest.mark.parametrize("late", ["node2", "node1"])
def test_a_node_that_ships_late_completes_the_stored_requests(tmp_path: Path,
                                                              late: str) -> None:
    """One node's agent ships only after the other's requests were stored without it (its
    node was idle, so they were finished): the late data completes them, and what is
    stored is what replay gives with every capture at once (not the first, partial stitch
    kept for good)."""
    want = _replayed("cross-node-public")
    pairs = dict(_pairs("cross-node-public"))
    early = "node1" if late == "node2" else "node2"

    async def go() -> tuple[list[Any], list[Any], int, bytes]:
        c = Collector(_cfg(tmp_path))
        await c.start()
        try:
            await ship(_ship_cfg(c, early, pairs[early]))
            await _settled(c, {early})
            first = (await _get(c, "/requests?since=10m&limit=1000"))["requests"]
            await ship(_ship_cfg(c, late, pairs[late]))
            await _settled(c, {early, late})
            env = await _get(c, "/requests?since=10m&limit=1000")
            metrics, _ = c.metrics.exposition()
        finally:
            await c.stop()
        return first, env["requests"], c.store.replaced, metrics

    first, got, replaced, metrics = _run(go)
    cross = [r for r in want["requests"] if r["ingress_node"] != r["pod_node"]]
    assert cross and all("incomplete" in r["flags"] for r in first
                         if r["request_id"] in {x["request_id"] for x in cross})
    assert sorted(got, key=lambda r: r["request_id"]) == sorted(
        want["requests"], key=lambda r: r["request_id"])
    assert replaced == len(cross)
    assert f"hopscope_requests_completed_late_total {float(len(cross))}".encode() in metrics


def test_requests_filters_stats_counts(tmp_path: Path) -> None:
    want = _replayed("replica-clean")

    async def go() -> None:
        c, _env = await _collect(tmp_path, "replica-clean")
        await c.stop()

    _run(go)
    db = str(tmp_path / "collector.db")
    totals = sorted(r["total_ns"] for r in want["requests"])
    cut = totals[len(totals) // 2]
    out = json.loads(_cli("requests", "--db", db, "--since", "1h", "--slower-than",
                          f"{cut}ns", "--limit", "1000", "--json"))
    assert out["requests"]
    assert all(r["total_ns"] > cut for r in out["requests"])
    assert len(out["requests"]) == sum(t > cut for t in totals)
    # milliseconds parse, and a tight limit keeps the newest
    one = json.loads(_cli("requests", "--db", db, "--since", "1h", "--limit", "1", "--json"))
    assert one["requests"] == [max(want["requests"], key=lambda r: r["start_ns"])]
    # status filter: a class that matches nothing and one that matches all
    codes = Counter(r["status"] // 100 for r in want["requests"] if r.get("status"))
    k, n = codes.most_common(1)[0]
    sel = json.loads(_cli("requests", "--db", db, "--since", "1h", "--status", f"{k}xx",
                          "--limit", "1000", "--json"))
    assert len(sel["requests"]) == n
    # stats: per hop counts equal the replay's hops
    st = json.loads(_cli("stats", "--db", db, "--since", "1h", "--json"))
    want_counts = Counter((h["name"], h["dir"]) for r in want["requests"] for h in r["hops"])
    got_counts = {(row["name"], row["dir"]): row["count"] for row in st["hops"]
                  if row["name"] != "total"}
    assert got_counts == dict(want_counts)
    for row in st["hops"]:
        assert row["p50"] <= row["p90"] <= row["p99"] <= row["max"]
        assert all(isinstance(row[k], int) for k in ("p50", "p90", "p99", "max"))
    by_node = json.loads(_cli("stats", "--db", db, "--since", "1h", "--by", "node", "--json"))
    assert sum(r["count"] for r in by_node["hops"] if r["name"] != "total") == \
        sum(want_counts.values())
    text = _cli("stats", "--db", db, "--since", "1h")
    assert "p99" in text and "ingress" in text
    human = _cli("requests", "--db", db, "--since", "1h", "--slower-than", "1ms")
    assert "Per-hop latency" in human or "No HTTP requests" in human


def test_path_filter_and_grouping_leave_the_query_string_out(tmp_path: Path) -> None:
    def req(i: int, path: str) -> dict[str, Any]:
        return {"request_id": f"r{i}", "start_ns": 1_764_000_000_000_000_000 + i,
                "total_ns": 1000 + i, "status": 200, "path": path, "ingress_node": "node1",
                "pod_node": "node1", "hops": [{"name": "ingress", "dir": "request",
                                               "node": "node1", "duration_ns": 10 + i}]}

    st = SqliteStore(tmp_path / "s.db")
    try:
        st.put_requests([req(0, "/api/tasks/"), req(1, "/api/tasks/?residence=42"),
                         req(2, "/api/tasks/7/"), req(3, "/api/tasks/?residence=7")])
        got = [r["request_id"] for r in st.query_requests(path="/api/tasks/")]
        assert got == ["r0", "r1", "r3"]  # the stored path keeps its query string
        assert st.get_request("r1")["path"] == "/api/tasks/?residence=42"
        assert len(st.query_requests(path="/api/tasks/*")) == 4
        assert [r["request_id"] for r in st.query_requests(path="/api/tasks/7/")] == ["r2"]
        got = [r["request_id"] for r in st.query_requests(path="/api/tasks/?residence=7")]
        assert got == ["r3"]  # a query string given: that one
        rows = st.hop_stats(by="path")
        assert {(r["path"], r["name"]): r["count"] for r in rows} == {
            ("/api/tasks/", "ingress"): 3, ("/api/tasks/", "total"): 3,
            ("/api/tasks/7/", "ingress"): 1, ("/api/tasks/7/", "total"): 1}
    finally:
        st.close()


def test_stats_has_the_sub_hops_under_their_hop(tmp_path: Path) -> None:
    """`stats` (and /stats) lists eBPF's sub-hops under `ingress`, as `requests` does; a
    store written before sub-hops had rows opens and gains them for new requests."""
    def hop(name: str, ns: int, children: list[dict[str, Any]] = ()) -> dict[str, Any]:
        return {"name": name, "dir": "request", "node": "node1", "start_ns": 0,
                "duration_ns": ns, "children": list(children)}

    def req(i: int, sub: bool) -> dict[str, Any]:
        kin = hop("kernel_in", 10 + i, [hop("netfilter", 3 + i)] if i else [])
        ing = hop("ingress", 100 + i, [kin, hop("proxy", 70), hop("service_nat", 20 - i)]
                  if sub else [])
        return {"request_id": f"r{i}", "start_ns": 1_764_000_000_000_000_000 + i,
                "total_ns": 1000 + i, "status": 200, "path": "/", "ingress_node": "node1",
                "pod_node": "node1", "hops": [ing, hop("app", 500)], "flags": []}

    db = tmp_path / "s.db"
    old = sqlite3.connect(db)  # the hops table as stores before sub-hops had it
    old.execute("CREATE TABLE hops (req INTEGER NOT NULL, name TEXT NOT NULL, dir TEXT NOT "
                "NULL, node TEXT NOT NULL, duration_ns INTEGER NOT NULL)")
    old.commit()
    old.close()
    st = SqliteStore(db)
    try:
        st.put_requests([req(0, False), req(1, True), req(2, True)])
        rows = [(r.get("parent", ""), r["name"], r["count"], r["max"]) for r in st.hop_stats()]
    finally:
        st.close()
    # the sub-hops first seen in a later request are still listed under their hop
    assert rows == [("", "ingress", 3, 102), ("ingress", "kernel_in", 2, 12),
                    ("ingress/kernel_in", "netfilter", 2, 5), ("ingress", "proxy", 2, 70),
                    ("ingress", "service_nat", 2, 19), ("", "app", 3, 500),
                    ("", "total", 3, 1002)]
    text = _cli("stats", "--db", str(db), "--since", "1000d", "--anchor", "now")
    names = [ln.split()[0] for ln in text.splitlines()[2:]]
    assert names == ["ingress", "kernel_in", "netfilter", "proxy", "service_nat", "app", "total"]
    assert "\n  kernel_in " in text and "\n    netfilter " in text and "\napp " in text


def test_drops(tmp_path: Path) -> None:
    want = _replayed("drops")
    assert want["drops"]

    async def go() -> Any:
        c, _env = await _collect(tmp_path, "drops")
        try:
            return await _get(c, "/drops?since=1h")
        finally:
            await c.stop()

    got = _run(go)
    key = lambda d: json.dumps(d, sort_keys=True)  # noqa: E731
    assert sorted(map(key, got["drops"])) == sorted(map(key, want["drops"]))
    out = _cli("drops", "--db", str(tmp_path / "collector.db"), "--since", "1h")
    assert f"Drops ({len(want['drops'])})" in out


def test_wrong_token_refused_other_agent_unaffected(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hopscope")
    want = _replayed("cross-node-public")

    async def go() -> tuple[int, BaseException | None]:
        c = Collector(_cfg(tmp_path))
        await c.start()
        try:
            async def intruder() -> BaseException | None:
                hello = wire.Hello("evil", "node1", b"x" * 32, time.time_ns())
                try:
                    await wire.open_agent_connection("127.0.0.1", c.agent_port, hello)
                except AuthFailed as exc:
                    return exc
                return None

            results = await asyncio.gather(
                intruder(), *(ship(_ship_cfg(c, n, p)) for n, p in _pairs("cross-node-public")))
            await _settled(c, {"node1", "node2"})
            return c.store.count_requests(), results[0]
        finally:
            await c.stop()

    n, exc = _run(go)
    assert isinstance(exc, AuthFailed)
    assert n == len(want["requests"])
    refused = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refused) == 1 and "wrong token" in refused[0].getMessage()
    assert "x" * 32 not in caplog.text


def test_restart_mid_stream_exactly_once(tmp_path: Path) -> None:
    """Stop the collector while an agent is mid-capture; it spools, reconnects, replays."""
    want = _replayed("replica-clean")
    pairs = _pairs("replica-clean")

    async def go() -> tuple[int, list[str], int]:
        c = Collector(_cfg(tmp_path, idle_flush=1.5))
        await c.start()
        port = c.agent_port
        spool = tmp_path / "spool-node2"
        first = [asyncio.create_task(ship(_ship_cfg(c, n, p, batch=50))) for n, p in pairs
                 if n != "node2"]
        slow = asyncio.create_task(ship(_ship_cfg(c, "node2", PCAPS / "replica-clean" /
                                                  "node2.pcapng", batch=50, pace=0.02,
                                                  spool_dir=str(spool))))
        while c.seqs.acked("hopscope-agent@node2") < 5:
            await asyncio.sleep(0.01)
        await c.stop()  # mid-stream: node2 keeps reading into its spool
        await asyncio.sleep(0.5)
        assert not slow.done()
        c2 = Collector(_cfg(tmp_path, port=port, idle_flush=1.5))
        await c2.start()
        try:
            res = await slow
            await asyncio.gather(*first)
            await _settled(c2, {n for n, _ in pairs})
            env = await _get(c2, "/requests?since=1h&limit=100000")
            assert res.connects >= 2
            return c2.store.count_requests(), [r["request_id"] for r in env["requests"]], \
                res.spooled_left
        finally:
            await c2.stop()

    n, ids, left = _run(go)
    assert left == 0
    assert n == len(ids) == len(set(ids)) == len(want["requests"])
    assert set(ids) == {r["request_id"] for r in want["requests"]}
    s = SqliteStore(tmp_path / "collector.db", readonly=True)
    try:
        seqs = s.agent_seqs()
        nb = s.db.execute("SELECT count(*) FROM batches WHERE agent = ?",
                          ("hopscope-agent@node2",)).fetchone()[0]
    finally:
        s.close()
    assert nb == seqs["hopscope-agent@node2"] + 1  # every batch stored once, none missing


def test_v1_agents_and_v1_batches_in_the_store_are_still_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent of schema v1 (rows) beside one of v2 (columns), then a restart that
    re-stitches both kinds of stored batch: the same requests as replay, every time."""
    want = _replayed("cross-node-public")
    encode = wire.encode_batch
    versions: list[tuple[str, int]] = []

    def by_node(*a: Any, **kw: Any) -> bytes:
        kw["version"] = 1 if a[2] == "node1" else 2
        versions.append((a[2], kw["version"]))
        return encode(*a, **kw)

    monkeypatch.setattr(wire, "encode_batch", by_node)

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        c, env = await _collect(tmp_path, "cross-node-public")
        await c.stop()
        with sqlite3.connect(tmp_path / "collector.db") as db:  # the results go, the
            db.execute("PRAGMA foreign_keys=ON")  # batches stay
            for table in ("hops", "requests", "drops", "offsets"):
                db.execute(f"DELETE FROM {table}")
        db.close()
        c2 = Collector(_cfg(tmp_path))
        await c2.start()  # restore(): every stored batch is decoded and stitched again
        try:
            await _settled(c2, {"node1", "node2"})
            again = await _get(c2, "/requests?since=10m&limit=100000")
        finally:
            await c2.stop()
        return env, again

    env, again = _run(go)
    assert {v for n, v in versions if n == "node1"} == {1}
    assert {v for n, v in versions if n == "node2"} == {2}
    s = SqliteStore(tmp_path / "collector.db", readonly=True)
    try:
        segs = s.db.execute("SELECT node, seg, off, len FROM batches").fetchall()
        kinds = Counter((node, msgpack.unpackb(s.batch_log.read(seg, off, n))["v"])
                        for node, seg, off, n in segs)
        restored = [(node, list(obs)) for _, _, node, obs in s.iter_batches()]
    finally:
        s.close()
    assert set(kinds) == {("node1", 1), ("node2", 2)}
    assert len(restored) == sum(kinds.values()) and all(obs for _, obs in restored)
    assert env["requests"] == again["requests"] == want["requests"]


@pytest.mark.parametrize("backlog", [64 << 20, 1])
def test_acks_wait_for_the_stitcher_only_beyond_the_backlog(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backlog: int) -> None:
    """Batches are acked once durable while the trackers are held back (a burst taken in
    at full speed), unless more than ``feed_backlog`` bytes wait: then the acks wait for
    the trackers. Either way the requests come out as replay stitches them."""
    want = _replayed("cross-node-public")
    hold = asyncio.Event()
    loop_ = Collector._feed_loop

    async def held(self: Collector) -> None:
        await hold.wait()
        await loop_(self)

    monkeypatch.setattr(Collector, "_feed_loop", held)
    pairs = _pairs("cross-node-public")

    async def go() -> tuple[dict[str, Any], list[int], list[int]]:
        c = Collector(_cfg(tmp_path, feed_backlog=backlog))
        await c.start()
        try:
            shipping = [asyncio.create_task(ship(_ship_cfg(c, n, p, batch=10)))
                        for n, p in pairs]
            await asyncio.sleep(1.0)
            acked = [c.seqs.acked(f"hopscope-agent@{n}") for n, _ in pairs]
            held_back = [c.backlog, len(c.trackers)]  # feeding a node's batch makes its tracker
            hold.set()
            results = await asyncio.gather(*shipping)
            assert [r.acked for r in results] == [r.batches - 1 for r in results]
            await _settled(c, {n for n, _ in pairs})
            assert c.backlog == 0 and c.feed_errors == 0
            health = await _get(c, "/health")
            assert (health["backlog"], health["feed_errors"]) == (0, 0)
            text = c.metrics.exposition()[0].decode()
            assert "hopscope_feed_backlog_batches 0.0" in text.splitlines()
            assert "hopscope_feed_errors_total 0.0" in text.splitlines()
            return await _get(c, "/requests?since=10m&limit=100000"), acked, held_back
        finally:
            await c.stop()

    env, acked, (queued, trackers) = _run(go)
    assert trackers == 0  # nothing reached a tracker while the feeder was held
    if backlog > 1:  # every batch acked while none was stitched
        assert queued == sum(a + 1 for a in acked) and min(acked) >= 2
    else:  # the first batch is over the cap: no ack, a connection's in-flight batches wait
        assert max(acked) == -1 and 0 < queued <= wire.MAX_INFLIGHT * len(pairs)
    assert env["requests"] == want["requests"]


def test_garbage_refused_with_a_log_line(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hopscope")

    async def go() -> bytes:
        c = Collector(_cfg(tmp_path))
        await c.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", c.agent_port)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64))
            await w.drain()
            data = await asyncio.wait_for(r.read(), 5)  # the error frame, then EOF
            w.close()
            # the collector still works for a real agent
            await ship(_ship_cfg(c, "node1", PCAPS / "cross-node-public" / "node1.pcapng"))
            return data
        finally:
            await c.stop()

    data = _run(go)
    frame = wire.FrameDecoder(wire.HELLO_MAX_FRAME).feed(data)[0]
    assert isinstance(frame, wire.ErrorFrame) and frame.code == "too-large"
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refused) == 1 and "not a hopscope peer" in refused[0]


def test_a_batch_that_does_not_decode_is_dropped_not_replayed(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    """The refusal names the batch (docs/wire.md): the agent drops it from its spool and
    the batches behind it go through, on the same few connections."""
    from hopscope.collector.spool import Spool

    from hopscope.capture import CaptureReader

    caplog.set_level(logging.INFO, logger="hopscope")
    capture = PCAPS / "cross-node-public" / "node1.pcapng"
    spool = tmp_path / "spool"
    rows = [list(ob) for ob in next(iter(CaptureReader(str(capture), "nodeB",
                                                      directions=False)))[:3]]
    rows[1][10] = "oops"  # sport: an older or broken agent's batch, spooled before
    body = msgpack.packb({"v": 1, "t": "batch", "agent": "hopscope-agent@nodeB", "seq": 0,
                          "node": "nodeB", "ts_real_ns": 0, "obs": rows}, use_bin_type=True)
    with Spool(spool) as sp:
        sp.append(0, len(body).to_bytes(4, "big") + body)

    async def go() -> Any:
        c = Collector(_cfg(tmp_path))
        await c.start()
        try:
            return await ship(_ship_cfg(c, "nodeB", capture, spool_dir=str(spool), batch=10,
                                        wait=10.0))
        finally:
            await c.stop()

    res = _run(go)
    assert res.spooled_left == 0 and res.acked == res.batches  # seqs 1..batches, 0 dropped
    assert res.connects == 2  # the refusal, then everything else
    dropped = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("batch 0 refused for good")]
    assert len(dropped) == 1 and "field 'sport' must be int" in dropped[0]
    # counted as a spool drop (what later batches' `lost` maps report to the collector)
    assert any("batch 0 refused by the collector: dropped; 1 batches" in r.getMessage()
               for r in caplog.records)


def test_a_collector_that_refuses_after_the_welcome_is_dialled_with_backoff(
        tmp_path: Path) -> None:
    """The backoff starts again from its minimum once a batch is acked, not at each welcome:
    else a collector that welcomes, then refuses, is dialled ten times a second."""
    capture = PCAPS / "cross-node-public" / "node1.pcapng"
    conns = 0

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        try:
            await wire.read_frame(reader, wire.HELLO_MAX_FRAME)
            await wire.write_frame(writer, wire.Welcome("c", -1, wire.MAX_FRAME))
            await wire.read_frame(reader, wire.MAX_FRAME)
            await wire.write_frame(writer, wire.ErrorFrame("internal", "writer failed", -1))
        finally:
            await wire.close_writer(writer)

    async def go() -> None:
        srv = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        cfg = ShipConfig(capture=str(capture), node="n1", host="127.0.0.1", port=port,
                         token=TOKEN, batch=1000, backoff_min=0.05, backoff_max=0.4, wait=2.0)
        try:
            with pytest.raises(HopscopeError, match="did not take"):
                await ship(cfg)
        finally:
            srv.close()

    _run(go)
    # 0.05, 0.1, 0.2, 0.4, 0.4 ... s apart: about 7 in 2 s (40 with the backoff reset)
    assert 4 <= conns <= 10, conns


def test_a_connection_cut_before_the_welcome_asks_about_tls(
        caplog: pytest.LogCaptureFixture) -> None:
    """What a TLS collector does to a plain agent (its handshake fails before the collector
    sees the connection): the connection ends, nothing said. The agent's warning asks."""
    caplog.set_level(logging.WARNING, logger="hopscope")
    capture = PCAPS / "cross-node-public" / "node1.pcapng"

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def go() -> None:
        srv = await asyncio.start_server(cut, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        cfg = ShipConfig(capture=str(capture), node="n1", host="127.0.0.1", port=port,
                         token=TOKEN, backoff_min=0.05, backoff_max=0.1, wait=0.3)
        try:
            with pytest.raises(HopscopeError):
                await ship(cfg)
        finally:
            srv.close()

    _run(go)
    warned = [r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage()]
    assert warned and all("does the collector want TLS on this port: --tls-ca?" in w
                          for w in warned), warned


def test_http_out_of_range_and_overlong_is_400(tmp_path: Path) -> None:
    big = "9" * 23

    async def go() -> list[tuple[int, str]]:
        c = Collector(_cfg(tmp_path))
        await c.start()
        out = []
        try:
            for q in (f"/requests?limit={big}", f"/requests?since={big}",
                      f"/requests?until={big}", f"/requests?slower_than={big}",
                      f"/stats?since={big}", f"/drops?since={big}"):
                out.append(await _raw_get(c.http_port, f"GET {q} HTTP/1.1\r\n\r\n".encode()))
            for head in (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                         b"GET /health HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n"):
                out.append(await _raw_get(c.http_port, head))
        finally:
            await c.stop()
        return out

    for status, body in _run(go):
        assert status == 400, body
        err = json.loads(body)["error"]
        assert ("out of range" in err or "longer than 292 years" in err
                or err == "request line or header too long"), err


async def _raw_get(port: int, data: bytes) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    resp = await reader.read()
    writer.close()
    head, _, body = resp.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def test_a_prune_at_the_cap_lets_the_drain_run_between_its_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prune at the cap deletes a chunk a step, and the drain loop stores between two
    steps: the collector keeps storing while it prunes (when the whole prune ran inside
    the drain loop, nothing was stored for seconds at the replica's rates)."""
    pre = SqliteStore(tmp_path / "collector.db")
    pre.put_requests([{"request_id": f"r{i:05d}", "start_ns": 1_000 + i, "total_ns": 10,
                       "hops": [{"name": "ingress", "dir": "request", "node": "node1",
                                 "duration_ns": 5}]} for i in range(3000)])
    pre.close()

    async def go() -> list[tuple[int, int]]:
        c = Collector(_cfg(tmp_path, prune_every=0.05, max_bytes=1, prune_chunk=10))
        drains, runs, seen = 0, 0, []
        step, steps, chunk = c.step, c.store.prune_steps, c.store._delete_chunk

        def counted() -> int:
            nonlocal drains
            drains += 1
            return step()

        def run(*a: Any, **kw: Any) -> Any:
            nonlocal runs
            runs += 1
            return steps(*a, **kw)

        def recorded(*a: Any, **kw: Any) -> int:
            seen.append((runs, drains))
            time.sleep(0.002)  # a slower disk: the run spans several drain intervals
            return chunk(*a, **kw)

        monkeypatch.setattr(c, "step", counted)
        monkeypatch.setattr(c.store, "prune_steps", run)
        monkeypatch.setattr(c.store, "_delete_chunk", recorded)
        await c.start()
        try:
            t0 = time.monotonic()
            while runs < 2 and time.monotonic() - t0 < 30:
                await asyncio.sleep(0.05)
        finally:
            await c.stop()
        return seen

    seen = _run(go)
    first = [d for r, d in seen if r == 1]
    assert len(first) > 100, len(first)  # tenths of 3,000 requests, 10 a step
    assert first[-1] - first[0] >= 3, first  # drains ran during the first prune


def test_store_keeps_the_more_complete_stitch_of_an_id(tmp_path: Path) -> None:
    whole = next(r for r in _replayed("cross-node-public")["requests"]
                 if r["ingress_node"] != r["pod_node"])
    part = replay([_pairs("cross-node-public")[0]], jobs=1).envelope["requests"]
    part = next(r for r in part if r["request_id"] == whole["request_id"])
    assert "incomplete" in part["flags"]
    st = SqliteStore(tmp_path / "s.db")
    try:
        assert st.put_requests([part]) == 1
        assert st.put_requests([whole]) == 0 and st.replaced == 1  # completed
        assert st.put_requests([part]) == 0 and st.replaced == 1  # never the other way
        assert st.get_request(whole["request_id"]) == whole
        hops = st.db.execute("SELECT name, node, duration_ns FROM hops").fetchall()
        assert hops == [(h["name"], h["node"], h["duration_ns"]) for h in whole["hops"]]
    finally:
        st.close()


def test_one_half_of_a_request_never_replaces_the_other(tmp_path: Path) -> None:
    """With the late window off (or past), each node's part comes stitched alone: the
    second part, with more hops but not the first's end, must not replace it."""
    whole = next(r for r in _replayed("cross-node-public")["requests"]
                 if r["ingress_node"] != r["pod_node"])
    halves = []
    for pair in _pairs("cross-node-public"):
        reqs = replay([pair], jobs=1).envelope["requests"]
        halves.append(next(r for r in reqs if r["request_id"] == whole["request_id"]))
    ends = {(h["ingress_node"], h["pod_node"]) for h in halves}
    assert ends == {(whole["ingress_node"], None), (None, whole["pod_node"])}, ends
    for first, second in (halves, halves[::-1]):
        st = SqliteStore(tmp_path / f"{first['ingress_node']}.db")
        try:
            assert st.put_requests([first]) == 1
            assert st.put_requests([second]) == 0 and st.replaced == 0
            assert st.get_request(whole["request_id"]) == first
            assert st.put_requests([whole]) == 0 and st.replaced == 1  # this one completes it
            assert st.get_request(whole["request_id"]) == whole
        finally:
            st.close()


def test_trace_from_a_store_without_per_request_offsets(tmp_path: Path) -> None:
    """A store written before requests kept the offsets their hops used: ``trace`` shows
    the latest stored ones, also read-only (the CLI's ``--db``), where no column is added."""
    want = _replayed("cross-node-public")
    cross = next(r for r in want["requests"] if r["ingress_node"] != r["pod_node"])
    db = tmp_path / "old.db"
    st = SqliteStore(db)
    st.put_requests([cross])
    st.put_offsets(want)
    st.close()
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE requests DROP COLUMN clock")
    con.commit()
    con.close()
    ro = SqliteStore(db, readonly=True)
    try:
        env = ro.trace(cross["request_id"])
    finally:
        ro.close()
    assert env is not None and env["requests"] == [cross]
    assert env["clock_offsets"] == want["clock_offsets"] and env["reference"] == "node1"
    st = SqliteStore(db)  # read-write: the column comes back, empty for the old rows
    try:
        assert st.trace(cross["request_id"]) == env
    finally:
        st.close()


def test_durations_and_since() -> None:
    assert parse_duration("300ms") == 300_000_000
    assert parse_duration("1.5s") == 1_500_000_000
    assert parse_duration("250us") == 250_000
    assert parse_duration("10m") == 600_000_000_000
    with pytest.raises(UsageError):
        parse_duration("fast")


def test_since_anchor(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "db")
    try:
        old = 1_000_000_000_000_000_000
        s.put_requests([{"request_id": "a", "start_ns": old, "total_ns": 5, "hops": []}])
        now = old + 86_400_000_000_000
        assert resolve_since(s, "10m", "now", now_ns=now) == now - 600_000_000_000
        assert resolve_since(s, "10m", "auto", now_ns=now) == old - 600_000_000_000
        assert resolve_since(s, "10m", "newest", now_ns=now) == old - 600_000_000_000
        assert s.put_requests([{"request_id": "a", "start_ns": old, "hops": []}]) == 0
    finally:
        s.close()


def test_spool_overflow_drops_the_oldest_and_the_collector_is_told(tmp_path: Path) -> None:
    """The collector is down while an agent reads its whole capture into a small spool:
    the oldest batches go, the rest arrive once it is up, and the count of what went
    reaches the collector (the last batch's lost map, and /metrics)."""
    from hopscope.agent.ship import Shipper
    from hopscope.collector.spool import Spool

    from hopscope.capture import read_all

    capture = PCAPS / "replica-clean" / "node1.pcapng"
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()

    async def go() -> tuple[int, int, int, str]:
        cfg = ShipConfig(capture=str(capture), node="node1", host="127.0.0.1", port=port,
                         token=TOKEN, batch=20, backoff_min=0.05, backoff_max=0.2, wait=30.0)
        with Spool(tmp_path / "spool", max_bytes=8 << 10) as spool:
            sh = Shipper(cfg, spool)
            task = asyncio.create_task(sh.run())
            want = len(read_all(capture, "node1")[0])
            while sh.res.observations < want:
                await asyncio.sleep(0.02)  # nobody listens: it all goes to the spool
            c = Collector(_cfg(tmp_path, port=port))
            await c.start()
            try:
                res = await task
                await _settled(c, {"node1"})
                body = await asyncio.to_thread(lambda: urllib.request.urlopen(
                    f"http://127.0.0.1:{c.http_port}/metrics", timeout=10).read().decode())
            finally:
                await c.stop()
            return res.batches, spool.dropped_batches, res.spooled_left, body

    total, dropped, left, metrics = _run(go)
    assert 0 < dropped < total and left == 0
    s = SqliteStore(tmp_path / "collector.db", readonly=True)
    try:
        stored = s.db.execute("SELECT count(*) FROM batches").fetchone()[0]
    finally:
        s.close()
    assert stored == total - dropped  # the oldest went, every other batch arrived once
    line = next(ln for ln in metrics.splitlines() if ln.startswith(
        "hopscope_agent_lost_events_total") and 'source="spool_batches"' in ln)
    assert float(line.rsplit(" ", 1)[1]) == dropped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigkill_mid_stream_every_observation_stored_once(tmp_path: Path) -> None:
    """``hopscope collector serve`` killed with SIGKILL while three agents ship at a steady
    pace, then started again: every observation read is stored exactly once, and every
    request replay finds is stitched and stored once."""
    import signal
    import subprocess
    import sys

    from hopscope.capture import CaptureReader

    want = _replayed("replica-clean")
    pairs = _pairs("replica-clean")
    token = tmp_path / "token"
    token.write_bytes(TOKEN)
    token.chmod(0o600)
    port, hport = _free_port(), _free_port()
    db = tmp_path / "collector.db"
    argv = [sys.executable, "-m", "hopscope", "collector", "serve", "--listen",
            f"127.0.0.1:{port}", "--http", f"127.0.0.1:{hport}", "--token-file", str(token),
            "--db", str(db), "--reference", "node1", "--idle-flush", "1s"]

    def health() -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{hport}/health", timeout=2) as r:
                return dict(json.loads(r.read()))
        except OSError:
            return None

    def start(n: int) -> subprocess.Popen[bytes]:
        logf = open(tmp_path / f"collector-{n}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen(argv, stdout=logf, stderr=logf)
        logf.close()
        t0 = time.monotonic()
        while health() is None:
            assert p.poll() is None, (tmp_path / f"collector-{n}.log").read_text()
            assert time.monotonic() - t0 < 20, "the collector did not come up"
            time.sleep(0.05)
        return p

    procs = [start(1)]
    try:
        async def go() -> dict[str, int]:
            ships = {n: asyncio.create_task(ship(ShipConfig(
                capture=str(p), node=n, host="127.0.0.1", port=port, token=TOKEN, batch=20,
                pace=0.01, backoff_max=0.2, wait=30.0, spool_dir=str(tmp_path / f"spool-{n}"))))
                for n, p in pairs}
            t0 = time.monotonic()
            while True:  # mid-stream: every agent has batches acked, none has finished
                h = await asyncio.to_thread(health)
                acked = (h or {}).get("agents", {})
                if len(acked) == len(pairs) and min(acked.values()) >= 4:
                    break
                assert time.monotonic() - t0 < 20, acked
                await asyncio.sleep(0.02)
            assert not any(t.done() for t in ships.values())
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(10)
            await asyncio.sleep(0.3)
            procs.append(await asyncio.to_thread(start, 2))
            results = {n: await t for n, t in ships.items()}
            t0 = time.monotonic()
            while True:
                h = await asyncio.to_thread(health)
                if h and h["requests"] >= len(want["requests"]) and len(h["nodes"]) == 3:
                    break
                assert time.monotonic() - t0 < 30, h
                await asyncio.sleep(0.1)
            assert all(r.spooled_left == 0 and r.connects >= 2 for r in results.values()), \
                results
            return {n: r.observations for n, r in results.items()}

        shipped = _run(go, timeout=120)
        procs[-1].send_signal(signal.SIGTERM)
        assert procs[-1].wait(20) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    s = SqliteStore(db, readonly=True)
    try:
        stored: dict[str, Counter[tuple[Any, ...]]] = {n: Counter() for n, _ in pairs}
        seqs: dict[str, list[int]] = {n: [] for n, _ in pairs}
        for agent, seq, node, obs in s.iter_batches():
            assert agent == f"hopscope-agent@{node}"
            seqs[node].append(seq)
            stored[node].update(tuple(o) for o in obs)
        ids = [r["request_id"] for r in s.query_requests(limit=100000)]
    finally:
        s.close()
    for node, path in pairs:
        read = Counter(tuple(o) for b in CaptureReader(str(path), node, directions=False)
                       for o in b)
        assert sum(read.values()) == shipped[node]
        assert stored[node] == read, node  # each observation once: none lost, none twice
        assert seqs[node] == list(range(len(seqs[node]))), node
    assert sorted(ids) == sorted(r["request_id"] for r in want["requests"])


def _as_events(obs: list[Any], off: int) -> tuple[list[bytes], tuple[tuple[int, str, str], ...]]:
    """A capture's packets as the agent's tc programs would have emitted them (struct
    hs_event, CLOCK_MONOTONIC = wall clock - ``off``), and the agent's interface table."""
    from hopscope.agent import events as ev

    from hopscope.tcpflow import point_for_ifname

    names = sorted({o.ifname for o in obs})
    ifaces = tuple((i + 2, n, point_for_ifname(n) if point_for_ifname(n) in ("overlay", "pod")
                    else "nic+underlay") for i, n in enumerate(names))
    index = {n: i for i, n, _ in ifaces}
    return [ev.encode_packet(o, index[o.ifname], off) for o in obs], ifaces


def test_raw_records_are_decoded_and_reordered_as_the_agent_would(tmp_path: Path) -> None:
    """Agents shipping their ring's records (wire v3; the collector decodes them and puts
    them back in time order, batch by batch up to each one's cut) store exactly what
    agents decoding the same events themselves (v2) store: the replica's requests."""
    import random

    from hopscope.agent import events as ev
    from hopscope.agent.ringbuf import ring_records
    from hopscope.agent.ship import Shipper
    from hopscope.collector.spool import Spool

    from hopscope.capture import CaptureReader

    off = 1_700_000_000_000_000_000
    rng = random.Random(5)
    want = _replayed("replica-clean")
    sent: dict[str, tuple[list[bytes], Any, list[Any]]] = {}
    for node, path in _pairs("replica-clean"):
        obs = [o for b in CaptureReader(path, node, directions=False) for o in b]
        events, ifaces = _as_events(obs, off)
        decoded: list[Any] = []  # what the agent would have decoded
        dec = ev.Decoder(node, {i: ev.Iface(n, p) for i, n, p in ifaces}, lambda: off, {})
        for e in events:
            assert dec.decode(e, [(0, len(e))], decoded) == 0
        assert len(decoded) == len(obs)
        sent[node] = (events, ifaces, decoded)

    async def ship_node(c: Collector, node: str, raw: bool) -> None:
        events, ifaces, decoded = sent[node]
        cfg = _ship_cfg(c, node, Path("-"))
        with Spool(tmp_path / f"spool-{node}-{raw}") as spool:
            sh = Shipper(cfg, spool)
            n = len(events)
            chunks = [list(range(k, min(k + 40, n))) for k in range(0, n, 40)]
            if not raw:
                for chunk in chunks:
                    sh.append([decoded[i] for i in chunk])
            for j, chunk in enumerate(chunks if raw else ()):
                # The ring interleaves CPUs: a batch is not in time order, and the drain
                # that ends it can come between two CPUs' events, the later one taken
                # first: this batch takes the next one's first 5 events, gives it its own
                # last 5, and is sorted up to just before those.
                late = chunk[-5:] if j + 1 < len(chunks) else []
                mine = chunk[:len(chunk) - len(late)] + (chunks[j + 1][:5] if late else [])
                if j:
                    mine = chunks[j - 1][-5:] + mine[5:]
                rng.shuffle(mine)
                cut = decoded[late[0]].ts_mono_ns - 1 if late else 1 << 62
                sh.append([], raw=ev.RawEvents(ring_records([events[i] for i in mine]),
                                               ifaces, off, cut))
            await sh.pump(until_empty=True)
            assert not len(spool)
            if sh.writer is not None:
                await wire.close_writer(sh.writer)

    async def go(raw: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        (tmp_path / f"raw-{raw}").mkdir(exist_ok=True)
        c = Collector(_cfg(tmp_path / f"raw-{raw}"))
        await c.start()
        try:
            await asyncio.gather(*(ship_node(c, n, raw) for n in sent))
            await _settled(c, set(sent))
            return await _get(c, "/requests?since=10m&limit=100000"), await _get(c, "/health")
        finally:
            await c.stop()

    (raw_env, raw_health), (dec_env, _h) = _run(lambda: go(True)), _run(lambda: go(False))
    assert raw_health["decode_errors"] == 0
    assert raw_env["requests"] == dec_env["requests"]
    assert len(raw_env["requests"]) == len(want["requests"])
    by_id = {r["request_id"]: r for r in raw_env["requests"]}
    for r in want["requests"]:
        assert [(h["name"], h["node"]) for h in by_id[r["request_id"]]["hops"]] == \
               [(h["name"], h["node"]) for h in r["hops"]]
