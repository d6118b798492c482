"""The VM's kernel offers what the production probe path needs (runs inside the VM).

* kprobes exist, and IPVS loads and takes a virtual service in a namespace;
* ``hopscope doctor --json`` reports kprobes usable, every kprobe target present,
  IPVS, and kernel headers matching the running kernel;
* bcc compiles, loads and attaches a kprobe on ``tcp_v4_connect`` that fires on a
  loopback connection in a network namespace;
* the hopscope package is laid out as pyproject.toml's package-dir maps it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

#: Modules holding kprobe targets of the agent (``ip_vs_conn_new`` and friends are
#: only in kallsyms once their module is loaded).
TARGET_MODULES = ("ip_vs", "nf_tables", "ip_tables", "vxlan")


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert cp.returncode == 0, f"{' '.join(argv)} exited {cp.returncode}: {cp.stderr.strip()}"
    return cp


def test_running_in_the_vm() -> None:
    assert os.environ.get("HOPSCOPE_IN_VM") == "1"
    assert os.geteuid() == 0
    assert os.uname().release.endswith("-amd64"), os.uname().release  # Debian's stock kernel


def test_kprobes_available() -> None:
    assert (Path("/sys/kernel/tracing/kprobe_events").exists()
            or Path("/sys/bus/event_source/devices/kprobe").is_dir())


def test_ipvs_virtual_service_in_a_namespace(netns: str) -> None:
    run(["modprobe", "ip_vs"])
    assert Path("/proc/net/ip_vs").exists()
    ns = ["ip", "netns", "exec", netns]
    try:
        run([*ns, "ipvsadm", "-A", "-t", "10.43.0.10:8000", "-s", "rr"])
        run([*ns, "ipvsadm", "-a", "-t", "10.43.0.10:8000", "-r", "10.42.1.5:8000", "-m"])
        listing = run([*ns, "ipvsadm", "-Ln"]).stdout
        assert "TCP  10.43.0.10:8000 rr" in listing, listing
        assert "10.42.1.5:8000" in listing and "Masq" in listing, listing
        root = run(["ipvsadm", "-Ln"]).stdout
        assert "10.43.0.10:8000" not in root, "the virtual service leaked into the root netns"
    finally:
        subprocess.run([*ns, "ipvsadm", "-C"], capture_output=True, timeout=20)


def test_doctor_reports_kprobes_ipvs_and_matching_headers() -> None:
    for mod in TARGET_MODULES:
        run(["modprobe", mod])
    cp = subprocess.run([sys.executable, "-m", "hopscope", "doctor", "--json"],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, f"doctor exited {cp.returncode}: {cp.stderr.strip()}"
    report = json.loads(cp.stdout)
    release = os.uname().release

    assert report["kernel"]["details"]["release"] == release
    kp = report["kprobes"]
    assert kp["details"]["usable"] is True, kp["summary"]
    assert kp["details"]["kprobe_events"] or kp["details"]["kprobe_pmu"], kp["details"]
    absent = [t for t, v in kp["details"]["targets"].items()
              if not (v["kallsyms"] or v["available_filter_functions"])]
    assert not absent, f"kprobe targets absent: {absent}"
    assert kp["status"] == "ok", kp["summary"]

    assert report["ipvs"]["status"] == "ok", report["ipvs"]["summary"]

    hd = report["kernel_headers"]
    assert hd["status"] == "ok", hd["summary"]
    assert hd["details"]["present"] is True
    assert hd["details"]["matches"] is True, hd["details"]
    assert hd["details"]["version"] == release


CONNECT_PROG = r"""
#include <uapi/linux/ptrace.h>
BPF_HASH(hits, u32, u64);
int on_tcp_v4_connect(struct pt_regs *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    hits.increment(tgid);
    return 0;
}
"""

#: Run in the namespace: listen on 127.0.0.1, connect to it once, print the pid.
CLIENT = r"""
import os, socket
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
cli = socket.create_connection(srv.getsockname(), timeout=5)
conn, _ = srv.accept()
cli.sendall(b"x"); assert conn.recv(1) == b"x"
print(os.getpid())
"""


def test_bcc_kprobe_on_tcp_v4_connect_fires(netns: str) -> None:
    from bcc import BPF

    b = BPF(text=CONNECT_PROG.encode())
    try:
        b.attach_kprobe(event=b"tcp_v4_connect", fn_name=b"on_tcp_v4_connect")
        assert b.num_open_kprobes() == 1
        cp = run(["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT])
        pid = int(cp.stdout.strip())
        hits = {k.value: v.value for k, v in b[b"hits"].items()}
        assert hits.get(pid, 0) == 1, f"pid {pid}: hits {hits}"
    finally:
        b.cleanup()


def test_hopscope_package_layout() -> None:
    """vm/layout.py put the packages where pyproject.toml's package-dir maps them."""
    import tomllib

    from hopscope.agent import events

    import hopscope

    setuptools = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]
    pkg_root = Path(hopscope.__file__).parent.parent
    for pkg, rel in setuptools["package-dir"].items():
        dest = pkg_root.joinpath(*pkg.split("."))
        assert dest.is_dir(), f"{pkg} (from {rel}/) not laid out at {dest}"
        assert {p.name for p in Path(rel).iterdir() if p.name != "__pycache__"} <= \
            {p.name for p in dest.iterdir()}, f"{dest} lacks files of {rel}/"
    # the agent finds its BPF sources
    assert (events.BPF_DIR / "hopscope.h").is_file(), events.BPF_DIR
    # the console script (test_doctor_* runs `python -m hopscope`)
    assert "doctor" in run(["hopscope", "--help"]).stdout
