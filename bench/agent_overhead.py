#!/usr/bin/env python3
"""Agent overhead: the replica's throughput at saturation with the live agents and without.

One replica (``hopscope.testbed.build.replica``, a fresh ``hsbo<hex>-``
prefix, access logs off) for the whole run, always torn down. Each round
runs two phases, in ABBA order (the first arm alternates between rounds, so
that a drift of the machine's speed cancels):

* ``baseline``: no agent;
* ``agents``: ``hopscope agent run --collector`` on every node, each in its
  node's namespace, started (compiled, attached, ready) before the phase and
  stopped after it, so that neither start-up nor stop is measured. They ship
  as on a node (spool on disk) to ``bench/_sink.py``, a collector that acks
  and keeps the frames (in memory) but stitches nothing, in the replica's
  internet namespace; its CPU is left out of the replica's, as the
  generators' is. ``--via record`` gives them ``--record`` files on disk
  instead. Not ``--out``: that makes the agent stitch in-process, which a
  production agent leaves to the collector (``--stitch-in-agent`` measures
  it anyway).

In each phase ``--clients`` load generators (``hopscope testbed traffic``,
each a Python process with ``--concurrency`` connections, Cloudflare's
headers, a unique CF-Ray per request) drive the replica's three public
addresses for ``--warmup`` + ``--seconds`` + 1 s; the measured window is
the ``--seconds`` in the middle. In it:

* requests: answered 200/201 with their last byte inside the window, from
  the generators' per-request records; req/s = requests / window;
* CPU: the machine's busy time (``/proc/stat``: user, nice, system, irq,
  softirq, steal), the generators' and the agents' processes' user + system
  (``/proc/PID/stat``, the agents' waited-for children included); the
  replica's CPU is the machine's minus the generators';
* BPF: with ``kernel.bpf_stats_enabled=1`` (set for the run, restored
  after), ``run_time_ns`` and ``run_cnt`` of every program the agents hold
  (``/proc/PID/fdinfo``; names from ``bpftool prog show``) and of every
  program attached through a perf event they hold (their tracepoints and
  kprobes, which after the agent's re-exec hold no program fd: ids from
  ``bpftool perf show``, named by what they are attached to);
* memory: each agent's VmRSS, VmHWM and RssAnon at the end of the window;
* the floor: an empty classifier (``bench/_noop_tc.py``) attached in front of
  the agents' filters on the same interfaces during the agents phases (it
  hands every packet on): its run time per run is what any classifier costs
  there before doing anything (``--no-noop-beside`` leaves it out).

After an agents phase every agent's record (the sink's frames) is stitched together
(``hopscope.testbed.agents.stitch_records``) and every request a generator
got a 200/201 for must be there, without ``incomplete``/``no_response``.

Targets (the issue's): throughput with agents / without >= 0.97 (median of
the per-round ratios; goal 0.99); agent CPU (processes + BPF) <= 2 % of the
replica's CPU per request; BPF <= 150 ns per run of each program; agent
RSS <= 80 MB; every request stitched. A missed target is a result, not an
error: the exit status is non-zero only when the bench itself fails.

    python bench/agent_overhead.py                        # 7 rounds of 8 s per arm, ~5 min
    python bench/agent_overhead.py --rounds 3 --seconds 5
    python bench/agent_overhead.py --calibrate            # req/s by number of generators
    python bench/agent_overhead.py --json > overhead.json # the table goes to stderr
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _noop_tc  # bench/, beside this script
from hopscope.agent import bpfsys

from hopscope.errors import HopscopeError
from hopscope.testbed import build, netns
from hopscope.testbed.agents import (
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    AgentProc,
    AgentSet,
    remove_stale_in,
    stitch_records,
)
from hopscope.testbed.topology import Instance

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
#: the empty classifier attached in front of the agents' in their phases (None: not)
NOOP_FD: int | None = None
OK_STATUS = (200, 201)
BAD_FLAGS = {"incomplete", "no_response"}
ARMS = ("baseline", "agents")
SETTLE_S = 1.0  # after the agents are ready (and before a baseline phase, alike)
TAIL_S = 1.0  # the generators keep sending this long after the window
CLIENT_GRACE_S = 45.0  # a generator's last request may take its timeout
#: unattributed busy time above this (in either arm of a round): the machine was shared
#: (2.5 % without agents, 9.5 % with them, in a round that had the machine to itself)
OTHER_WARN = 0.15

TARGET_RATIO = 0.97
GOAL_RATIO = 0.99
TARGET_CPU_SHARE = 0.02
TARGET_BPF_NS = 150.0
TARGET_RSS_MB = 80.0

log = logging.getLogger("agent_overhead")


# --------------------------------------------------------------------------
# /proc and the BPF counters


def machine_busy_ticks() -> int:
    """Busy clock ticks of all CPUs since boot: /proc/stat without idle and iowait."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return user + nice + system + irq + softirq + steal


def process_ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks of a process (all its threads) and of its waited-for
    children."""
    with open(f"/proc/{pid}/stat") as f:
        utime, stime, cutime, cstime = (int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15])
    return utime + cutime, stime + cstime


def total_ticks(pids: Iterable[int]) -> int:
    return sum(sum(process_ticks(p)) for p in pids)


STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "voluntary_ctxt_switches")


def process_status(pid: int, keys: Sequence[str] = STATUS_KEYS) -> dict[str, int]:
    """The ``keys`` of ``/proc/PID/status`` as numbers (kB for memory): by default memory
    and voluntary context switches (of the main thread)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in keys:
                out[key] = int(rest.split()[0])
    return out


def bpf_programs(pid: int) -> dict[int, tuple[int, int]]:
    """prog id -> (run_time_ns, run_cnt) of every BPF program ``pid`` holds an fd of."""
    out: dict[int, tuple[int, int]] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # closed meanwhile
            continue
        out[int(info["prog_id"])] = (int(info.get("run_time_ns", 0)),
                                     int(info.get("run_cnt", 0)))
    return out


def perf_attached(pids: Sequence[int]) -> dict[int, dict[int, str]]:
    """pid -> {id: what it is attached to} of the BPF programs attached through perf
    events it holds (its tracepoints and kprobes: after the agent's re-exec it holds their
    perf event fds, no longer the programs'), from ``bpftool perf show``."""
    out: dict[int, dict[int, str]] = {p: {} for p in pids}
    try:
        cp = subprocess.run(["bpftool", "-j", "perf", "show"], capture_output=True, text=True,
                            timeout=30, check=True)
        rows = json.loads(cp.stdout or "[]")
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("bpftool perf show: %s: the tracepoint programs are not counted", exc)
        return out
    for r in rows:
        if r.get("pid") in out and "prog_id" in r:
            what = r.get("tracepoint") or r.get("func") or r.get("fd_type", "perf")
            out[r["pid"]][int(r["prog_id"])] = f"{r.get('fd_type', 'perf')}:{what}"
    return out


_PROG_GET_FD_BY_ID = 13


def program_stats(prog_id: int) -> tuple[int, int] | None:
    """(run_time_ns, run_cnt) of a BPF program by id (None when it is gone)."""
    attr = ctypes.create_string_buffer(struct.pack("<I", prog_id), 16)
    fd = bpfsys._bpf(_PROG_GET_FD_BY_ID, attr)
    if fd < 0:
        return None
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
    finally:
        os.close(fd)
    return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))


def bpf_program_names(ids: Sequence[int]) -> dict[int, str]:
    """Names of BPF programs by id (``bpftool``; ``prog<id>`` when it cannot tell)."""
    names: dict[int, str] = {}
    try:
        cp = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                            timeout=30, check=True)
        for p in json.loads(cp.stdout or "[]"):
            names[int(p["id"])] = str(p.get("name", "")).removeprefix("tracepoint__")
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("bpftool prog show: %s", exc)
    return {i: names.get(i) or f"prog{i}" for i in ids}


def bpf_programs_alive(ids: Sequence[int]) -> list[int]:
    """Which of these BPF program ids still exist."""
    return [i for i in ids
            if subprocess.run(["bpftool", "prog", "show", "id", str(i)],
                              capture_output=True).returncode == 0]


@contextlib.contextmanager
def bpf_stats(enable: bool) -> Iterator[None]:
    """``kernel.bpf_stats_enabled=1`` while the body runs; the old value restored after."""
    if not enable:
        yield
        return
    old = BPF_STATS.read_text().strip()
    BPF_STATS.write_text("1\n")
    try:
        yield
    finally:
        BPF_STATS.write_text(old + "\n")


# --------------------------------------------------------------------------
# Agents and load generators


#: more arguments for every agent (``--decode-here``)
AGENT_EXTRA: list[str] = []


@dataclass
class Sink:
    """The collector the agents ship to (``bench/_sink.py``, in the replica's internet)."""

    proc: subprocess.Popen[bytes]
    addr: str  # ADDR:PORT
    token: Path
    out: Path  # where it writes each node's frames (tmpfs: a collector is off the node)
    spool: Path  # the agents' spools (on disk, as a node's state directory is)


#: the sink, in ``--via ship`` runs (its CPU is left out of the replica's, as the generators')
SINK: Sink | None = None
SINK_PORT = 7000


@contextlib.contextmanager
def running_sink(inst: Instance, work: Path) -> Iterator[Sink]:
    """``bench/_sink.py`` in the replica's internet namespace until the body ends."""
    global SINK
    spool = Path(tempfile.mkdtemp(prefix="hopscope-overhead-spool-"))
    token = work / "token"
    token.write_text(os.urandom(24).hex())
    token.chmod(0o600)
    out, ready = work / "sink", work / "sink.ready"
    addr = f"{inst.topology.public_gw}:{SINK_PORT}"
    with open(work / "sink.log", "wb") as lf:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", inst.topology.ns("inet"), sys.executable,
             str(REPO / "bench" / "_sink.py"), "--listen", addr, "--token-file", str(token),
             "--out", str(out), "--ready-file", str(ready)],
            stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, cwd=REPO)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise HopscopeError("the collector sink did not start: "
                                    + (work / "sink.log").read_text(errors="replace")[-300:])
            time.sleep(0.05)
        if int(ready.read_text()) != proc.pid:
            raise HopscopeError(f"the collector sink runs as pid {ready.read_text()}")
        SINK = Sink(proc, addr, token, out, spool)
        yield SINK
    finally:
        SINK = None
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(spool, ignore_errors=True)


def start_agents(inst: Instance, out_dir: Path, stitch_in_agent: bool) -> AgentSet:
    """``hopscope agent run`` on every node, all launched, then all awaited: shipping to
    the sink when it runs (:data:`SINK`), else with ``--record``.

    Like :func:`hopscope.testbed.agents.start_agent`, without ``--out``
    unless ``stitch_in_agent``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    s = AgentSet()
    ready: dict[str, Path] = {}
    try:
        for node in (n.name for n in inst.topology.nodes):
            ns = inst.ns(node)
            rec, logf = out_dir / f"agent-{node}.obs", out_dir / f"agent-{node}.log"
            out = out_dir / f"agent-{node}.json"
            ready[node] = out_dir / f"agent-{node}.ready"
            argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "hopscope", "-v", "agent",
                    "run", "--node", node, "--ready-file", str(ready[node])]
            if SINK is not None:  # shipped: the sink's frames become the record after the stop
                argv += ["--collector", SINK.addr, "--token-file", str(SINK.token),
                         "--spool", str(SINK.spool / node)]
            else:
                argv += ["--record", str(rec)]
            if stitch_in_agent:
                argv += ["--out", str(out)]
            argv += AGENT_EXTRA
            with open(logf, "wb") as lf:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                        cwd=REPO)
            s.agents[node] = AgentProc(node, ns, proc, out, rec, logf)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for node, a in s.agents.items():
            while not ready[node].exists():
                if a.proc.poll() is not None or time.monotonic() > deadline:
                    tail = a.log.read_text(errors="replace").strip().splitlines()[-3:]
                    raise HopscopeError(f"agent on {node} did not start: " + " | ".join(tail))
                time.sleep(0.05)
            # `ip netns exec` execs the agent: the pid we hold must be the agent's own
            pid = json.loads(ready[node].read_text())["pid"]
            if pid != a.proc.pid:
                raise HopscopeError(f"agent on {node} runs as pid {pid}, not {a.proc.pid}")
    except BaseException:
        stop_agents(s)
        raise
    return s


def stop_agents(s: AgentSet) -> None:
    """SIGTERM every agent at once (they drain and detach in parallel), once: a second
    one may find the interpreter exiting with the default handler back. Clean up after
    one that had to be killed. With the sink, each node's frames (every batch acked
    before its agent exits) become the agent's record file."""
    for a in s.agents.values():
        if a.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(a.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for a in s.agents.values():
        try:
            rc = a.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            a.proc.kill()
            rc = a.proc.wait()
        if rc != 0:
            log.warning("agent on %s exited %s: removing its filters", a.node, rc)
            remove_stale_in(a.ns)
        if SINK is not None:
            with contextlib.suppress(FileNotFoundError):
                shutil.move(SINK.out / f"{a.node}.frames", a.record)


_EVENTS = re.compile(r"detached; events (\{.*\})")


def agent_events(a: AgentProc) -> dict[str, int]:
    """The per-source event counters the agent logged when it stopped."""
    m = _EVENTS.search(a.log.read_text(errors="replace"))
    return json.loads(m.group(1)) if m else {}


@dataclass
class Load:
    clients: int
    concurrency: int
    new_conn_ratio: float
    warmup: float
    seconds: float


@dataclass
class Client:
    proc: subprocess.Popen[bytes]
    records: Path
    log: Path


def start_clients(inst: Instance, load: Load, out_dir: Path, seed: int) -> list[Client]:
    duration = load.warmup + load.seconds + TAIL_S
    out: list[Client] = []
    try:
        for k in range(load.clients):
            rec, logf = out_dir / f"client-{k}.jsonl", out_dir / f"client-{k}.log"
            argv = [sys.executable, "-m", "hopscope", "testbed", "traffic",
                    "--prefix", inst.prefix, "--duration", f"{duration:g}",
                    "--concurrency", str(load.concurrency),
                    "--new-conn-ratio", f"{load.new_conn_ratio:g}",
                    "--seed", str(seed + k), "--out", str(rec), "--json"]
            with open(logf, "wb") as lf:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                        cwd=REPO)
            out.append(Client(proc, rec, logf))
    except BaseException:
        kill_clients(out)
        raise
    return out


def kill_clients(clients: Sequence[Client]) -> None:
    for c in clients:
        if c.proc.poll() is None:
            c.proc.kill()
        c.proc.wait()


def wait_clients(clients: Sequence[Client], timeout: float) -> list[list[dict[str, Any]]]:
    """Wait for the generators; the records of each."""
    deadline = time.monotonic() + timeout
    try:
        for k, c in enumerate(clients):
            rc = c.proc.wait(max(0.1, deadline - time.monotonic()))
            if rc != 0:
                raise HopscopeError(f"load generator {k} exited {rc}: see {c.log}")
    except subprocess.TimeoutExpired as exc:
        raise HopscopeError(f"a load generator still ran after {timeout:.0f} s") from exc
    finally:
        kill_clients(clients)
    out = []
    for c in clients:
        with open(c.records) as f:
            out.append([json.loads(line) for line in f])
    return out


# --------------------------------------------------------------------------
# One phase


@dataclass
class Snapshot:
    mono: float
    wall_ns: int
    busy: int  # the machine's busy ticks
    clients: int  # the generators' ticks (and the collector sink's)
    replica: int  # ticks of the replica's processes (Traefik, pods)
    agents: dict[str, tuple[int, int]]  # node -> the agent's (user, system) ticks
    status: dict[str, dict[str, int]]  # node -> the agent's memory and context switches
    bpf: dict[int, tuple[int, int]]  # prog id -> (run_time_ns, run_cnt), the agents' programs
    names: dict[int, str] = field(default_factory=dict)  # prog id -> name, at the end only


def snapshot(inst: Instance, clients: Sequence[Client], agents: AgentSet | None,
             perf: dict[int, dict[int, str]] | None = None, end: bool = False) -> Snapshot:
    """The counters, read back to back; at the window's ``end`` also the names of the
    agents' programs (while they still hold them). ``perf``: :func:`perf_attached`."""
    procs = agents.agents if agents is not None else {}
    bpf: dict[int, tuple[int, int]] = {}
    for a in procs.values():
        bpf.update(bpf_programs(a.proc.pid))
        for prog in (perf or {}).get(a.proc.pid, ()):
            st = program_stats(prog)
            if st is not None:
                bpf[prog] = st
    load = [c.proc.pid for c in clients] + ([SINK.proc.pid] if SINK is not None else [])
    s = Snapshot(time.monotonic(), time.time_ns(), machine_busy_ticks(),
                 total_ticks(load), total_ticks(inst.pids.values()),
                 {n: process_ticks(a.proc.pid) for n, a in procs.items()},
                 {n: process_status(a.proc.pid) for n, a in procs.items()}, bpf)
    if end and bpf:
        s.names = bpf_program_names(sorted(bpf))
        for progs in (perf or {}).values():
            s.names.update(progs)  # bcc's names of tracepoint programs are cut to 15 chars
    return s


@dataclass
class Phase:
    arm: str
    round: int
    seconds: float = 0.0
    requests: int = 0  # answered 200/201 inside the window
    errors: int = 0  # other answers and failures inside the window
    busy_cpu_s: float = 0.0  # the machine
    client_cpu_s: float = 0.0  # the load generators
    replica_procs_cpu_s: float = 0.0  # Traefik and the pods
    agent_cpu_s: dict[str, float] = field(default_factory=dict)  # node -> user + system
    agent_sys_s: float = 0.0  # of all agents, system time
    agent_wakeups: int = 0  # voluntary context switches of all agents
    bpf: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (ns, runs)
    noop: tuple[int, int] = (0, 0)  # the empty classifier beside the agents' (ns, runs)
    memory_kb: dict[str, dict[str, int]] = field(default_factory=dict)
    events: dict[str, dict[str, int]] = field(default_factory=dict)
    sent_ok: int = 0  # the whole phase: 200/201 answers
    stitched: int = 0  # of those, stitched without incomplete/no_response
    #: why the others were not: "missing", "incomplete", "no_response" -> count
    unstitched: dict[str, int] = field(default_factory=dict)
    unstitched_ids: list[str] = field(default_factory=list)  # a few CF-Rays, for the record
    stitch_seconds: float = 0.0
    coverage: str = "ok"
    bpf_ids: list[int] = field(default_factory=list)  # the agents' programs, for the clean-up check

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def replica_cpu_s(self) -> float:
        """The machine's busy time but the load generators'."""
        return self.busy_cpu_s - self.client_cpu_s

    @property
    def other_share(self) -> float:
        """What no replica process, agent or generator was charged with, of the machine's
        busy time: kernel work in between, and whatever else runs on the machine."""
        other = self.replica_cpu_s - self.replica_procs_cpu_s - sum(self.agent_cpu_s.values())
        return other / self.busy_cpu_s if self.busy_cpu_s else 0.0

    @property
    def agents_total_s(self) -> float:
        """The agents' processes plus their BPF programs' run time."""
        return sum(self.agent_cpu_s.values()) + sum(ns for ns, _ in self.bpf.values()) / 1e9

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(rps=round(self.rps, 1), replica_cpu_s=round(self.replica_cpu_s, 3),
                 agents_total_s=round(self.agents_total_s, 4),
                 other_share=round(self.other_share, 4))
        return d


def window_counts(recs: Sequence[dict[str, Any]], t0_ns: int, t1_ns: int) -> tuple[int, int]:
    ok = bad = 0
    for r in recs:
        if t0_ns <= r["t_end_ns"] < t1_ns:
            if r["status"] in OK_STATUS and not r["error"]:
                ok += 1
            else:
                bad += 1
    return ok, bad


def coverage(per_client: Sequence[Sequence[dict[str, Any]]], t0_ns: int, t1_ns: int) -> str:
    """"ok" when every generator was sending from before the window to after it."""
    for k, recs in enumerate(per_client):
        if not recs:
            return f"generator {k} sent nothing"
        first = min(r["t_start_real_ns"] for r in recs)
        last = max(r["t_end_ns"] for r in recs)
        if first > t0_ns:
            return f"generator {k} started {(first - t0_ns) / 1e9:.2f} s into the window"
        if last < t1_ns:
            return f"generator {k} stopped {(t1_ns - last) / 1e9:.2f} s before the window's end"
    return "ok"


def check_stitched(agents: AgentSet, recs: Sequence[dict[str, Any]], ph: Phase) -> None:
    """Every 200/201 of the phase stitched from the agents' records, cleanly."""
    t = time.monotonic()
    env = stitch_records(agents, list(agents.agents))
    got = {r["request_id"]: r for r in env["requests"]}
    want = [r["cf_ray"] for r in recs if r["status"] in OK_STATUS and not r["error"]]
    why: Counter[str] = Counter()
    for rid in want:
        flags = BAD_FLAGS & set(got[rid]["flags"]) if rid in got else {"missing"}
        why.update(flags)
        if flags and len(ph.unstitched_ids) < 5:
            ph.unstitched_ids.append(rid)
        ph.stitched += not flags
    ph.sent_ok, ph.unstitched = len(want), dict(why)
    ph.stitch_seconds = round(time.monotonic() - t, 2)


def run_phase(inst: Instance, arm: str, rnd: int, load: Load, d: Path, seed: int,
              stitch_in_agent: bool) -> Phase:
    """One arm's phase; the agents' and generators' files go to ``d``."""
    d.mkdir(parents=True)
    agents = start_agents(inst, d, stitch_in_agent) if arm == "agents" else None
    beside = None
    noop = (0, 0)
    try:
        if agents is not None and NOOP_FD is not None:
            beside = _noop_tc.NoopBeside(NOOP_FD, [inst.ns(n) for n in agents.agents])
            beside.__enter__()
        time.sleep(SETTLE_S)
        clients = start_clients(inst, load, d, seed)
        try:
            perf = perf_attached([a.proc.pid for a in agents.agents.values()]) \
                if agents is not None else None
            time.sleep(load.warmup)
            a = snapshot(inst, clients, agents, perf)
            n0 = _noop_tc.run_stats(NOOP_FD) if beside is not None else (0, 0)
            time.sleep(load.seconds)
            b = snapshot(inst, clients, agents, perf, end=True)
            if beside is not None:
                n1 = _noop_tc.run_stats(NOOP_FD)  # type: ignore[arg-type]
                noop = (n1[0] - n0[0], n1[1] - n0[1])
        except BaseException:
            kill_clients(clients)
            raise
        per_client = wait_clients(clients, load.seconds + TAIL_S + CLIENT_GRACE_S)
    finally:
        if beside is not None:
            beside.__exit__()
        if agents is not None:
            stop_agents(agents)
    recs = [r for rs in per_client for r in rs]
    ph = Phase(arm, rnd, seconds=b.mono - a.mono, busy_cpu_s=(b.busy - a.busy) / CLK_TCK,
               client_cpu_s=(b.clients - a.clients) / CLK_TCK,
               replica_procs_cpu_s=(b.replica - a.replica) / CLK_TCK,
               coverage=coverage(per_client, a.wall_ns, b.wall_ns))
    ph.requests, ph.errors = window_counts(recs, a.wall_ns, b.wall_ns)
    if agents is not None:
        ph.agent_cpu_s = {n: (sum(b.agents[n]) - sum(a.agents[n])) / CLK_TCK
                          for n in agents.agents}
        ph.agent_sys_s = sum(b.agents[n][1] - a.agents[n][1] for n in agents.agents) / CLK_TCK
        ph.agent_wakeups = sum(b.status[n]["voluntary_ctxt_switches"]
                               - a.status[n]["voluntary_ctxt_switches"] for n in agents.agents)
        ph.memory_kb = {n: {k: v for k, v in st.items() if k.startswith(("Vm", "Rss"))}
                        for n, st in b.status.items()}
        ph.bpf_ids = sorted(b.bpf)
        for prog, (ns1, cnt1) in b.bpf.items():  # same-named programs (one per agent) summed
            ns0, cnt0 = a.bpf.get(prog, (0, 0))
            ns, cnt = ph.bpf.get(b.names[prog], (0, 0))
            ph.bpf[b.names[prog]] = (ns + ns1 - ns0, cnt + cnt1 - cnt0)
        ph.events = {n: agent_events(x) for n, x in agents.agents.items()}
        ph.noop = noop
        check_stitched(agents, recs, ph)
    return ph


# --------------------------------------------------------------------------
# Summary and report


def lost_events(ph: Phase) -> int:
    return sum(v for ev in ph.events.values() for k, v in ev.items() if k.endswith("_lost"))


def cpu_share(ph: Phase) -> float:
    return ph.agents_total_s / ph.replica_cpu_s if ph.replica_cpu_s > 0 else float("nan")


def bpf_share(ph: Phase) -> float:
    ns = sum(ns for ns, _ in ph.bpf.values())
    return ns / 1e9 / ph.replica_cpu_s if ph.replica_cpu_s > 0 else float("nan")


def summarize(rounds: Sequence[tuple[Phase, Phase]]) -> dict[str, Any]:
    """The issue's figures, from (baseline, agents) phase pairs."""
    ratios = [ag.rps / base.rps for base, ag in rounds if base.rps]
    quiet = [ag.rps / base.rps for base, ag in rounds
             if base.rps and max(base.other_share, ag.other_share) <= OTHER_WARN]
    base_phases = [base for base, _ in rounds]
    agent_phases = [ag for _, ag in rounds]

    def total(phases: Sequence[Phase], what: str) -> float:
        return float(sum(getattr(p, what) for p in phases))

    req = total(agent_phases, "requests")
    agents_s = total(agent_phases, "agents_total_s")
    procs_s = sum(sum(p.agent_cpu_s.values()) for p in agent_phases)
    replica_s = total(agent_phases, "replica_cpu_s")
    processes_s = total(agent_phases, "replica_procs_cpu_s") + procs_s
    agent_seconds = total(agent_phases, "seconds") * len(agent_phases[0].agent_cpu_s)
    progs: dict[str, list[int]] = {}
    for p in agent_phases:
        for name, (ns, cnt) in p.bpf.items():
            acc = progs.setdefault(name, [0, 0])
            acc[0] += ns
            acc[1] += cnt
    bpf = {name: {"ns_per_run": ns / cnt if cnt else None, "runs_per_request": cnt / req,
                  "ns_per_request": ns / req, "runs": cnt}
           for name, (ns, cnt) in sorted(progs.items(), key=lambda kv: -kv[1][0])}
    noop_ns = sum(p.noop[0] for p in agent_phases)
    noop_runs = sum(p.noop[1] for p in agent_phases)
    # no runs counted: kernel.bpf_stats_enabled was off (--no-bpf-stats)
    worst = max((v["ns_per_run"] for v in bpf.values() if v["ns_per_run"] is not None),
                default=None)

    def mem_mb(key: str) -> float:
        return max((m.get(key, 0) for p in agent_phases for m in p.memory_kb.values()),
                   default=0) / 1024

    rss_mb = mem_mb("VmRSS")
    sent = sum(p.sent_ok for p in agent_phases)
    stitched = sum(p.stitched for p in agent_phases)
    share = agents_s / replica_s if replica_s else float("nan")
    median = statistics.median(ratios)
    return {
        "ratio": {"median": median, "min": min(ratios), "max": max(ratios),
                  "per_round": ratios, "target": TARGET_RATIO, "goal": GOAL_RATIO,
                  "quiet_rounds": len(quiet),
                  "quiet_median": statistics.median(quiet) if quiet else None,
                  "pass": median >= TARGET_RATIO, "goal_met": median >= GOAL_RATIO},
        "cpu": {"agents_us_per_request": agents_s / req * 1e6,
                "agent_processes_us_per_request": procs_s / req * 1e6,
                "agent_system_share": total(agent_phases, "agent_sys_s") / procs_s,
                "bpf_us_per_request": (agents_s - procs_s) / req * 1e6,
                "replica_us_per_request": replica_s / req * 1e6,
                "baseline_replica_us_per_request":
                    total(base_phases, "replica_cpu_s") / total(base_phases, "requests") * 1e6,
                "agent_wakeups_per_s": total(agent_phases, "agent_wakeups") / agent_seconds,
                "share": share, "share_per_round": [cpu_share(p) for p in agent_phases],
                "share_of_processes": agents_s / processes_s if processes_s else float("nan"),
                "other_share_max": max(p.other_share for p in base_phases + agent_phases),
                "target": TARGET_CPU_SHARE, "pass": share <= TARGET_CPU_SHARE},
        "bpf": {"programs": bpf if worst is not None else {}, "worst_ns_per_run": worst,
                "noop_ns_per_run": noop_ns / noop_runs if noop_runs else None,
                "noop_runs": noop_runs, "target": TARGET_BPF_NS,
                "pass": worst <= TARGET_BPF_NS if worst is not None else None},
        "rss": {"max_vmrss_mb": rss_mb, "max_vmhwm_mb": mem_mb("VmHWM"),
                "max_rssanon_mb": mem_mb("RssAnon"), "target": TARGET_RSS_MB,
                "pass": rss_mb <= TARGET_RSS_MB},
        "stitched": {"sent": sent, "stitched": stitched, "pass": stitched == sent,
                     "not": dict(sum((Counter(p.unstitched) for p in agent_phases), Counter()))},
        "lost_events": sum(lost_events(p) for p in agent_phases),
    }


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(res: dict[str, Any], rounds: Sequence[tuple[Phase, Phase]], out: TextIO) -> None:
    cfg = res["config"]

    def p(line: str = "") -> None:
        print(line, file=out)

    p()
    p(f"replica {res['prefix']}: {cfg['rounds']} rounds x {cfg['seconds']:g} s per arm (after"
      f" {cfg['warmup']:g} s of load), {cfg['clients']} load generators x {cfg['concurrency']}"
      f" connections, new-conn ratio {cfg['new_conn_ratio']:g}; agents: {cfg['agent_mode']};"
      f" {res['cpus']} CPUs, Python {res['python']}, kernel {res['kernel']}")
    p()
    p(f"{'round':>5} {'first':8} {'base req/s':>10} {'agent req/s':>11} {'ratio':>6}"
      f" {'agent CPU':>9} {'BPF':>6} {'other':>6} {'stitched/sent':>15} {'lost':>5}")
    for base, ag in rounds:
        first = ARMS[(ag.round - 1) % 2]
        other = max(base.other_share, ag.other_share)
        measured = any(cnt for _, cnt in ag.bpf.values())
        bpf = f"{bpf_share(ag):6.2%}" if measured else f"{'-':>6}"
        p(f"{ag.round:>5} {first:8} {base.rps:10,.0f} {ag.rps:11,.0f}"
          f" {ag.rps / base.rps:6.3f} {cpu_share(ag):9.2%} {bpf} {other:6.1%}"
          f" {f'{ag.stitched:,}/{ag.sent_ok:,}':>15} {lost_events(ag):5}")
    p("(agent CPU: the agents' processes + their BPF programs, as a share of the replica's CPU"
      " (the machine's but the generators') in the same window; BPF: the programs' part;"
      " other: the machine's busy time no replica process, agent or generator was charged"
      " with, the larger of the two arms; lost: events the ring buffers refused)")
    s = res["summary"]
    r, c, b, m, st = s["ratio"], s["cpu"], s["bpf"], s["rss"], s["stitched"]
    p()
    p(f"throughput with / without agents: median {r['median']:.3f} (min {r['min']:.3f},"
      f" max {r['max']:.3f}, {len(r['per_round'])} rounds); target >= {r['target']}:"
      f" {verdict(r['pass'])}; goal {r['goal']}: {'met' if r['goal_met'] else 'not met'}")
    p(f"agent CPU per request: {c['agents_us_per_request']:.1f} µs (processes"
      f" {c['agent_processes_us_per_request']:.1f}, {c['agent_system_share']:.0%} of it in the"
      f" kernel; BPF {c['bpf_us_per_request']:.1f}) of the replica's"
      f" {c['replica_us_per_request']:.1f} µs = {c['share']:.2%} (rounds"
      f" {min(c['share_per_round']):.2%} .. {max(c['share_per_round']):.2%}); target <="
      f" {c['target']:.0%}: {verdict(c['pass'])}")
    p(f"  of the CPU of the replica's processes alone (Traefik, pods, agents):"
      f" {c['share_of_processes']:.2%}; replica CPU per request without agents:"
      f" {c['baseline_replica_us_per_request']:.1f} µs; each agent woke up"
      f" {c['agent_wakeups_per_s']:,.0f} times a second")
    if b["worst_ns_per_run"] is None:
        p("BPF run time per program: not measured (kernel.bpf_stats_enabled off)")
    else:
        p(f"BPF run time per program (all agents, all rounds); target <= {b['target']:.0f} ns"
          f" per run: {verdict(b['pass'])} (worst {b['worst_ns_per_run']:.0f} ns)")
        p(f"  {'program':36} {'runs/req':>9} {'ns/run':>7} {'ns/req':>7}")
    for name, v in b["programs"].items():
        nsr = f"{v['ns_per_run']:7.0f}" if v["ns_per_run"] is not None else f"{'-':>7}"
        flag = "  > target" if v["ns_per_run"] and v["ns_per_run"] > b["target"] else ""
        p(f"  {name:36} {v['runs_per_request']:9.2f} {nsr} {v['ns_per_request']:7.0f}{flag}")
    if b.get("noop_ns_per_run") is not None:
        p(f"  an empty classifier in front of the agents' on the same interfaces and packets:"
          f" {b['noop_ns_per_run']:.0f} ns per run ({b['noop_runs']:,} runs): what any"
          " classifier costs here before it does anything (bench/tc_paths.py: the programs'"
          " own cost per path)")
    p(f"agent RSS (largest, end of window): VmRSS {m['max_vmrss_mb']:.1f} MB (RssAnon"
      f" {m['max_rssanon_mb']:.1f}, peak VmHWM {m['max_vmhwm_mb']:.1f}); target <="
      f" {m['target']:.0f} MB: {verdict(m['pass'])}")
    nots = ", ".join(f"{k} {v:,}" for k, v in sorted(st["not"].items()))
    p(f"stitched: {st['stitched']:,} of {st['sent']:,} requests answered 200/201 in the agents"
      f" phases{f' (not: {nots})' if nots else ''}: {verdict(st['pass'])}; events lost by the"
      f" ring buffers: {s['lost_events']:,}")
    if c["other_share_max"] > OTHER_WARN:
        qm = r["quiet_median"]
        quiet = (f"median of the {r['quiet_rounds']} rounds with other <= {OTHER_WARN:.0%}:"
                 f" {qm:.3f}" if qm is not None else f"no round had other <= {OTHER_WARN:.0%}")
        p(f"NOTE: up to {c['other_share_max']:.0%} of the machine's busy time went to no replica"
          " process, agent or generator: something else was running, and the throughput ratio"
          f" is mostly its noise ({quiet}); the CPU figures hold better")
    p("(every node's agent, Traefik and pod and the load generators share one machine:"
      " harsher than production)")


def report_calibration(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    print(f"\n{'generators':>10} {'conns':>6} {'req/s':>8} {'busy CPU':>9} {'generators':>11}"
          f" {'other':>6} {'replica µs/req':>15}", file=out)
    for r in rows:
        print(f"{r['clients']:>10} {r['concurrency']:>6} {r['rps']:8,.0f} {r['busy_pct']:8.0f}%"
              f" {r['client_pct']:10.0f}% {r['other_share']:6.1%} {r['replica_us']:15,.0f}",
              file=out)
    print("(busy CPU and generators: % of one CPU; other: of the busy time, what no replica"
          " process or generator was charged with)", file=out)


# --------------------------------------------------------------------------


def run_rounds(inst: Instance, n: int, load: Load, work: Path, keep: bool,
               stitch_in_agent: bool, bpf_ids: set[int]) -> list[tuple[Phase, Phase]]:
    """``n`` rounds of both arms, ABBA; the agents' program ids are added to ``bpf_ids``."""
    rounds: list[tuple[Phase, Phase]] = []
    for rnd in range(1, n + 1):
        order = ARMS if rnd % 2 else ARMS[::-1]
        got: dict[str, Phase] = {}
        for arm in order:
            d = work / f"r{rnd}-{arm}"
            got[arm] = ph = run_phase(inst, arm, rnd, load, d, 1000 * rnd, stitch_in_agent)
            bpf_ids.update(ph.bpf_ids)
            if ph.coverage != "ok":
                log.warning("round %d %s: %s", rnd, arm, ph.coverage)
            if not keep:  # the agents' records: ~10 MB a second each
                shutil.rmtree(d)
        base, ag = got["baseline"], got["agents"]
        rounds.append((base, ag))
        print(f"round {rnd}/{n} ({order[0]} first): baseline {base.rps:,.0f} req/s,"
              f" agents {ag.rps:,.0f} req/s, ratio {ag.rps / base.rps:.3f}; agents"
              f" {cpu_share(ag):.2%} of the replica's CPU; stitched"
              f" {ag.stitched:,}/{ag.sent_ok:,} ({ag.stitch_seconds:.1f} s); other"
              f" {max(base.other_share, ag.other_share):.0%}",
              file=sys.stderr, flush=True)
    return rounds


def calibrate(inst: Instance, load: Load, work: Path, keep: bool) -> list[dict[str, Any]]:
    """Baseline phases with 1 .. ``load.clients`` generators: where does req/s stop growing?"""
    rows = []
    for k in range(1, load.clients + 1):
        d = work / f"calibrate-{k}"
        ph = run_phase(inst, "baseline", k, replace(load, clients=k), d, 1000 * k, False)
        if not keep:
            shutil.rmtree(d)
        rows.append({"clients": k, "concurrency": load.concurrency, "rps": ph.rps,
                     "busy_pct": 100 * ph.busy_cpu_s / ph.seconds,
                     "client_pct": 100 * ph.client_cpu_s / ph.seconds,
                     "replica_us": ph.replica_cpu_s / ph.requests * 1e6,
                     "other_share": ph.other_share, "coverage": ph.coverage})
        print(f"{k} generator(s): {ph.rps:,.0f} req/s", file=sys.stderr, flush=True)
    return rows


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="rounds, each both arms (default 7)")
    ap.add_argument("--seconds", type=float, default=8.0,
                    help="measured seconds per arm and round (default 8)")
    ap.add_argument("--warmup", type=float, default=2.0,
                    help="seconds of load before the window (default 2)")
    ap.add_argument("--clients", type=int, default=2,
                    help="load generator processes (default 2)")
    ap.add_argument("--concurrency", type=int, default=16,
                    help="connections per load generator (default 16)")
    ap.add_argument("--new-conn-ratio", type=float, default=0.1,
                    help="probability of a new connection before a request (default 0.1)")
    ap.add_argument("--via", choices=("ship", "record"), default="ship",
                    help="how the agents hand their events on: to a collector (a sink that "
                         "acks and keeps the frames, in the replica's internet; default), or "
                         "--record files on the work directory's disk")
    ap.add_argument("--stitch-in-agent", action="store_true",
                    help="run the agents with --out too (they stitch in-process)")
    ap.add_argument("--decode-here", action="store_true",
                    help="run the agents with --decode-here: they decode their events and"
                         " record observations (wire v2), as before raw records (v3)")
    ap.add_argument("--no-bpf-stats", action="store_true",
                    help="leave kernel.bpf_stats_enabled alone (no BPF run times)")
    ap.add_argument("--no-noop-beside", action="store_true",
                    help="do not attach the empty classifier in front of the agents' (the"
                         " floor of a classifier's run, measured in place)")
    ap.add_argument("--calibrate", action="store_true",
                    help="baseline only: req/s with 1..--clients generators, then exit")
    ap.add_argument("--keep", type=Path,
                    help="keep the agents' logs and records and the generators' records here")
    ap.add_argument("--json", action="store_true",
                    help="print the results as JSON on stdout (the table goes to stderr)")
    a = ap.parse_args(argv)
    AGENT_EXTRA[:] = ["--decode-here"] if a.decode_here else []
    if a.rounds < 1 or a.clients < 1 or a.concurrency < 1 or a.seconds <= 0 or a.warmup < 0.5:
        ap.error("--rounds, --clients, --concurrency >= 1, --seconds > 0, --warmup >= 0.5")
    if os.geteuid() != 0:
        print("agent_overhead: needs root (network namespaces, BPF)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = sys.stderr if a.json else sys.stdout
    signal.signal(signal.SIGTERM, _raise_interrupt)

    global NOOP_FD
    if not (a.no_noop_beside or a.no_bpf_stats or a.calibrate):
        NOOP_FD = _noop_tc.load()  # before any namespace handle: inherited by all
    prefix = f"hsbo{os.urandom(2).hex()}-"
    load = Load(a.clients, a.concurrency, a.new_conn_ratio, a.warmup, a.seconds)
    # shipped: the frames the sink keeps go to memory (a collector is off the node; a
    # disk here would add the writeback of ~10 MB/s per agent that no node does)
    shm = "/dev/shm" if a.via == "ship" and os.path.isdir("/dev/shm") else None
    work_ctx = (contextlib.nullcontext(str(a.keep / prefix.rstrip("-"))) if a.keep
                else tempfile.TemporaryDirectory(prefix="hopscope-overhead-", dir=shm))
    rounds: list[tuple[Phase, Phase]] = []
    calibration: list[dict[str, Any]] = []
    bpf_ids: set[int] = set()
    t_start = time.monotonic()
    try:
        build.down(prefix)
        with work_ctx as wd, bpf_stats(not a.no_bpf_stats and not a.calibrate), \
                build.replica(prefix, access_log=False,
                              progress=lambda m: print(f"replica: {m}", file=sys.stderr)) as inst:
            if a.calibrate:
                calibration = calibrate(inst, load, Path(wd), a.keep is not None)
            else:
                Path(wd).mkdir(parents=True, exist_ok=True)
                with (running_sink(inst, Path(wd)) if a.via == "ship"
                      else contextlib.nullcontext()):
                    rounds = run_rounds(inst, a.rounds, load, Path(wd), a.keep is not None,
                                        a.stitch_in_agent, bpf_ids)
    except KeyboardInterrupt:
        print("agent_overhead: interrupted (replica torn down)", file=sys.stderr)
        return 130
    except (HopscopeError, OSError) as exc:  # OSError: a replica process gone, say
        print(f"agent_overhead: {exc}", file=sys.stderr)
        return 1
    left = netns.list_namespaces(prefix)
    alive = bpf_programs_alive(sorted(bpf_ids))
    if left or alive:
        print(f"agent_overhead: left behind: namespaces {left}, BPF programs {alive}",
              file=sys.stderr)
        return 1

    res: dict[str, Any] = {
        "prefix": prefix, "cpus": os.cpu_count(), "python": platform.python_version(),
        "kernel": platform.release(), "seconds": round(time.monotonic() - t_start, 1),
        "config": {"rounds": a.rounds, "seconds": a.seconds, "warmup": a.warmup,
                   "clients": a.clients, "concurrency": a.concurrency,
                   "new_conn_ratio": a.new_conn_ratio, "bpf_stats": not a.no_bpf_stats,
                   "via": a.via,
                   "agent_mode": " ".join(["--collector" if a.via == "ship" else "--record",
                                           *AGENT_EXTRA]
                                          + (["--out"] if a.stitch_in_agent else []))},
    }
    if a.calibrate:
        res["calibration"] = calibration
        report_calibration(calibration, out)
    else:
        res["summary"] = summarize(rounds)
        res["rounds"] = [{"baseline": b.to_dict(), "agents": g.to_dict()} for b, g in rounds]
        report(res, rounds, out)
    if a.json:
        json.dump(res, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
