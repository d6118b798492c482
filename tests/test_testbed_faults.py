"""Faults and per-node captures on the network replica.

The privileged tests share one replica (the ``testbed`` fixture of
conftest.py, module scope). Every test clears its faults in a fixture, so a
failing test leaves nothing behind for the next one; the replica itself is
torn down after the module whatever happens.

Unprivileged tests at the top cover the pcapng writer and the holder's
timer heap.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import statistics
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hopscope.testbed import build, faults, netns
from hopscope.testbed.capture import (
    IfaceOut,
    MergeInput,
    capturing,
    merge_parts,
)
from hopscope.testbed.nfq_holder import DEFAULT_MARK_BIT, Holder, RuleSpec
from hopscope.testbed.topology import Instance, load_instance

# ---------------------------------------------------------------------------
# unprivileged: pcapng writer, holder heap
# ---------------------------------------------------------------------------


def _write_pcap(path: Path, records: list[tuple[int, bytes]], nano: bool = True) -> None:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, 262144, 1))
        for ts, data in records:
            frac = ts % 1_000_000_000 if nano else (ts % 1_000_000_000) // 1000
            f.write(struct.pack("<IIII", ts // 1_000_000_000, frac, len(data), len(data)))
            f.write(data)


def _read_pcapng(path: Path) -> tuple[list[dict[str, Any]], list[tuple[int, int, int, bytes]]]:
    """Tiny reader for the little-endian pcapng we write: IDBs and EPBs."""
    buf = path.read_bytes()
    idbs: list[dict[str, Any]] = []
    epbs: list[tuple[int, int, int, bytes]] = []
    off = 0
    while off < len(buf):
        btype, blen = struct.unpack_from("<II", buf, off)
        body = buf[off + 8 : off + blen - 4]
        assert struct.unpack_from("<I", buf, off + blen - 4)[0] == blen
        if btype == 1:
            linktype, _, snap = struct.unpack_from("<HHI", body, 0)
            opts: dict[int, bytes] = {}
            o = 8
            while o < len(body):
                code, ln = struct.unpack_from("<HH", body, o)
                if code == 0:
                    break
                opts[code] = body[o + 4 : o + 4 + ln]
                o += 4 + ln + (-ln % 4)
            idbs.append({"linktype": linktype, "snaplen": snap, "opts": opts})
        elif btype == 6:
            ifid, hi, lo, cap, _orig = struct.unpack_from("<IIIII", body, 0)
            data = body[20 : 20 + cap]
            o = 20 + cap + (-cap % 4)
            flags = 0
            if o < len(body):
                code, ln = struct.unpack_from("<HH", body, o)
                if code == 2:
                    flags = struct.unpack_from("<I", body, o + 4)[0]
            epbs.append((ifid, (hi << 32) | lo, flags, data))
        off += blen
    return idbs, epbs


def test_merge_parts_writes_named_ns_interfaces_in_time_order(tmp_path: Path) -> None:
    t0 = 1_795_766_400_123_456_789
    a_in = tmp_path / "eth0.in.pcap"
    a_out = tmp_path / "eth0.out.pcap"
    b_in = tmp_path / "cni0.in.pcap"
    empty = tmp_path / "flannel.1.in.pcap"
    frame = b"\x00" * 12 + b"\x08\x00" + b"\x45" + b"\x00" * 19
    _write_pcap(a_in, [(t0, frame), (t0 + 30, frame)])
    _write_pcap(a_out, [(t0 + 10, frame + b"x")])
    _write_pcap(b_in, [(t0 + 5_000, frame + b"yy")], nano=False)  # microsecond part
    empty.write_bytes(b"")  # a capturer that never wrote its header
    out = tmp_path / "node1.pcapng"
    counts = merge_parts(
        [MergeInput(a_in, 0, "in"), MergeInput(a_out, 0, "out"), MergeInput(b_in, 1, "in"),
         MergeInput(empty, 2, "in")],
        [IfaceOut("eth0", "node1 eth0"), IfaceOut("cni0", "node1 cni0"),
         IfaceOut("flannel.1", "")],
        out, comment="test", bpf="tcp port 80",
    )
    assert counts == {"eth0": 3, "cni0": 1, "flannel.1": 0}
    idbs, epbs = _read_pcapng(out)
    assert [i["opts"][2] for i in idbs] == [b"eth0", b"cni0", b"flannel.1"]
    assert all(i["opts"][9] == b"\x09" for i in idbs)  # if_tsresol: 10^-9
    assert idbs[0]["opts"][11] == b"\x00tcp port 80"
    assert [(e[0], e[1] - t0, e[2]) for e in epbs] == [
        (0, 0, 1), (0, 10, 2), (0, 30, 1), (1, (t0 + 5_000) // 1000 * 1000 - t0, 1)
    ]
    assert epbs[1][3] == frame + b"x"
    if shutil.which("tshark"):
        cp = subprocess.run(["tshark", "-r", str(out), "-T", "fields", "-e",
                             "frame.interface_name", "-e", "frame.time_epoch"],
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        assert [ln.split("\t")[0] for ln in cp.stdout.splitlines()] == [
            "eth0", "eth0", "eth0", "cni0"]
        assert cp.stdout.splitlines()[0].split("\t")[1].endswith("123456789")


def test_merge_parts_resorts_a_part_written_slightly_out_of_order(tmp_path: Path) -> None:
    t0 = 1_795_766_400_000_000_000
    part = tmp_path / "veth.in.pcap"
    frame = b"\x00" * 34
    # tcpdump writes in ring order; with several CPUs a packet can come after a later one
    _write_pcap(part, [(t0 + 100, frame), (t0 + 50, frame), (t0 + 300, frame),
                       (t0 + 200, frame)])
    out = tmp_path / "n.pcapng"
    merge_parts([MergeInput(part, 0, "in")], [IfaceOut("veth0", "")], out, comment="", bpf="")
    _, epbs = _read_pcapng(out)
    assert [ts - t0 for _, ts, _, _ in epbs] == [50, 100, 200, 300]


class _FakePacket:
    def __init__(self, n: int) -> None:
        self.n = n
        self.mark = 0x4000
        self.verdict: tuple[str, int] | None = None

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, m: int) -> None:
        self.mark = m

    def repeat(self) -> None:
        self.verdict = ("repeat", self.mark)


def test_holder_holds_packets_concurrently_and_keeps_marks() -> None:
    now = [1_000_000_000]
    h = Holder(hold_ns=20_000_000, mark_bit=DEFAULT_MARK_BIT, clock=lambda: now[0])
    pkts = [_FakePacket(i) for i in range(50)]
    for i, p in enumerate(pkts):  # 50 packets, 10 µs apart
        now[0] += 10_000 * (i > 0)
        h.on_packet(p)
    assert h.stats.max_in_flight == 50 and h.stats.released == 0
    now[0] += 20_000_000 - 490_000 - 1  # 1 ns before the first one's deadline
    h.release_due()
    assert h.stats.released == 0 and all(p.verdict is None for p in pkts)
    now[0] += 1 + 245_000  # the first 25 due (held together: not one after the other)
    h.release_due()
    assert [p.verdict is not None for p in pkts] == [True] * 25 + [False] * 25
    now[0] += 245_000
    h.release_due()
    assert not h.heap and all(p.verdict == ("repeat", 0x4000 | DEFAULT_MARK_BIT) for p in pkts)
    assert h.stats.held == h.stats.released == 50  # other mark bits kept, each released once
    assert h.stats.summary()["late_us_max"] == 245  # the first, released 245 µs late


def test_rule_spec_matches_only_unmarked_packets() -> None:
    spec = RuleSpec("INPUT", "tcp", 80, 101, 0x01000000, "hopscope-fault-x")
    ins = spec.insert_cmd()
    assert ins[ins.index("-I") : ins.index("-I") + 3] == ["-I", "INPUT", "1"]
    assert ins[ins.index("!") : ins.index("!") + 3] == ["!", "--mark", "0x1000000/0x1000000"]
    assert ins[-4:] == ["NFQUEUE", "--queue-num", "101", "--queue-bypass"]
    assert spec.delete_cmd()[spec.delete_cmd().index("-D") + 2 :] == spec.match_args()


# ---------------------------------------------------------------------------
# privileged: a client in the edge namespace
# ---------------------------------------------------------------------------

BODY = b'{"title":"Clean gutters"}'


def _request(sock: socket.socket, host: str, ray: str = "") -> tuple[int, str]:
    extra = f"CF-Ray: {ray}\r\n" if ray else ""
    sock.sendall(
        (f"POST /api/tasks/ HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
         f"{extra}Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    need = int(hdrs.get("content-length", "0"))
    while len(rest) < need:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, hdrs.get("x-served-by", "")


def keepalive_latencies(inst: Instance, node: str, n: int = 25, pause: float = 0.02,
                        timeout: float = 5.0) -> tuple[list[float], list[int]]:
    """n requests on one connection from the edge to ``node``: (ms each, statuses).

    A pause before each request keeps the path equally "cold" with and
    without a delay fault (a request after 20 ms of idle is ~0.5 ms slower).
    """
    topo = inst.topology
    ip = topo.node(node).public_ip

    def body() -> tuple[list[float], list[int]]:
        lat: list[float] = []
        sts: list[int] = []
        with socket.create_connection((ip, topo.http_port), timeout=timeout) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(timeout)
            _request(s, topo.host)  # warm-up
            for _ in range(n):
                time.sleep(pause)
                t = time.perf_counter()
                st, _ = _request(s, topo.host)
                lat.append((time.perf_counter() - t) * 1000)
                sts.append(st)
        return lat, sts

    return netns.call_in_netns(inst.ns("edge"), body)


def fresh_requests(inst: Instance, node: str, n: int, timeout: float = 5.0,
                   concurrent: bool = True) -> list[tuple[str, str]]:
    """n requests, each on a new connection to ``node``: (outcome, served_by).

    outcome: the HTTP status as a string, ``timeout`` or ``error:<what>``.
    """
    topo = inst.topology
    ip = topo.node(node).public_ip

    def one(out: list[tuple[str, str]]) -> None:
        try:
            with socket.create_connection((ip, topo.http_port), timeout=timeout) as s:
                s.settimeout(timeout)
                st, served = _request(s, topo.host, ray=f"{secrets.token_hex(8)}-DFW")
                out.append((str(st), served))
        except TimeoutError:
            out.append(("timeout", ""))
        except OSError as exc:
            out.append((f"error:{exc}", ""))

    def body() -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if not concurrent:
            for _ in range(n):
                one(out)
            return out
        threads = [threading.Thread(target=one, args=(out,)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 5)
        return out

    return netns.call_in_netns(inst.ns("edge"), body)


def connect_times(inst: Instance, node: str, n: int = 15, timeout: float = 3.0) -> list[float]:
    ip = inst.topology.node(node).public_ip

    def body() -> list[float]:
        out = []
        for _ in range(n):
            time.sleep(0.02)
            t = time.perf_counter()
            with socket.create_connection((ip, inst.topology.http_port), timeout=timeout):
                out.append((time.perf_counter() - t) * 1000)
        return out

    return netns.call_in_netns(inst.ns("edge"), body)


def tagged_rules(inst: Instance) -> list[str]:
    """Every iptables rule of any replica namespace that a fault added."""
    left = []
    for name, ns in inst.topology.namespaces().items():
        if name in ("edge", "inet"):
            continue
        cp = netns.run(["iptables-save"], ns=ns, check=False)
        left += [f"{ns}: {ln}" for ln in cp.stdout.splitlines() if faults.RULE_TAG in ln]
    return left


def holder_pids(inst: Instance) -> list[int]:
    """NFQUEUE holders running in any namespace of the replica."""
    out = []
    for ns in inst.topology.namespaces().values():
        for pid in netns.pids_in_netns(ns):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"hopscope.testbed.nfq_holder" in cmd:
                out.append(pid)
    return out


def ufw_added(inst: Instance, node: str) -> list[list[str]]:
    return faults._ufw_added(inst, node)


def assert_all_201(inst: Instance, node: str, n: int = 6, deadline_s: float = 15.0) -> None:
    """Requests on new connections through ``node`` all get 201 (retrying until a deadline)."""
    deadline = time.monotonic() + deadline_s
    while True:
        got = fresh_requests(inst, node, n, timeout=3.0, concurrent=False)
        if all(o == "201" for o, _ in got):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"after clear, requests through {node} got {got}")
        time.sleep(0.5)


@pytest.fixture
def inst(testbed: Instance) -> Iterator[Instance]:
    """The module's replica; every fault is cleared after the test, pass or fail."""
    yield testbed
    try:
        faults.clear(testbed)
    finally:
        left = faults.load_faults(testbed)
        assert not left, f"faults left after clear: {[f.id for f in left]}"


# ---------------------------------------------------------------------------
# privileged: each fault's symptom, and clear
# ---------------------------------------------------------------------------


@pytest.mark.privileged
def test_delay_at_ufw_adds_the_hold_and_clear_removes_everything(inst: Instance) -> None:
    base, sts = keepalive_latencies(inst, "node1")
    assert set(sts) <= {200, 201}
    base_conn = statistics.median(connect_times(inst, "node1"))
    (f,) = faults.add_delay(inst, "ufw", "node1", 20)
    pid = int(f.undo["pid"])
    ns = inst.ns("node1")
    first = netns.run(["iptables", "-S", "INPUT"], ns=ns).stdout.splitlines()[1]
    assert f.undo["tag"] in first and "NFQUEUE" in first and "--queue-bypass" in first
    assert "! --mark 0x1000000/0x1000000" in first

    slow, sts = keepalive_latencies(inst, "node1")
    assert set(sts) <= {200, 201}  # UFW still allows the (re-injected) packets
    delta = statistics.median(slow) - statistics.median(base)
    assert 18.0 <= delta <= 22.0, (statistics.median(base), statistics.median(slow))
    conn_delta = statistics.median(connect_times(inst, "node1")) - base_conn
    assert 18.0 <= conn_delta <= 22.0  # the SYN is held too

    # held concurrently: 12 simultaneous requests all take ~20 ms, not 12 x 20 ms
    t = time.perf_counter()
    burst = fresh_requests(inst, "node1", 12, timeout=5.0)
    took = (time.perf_counter() - t) * 1000
    assert all(o in ("200", "201") for o, _ in burst), burst
    assert took < 200, f"12 concurrent requests took {took:.0f} ms (serialised: >= 240)"

    done = faults.clear(inst)
    assert [d.id for d in done] == ["delay@ufw/node1"]
    summary = done[0].params.get("holder_summary") or {}
    assert summary.get("held", 0) > 0 and summary["held"] == summary["released"]
    # each packet released on time: a holder that queued them behind each other would be
    # tens of ms late (its jitter, under 1 ms on a quiet machine, is a benchmark matter)
    assert summary["late_us_p99"] < 5000, summary
    assert not netns.pid_alive(pid)
    assert holder_pids(inst) == []
    assert tagged_rules(inst) == []
    assert not faults.faults_path(inst.prefix).exists()
    after, _ = keepalive_latencies(inst, "node1")
    assert statistics.median(after) < statistics.median(base) + 2.0


@pytest.mark.privileged
def test_delay_at_app_and_vxlan(inst: Instance) -> None:
    topo = inst.topology
    api2 = topo.pod("api-2")

    def direct(from_ns: str, n: int = 15) -> float:
        def body() -> float:
            lat = []
            with socket.create_connection((api2.ip, api2.port), timeout=5) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(5)
                _request(s, topo.host)
                for _ in range(n):
                    time.sleep(0.02)
                    t = time.perf_counter()
                    st, served = _request(s, topo.host)
                    assert st == 201 and served.startswith("api-2@")
                    lat.append((time.perf_counter() - t) * 1000)
            return statistics.median(lat)

        return netns.call_in_netns(from_ns, body)

    # node1 -> api-2 (on node2): the request crosses VXLAN; the response arrives
    # at node1 as VXLAN (udp 8472), so a vxlan delay on node1 adds to each exchange.
    base = direct(inst.ns("node1"))
    faults.add_delay(inst, "vxlan", "node1", 10)
    assert 8.0 <= direct(inst.ns("node1")) - base <= 12.5
    faults.clear(inst)
    # app: the pod's own INPUT (tcp 8000): the request is held at the pod
    faults.add_delay(inst, "app", "node2", 15, pod="api-2")
    assert 13.0 <= direct(inst.ns("node1")) - base <= 17.5
    faults.clear(inst)
    assert tagged_rules(inst) == []
    assert holder_pids(inst) == []


@pytest.mark.privileged
def test_ufw_deny_http_drops_syns_and_clear_restores(inst: Instance) -> None:
    before = ufw_added(inst, "node1")
    faults.add_ufw_deny_http(inst, "node1")
    added = ufw_added(inst, "node1")
    assert added[0] == ["deny", "in", "on", "eth0", "to", "any", "port", "80", "proto", "tcp"]
    assert ["allow", "80/tcp"] in added  # the deny sits before the allow
    got = fresh_requests(inst, "node1", 3, timeout=2.0)
    assert [o for o, _ in got] == ["timeout"] * 3  # SYNs unanswered: no RST, no SYN-ACK
    assert all(o == "201" for o, _ in fresh_requests(inst, "node2", 3, timeout=3.0))
    faults.clear(inst)
    assert ufw_added(inst, "node1") == before
    assert_all_201(inst, "node1")


@pytest.mark.privileged
def test_ufw_block_vxlan_breaks_cross_node_requests() -> None:
    """A fresh replica: Traefik holds few idle upstream connections yet, so most requests
    dial one (kube-proxy picks its pod), two in three to a pod on another node."""
    from conftest import unique_prefix

    with build.replica(unique_prefix("v"), access_log=False) as inst:
        before = ufw_added(inst, "node1")
        f = faults.add_ufw_block_vxlan(inst, "node1")
        assert f.params["removed"] and all("8472" in r for r in f.params["removed"])
        assert not any("8472" in " ".join(r) for r in ufw_added(inst, "node1"))
        # Traefik's dial to a remote pod gets no SYN-ACK back (node1 drops the VXLAN
        # reply) and ends in a 504 after the replica's dial timeout. Go's transport
        # hands a waiting request any connection that frees up first, so keep the
        # local pod busy for longer than the dial timeout: then the new dials decide.
        faults.add_slow_app(inst, (build.DIAL_TIMEOUT_S + 3) * 1000, pod="api-1")
        got = fresh_requests(inst, "node1", 12, timeout=build.DIAL_TIMEOUT_S + 8)
        outcomes = [o for o, _ in got]
        assert "504" in outcomes, got
        # what still works is served by the pod on node1 itself (no VXLAN)
        assert all(served.startswith("api-1@node1") for o, served in got if o == "201"), got
        # a request Traefik sends on an upstream connection it already had (up's own
        # checks opened a few) hangs instead: no response-header timeout by default
        assert set(outcomes) <= {"201", "504", "timeout"}, got
        faults.clear(inst)
        assert ufw_added(inst, "node1") == before  # same rules, same order, same comments
        assert_all_201(inst, "node1", n=8)


@pytest.mark.privileged
def test_kill_pod_gives_502_and_clear_restarts_it(inst: Instance) -> None:
    old_pid = inst.pod_pid("api-1")
    faults.add_kill_pod(inst, "api-1")
    assert old_pid is not None and not netns.pid_alive(old_pid)
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + 20
    # kube-proxy picks the endpoint per upstream connection: new upstream
    # connections opened by Traefik for concurrent requests hit the dead pod
    # about one time in three.
    while "502" not in [o for o, _ in seen] and time.monotonic() < deadline:
        for node in inst.topology.node_names():
            seen += fresh_requests(inst, node, 16, timeout=4.0)
    outcomes = {o for o, _ in seen}
    assert "502" in outcomes, seen[:20]
    assert outcomes <= {"201", "502"}, outcomes
    assert not any(s.startswith("api-1@") for _, s in seen)
    faults.clear(inst)
    fresh = load_instance(inst.prefix)
    new_pid = fresh.pod_pid("api-1")
    assert new_pid and new_pid != old_pid and netns.pid_alive(new_pid)
    pod = inst.topology.pod("api-1")
    assert netns.wait_tcp(inst.ns("node1"), pod.ip, pod.port, 5.0)
    for node in inst.topology.node_names():
        assert_all_201(inst, node)


@pytest.mark.privileged
def test_slow_app_adds_service_time(inst: Instance) -> None:
    ctl = Path(inst.pod_control("api-1"))
    original = ctl.read_text()
    base, _ = keepalive_latencies(inst, "node1", n=15)
    made = faults.add_slow_app(inst, 50)
    assert {f.pod for f in made} == {p.name for p in inst.topology.pods}
    assert json.loads(ctl.read_text())["service_ms"] == pytest.approx(
        json.loads(original)["service_ms"] + 50)
    time.sleep(0.3)
    slow, sts = keepalive_latencies(inst, "node1", n=15)
    assert set(sts) == {201}
    delta = statistics.median(slow) - statistics.median(base)
    assert 48.0 <= delta <= 54.0, delta
    faults.clear(inst)
    assert ctl.read_text() == original
    time.sleep(0.3)
    after, _ = keepalive_latencies(inst, "node1", n=15)
    assert statistics.median(after) < statistics.median(base) + 3.0


@pytest.mark.privileged
def test_fault_cli_list_and_clear_by_node(inst: Instance) -> None:
    from hopscope.cli import main

    runner = CliRunner()
    p = ["--prefix", inst.prefix]
    r = runner.invoke(main, ["testbed", "fault", "slow-app", "--ms", "5", *p])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["testbed", "fault", "delay", "--at", "ufw", "--node", "node2",
                             "--ms", "5", *p])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["testbed", "fault", "delay", "--at", "ufw", "--node", "node2",
                             "--ms", "5", *p])
    assert r.exit_code == 2 and "already active" in r.output
    r = runner.invoke(main, ["testbed", "fault", "list", "--json", *p])
    assert r.exit_code == 0, r.output
    ids = {f["id"] for f in json.loads(r.output)}
    assert ids == {"slow-app@api-1", "slow-app@api-2", "slow-app@api-3", "delay@ufw/node2"}
    r = runner.invoke(main, ["testbed", "fault", "clear", "--node", "node2", *p])
    assert r.exit_code == 0, r.output
    assert {f.id for f in faults.load_faults(inst)} == {"slow-app@api-1", "slow-app@api-3"}
    assert tagged_rules(inst) == []
    r = runner.invoke(main, ["testbed", "fault", "delay", "--at", "nowhere", "--node", "node2",
                             "--ms", "5", *p])
    assert r.exit_code == 2
    # the hook `testbed down` calls
    assert faults.clear_all(inst) == []
    assert not faults.faults_path(inst.prefix).exists()


# ---------------------------------------------------------------------------
# privileged: capture
# ---------------------------------------------------------------------------


def _rays_in(pcapng: Path) -> tuple[set[str], str]:
    cp = subprocess.run(["tshark", "-r", str(pcapng), "-Y", "http.request", "-T", "fields",
                         "-e", "http.request.line"], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    rays = set(re.findall(r"CF-Ray: ([0-9a-f]{16}-[A-Z]{3})", cp.stdout, re.I))
    return rays, cp.stderr


@pytest.mark.privileged
@pytest.mark.skipif(not shutil.which("tshark") or not shutil.which("capinfos"),
                    reason="needs tshark and capinfos (Debian tshark package)")
def test_capture_writes_per_node_ns_pcapng_with_every_ray(inst: Instance, tmp_path: Path) -> None:
    from hopscope.testbed.traffic import TrafficConfig, run_traffic

    topo = inst.topology
    out = tmp_path / "cap"
    with capturing(inst, out) as cap:
        res = run_traffic(topo, TrafficConfig(count=240, concurrency=6, new_conn_ratio=0.3,
                                              timeout=10, seed=7), keep=True)
    assert cap.result is not None
    assert sorted(p.name for p in out.glob("*.pcapng")) == ["node1.pcapng", "node2.pcapng",
                                                            "node3.pcapng"]
    assert not (out / ".hopscope-parts").exists()
    assert all(c.proc is not None and c.proc.returncode is not None for c in cap.capturers)
    assert res.sent == 240 and set(res.by_status) <= {"200", "201"}

    for node in topo.node_names():
        f = out / f"{node}.pcapng"
        info = subprocess.run(["capinfos", "-M", str(f)], capture_output=True, text=True,
                              timeout=60)
        assert info.returncode == 0, info.stderr
        assert "File timestamp precision:  nanoseconds (9)" in info.stdout
        assert "Strict time order:   True" in info.stdout
        expected = {i.name for i in topo.interfaces(node)}
        names = subprocess.run(["tshark", "-r", str(f), "-T", "fields", "-e",
                                "frame.interface_name"], capture_output=True, text=True,
                               timeout=120)
        assert names.returncode == 0, names.stderr
        warn = [ln for ln in names.stderr.splitlines() if "Running as user" not in ln]
        assert warn == [], warn
        for name in expected:
            assert f"Name = {name}" in info.stdout, (node, name)
        seen_ifaces = set(names.stdout.split())
        # every interface carried traffic except, possibly, an idle pod's
        assert {"eth0", "flannel.1"} <= seen_ifaces
        assert seen_ifaces <= expected
        rays, err = _rays_in(f)
        assert [ln for ln in err.splitlines() if "Running as user" not in ln] == []
        want = {r["cf_ray"] for r in res.records if r["node"] == node}
        missing = want - rays
        assert not missing, f"{node}: {len(missing)} of {len(want)} CF-Rays not captured"
    # ns timestamps really carry ns (not microseconds padded with zeros)
    _, epbs = _read_pcapng(out / "node1.pcapng")
    assert any(ts % 1000 for _, ts, _, _ in epbs)
    assert {flags & 3 for _, _, flags, _ in epbs} == {1, 2}  # inbound and outbound
