"""Recorded captures of the live replica (pcaps/replica-*) against the traffic generator's truth.

Recorded by ``pcaps/record_replica.py``: real kernel, UFW, Traefik, kube-proxy
rules and VXLAN. No root needed to check them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from hopscope.replay import replay

PCAPS = Path(__file__).resolve().parent.parent / "pcaps"


def load(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    d = PCAPS / name
    truth = json.loads((d / "truth.json").read_text())
    files = sorted(d.glob("*.pcapng"))
    res = replay([(f.stem, f) for f in files], progress=False)
    assert res.warnings == []
    return res.envelope, truth


@pytest.mark.parametrize("name", ["replica-clean", "replica-ufw-delay"])
def test_every_request_sent_is_stitched_as_it_happened(name: str) -> None:
    env, truth = load(name)
    sent = {r["cf_ray"]: r for phase in truth["phases"].values() for r in phase}
    got = {r["request_id"]: r for r in env["requests"]}
    assert set(got) == set(sent)
    for rid, r in got.items():
        t = sent[rid]
        assert (r["status"], r["method"], r["path"]) == (t["status"], t["method"], t["path"])
        assert r["ingress_node"] == t["node"]
        assert t["served_by"] == f"api-{r['pod_node'][-1]}@{r['pod_node']}"
        assert r["flags"] in ([], ["out_of_order"]), r["flags"]
        assert all(h["duration_ns"] >= 0 for h in r["hops"])
        assert sum(h["duration_ns"] for h in r["hops"] if h["name"] != "edge_rtt") == r["total_ns"]
        # what the node saw lies inside what the client saw (one machine, one clock)
        assert t["t_start_real_ns"] < r["start_ns"]
        assert r["start_ns"] + r["total_ns"] < t["t_first_byte_ns"]
        names = [h["name"] for h in r["hops"] if h["name"] != "edge_rtt"]
        if r["pod_node"] == r["ingress_node"]:
            assert names[0] == "ingress" and names[-2:] == ["app", "egress"]
        else:
            assert names == ["ingress", "encap", "wire", "decap", "deliver", "app", "route",
                             "encap", "wire", "decap", "egress"]
        assert any(h["name"] == "edge_rtt" for h in r["hops"]) <= bool(t["new_conn"])
    assert env["drops"] == []
    for o in env["clock_offsets"].values():
        assert abs(o["offset_ns"]) <= o["error_ns"]


def test_ufw_delay_is_in_ingress_of_node2_and_nowhere_else() -> None:
    env, truth = load("replica-ufw-delay")
    assert truth["fault"] == {"kind": "delay", "at": "ufw", "node": "node2", "ms": 20}
    by_id = {r["request_id"]: r for r in env["requests"]}

    def med(phase: str, hop: str) -> float:
        return statistics.median(h["duration_ns"] for x in truth["phases"][phase]
                                 for h in by_id[x["cf_ray"]]["hops"] if h["name"] == hop)

    assert all(by_id[x["cf_ray"]]["ingress_node"] == "node2"
               for p in truth["phases"].values() for x in p)
    assert 19_000_000 <= med("delayed", "ingress") - med("clean", "ingress") <= 21_000_000
    for x in truth["phases"]["delayed"]:
        ingress = next(h for h in by_id[x["cf_ray"]]["hops"] if h["name"] == "ingress")
        assert ingress["duration_ns"] >= 20_000_000
    for hop in ("app", "egress"):
        assert abs(med("delayed", hop) - med("clean", hop)) < 1_000_000, hop
