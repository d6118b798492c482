"""Recorded captures of the live replica (pcaps/replica-*) against the traffic generator's truth.

Recorded by ``pcaps/record_replica.py``: real kernel, UFW, Traefik, kube-proxy
rules and VXLAN. No root needed to check them.
"""

from __future__ import annotations

import json
import statistics
import struct
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


def _cut(src: Path, dst: Path, snap: int) -> None:
    """``editcap -s snap``: every packet block keeps its first ``snap`` bytes and says its
    original length (the testbed writes little-endian pcapng)."""
    data, out, pos = src.read_bytes(), [], 0
    while pos < len(data):
        btype, blen = struct.unpack_from("<II", data, pos)
        block = data[pos : pos + blen]
        if btype == 6:
            cap = struct.unpack_from("<I", block, 20)[0]
            kept = min(cap, snap)
            opts = block[28 + ((cap + 3) & ~3) : -4]
            body = block[8:20] + struct.pack("<I", kept) + block[24:28] + block[28 : 28 + kept]
            body += b"\0" * (-kept % 4) + opts
            block = struct.pack("<II", 6, len(body) + 12) + body + struct.pack("<I", len(body) + 12)
        out.append(block)
        pos += blen
    dst.write_bytes(b"".join(out))


def _shape(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["start_ns"], r["ingress_node"], r["method"], r["path"], r["status"],
            tuple(h["name"] for h in r["hops"]))


@pytest.mark.parametrize("snap", [600, 200])
def test_a_snap_length_keeps_every_request(tmp_path: Path, snap: int) -> None:
    """The same captures as `tcpdump -s` would have cut them: a head longer than the snap
    length, on keep-alive connections, the response's too. At 600 bytes (longer heads
    than that lose their ends, the CF-Ray kept) every request comes out as from the whole
    packets, hop by hop to the nanosecond, flagged `truncated` where it was cut. At 200 the
    CF-Rays are lost: every request, status, hop and pod still comes out, linked by
    method, path and time (among them two concurrent GETs that node2 forwarded in the
    other order, the first held 26 ms: the one whose answer came first takes the upstream
    request only its window holds; taken first come, first served, they swapped). Each
    file says what its snap length cost, once."""
    whole, _truth = load("replica-clean")
    files = []
    for f in sorted((PCAPS / "replica-clean").glob("*.pcapng")):
        _cut(f, tmp_path / f.name, snap)
        files.append((f.stem, tmp_path / f.name))
    res = replay(files, progress=False)
    assert len(res.warnings) == 3 and all(
        f"at most {snap} bytes kept" in w and "VXLAN" not in w for w in res.warnings)
    want = sorted(whole["requests"], key=lambda r: r["start_ns"])
    got = sorted(res.envelope["requests"], key=lambda r: r["start_ns"])
    assert [_shape(r) for r in got] == [_shape(r) for r in want]
    assert sum("truncated" in r["flags"] for r in got) >= len(got) // 2
    if snap == 600:
        assert [(r["request_id"], r["pod_node"], [h["duration_ns"] for h in r["hops"]])
                for r in got] == [(r["request_id"], r["pod_node"],
                                   [h["duration_ns"] for h in r["hops"]]) for r in want]
        assert all(set(r["flags"]) <= {"truncated"} for r in got)
    else:
        assert all("derived_id" in r["flags"] for r in got)
        assert [r["pod_node"] for r in got] == [r["pod_node"] for r in want]
