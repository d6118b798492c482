"""Captures of the live replica replay into exactly the requests the traffic generator sent."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest

from hopscope.replay import replay
from hopscope.testbed import faults
from hopscope.testbed.capture import capturing
from hopscope.testbed.topology import Instance
from hopscope.testbed.traffic import TrafficConfig, run_traffic

pytestmark = pytest.mark.privileged


def capture_traffic(inst: Instance, out: Path, cfgs: list[tuple[TrafficConfig, Any]]) -> tuple[
        dict[str, Any], list[list[dict[str, Any]]]]:
    """Run each (config, before-callable) while capturing; return the envelope and the records."""
    records: list[list[dict[str, Any]]] = []
    with capturing(inst, out) as cap:
        for cfg, before in cfgs:
            if before is not None:
                before()
            try:
                records.append(run_traffic(inst.topology, cfg, keep=True).records)
            finally:
                if before is not None:
                    faults.clear(inst)
    assert cap.result is not None
    files = cap.result.files
    assert sorted(f.name for f in files) == ["node1.pcapng", "node2.pcapng", "node3.pcapng"]
    res = replay([(f.name.split(".")[0], f) for f in files], progress=False)
    assert not [w for w in res.warnings if "truncated" in w or "corrupt" in w]
    return res.envelope, records


def test_replayed_requests_equal_ground_truth(testbed: Instance, tmp_path: Path) -> None:
    # 8 client connections: each Traefik then pools a few upstream connections, each
    # DNATed to a random one of the three pods when opened. With 4, a CI run once had
    # every pooled connection go to its own node's pod (no cross-node request at all)
    env, [recs] = capture_traffic(testbed, tmp_path, [
        (TrafficConfig(count=120, concurrency=8, new_conn_ratio=0.3, seed=7), None)])
    sent = {r["cf_ray"]: r for r in recs}
    assert len(sent) == 120 and all(r["status"] in (200, 201) for r in recs)
    got = {r["request_id"]: r for r in env["requests"]}
    assert set(got) == set(sent)
    cross = 0
    for rid, r in got.items():
        truth = sent[rid]
        assert r["status"] == truth["status"]
        assert r["method"] == truth["method"] and r["path"] == truth["path"]
        assert r["ingress_node"] == truth["node"]
        assert truth["served_by"].endswith("@" + r["pod_node"]), (rid, r["pod_node"], truth["served_by"])
        assert all(h["duration_ns"] >= 0 for h in r["hops"]), (
            r["ingress_node"], r["pod_node"], r["flags"],
            [(h["name"], h["node"], h["duration_ns"]) for h in r["hops"]])
        tiling = [h for h in r["hops"] if h["name"] != "edge_rtt"]
        assert sum(h["duration_ns"] for h in tiling) == r["total_ns"]
        assert not {"incomplete", "no_upstream", "no_response"} & set(r["flags"]), r["flags"]
        # the node's part is inside what the client measured (one clock: one machine)
        assert 0 < r["total_ns"] < truth["t_first_byte_ns"] - truth["t_start_real_ns"]
        if r["pod_node"] != r["ingress_node"]:
            cross += 1
            assert [h["name"] for h in tiling] == ["ingress", "encap", "wire", "decap", "deliver",
                                                  "app", "route", "encap", "wire", "decap", "egress"]
    assert cross > 0
    assert env["drops"] == []
    # one machine, one clock: every offset that can be known is 0 within its bound. It
    # can be known for the nodes tied to the reference (node1) by cross-node requests;
    # when Traefik's few pooled upstream connections of node1 all went to its own pod,
    # none are, and the others are rightly unknown (error -1)
    tied = {"node1"}
    pairs = {(r["ingress_node"], r["pod_node"]) for r in got.values()}
    while grow := {b for a, b in pairs if a in tied} | {a for a, b in pairs if b in tied}:
        if grow <= tied:
            break
        tied |= grow
    for n, o in env["clock_offsets"].items():
        if n in tied:
            assert abs(o["offset_ns"]) <= o["error_ns"] <= 200_000, (n, env["clock_offsets"])
        else:
            assert o["error_ns"] == -1, (n, env["clock_offsets"])


def _hops_of(reqs: list[dict[str, Any]], name: str) -> list[int]:
    return [h["duration_ns"] for r in reqs for h in r["hops"] if h["name"] == name]


def test_ufw_delay_lands_in_ingress_of_that_node_only(testbed: Instance, tmp_path: Path) -> None:
    node = "node2"
    base = TrafficConfig(count=40, concurrency=2, new_conn_ratio=0.2, nodes=[node], seed=11)
    slow = TrafficConfig(count=40, concurrency=2, new_conn_ratio=0.2, nodes=[node], seed=12)
    env, (r_base, r_slow) = capture_traffic(testbed, tmp_path, [
        (base, None), (slow, lambda: faults.add_delay(testbed, "ufw", node, 20))])
    by_id = {r["request_id"]: r for r in env["requests"]}
    a = [by_id[x["cf_ray"]] for x in r_base]
    b = [by_id[x["cf_ray"]] for x in r_slow]
    assert all(r["ingress_node"] == node for r in a + b)
    shift = statistics.median(_hops_of(b, "ingress")) - statistics.median(_hops_of(a, "ingress"))
    assert 19_000_000 <= shift <= 21_000_000, shift
    for name in ("app", "egress", "encap", "wire", "decap", "deliver", "route"):
        va, vb = _hops_of(a, name), _hops_of(b, name)
        if len(va) >= 5 and len(vb) >= 5:
            assert abs(statistics.median(vb) - statistics.median(va)) < 1_000_000, name
