"""``hopscope doctor`` and the probes in :mod:`hopscope.agent.features`.

Three kinds of tests:

* parsers on fixture text (tracefs format, CapEff, a config.gz made here,
  ``ip -j`` / ``tc -j`` samples, a BTF blob built here);
* facts of the machine the tests run on, each gated on the kernel config
  saying the fact should hold (so they do not fail on another kernel);
* the CLI: ``--json`` as root and as nobody, and ``--netns`` on a namespace
  of the test's own (removed in a finally; the root namespace is not touched).
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hopscope.agent import doctor
from hopscope.agent import features as ft
from hopscope.agent.features import DEGRADED, MISSING, OK, Finding

from hopscope.cli import main
from hopscope.errors import UsageError

KFREE_SKB_FORMAT = r"""name: kfree_skb
ID: 2310
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:void * skbaddr;	offset:8;	size:8;	signed:0;
	field:void * location;	offset:16;	size:8;	signed:0;
	field:void * rx_sk;	offset:24;	size:8;	signed:0;
	field:unsigned short protocol;	offset:32;	size:2;	signed:0;
	field:enum skb_drop_reason reason;	offset:36;	size:4;	signed:0;

print fmt: "skbaddr=%p rx_sk=%p protocol=%u location=%pS reason: %s", REC->skbaddr, REC->rx_sk, REC->protocol, REC->location, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 4, "SOCKET_CLOSE" }, { 11, "UDP_CSUM" }, { 12, "NETFILTER_DROP" }, { 13, "OTHERHOST" }, { 128, "MAX" })
"""

KFREE_SKB_FORMAT_5_10 = r"""name: kfree_skb
ID: 1234
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:void * skbaddr;	offset:8;	size:8;	signed:0;
	field:void * location;	offset:16;	size:8;	signed:0;
	field:unsigned short protocol;	offset:24;	size:2;	signed:0;

print fmt: "skbaddr=%p protocol=%u location=%p", REC->skbaddr, REC->protocol, REC->location
"""

STATUS = """Name:\tpython3
Umask:\t0022
State:\tR (running)
CapInh:\t0000000000000000
CapPrm:\t000001fffeffffff
CapEff:\t000001fffeffffff
CapBnd:\t000001fffeffffff
CapAmb:\t0000000000000000
"""

# `ip -d -j link` of a k3s node where Flannel's VXLAN is bound to the public NIC
IP_LINK = [
    {"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP"], "operstate": "UNKNOWN",
     "link_type": "loopback"},
    {"ifindex": 2, "ifname": "enp1s0", "operstate": "UP", "link_type": "ether"},
    {"ifindex": 3, "ifname": "eth1", "operstate": "UP", "link_type": "ether"},
    {"ifindex": 4, "ifname": "flannel.1", "operstate": "UNKNOWN", "link_type": "ether",
     "linkinfo": {"info_kind": "vxlan", "info_data": {"id": 1, "local": "10.0.0.5",
                                                      "link": "enp1s0", "port": 8472}}},
    {"ifindex": 5, "ifname": "cni0", "operstate": "UP", "link_type": "ether",
     "linkinfo": {"info_kind": "bridge", "info_data": {"stp_state": 0}}},
    {"ifindex": 6, "link": "eth0", "ifname": "veth1a2b3c4d", "master": "cni0",
     "operstate": "UP", "link_type": "ether",
     "linkinfo": {"info_kind": "veth", "info_slave_kind": "bridge"}},
]
IP_ADDR = [
    {"ifname": "enp1s0", "addr_info": [{"family": "inet", "local": "10.0.0.5"}]},
    {"ifname": "eth1", "addr_info": [{"family": "inet", "local": "192.168.7.5"}]},
]
TC_QDISC = [
    {"kind": "fq_codel", "handle": "0:", "dev": "enp1s0", "root": True},
    {"kind": "clsact", "handle": "ffff:", "dev": "enp1s0", "parent": "ffff:fff1"},
    {"kind": "clsact", "handle": "ffff:", "dev": "cni0", "parent": "ffff:fff1"},
]
TC_FILTERS = {
    ("enp1s0", "ingress"): [
        {"protocol": "all", "pref": 49152, "kind": "bpf", "chain": 0},
        {"protocol": "all", "pref": 49152, "kind": "bpf", "chain": 0,
         "options": {"handle": "0x1", "bpf_name": "hopscope_nic_in", "direct-action": True,
                     "prog": {"id": 26, "name": "hs_in", "jited": 1}}}],
    ("enp1s0", "egress"): [],
    ("cni0", "ingress"): [
        {"protocol": "all", "pref": 49152, "kind": "bpf", "chain": 0,
         "options": {"handle": "0x1", "direct-action": True,
                     "prog": {"id": 31, "name": "cil_from_conta", "jited": 1}}}],
    ("cni0", "egress"): [],
}

PROC_NET_TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4243 1 0 100 0 0 10 0
   2: 0200000A:0050 0300000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 4244 1 0 100 0 0 10 0
"""
PROC_NET_TCP6 = """  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5151 1 0 100 0 0 10 0
"""


def _config() -> ft.KernelConfig:
    return ft.read_kernel_config()


def _cfg_is(name: str, *values: str) -> bool:
    return _config().value(name) in values


# -- parsers on fixtures -----------------------------------------------------------------


def test_drop_reasons_from_the_format_file() -> None:
    reasons = ft.parse_drop_reasons(KFREE_SKB_FORMAT)
    assert reasons[12] == "NETFILTER_DROP"
    assert reasons[3] == "NO_SOCKET"
    assert "MAX" not in reasons.values()
    fmt = ft.parse_tracepoint_format(KFREE_SKB_FORMAT)
    assert fmt.name == "kfree_skb" and fmt.id == 2310
    assert fmt.fields["reason"] == ("enum skb_drop_reason", 36, 4)
    assert fmt.fields["skbaddr"] == ("void *", 8, 8)


def test_kernels_without_drop_reasons_give_none() -> None:
    assert ft.parse_drop_reasons(KFREE_SKB_FORMAT_5_10) == {}
    assert "reason" not in ft.parse_tracepoint_format(KFREE_SKB_FORMAT_5_10).fields


def test_cap_eff_decodes_to_names() -> None:
    mask = ft.parse_cap_eff(STATUS)
    assert mask == 0x1FFFEFFFFFF
    caps = ft.decode_caps(mask)
    assert {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN"} <= set(caps)
    assert "CAP_SYS_RESOURCE" not in caps  # bit 24 is the one cleared
    assert len(caps) == 40
    assert ft.decode_caps(0) == []
    assert ft.decode_caps(1 << 39) == ["CAP_BPF"]
    assert ft.parse_cap_eff("Name: x\n") is None


def test_kernel_config_from_config_gz_then_boot(tmp_path: Path) -> None:
    gz = tmp_path / "config.gz"
    with gzip.open(gz, "wt") as f:
        f.write("#\n# Automatically generated\nCONFIG_BPF_SYSCALL=y\n# CONFIG_KPROBES is not set\n"
                "CONFIG_IP_VS=m\nCONFIG_LOCALVERSION=\"-fc\"\n")
    cfg = ft.read_kernel_config("6.18.0-x", proc_config=str(gz), boot_dir=str(tmp_path))
    assert cfg.source == str(gz)
    assert cfg.value("CONFIG_KPROBES") == "n"
    assert cfg.value("CONFIG_IP_VS") == "m" and cfg.enabled("CONFIG_IP_VS")
    assert cfg.value("CONFIG_LOCALVERSION") == "-fc"
    assert cfg.value("CONFIG_NOT_MENTIONED") == "n"

    (tmp_path / "config-6.1.0-x").write_text("CONFIG_KPROBES=y\n")
    boot = ft.read_kernel_config("6.1.0-x", proc_config=str(tmp_path / "absent.gz"),
                                 boot_dir=str(tmp_path))
    assert boot.source == str(tmp_path / "config-6.1.0-x") and boot.enabled("CONFIG_KPROBES")

    none = ft.read_kernel_config("9.9", proc_config=str(tmp_path / "absent.gz"),
                                 boot_dir=str(tmp_path))
    assert none.source is None and none.value("CONFIG_KPROBES") is None
    assert "absent.gz missing" in (none.error or "")


def test_interface_roles_from_ip_json() -> None:
    ifaces = {i.name: i for i in ft.classify_interfaces(IP_LINK, ["enp1s0"], IP_ADDR)}
    assert ifaces["enp1s0"].role == ft.ROLE_PUBLIC_UNDERLAY
    assert ifaces["flannel.1"].role == ft.ROLE_OVERLAY
    assert ifaces["flannel.1"].vxlan == {"id": 1, "port": 8472, "local": "10.0.0.5",
                                         "underlay": ["enp1s0"]}
    assert ifaces["flannel.1"].point == "overlay"
    assert ifaces["cni0"].role == ft.ROLE_POD_BRIDGE and ifaces["cni0"].point == "pod"
    assert ifaces["veth1a2b3c4d"].role == ft.ROLE_POD_VETH
    assert ifaces["eth1"].role == ft.ROLE_OTHER
    assert ifaces["lo"].role == ft.ROLE_LOOPBACK


def test_pod_point_watched_once_at_the_veths() -> None:
    """cni0 and its veths carry the same packets: the veths are watched, the bridge only
    when none of its veths is up."""
    ifaces = ft.classify_interfaces(IP_LINK, ["enp1s0"], IP_ADDR)
    names = {i.name for i in ft.attached_interfaces(ifaces)}
    assert {"enp1s0", "flannel.1", "veth1a2b3c4d"} <= names and "cni0" not in names
    down = [dict(x) for x in IP_LINK]
    down[5] = {**down[5], "operstate": "DOWN"}
    names = {i.name for i in ft.attached_interfaces(
        ft.classify_interfaces(down, ["enp1s0"], IP_ADDR))}
    assert {"enp1s0", "flannel.1", "cni0"} <= names and "veth1a2b3c4d" not in names


def test_points_come_from_roles_not_names() -> None:
    """A pod veth whose name says nothing is watched at `pod`; a bond's slaves and a second
    NIC named like NICs are no point of the model and are not watched (each packet at the
    nic taken twice, or another network's taken as the nic's)."""
    links = [
        {"ifindex": 2, "ifname": "bond0", "operstate": "UP", "link_type": "ether",
         "linkinfo": {"info_kind": "bond"}},
        {"ifindex": 3, "ifname": "eth0", "master": "bond0", "operstate": "UP",
         "link_type": "ether", "linkinfo": {"info_slave_kind": "bond"}},
        {"ifindex": 4, "ifname": "eth1", "master": "bond0", "operstate": "UP",
         "link_type": "ether", "linkinfo": {"info_slave_kind": "bond"}},
        {"ifindex": 5, "ifname": "ens19", "operstate": "UP", "link_type": "ether"},
        {"ifindex": 6, "ifname": "cni0", "operstate": "UP", "link_type": "ether",
         "linkinfo": {"info_kind": "bridge"}},
        {"ifindex": 7, "ifname": "ab12", "master": "cni0", "operstate": "UP",
         "link_type": "ether", "linkinfo": {"info_kind": "veth", "info_slave_kind": "bridge"}},
        {"ifindex": 8, "ifname": "pod-b", "master": "cni0", "operstate": "UP",
         "link_type": "ether", "linkinfo": {"info_kind": "veth", "info_slave_kind": "bridge"}},
    ]
    ifaces = ft.classify_interfaces(links, ["bond0"], [])
    points = {i.name: i.point for i in ifaces}
    assert points == {"bond0": "nic", "eth0": "-", "eth1": "-", "ens19": "-", "cni0": "pod",
                      "ab12": "pod", "pod-b": "pod"}
    assert sorted(i.name for i in ft.attached_interfaces(ifaces)) == ["ab12", "bond0", "pod-b"]


def test_underlay_found_by_local_address() -> None:
    links = [dict(x) for x in IP_LINK]
    links[3] = {"ifname": "flannel.1", "linkinfo": {"info_kind": "vxlan", "info_data": {
        "id": 1, "local": "192.168.7.5", "port": 8472}}}
    ifaces = {i.name: i for i in ft.classify_interfaces(links, ["enp1s0"], IP_ADDR)}
    assert ifaces["eth1"].role == ft.ROLE_UNDERLAY
    assert ifaces["enp1s0"].role == ft.ROLE_PUBLIC_NIC
    assert ifaces["flannel.1"].vxlan is not None
    assert ifaces["flannel.1"].vxlan["underlay"] == ["eth1"]


def test_underlay_found_by_routes_to_fdb_peers() -> None:
    links = [dict(x) for x in IP_LINK]
    links[3] = {"ifname": "flannel.1", "linkinfo": {"info_kind": "vxlan", "info_data": {
        "id": 1, "port": 8472}}}
    routes = {"flannel.1": ["eth1", "enp1s0", "eth1"]}
    ifaces = {i.name: i for i in ft.classify_interfaces(links, ["enp1s0"], IP_ADDR, routes)}
    assert ifaces["eth1"].role == ft.ROLE_UNDERLAY
    assert ifaces["enp1s0"].role == ft.ROLE_PUBLIC_UNDERLAY
    assert ifaces["flannel.1"].vxlan is not None
    assert ifaces["flannel.1"].vxlan["underlay"] == ["enp1s0", "eth1"]


def test_tc_hooks_name_hopscope_filters() -> None:
    hooks = ft.tc_hooks(TC_QDISC, lambda dev, d: TC_FILTERS[(dev, d)])
    assert hooks["enp1s0"].clsact
    assert hooks["enp1s0"].hopscope_filters == ["ingress:bpf:hopscope_nic_in"]
    assert hooks["cni0"].filters == ["ingress:bpf:cil_from_conta"]
    assert hooks["cni0"].hopscope_filters == []
    assert "eth1" not in hooks


def test_listening_sockets_from_proc_net_tcp() -> None:
    v4 = ft.parse_proc_net_tcp(PROC_NET_TCP, socket.AF_INET)
    assert [(s.address, s.port, s.inode) for s in v4] == [("0.0.0.0", 80, 4242),
                                                          ("127.0.0.1", 8080, 4243)]
    v6 = ft.parse_proc_net_tcp(PROC_NET_TCP6, socket.AF_INET6)
    assert [(s.address, s.port) for s in v6] == [("::", 80)]
    assert v6[0].dual_stack_candidate and not v4[0].dual_stack_candidate


def _fake_proc(root: Path, pid: int, comm: bytes, cmdline: bytes, netns: str) -> None:
    d = root / str(pid)
    (d / "ns").mkdir(parents=True)
    (d / "comm").write_bytes(comm + b"\n")
    (d / "cmdline").write_bytes(cmdline)
    ns = root / "namespaces" / netns
    ns.parent.mkdir(exist_ok=True)
    ns.touch()
    os.link(ns, d / "ns" / "net")  # same inode: what ns/net's stat gives on a real /proc


def test_process_pids_by_comm_or_argv0_in_one_namespace(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 10, b"traefik", b"/usr/local/bin/traefik\0--configfile=x\0", "a")
    _fake_proc(tmp_path, 11, b"traefik-wrapped"[:15], b"/opt/bin/traefik\0", "a")
    _fake_proc(tmp_path, 12, b"traefik", b"traefik\0", "b")
    _fake_proc(tmp_path, 13, b"python3", b"python3\0-m\0traefik\0", "a")
    _fake_proc(tmp_path, 14, b"traefikx", b"traefikx\0", "a")
    (tmp_path / "self").mkdir()
    (tmp_path / "15").mkdir()  # exited between the listing and the reads
    ns_a = (tmp_path / "namespaces" / "a").stat().st_ino
    assert ft.process_pids("traefik", None, str(tmp_path)) == [10, 11, 12]
    assert ft.process_pids("traefik", ns_a, str(tmp_path)) == [10, 11]
    assert ft.process_pids("nginx", None, str(tmp_path)) == []
    assert ft.process_pids("traefik", None, str(tmp_path / "missing")) == []


def test_process_pids_finds_a_live_process_as_psutil_does(tmp_path: Path) -> None:
    name = f"hs-sleep-{secrets.token_hex(3)}"
    exe = tmp_path / name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
    child = subprocess.Popen([str(exe), "30"])
    try:
        # Popen returns once the child forked; until it has exec'd it bears our name
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/comm").read_text().strip() != name[:15]:
            assert time.monotonic() < deadline, "the child never exec'd"
            time.sleep(0.01)
        own_ns = os.stat("/proc/self/ns/net").st_ino
        assert ft.process_pids(name, own_ns) == [child.pid]
        assert ft.process_pids(name, own_ns + 1) == []
        assert [p.pid for p in ft.find_processes(name)] == [child.pid]
        import psutil  # an independent scan: the same process, by its name

        assert [p.pid for p in psutil.process_iter(["name"])
                if p.info["name"] == name] == [child.pid]
        assert os.getpid() not in ft.process_pids(Path(sys.executable).name)
    finally:
        child.kill()
        child.wait()
    assert ft.process_pids(name) == []


def test_mounts_and_tracefs(tmp_path: Path) -> None:
    m = tmp_path / "mounts"
    m.write_text("proc /proc proc rw 0 0\nnodev /sys/kernel/debug/tracing tracefs rw 0 0\n")
    assert ft.find_tracefs(str(m)) == "/sys/kernel/debug/tracing"
    m.write_text("proc /proc proc rw 0 0\n")
    assert ft.find_tracefs(str(m)) is None


def _btf_blob() -> bytes:
    strs = b"\0int\0skb_drop_reason\0SKB_NOT_DROPPED_YET\0SKB_DROP_REASON_NETFILTER_DROP\0" \
           b"SKB_DROP_REASON_MAX\0tcp_v4_connect\0btf_trace_kfree_skb\0"

    def off(s: bytes) -> int:
        return strs.index(b"\0" + s + b"\0") + 1

    types = b"".join([
        struct.pack("<IIII", off(b"int"), ft.BTF_KIND_INT << 24, 4, 32),  # id 1
        struct.pack("<III", off(b"skb_drop_reason"), (ft.BTF_KIND_ENUM << 24) | 3, 4),  # id 2
        struct.pack("<Ii", off(b"SKB_NOT_DROPPED_YET"), 0),
        struct.pack("<Ii", off(b"SKB_DROP_REASON_NETFILTER_DROP"), 12),
        struct.pack("<Ii", off(b"SKB_DROP_REASON_MAX"), 128),
        struct.pack("<III", 0, (ft.BTF_KIND_FUNC_PROTO << 24) | 1, 1),  # id 3
        struct.pack("<II", 0, 1),
        struct.pack("<III", off(b"tcp_v4_connect"), ft.BTF_KIND_FUNC << 24, 3),  # id 4
        struct.pack("<III", off(b"btf_trace_kfree_skb"), ft.BTF_KIND_TYPEDEF << 24, 1),  # id 5
    ])
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strs))
    return hdr + types + strs


def test_btf_reader_on_a_built_blob() -> None:
    btf = ft.Btf(_btf_blob())
    assert btf.type_count == 5
    assert btf.find(ft.BTF_KIND_FUNC, "tcp_v4_connect") == 4
    assert btf.find(ft.BTF_KIND_TYPEDEF, "btf_trace_kfree_skb") == 5
    assert btf.find(ft.BTF_KIND_FUNC, "nope") is None
    assert ft.drop_reasons_from_btf(btf) == {12: "NETFILTER_DROP"}
    with pytest.raises(ft.BtfError, match="magic"):
        ft.Btf(b"\0" * 32)


def test_headers_fix_links_debian_headers(tmp_path: Path) -> None:
    mods = tmp_path / "modules"
    build = tmp_path / "src/linux-headers-6.1.0-56-amd64"
    common = tmp_path / "src/linux-headers-6.1.0-56-common"
    (build / "include/generated").mkdir(parents=True)
    (build / "include/generated/utsrelease.h").write_text('#define UTS_RELEASE "6.1.0-56-amd64"\n')
    (common / "include/linux").mkdir(parents=True)
    (common / "include/linux/kconfig.h").write_text("\n")
    (mods / "6.1.0-56-amd64").mkdir(parents=True)
    (mods / "6.1.0-56-amd64/build").symlink_to(build)
    (mods / "6.1.0-56-amd64/source").symlink_to(common)

    info = ft.probe_headers("6.18.44-x", modules_dir=str(mods))
    assert not info.present
    assert [c.version for c in info.candidates] == ["6.1.0-56-amd64"]
    fix = ft.headers_fix(info, None) or ""
    assert f"ln -sfn {build} /lib/modules/6.18.44-x/build" in fix
    assert f"ln -sfn {common} /lib/modules/6.18.44-x/source" in fix
    assert "UAPI headers and tracepoint formats" in fix
    assert ft.headers_fix(info, "linux-headers-6.18.44-x") == \
        "apt-get install linux-headers-6.18.44-x"

    # a kernel whose headers are installed and match
    same = ft.probe_headers("6.1.0-56-amd64", modules_dir=str(mods))
    assert same.present and same.matches and same.has_kconfig_h
    assert ft.headers_fix(same, None) is None

    # the fix applied: another version's headers linked for the running kernel
    (mods / "6.18.44-x").mkdir()
    (mods / "6.18.44-x/build").symlink_to(build)
    (mods / "6.18.44-x/source").symlink_to(common)
    linked = ft.probe_headers("6.18.44-x", modules_dir=str(mods))
    assert linked.present and linked.has_kconfig_h and not linked.matches
    assert linked.version == "6.1.0-56-amd64"
    assert ft.headers_fix(linked, None) is None  # nothing better to do
    assert ft.headers_fix(linked, "linux-headers-6.18.44-x") == \
        "apt-get install linux-headers-6.18.44-x"


def _headers(release: str = "6.18.44-x", **kw: Any) -> ft.HeadersInfo:
    """This kernel's own complete headers (what ``probe_headers`` finds), unless told."""
    base: dict[str, Any] = dict(present=True, has_kconfig_h=True, matches=True,
                                version=release)
    base.update(kw)
    return ft.HeadersInfo(release, f"/lib/modules/{release}/build", **base)


#: tcp:tcp_probe's fields on 6.18 (socket and skb) and on Debian 12's 6.1 (neither)
TCP_PROBE_6_18 = frozenset({"family", "sport", "dport", "saddr", "daddr", "mark", "data_len",
                            "snd_nxt", "snd_una", "snd_cwnd", "ssthresh", "snd_wnd", "srtt",
                            "rcv_wnd", "sock_cookie", "skaddr", "skbaddr"})
TCP_PROBE_6_1 = TCP_PROBE_6_18 - {"skaddr", "skbaddr"}


def _inputs(**kw: Any) -> ft.PlanInputs:
    base: dict[str, Any] = dict(
        kprobes=False, kprobe_symbols={"nf_hook_slow": True, "tcp_rcv_established": True},
        fentry=False, ipvs_config=False, ipvs_active=False, tc_clsact=True, af_packet=True,
        tracepoints={n: True for n in ft.AGENT_TRACEPOINTS}, drop_reasons=True, ringbuf=True,
        bcc=True, headers=_headers(), tracefs_mounted=True, sys_admin=True,
        tracepoint_progs=True, tcp_probe_fields=TCP_PROBE_6_18, tc_pid_tgid=True,
        proxy_calls=("write", "writev", "connect"))
    base.update(kw)
    return ft.PlanInputs(**base)


def _plan(**kw: Any) -> dict[str, ft.PlanItem]:
    return {i.hop: i for i in ft.plan_probes(_inputs(**kw))}


def test_probe_plan_choices() -> None:
    p = _plan()
    assert p["nic packets"].source.startswith("tc clsact")
    assert p["kernel_in"].source == "tc ingress (nic) -> tracepoint tcp:tcp_probe"
    assert p["proxy"].source.startswith("syscalls:sys_enter_{write,writev,connect} ")
    assert p["service_nat"].source.startswith("iptables DNAT")
    assert p["drops"].source == "skb:kfree_skb with reasons"
    assert all(i.usable and not i.not_built for i in p.values())

    syms = {"nf_hook_slow": True, "ip_vs_schedule": True, "ip_vs_conn_new": True}
    p = _plan(kprobes=True, kprobe_symbols=syms, ipvs_config=True, ipvs_active=True)
    assert "nf_hook_slow" in p["kernel_in"].reason and "verdict" in p["kernel_in"].reason
    assert p["service_nat"].source == "kprobes ip_vs_schedule + ip_vs_conn_new"
    # IPVS in use but its functions not traceable: the packets' view
    p = _plan(kprobes=True, kprobe_symbols={"nf_hook_slow": True}, ipvs_config=True,
              ipvs_active=True)
    assert p["service_nat"].source.startswith("iptables DNAT")

    p = _plan(tc_clsact=False)
    assert p["pod packets"].source == "AF_PACKET capture (TPACKET_V3, socket filter)"
    assert "no tc clsact" in p["pod packets"].reason
    p = _plan(tc_clsact=False, af_packet=False)
    assert not p["overlay packets"].usable and p["overlay packets"].source == "none"


def test_probe_plan_kernel_in_and_proxy_as_the_agent_builds_them() -> None:
    """Audit 20, finding 3: on Debian 12's 6.1 tcp:tcp_probe has no skaddr/skbaddr and tc
    programs cannot call bpf_get_current_pid_tgid: the agent takes the kernel point from a
    kprobe on tcp_rcv_established (none without kprobes) and merges proxy+service_nat."""
    p = _plan(tcp_probe_fields=TCP_PROBE_6_1, tc_pid_tgid=False, kprobes=True)
    assert p["kernel_in"].source == "tc ingress (nic) -> kprobe tcp_rcv_established"
    assert "no socket/skb fields" in p["kernel_in"].reason and p["kernel_in"].usable
    assert p["proxy"].source == "none: tc cannot tell the thread here (proxy+service_nat merged)"
    assert not p["proxy"].usable and "before 6.10" in p["proxy"].reason
    assert "proxy+service_nat" in p["service_nat"].source
    # no kprobes (or `agent run --no-kprobes`): no kernel point at all
    p = _plan(tcp_probe_fields=TCP_PROBE_6_1, kprobes=False)
    assert p["kernel_in"].source == "none" and not p["kernel_in"].usable
    assert "kernel_in+proxy" in p["kernel_in"].reason
    assert p["kernel_in"].not_built.startswith("net:netif_receive_skb")  # named, not used
    # tcp:tcp_probe absent altogether: the same (the programs build without it)
    p = _plan(tcp_probe_fields=frozenset(), kprobes=True,
              tracepoints={n: n != "tcp:tcp_probe" for n in ft.AGENT_TRACEPOINTS})
    assert p["nic packets"].source.startswith("tc clsact")
    assert p["kernel_in"].source == "tc ingress (nic) -> kprobe tcp_rcv_established"
    assert "tcp:tcp_probe is absent" in p["kernel_in"].reason
    p = _plan(tcp_probe_fields=TCP_PROBE_6_1, kprobes=True,
              kprobe_symbols={"tcp_rcv_established": False})
    assert p["kernel_in"].source == "none"
    assert "tcp_rcv_established not in kallsyms" in p["kernel_in"].reason


def _candidate(version: str = "6.1.0-56-amd64", source: bool = True) -> ft.HeaderTree:
    return ft.HeaderTree(version, f"/usr/src/linux-headers-{version}",
                         f"/usr/src/linux-headers-{version}-common" if source else None)


def test_probe_plan_packet_source_as_the_agent_falls_back() -> None:
    """Audit 20, finding 3: where the BPF programs cannot be used (bcc, headers neither
    present nor stageable, no CAP_SYS_ADMIN to stage them, ...) `--source auto` takes
    packets from AF_PACKET capture, with no kernel_in, proxy, service_nat or drops."""
    def capture(**kw: Any) -> dict[str, ft.PlanItem]:
        p = _plan(**kw)
        assert p["nic packets"].source.startswith("AF_PACKET capture"), kw
        for hop in ("kernel_in", "proxy", "service_nat", "drops"):
            assert p[hop].source == "none" and not p[hop].usable, (kw, hop)
        return p

    assert "bcc not importable" in capture(bcc=False)["nic packets"].reason
    no_headers = _headers(present=False, has_kconfig_h=False, matches=False, version=None)
    assert "none of another version" in capture(headers=no_headers)["nic packets"].reason
    stageable = _headers(present=False, has_kconfig_h=False, matches=False, version=None,
                         candidates=[_candidate()])
    p = capture(headers=stageable, sys_admin=False)
    assert "linking 6.1.0-56-amd64's headers" in p["nic packets"].reason
    assert "CAP_SYS_ADMIN" in p["nic packets"].reason
    p = _plan(headers=stageable, sys_admin=True)  # root: linked in its own mount namespace
    assert p["nic packets"].source.startswith("tc clsact")
    assert "6.1.0-56-amd64's, linked in the agent's private mount namespace" in \
        p["nic packets"].reason
    assert "mounting tracefs" in capture(tracefs_mounted=False, sys_admin=False)[
        "nic packets"].reason
    assert _plan(tracefs_mounted=False)["nic packets"].source.startswith("tc clsact")
    p = capture(tracepoints={n: not n.startswith("syscalls:") for n in ft.AGENT_TRACEPOINTS})
    assert p["proxy"].not_built.startswith("raw_syscalls:sys_enter")
    # only the proxy calls the programs are built with are needed
    tps = {n: "sendto" not in n and "sendmsg" not in n for n in ft.AGENT_TRACEPOINTS}
    assert _plan(tracepoints=tps)["nic packets"].source.startswith("tc clsact")
    p = capture(ringbuf=False)
    assert p["transport"].not_built == "perf buffer"
    capture(tracepoint_progs=False)
    p = _plan(bcc=False, af_packet=False)
    assert p["nic packets"].source == "none" and not p["nic packets"].usable
    assert ft.packet_source(_inputs(bcc=False, tc_clsact=False)) == (
        ft.PACKETS_CAPTURE, {"bcc": "bcc not importable", "tc_clsact": "no tc clsact/cls_bpf"})


class _FakeProgram:
    """Stands for bpfprog.AgentProgram in load_program: keeps the settings it was built with."""

    built: list[Any] = []

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        _FakeProgram.built.append(settings)

    def attach_kprobes(self, have: Any) -> list[str]:
        return []


def test_probe_plan_agrees_with_load_program(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The doctor reads the facts with the agent's own functions (doctor.agent_facts), and
    the plan says what run.load_program then builds: the kernel point's source, the proxy
    point, kprobes. Every combination, against load_program itself (bcc stubbed out)."""
    from hopscope.agent import bpfprog, run

    monkeypatch.setattr(bpfprog, "remove_stale", lambda: 0)
    monkeypatch.setattr(bpfprog, "AgentProgram", _FakeProgram)
    tracefs = tmp_path / "tracing"
    fmt = Path(ft.tracepoint_dir(str(tracefs), "tcp:tcp_probe")) / "format"
    fmt.parent.mkdir(parents=True)
    monkeypatch.setattr(ft, "find_tracefs", lambda *a: str(tracefs))
    cases = 0
    for fields in (TCP_PROBE_6_18, TCP_PROBE_6_1, None):
        for pid_tgid in (True, False):
            for kprobe_events in (True, False):
                if fields is None:
                    fmt.unlink(missing_ok=True)
                else:
                    fmt.write_text("name: tcp_probe\nID: 1\nformat:\n" + "".join(
                        f"\tfield:int {n};\toffset:0;\tsize:4;\tsigned:1;\n"
                        for n in sorted(fields)))
                (tracefs / "kprobe_events").unlink(missing_ok=True)
                if kprobe_events:
                    (tracefs / "kprobe_events").touch()
                monkeypatch.setattr(ft, "tc_helper_pid_tgid", lambda v=pid_tgid: v)
                cfg = run.AgentConfig(node="n1")
                run.load_program(cfg, {})
                st = _FakeProgram.built[-1]
                facts = doctor.agent_facts(str(tracefs), True, (6, 1, 0))
                p = {i.hop: i for i in ft.plan_probes(_inputs(
                    kprobes=facts["kprobes"], tcp_probe_fields=facts["tcp_probe_fields"],
                    tc_pid_tgid=facts["tc_pid_tgid"]))}
                case = (fields is not None and "skaddr" in fields, pid_tgid, kprobe_events)
                assert facts["kprobes"] == st.kprobes, case
                assert p["kernel_in"].source.endswith("tracepoint tcp:tcp_probe") == \
                    st.tp_probe_skb, case
                assert p["kernel_in"].source.endswith("kprobe tcp_rcv_established") == (
                    not st.tp_probe_skb and st.kprobes), case
                assert p["proxy"].usable == st.tc_pid_tgid, case
                cases += 1
    assert cases == 12


def test_probe_plan_agrees_with_prepare_kernel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers and tracefs as bpfprog.prepare_kernel_env handles them: the plan says tc
    exactly when it gets through (else run_agent falls back to capture), and names the
    header tree it links."""
    from hopscope.agent import bpfprog

    from hopscope.errors import HopscopeError

    staged: list[ft.HeaderTree | None] = []
    trees = {
        "own": _headers(),
        "incomplete, a candidate": _headers(has_kconfig_h=False, candidates=[_candidate()]),
        "none, candidates": _headers(present=False, has_kconfig_h=False, matches=False,
                                     version=None, candidates=[_candidate("6.2.0-1", False),
                                                               _candidate()]),
        "none, one without source": _headers(present=False, has_kconfig_h=False,
                                             matches=False, version=None,
                                             candidates=[_candidate(source=False)]),
        "none at all": _headers(present=False, has_kconfig_h=False, matches=False,
                                version=None),
    }
    for name, info in trees.items():
        for mounted in (True, False):
            for admin in (True, False):
                def mounts(*, tracefs: str | None, stage: ft.HeaderTree | None, release: str,
                           admin: bool = admin) -> None:
                    if not admin:
                        raise ft.PrivateMountError("cannot make a private mount namespace: "
                                                   "Operation not permitted (needs "
                                                   "CAP_SYS_ADMIN)")
                    staged.append(stage)

                monkeypatch.setattr(ft, "probe_headers", lambda *a, i=info: i)
                monkeypatch.setattr(ft, "find_tracefs",
                                    lambda *a, m=mounted: "/sys/kernel/tracing" if m else None)
                monkeypatch.setattr(ft, "private_mounts", mounts)
                staged.clear()
                try:
                    bpfprog.prepare_kernel_env("6.18.44-x")
                    through = True
                except HopscopeError:
                    through = False
                inputs = _inputs(headers=info, tracefs_mounted=mounted, sys_admin=admin)
                case = (name, mounted, admin)
                assert (ft.packet_source(inputs)[0] == ft.PACKETS_TC) == through, case
                if through and staged:
                    assert staged[0] == ft.headers_stage(info), case
                elif through:
                    assert ft.headers_stage(info) is None, case


def _ctx(**kw: Any) -> doctor.Context:
    base: dict[str, Any] = dict(
        root=True, release="6.18.44-x", version=(6, 18, 44),
        config=ft.KernelConfig("/proc/config.gz", {"CONFIG_IKHEADERS": "n"}),
        tracefs_mounted="/sys/kernel/tracing", tracefs="/sys/kernel/tracing",
        tracefs_private=False, btf=None, btf_error=None, kallsyms={}, filter_functions=None,
        filter_functions_error=None)
    base.update(kw)
    return doctor.Context(**base)


def test_headers_section_when_the_agent_links_them_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit 20, finding 5: no headers for this kernel but another version's tree: the agent
    as root links it in its own mount namespace, the unit gets it from the install's
    drop-in; the host-wide links are only an alternative."""
    mods = tmp_path / "modules"
    build = tmp_path / "src/linux-headers-6.1.0-56-amd64"
    common = tmp_path / "src/linux-headers-6.1.0-56-common"
    (build / "include/generated").mkdir(parents=True)
    (common / "include/linux").mkdir(parents=True)
    (common / "include/linux/kconfig.h").write_text("\n")
    (mods / "6.1.0-56-amd64").mkdir(parents=True)
    (mods / "6.1.0-56-amd64/build").symlink_to(build)
    (mods / "6.1.0-56-amd64/source").symlink_to(common)
    real = ft.probe_headers
    monkeypatch.setattr(ft, "probe_headers", lambda release: real(release, str(mods)))
    monkeypatch.setattr(ft, "apt_headers_package", lambda release: None)

    f = doctor.headers_section(_ctx())
    assert f.status == DEGRADED, f
    assert "bcc cannot compile" not in f.summary
    assert "links 6.1.0-56-amd64's in its own mount namespace" in f.summary
    fix = f.fix or ""
    assert "nothing to do for `sudo hopscope agent run`" in fix
    assert ("`hopscope install agent` writes "
            "/etc/systemd/system/hopscope-agent.service.d/headers.conf") in fix
    assert fix.index("hopscope install agent") < fix.index("or, host-wide instead: ")
    assert f"ln -sfn {build} /lib/modules/6.18.44-x/build" in fix
    assert f.details["stage"]["version"] == "6.1.0-56-amd64"

    # nothing to link: bcc cannot compile, the agent captures packets
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(ft, "probe_headers", lambda release: real(release, str(empty)))
    f = doctor.headers_section(_ctx())
    assert f.status == MISSING and "AF_PACKET" in f.summary


def test_agent_verdict_packets_only_without_tracepoints() -> None:
    """Audit 20, finding 6: AF_PACKET capture needs no tracepoints (nor bcc): the agent can
    run, packets only (exit 0, degraded), not "cannot run" (exit 1)."""
    ctx = _ctx(root=True)
    ctx.results.update({"tracepoints": False, "tc": True, "af_packet": True})
    f, code = doctor.agent_section(ctx, {})
    assert (code, f.status) == (doctor.EXIT_OK, DEGRADED), f
    assert "packets only (AF_PACKET capture)" in f.summary and f.details["can_run"]
    # from the plan: its reasons, and the fixes of the sections they are about
    ctx = _ctx(root=True)
    ctx.results.update({"tracepoints": True, "tc": True, "af_packet": True, "bcc": False,
                        "packet_source": ft.PACKETS_CAPTURE,
                        "packet_source_why": {"bcc": "bcc not importable"}})
    sections = {"bcc": Finding(MISSING, "bcc not importable", {}, "apt-get install python3-bpfcc"),
                "kernel_headers": Finding(DEGRADED, "linked by the agent", {}, "nothing to do")}
    f, code = doctor.agent_section(ctx, sections)
    assert (code, f.status) == (doctor.EXIT_OK, DEGRADED)
    assert f.summary.endswith("the BPF programs cannot be used: bcc not importable")
    assert f.fix == "apt-get install python3-bpfcc"
    ctx.results.update({"af_packet": False, "packet_source": ft.PACKETS_NONE})
    f, code = doctor.agent_section(ctx, sections)
    assert (code, f.status) == (doctor.EXIT_CANNOT_RUN, MISSING)
    ctx = _ctx(root=True)
    ctx.results.update({"tracepoints": False, "tc": True, "af_packet": False})
    assert doctor.agent_section(ctx, {})[1] == doctor.EXIT_CANNOT_RUN


def test_capabilities_fix_names_root_or_the_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit 20, finding 7: `agent run` refuses any uid but 0, so granting capabilities to
    another user is no fix: root, or the unit (uid 0 with its capabilities)."""
    monkeypatch.setattr(ft, "read_caps", lambda: {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN",
                                                  "CAP_NET_RAW"})
    monkeypatch.setattr(doctor.os, "geteuid", lambda: 65534)
    f = doctor.capabilities_section(_ctx(root=False))
    assert f.status == MISSING and "uid 65534" in f.summary
    fix = f.fix or ""
    assert "grant" not in fix
    assert "as root" in fix and "hopscope-agent unit" in fix
    for cap in ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_PTRACE"):
        assert cap in fix
    monkeypatch.setattr(doctor.os, "geteuid", lambda: 0)
    monkeypatch.setattr(ft, "read_caps", lambda: {"CAP_NET_RAW"})
    f = doctor.capabilities_section(_ctx())
    assert f.status == MISSING and f.fix == doctor.RUN_AS_ROOT


def test_unit_caps_are_the_units() -> None:
    unit = (Path(__file__).parent.parent / "systemd/hopscope-agent.service").read_text()
    line = next(x for x in unit.splitlines() if x.startswith("CapabilityBoundingSet="))
    assert tuple(line.split("=", 1)[1].split()) == doctor.UNIT_CAPS


def test_proxy_section_on_another_entry_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit 20, finding 9: the proxy's listener is looked for on --entry-port, not :80."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        ino = ft.netns_inode_of_name(None)
        monkeypatch.setattr(ft, "find_processes", lambda name, port=80: [ft.ProxyProcess(
            os.getpid(), name, name, ino, ft.proxy_listeners(os.getpid(), port))])
        f = doctor.proxy_section(_ctx(), "traefik", None, port)
        assert f.status == OK, f
        assert f.summary.endswith(f"listening on :{port} in this network namespace")
        assert f.details["entry_port"] == port
        f = doctor.proxy_section(_ctx(), "traefik", None)
        assert f.status == DEGRADED and "none listening on :80" in f.summary
        assert "--entry-port" in (f.fix or "")
    monkeypatch.setattr(ft, "find_processes", lambda name, port=80: [])
    f = doctor.proxy_section(_ctx(), "nginx", None)
    assert "`hopscope agent run --proxy NAME`" in (f.fix or "")


def test_cli_entry_port_reaches_the_proxy_check(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    def collect(**kw: Any) -> tuple[dict[str, Finding], int]:
        seen.append(kw)
        return {}, 0

    monkeypatch.setattr(doctor, "collect", collect)
    runner = CliRunner()
    assert runner.invoke(main, ["doctor", "--json", "--entry-port", "8080"]).exit_code == 0
    assert runner.invoke(main, ["doctor", "--json"]).exit_code == 0
    assert [kw["entry_port"] for kw in seen] == [8080, 80]
    res = runner.invoke(main, ["doctor", "--entry-port", "0"])
    assert res.exit_code == 2


def test_unknown_netns_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="ip netns list"):
        ft.check_netns(f"hopscope-no-such-{secrets.token_hex(3)}")


# -- facts of this machine (each gated on the kernel saying it should hold) -----------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    sections, code = doctor.collect()
    out = doctor.to_json(sections)
    out["_exit"] = code
    return out


def test_the_kernel_config_is_read_where_the_kernel_exposes_it() -> None:
    """The gates below are the kernel's own signs, not this config: a parser that read
    nothing would otherwise go unnoticed (doctor reports from it)."""
    cfg = _config()
    exposed = os.path.exists("/proc/config.gz") or os.path.exists(
        f"/boot/config-{ft.kernel_release()}")
    assert (cfg.source is not None) == exposed, cfg.error
    if exposed:
        assert cfg.value("CONFIG_BPF_SYSCALL") == "y" and cfg.value("CONFIG_NET") == "y"
        assert cfg.value("CONFIG_DEBUG_INFO_BTF") == (
            "y" if os.path.exists("/sys/kernel/btf/vmlinux") else "n")


#: perf's kprobe PMU: registered when the kernel has kprobe events
_HAS_KPROBES = os.path.isdir("/sys/bus/event_source/devices/kprobe")


@pytest.mark.skipif(_HAS_KPROBES, reason="kernel has kprobes")
def test_this_kernel_has_no_kprobes(report: dict[str, Any]) -> None:
    k = report["kprobes"]
    assert k["status"] == "missing"
    assert k["details"]["kprobe_events"] in (False, None)
    assert not k["details"]["usable"]
    assert "CONFIG_KPROBES not set" in k["summary"]


@pytest.mark.skipif(not os.path.exists("/sys/kernel/btf/vmlinux"), reason="no kernel BTF")
def test_this_kernel_has_btf(report: dict[str, Any]) -> None:
    assert report["btf"]["status"] == "ok"
    btf = ft.Btf.load()
    assert btf.find(ft.BTF_KIND_FUNC, "tcp_v4_connect") is not None
    if ft.kernel_version(ft.kernel_release()) >= (5, 17, 0):
        assert "NETFILTER_DROP" in ft.drop_reasons_from_btf(btf).values()


@needs_root
@pytest.mark.skipif(ft.kernel_version(ft.kernel_release()) < (5, 8, 0)
                    or not os.path.exists("/proc/sys/kernel/unprivileged_bpf_disabled"),
                    reason="no BPF ring buffer (kernel before 5.8, or no bpf(2))")
def test_ring_buffer_can_be_created(report: dict[str, Any]) -> None:
    assert ft.bpf_create_ringbuf().ok
    assert report["ringbuf"]["status"] == "ok"


@needs_root
@pytest.mark.skipif(ft.kernel_version(ft.kernel_release()) < (5, 17, 0),
                    reason="kfree_skb has drop reasons from 5.17")
def test_kfree_skb_and_its_drop_reasons(report: dict[str, Any]) -> None:
    tps = report["tracepoints"]["details"]["present"]
    assert tps["skb:kfree_skb"] and tps["sock:inet_sock_set_state"]
    dr = report["drop_reasons"]
    assert dr["status"] == "ok"
    assert "NETFILTER_DROP" in dr["details"]["reasons"].values()
    assert dr["details"]["key"]["NETFILTER_DROP"] == int(
        next(k for k, v in dr["details"]["reasons"].items() if v == "NETFILTER_DROP"))
    if dr["details"]["source"].startswith("tracefs"):
        assert dr["details"]["reason_field"] is True
        assert dr["details"].get("btf_agrees") in (True, None)


@needs_root
def test_tracefs_is_read_without_changing_mounts(report: dict[str, Any]) -> None:
    before = Path("/proc/mounts").read_text()
    with ft.private_tracefs() as path:
        if path is not None:
            assert os.path.isdir(os.path.join(path, "events", "sock"))
    assert Path("/proc/mounts").read_text() == before
    if report["tracefs"]["details"]["mounted_at"] is None:
        assert report["tracefs"]["status"] in ("degraded", "missing")
        assert "mount -t tracefs" in report["tracefs"]["fix"]


# -- the CLI ------------------------------------------------------------------------------


def _run_cli(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hopscope", "doctor", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                "--inh-caps=-all", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")


def _check_json(cp: subprocess.CompletedProcess[str], compile_test: bool = False
                ) -> dict[str, Any]:
    assert "Traceback" not in cp.stderr, cp.stderr
    doc = json.loads(cp.stdout)
    want = [s for s in doctor.SECTIONS if compile_test or s != "compile_test"]
    assert list(doc) == want
    for name, sec in doc.items():
        assert sec["status"] in ("ok", "missing", "degraded"), name
        assert isinstance(sec["details"], dict) and "fix" in sec, name
    return doc


@needs_root
def test_cli_json_as_root() -> None:
    cp = _run_cli("--json")
    doc = _check_json(cp)
    can_run = doc["agent"]["details"]["can_run"]
    assert cp.returncode == (0 if can_run else 1), cp.stderr
    if _cfg_is("CONFIG_NET_CLS_BPF", "y", "m") and _cfg_is("CONFIG_FTRACE_SYSCALLS", "y"):
        assert cp.returncode == 0  # tracepoints + tc: this kernel can run the agent


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to drop to nobody")
def test_cli_json_not_root_exits_77() -> None:
    cp = _run_cli("--json", user="65534")
    doc = _check_json(cp)
    assert cp.returncode == 77
    assert doc["kernel"]["details"]["release"] == ft.kernel_release()
    assert doc["capabilities"]["status"] == "missing"


def test_cli_unknown_netns_is_one_line() -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["doctor", "--netns", f"hsnope{secrets.token_hex(3)}"])
    assert res.exit_code == 2
    assert isinstance(res.exception, SystemExit)


@pytest.fixture
def own_netns() -> Iterator[tuple[str, str]]:
    """A namespace of this test: cni0 bridge, a veth pair, clsact + a hopscope filter."""
    from conftest import root_netns_problem

    problem = root_netns_problem()
    if problem:
        pytest.skip(problem)
    ns = f"hsdoc{os.getpid() % 100000}{secrets.token_hex(2)}"
    veth = f"veth{secrets.token_hex(4)}"
    prog_fd = None
    try:
        for cmd in (["ip", "netns", "add", ns],
                    ["ip", "-n", ns, "link", "add", "cni0", "type", "bridge"],
                    ["ip", "-n", ns, "link", "add", veth, "type", "veth", "peer", "name",
                     "podside0"],
                    ["ip", "-n", ns, "link", "set", veth, "master", "cni0"],
                    ["ip", "-n", ns, "link", "set", "podside0", "up"],
                    ["ip", "-n", ns, "link", "set", veth, "up"],
                    ["ip", "-n", ns, "link", "set", "cni0", "up"],
                    ["tc", "-n", ns, "qdisc", "add", "dev", veth, "clsact"]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=10)
        res = ft.bpf_load_trivial(ft.BPF_PROG_TYPE_SCHED_CLS, keep_fd=True)
        assert res.ok and res.fd is not None, res  # root loads a classifier on any kernel here
        prog_fd = res.fd
        from pyroute2 import NetNS

        with NetNS(ns) as ipr:
            idx = ipr.link_lookup(ifname="cni0")[0]
            ipr.tc("add", "clsact", idx)
            ipr.tc("add-filter", "bpf", idx, ":1", fd=prog_fd, name="hopscope_test",
                   parent="ffff:fff2", classid=1, direct_action=True)
        yield ns, veth
    finally:
        if prog_fd is not None:
            os.close(prog_fd)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=10)


@pytest.mark.requires_root_netns
def test_netns_roles(own_netns: tuple[str, str]) -> None:
    ns, veth = own_netns
    runner = CliRunner()
    res = runner.invoke(main, ["doctor", "--json", "--netns", ns])
    assert res.exit_code in (0, 1), res.output
    doc = json.loads(res.stdout)
    sec = doc["interfaces"]
    assert sec["details"]["netns"] == ns
    by_name = {i["name"]: i for i in sec["details"]["interfaces"]}
    assert by_name["cni0"]["role"] == ft.ROLE_POD_BRIDGE
    assert by_name[veth]["role"] == ft.ROLE_POD_VETH
    assert by_name[veth]["master"] == "cni0"
    assert by_name[veth]["tc"]["clsact"] and by_name[veth]["tc"]["filters"] == []
    assert by_name["podside0"]["role"] == ft.ROLE_OTHER
    # a sched_cls program named hopscope_test hangs off cni0's ingress
    assert by_name["cni0"]["tc"]["clsact"]
    assert by_name["cni0"]["tc"]["hopscope_filters"] == ["ingress:bpf:hopscope_test"]
    assert sec["status"] == "degraded" and "hopscope tc filters" in sec["summary"]
    # exactly the namespace's interfaces: none of the root namespace's
    assert set(by_name) == {"lo", "cni0", veth, "podside0"}
    # the pod point is watched at the veth, not at the bridge too
    assert veth in sec["details"]["watched"] and "cni0" not in sec["details"]["watched"]
    text = runner.invoke(main, ["doctor", "--netns", ns]).stdout
    cni = next(line for line in text.splitlines() if line.strip().startswith("cni0 "))
    assert "not watched: its pod veths are" in cni, text
