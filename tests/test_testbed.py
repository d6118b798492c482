"""The network replica: topology (unprivileged) and a real replica (root + netns).

The privileged tests are skipped only when root or ``ip netns`` is missing;
with both, a replica that does not work fails them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import snapshot_diff, take_root_snapshot, unique_prefix

from hopscope.errors import PrivilegeError, TestbedError, UsageError
from hopscope.testbed import build, netns
from hopscope.testbed.topology import (
    CLUSTER_IP,
    Instance,
    Topology,
    default_topology,
    normalize_prefix,
    run_dir,
    state_path,
)
from hopscope.testbed.traffic import TrafficConfig, percentile, run_traffic

# -- unprivileged ------------------------------------------------------------------------

def test_topology_names_fit_and_round_trip() -> None:
    t = default_topology("t12345abcd")
    assert t.prefix == "t12345abcd-"
    for n in t.nodes:
        for i in n.interfaces:
            assert len(i.name) <= 15, i.name
            if i.peer:
                assert len(i.peer.split(":", 1)[1]) <= 15
    for p in t.pods:
        assert re.fullmatch(r"veth[0-9a-f]{8}", p.veth)
    assert Topology.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert len({p.node for p in t.pods}) == 3
    # one node pair over the public NIC, one over the private NIC
    assert t.underlay_ifname("node1", "node2") == "eth0"
    assert t.underlay_ifname("node2", "node3") == "eth1"
    assert t.underlay_ip("node2", "node3").startswith("198.51.100.")
    assert t.interfaces_by_role("node1", "underlay") == ["eth0"]
    assert t.interfaces_by_role("node2", "underlay") == ["eth0", "eth1"]
    assert t.interfaces_by_role("node3", "overlay") == ["flannel.1"]


@pytest.mark.parametrize("bad", ["", "1abc", "HS", "a-b", "abcdefghijkl", "a_b"])
def test_bad_prefixes_are_refused(bad: str) -> None:
    with pytest.raises(UsageError):
        normalize_prefix(bad)


def test_kube_proxy_chain_names_and_rules() -> None:
    svc = build.svc_chain()
    assert re.fullmatch(r"KUBE-SVC-[A-Z2-7]{16}", svc)
    rules = build.kube_proxy_rules(default_topology(), "node1")
    assert f"-A KUBE-SERVICES -d {CLUSTER_IP}/32 -p tcp" in rules
    assert "--probability 0.3333333333" in rules and "--probability 0.5000000000" in rules
    assert rules.count("-j DNAT --to-destination 10.42.") == 3
    assert "-j MARK --set-xmark 0x4000/0x4000" in rules
    assert f"! -s 10.42.0.0/16 -d {CLUSTER_IP}/32" in rules


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0


def test_up_without_root_is_a_privilege_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PrivilegeError, match="needs root"):
        build.up("tnoroot")


# -- privileged: the shared replica -----------------------------------------------------------

def _served_rays(inst: Instance) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for pod in inst.topology.pods:
        lines = Path(inst.pod_log(pod.name)).read_text().splitlines()
        out[pod.name] = [json.loads(ln) for ln in lines if ln.strip()]
    return out


def _link_stats(ns: str, ifname: str) -> dict[str, int]:
    cp = netns.ip(ns, "-s", "-j", "link", "show", ifname)
    st = json.loads(cp.stdout)[0]["stats64"]
    return {"rx": int(st["rx"]["packets"]), "tx": int(st["tx"]["packets"])}


@pytest.mark.privileged
@pytest.mark.requires_root_netns
def test_up_is_quick_and_healthy(testbed: Instance) -> None:
    assert testbed.phase == "ready"
    assert testbed.up_seconds < 60, f"up took {testbed.up_seconds} s"
    st = build.status(testbed.prefix)
    assert st["healthy"], st
    for name, ns in testbed.topology.namespaces().items():
        assert netns.exists(ns), name


@pytest.mark.privileged
@pytest.mark.requires_root_netns
def test_refuses_a_second_up(testbed: Instance) -> None:
    with pytest.raises(TestbedError, match="already up"):
        build.up(testbed.prefix)


@pytest.mark.privileged
@pytest.mark.requires_root_netns
def test_post_through_each_node_reaches_a_pod_log(testbed: Instance) -> None:
    topo = testbed.topology
    for node in topo.node_names():
        res = run_traffic(topo, TrafficConfig(count=3, concurrency=1, post_ratio=1.0,
                                              nodes=[node], timeout=10), keep=True)
        assert res.by_status == {"201": 3}, (node, res.records)
        rays = {r["cf_ray"]: r for r in res.records}
        time.sleep(0.05)
        logs = _served_rays(testbed)
        for ray, rec in rays.items():
            assert re.fullmatch(r"[0-9a-f]{16}-DFW", ray)
            assert rec["node"] == node and rec["method"] == "POST"
            assert rec["t_start_real_ns"] <= rec["t_first_byte_ns"] <= rec["t_end_ns"]
            pod_name, pod_node = rec["served_by"].split("@")
            assert topo.pod(pod_name).node == pod_node
            hits = [p for p, recs in logs.items() if any(x["cf_ray"] == ray for x in recs)]
            assert hits == [pod_name], (ray, hits)


@pytest.mark.privileged
@pytest.mark.requires_root_netns
def test_node1_is_served_locally_and_across_vxlan(testbed: Instance) -> None:
    topo = testbed.topology
    n1 = topo.node("node1")
    before = _link_stats(testbed.ns("node1"), "flannel.1")
    served: set[str] = set()
    rays: dict[str, str] = {}
    # Traefik keeps upstream connections alive, so kube-proxy picks an endpoint
    # per new upstream connection: raise concurrency until both kinds are seen.
    for conc in (8, 16, 24, 32, 48):
        res = run_traffic(topo, TrafficConfig(count=conc * 4, concurrency=conc, nodes=["node1"],
                                              new_conn_ratio=0.5, timeout=10), keep=True)
        assert res.by_status.get("error", 0) == 0, res.summary()
        for r in res.records:
            served.add(r["served_by"].split("@")[1])
            rays[r["cf_ray"]] = r["served_by"]
        if "node1" in served and served - {"node1"}:
            break
    assert "node1" in served and served - {"node1"}, served
    after = _link_stats(testbed.ns("node1"), "flannel.1")
    assert after["tx"] > before["tx"] and after["rx"] > before["rx"]
    # the remote pod saw node1's traffic masqueraded to node1's flannel.1 address
    time.sleep(0.05)
    logs = _served_rays(testbed)
    remote = [r for r in rays.items() if not r[1].endswith("@node1")]
    ray, by = remote[0]
    line = next(x for x in logs[by.split("@")[0]] if x["cf_ray"] == ray)
    assert line["peer"].split(":")[0] == n1.vtep_ip
    local = [r for r in rays.items() if r[1].endswith("@node1")]
    ray, by = local[0]
    line = next(x for x in logs[by.split("@")[0]] if x["cf_ray"] == ray)
    assert line["peer"].split(":")[0] == n1.cni_ip


@pytest.mark.privileged
@pytest.mark.requires_root_netns
def test_private_underlay_carries_vxlan_between_node2_and_node3(testbed: Instance) -> None:
    topo = testbed.topology
    pod3 = topo.pod("api-3")
    before = _link_stats(testbed.ns("node3"), "eth1")
    before_pub = _link_stats(testbed.ns("node3"), "eth0")

    def get() -> bytes:
        import socket

        with socket.create_connection((pod3.ip, pod3.port), timeout=3) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(4096)

    for _ in range(5):
        assert netns.call_in_netns(testbed.ns("node2"), get).startswith(b"HTTP/1.1 200")
    after = _link_stats(testbed.ns("node3"), "eth1")
    after_pub = _link_stats(testbed.ns("node3"), "eth0")
    assert after["rx"] - before["rx"] >= 5 * 4
    assert after_pub["rx"] - before_pub["rx"] < 5  # not over the public NIC


@pytest.mark.privileged
@pytest.mark.requires_root_netns
def test_pod_service_time_changes_at_run_time(testbed: Instance) -> None:
    """Straight to api-2 from its node (kube-proxy and Traefik's pool choose no pod here)."""
    pod = testbed.topology.pod("api-2")
    ctl = Path(testbed.pod_control("api-2"))
    pid = testbed.pod_pid("api-2")
    assert pid is not None

    def timed_get() -> float:
        def body() -> float:
            with socket.create_connection((pod.ip, pod.port), timeout=5) as s:
                t = time.perf_counter()
                s.sendall(b"GET /api/tasks/ HTTP/1.1\r\nHost: api\r\nCF-Ray: 00000000feedbeef-DFW"
                          b"\r\nConnection: close\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = s.recv(4096)
                    assert chunk, "the pod closed without answering"
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200"), data[:40]
                return (time.perf_counter() - t) * 1000
        return netns.call_in_netns(testbed.ns(pod.node), body)

    try:
        ctl.write_text(json.dumps({"service_ms": 30}))
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.1)
        assert min(timed_get() for _ in range(3)) >= 30.0
        lines = Path(testbed.pod_log("api-2")).read_text().splitlines()
        assert json.loads(lines[-1])["service_ms"] == 30
    finally:
        ctl.write_text(json.dumps({"service_ms": 0}))
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.1)
    assert min(timed_get() for _ in range(3)) < 30.0


@pytest.mark.privileged
@pytest.mark.requires_root_netns
def test_node_firewalls_are_ufw_and_kube_proxy(testbed: Instance) -> None:
    for node in testbed.topology.node_names():
        ns = testbed.ns(node)
        filt = netns.run(["iptables-save", "-t", "filter"], ns=ns).stdout
        assert ":INPUT DROP" in filt and "ufw-user-input" in filt
        for port in ("22", "80", "443"):
            assert f"-A ufw-user-input -p tcp -m tcp --dport {port} -j ACCEPT" in filt
        vx = [ln for ln in filt.splitlines() if "--dport 8472" in ln and "ufw-user-input" in ln]
        assert len(vx) == 2 and all(" -s " in ln for ln in vx), vx
        nat = netns.run(["iptables-save", "-t", "nat"], ns=ns).stdout
        assert "-A PREROUTING -m comment --comment \"kubernetes service portals\" " \
               "-j KUBE-SERVICES" in nat
        assert "-m statistic --mode random --probability" in nat
        status = netns.ufw(ns, testbed.extra["ufw_dirs"][node], ["status"])
        assert "Status: active" in status


@pytest.mark.privileged
@pytest.mark.requires_root_netns
def test_root_namespace_unchanged_while_up(testbed: Instance,
                                           root_snapshot: dict[str, str]) -> None:
    now = take_root_snapshot()
    assert snapshot_diff(root_snapshot, now) == []


@pytest.mark.privileged
@pytest.mark.requires_root_netns
def test_cli_status_and_traffic(testbed: Instance, tmp_path: Path) -> None:
    from hopscope.testbed.cli import testbed as group

    runner = CliRunner()
    res = runner.invoke(group, ["status", "--prefix", testbed.prefix, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["healthy"]
    out = tmp_path / "t.jsonl"
    res = runner.invoke(group, ["traffic", "--prefix", testbed.prefix, "--count", "40",
                                "--concurrency", "4", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["sent"] == 40 and summary.get("by_status", {}).get("error") is None
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(recs) == 40 and len({r["cf_ray"] for r in recs}) == 40
    assert {"cf_ray", "node", "method", "path", "status", "t_start_real_ns", "t_first_byte_ns",
            "t_end_ns", "error"} <= set(recs[0])


# -- privileged: own replicas, teardown --------------------------------------------------

def _leftovers(prefix: str, pids: list[int]) -> list[str]:
    left = [f"netns {n}" for n in netns.list_namespaces(prefix)]
    left += [f"pid {p}" for p in pids if netns.pid_alive(p)]
    if run_dir(prefix).exists():
        left.append(str(run_dir(prefix)))
    if state_path(prefix).exists():
        left.append(str(state_path(prefix)))
    links = netns.run(["ip", "-o", "link", "show"]).stdout
    left += [f"root link {m}" for m in re.findall(r"\b(veth[0-9a-f]{8}|flannel\.1|cni0)\b",
                                                    links)]
    return left


@pytest.mark.privileged
@pytest.mark.requires_root_netns
def test_with_block_always_tears_down(root_snapshot: dict[str, str]) -> None:
    before = take_root_snapshot()
    prefix = unique_prefix("w")
    pids: list[int] = []
    try:
        with pytest.raises(RuntimeError, match="boom"), build.replica(prefix) as inst:
            pids = list(inst.pids.values())
            assert len(pids) == 6 and all(netns.pid_alive(p) for p in pids)
            assert netns.list_namespaces(prefix)
            raise RuntimeError("boom")
        assert _leftovers(prefix, pids) == []
        assert snapshot_diff(before, take_root_snapshot()) == []
    finally:
        build.down(prefix)  # nothing to do unless the teardown under test failed


@pytest.mark.privileged
@pytest.mark.requires_root_netns
def test_failed_up_cleans_up_and_down_finishes_a_partial_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(inst: Instance, access_log: bool, dial_timeout_s: float) -> None:
        raise TestbedError("injected failure while starting Traefik")

    monkeypatch.setattr(build, "_start_traefik", broken)
    # 1) up cleans up after itself
    prefix = unique_prefix("f")
    try:
        with pytest.raises(TestbedError, match="injected"):
            build.up(prefix)
        assert _leftovers(prefix, []) == []
    finally:
        build.down(prefix)  # nothing to do unless the cleanup under test failed
    # 2) an up that died without cleaning (as after SIGKILL): down finds everything
    prefix = unique_prefix("g")
    try:
        with pytest.raises(TestbedError, match="injected"):
            build.up(prefix, cleanup_on_error=False)
        inst = build.load_instance(prefix)
        pids = list(inst.pids.values())
        assert inst.phase == "pods" and len(pids) == 3 and all(netns.pid_alive(p) for p in pids)
        state_path(prefix).unlink()  # down must also work by scanning
        res = build.down(prefix)
        assert len(res["namespaces"]) == 8 and sorted(res["pids"]) == sorted(pids)
        assert _leftovers(prefix, pids) == []
    finally:
        build.down(prefix)


@pytest.mark.privileged
@pytest.mark.requires_root_netns
def test_down_of_nothing_is_fine() -> None:
    res = build.down(unique_prefix("n"))
    assert res["namespaces"] == [] and res["pids"] == []
