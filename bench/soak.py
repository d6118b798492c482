#!/usr/bin/env python3
"""Soak: does anything of hopscope grow while the replica is driven for a long time?

One replica (``hopscope.testbed.build.replica``, a fresh ``hssk<hex>-``
prefix, access logs off), always torn down, and in it what a cluster runs:

* ``hopscope collector serve`` in the replica's internet namespace (its
  SQLite store, raw batches and stitcher, ``--reference node1``), with its
  HTTP API;
* ``hopscope agent run --collector`` on every node, in the node's namespace,
  shipping to it with a spool on disk (as a node does);
* load for ``--minutes``: ``hopscope testbed traffic`` generators, one after
  the other (each at most 5 minutes), ``--concurrency`` connections (2: 1,000
  to 1,500 requests/s here, by the hour), a tenth of the requests on a new connection:
  steady, and within what the collector stitches on this 2-CPU machine
  beside the replica (a backlog that grows because the collector is too
  slow would be a capacity figure, not a leak).

Every ``--interval`` seconds it samples:

* each agent's and the collector's ``VmRSS`` and ``RssAnon`` (kB), open file
  descriptors and threads (``/proc/PID``);
* the entries of the agents' per-flow BPF maps (``follow``, ``hs_wait``:
  LRU hashes, counted key by key with ``BPF_MAP_GET_NEXT_KEY``) and the
  ``follow_open`` counter beside the ``follow`` entries it counts (a drift
  of the counter would cost the fast path, never an event);
* the agents' spool directories (bytes not yet acked by the collector);
* the collector's ``/health`` (requests stored, batches waiting for the
  stitcher) and its lag: how long ago the newest stored request started
  (``/requests?limit=1``; the replica's nodes share this machine's clock).

Growth is judged on what should stay flat once the replica is warm: the
median of the last third of the samples against the median of the middle
third (the first third is warm-up), with the least-squares slope over the
last two thirds, per hour. A series "grows" when the last third is above the
middle third by more than 5 % and more than its floor (2 MB of memory, 4
file descriptors, 2 threads, 1,000 map entries, 1 MB of spool, 100 batches
waiting, 2 s of lag).

At the end the generators' requests (sent, answered) are compared with what
the collector stitched once it went quiet (``hopscope_requests_total`` on
``/metrics``: the store keeps fewer once ``--max-db-bytes``, 1 GiB, prunes
it), the store's size is reported per request (the database with its WAL,
and the raw batches kept for a restart), and the agents' lost events (their
counters when they stop). A series that grows is a result, not an error:
the exit status is non-zero only when the bench itself fails.

    python bench/soak.py                      # 10 minutes, a sample every 30 s
    python bench/soak.py --minutes 60 --interval 60
    python bench/soak.py --json > soak.json   # the table goes to stderr
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
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import agent_overhead as ao  # bench/, beside this script
from hopscope.agent import bpfsys

from hopscope.errors import HopscopeError
from hopscope.testbed import build, netns
from hopscope.testbed.agents import READY_TIMEOUT_S, AgentSet
from hopscope.testbed.topology import Instance

REPO = Path(__file__).resolve().parent.parent
COLLECTOR_PORT, HTTP_PORT = 7000, 7001
GEN_MAX_S = 300.0  # one generator's run; the next one follows
QUIET_S = 60.0  # after the load: how long the collector may take to store everything
#: the agents' per-flow maps whose entries are counted (the rest are fixed-size arrays)
FLOW_MAPS = ("follow", "hs_wait")
#: series -> the growth below which it counts as flat (in the series' unit)
FLOORS = {"rss_kb": 2048, "anon_kb": 2048, "fds": 4, "threads": 2, "entries": 1000,
          "spool_bytes": 1 << 20, "backlog": 100, "follow_drift": 1000, "lag_ms": 2000}
GROWTH_SHARE = 0.05

log = logging.getLogger("soak")


# --------------------------------------------------------------------------
# /proc and the agents' maps


def proc_sample(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon (kB), open fds and threads of a process."""
    out = ao.process_status(pid, ("VmRSS", "RssAnon", "Threads"))
    return {"rss_kb": out.get("VmRSS", 0), "anon_kb": out.get("RssAnon", 0),
            "threads": out.get("Threads", 0), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


_MAP_GET_FD_BY_ID = 14
# the head of struct bpf_map_info: type, id, key_size, value_size, max_entries, flags, name
_MAP_INFO = struct.Struct("<IIIIII16s")


@dataclass
class MapRef:
    """One BPF map of an agent's, by id: opened for each sample and closed after, so that
    the soak holds none of the agent's maps between samples."""

    id: int
    name: str
    key_size: int
    value_size: int


def _map_fd(map_id: int) -> int:
    attr = ctypes.create_string_buffer(struct.pack("<I", map_id), 16)
    fd = bpfsys._bpf(_MAP_GET_FD_BY_ID, attr)
    if fd < 0:
        raise HopscopeError(f"BPF map {map_id}: cannot open it by id ({os.strerror(-fd)})")
    return fd


def agent_maps(pid: int) -> dict[str, MapRef]:
    """The maps (by name) of an agent's programs: those it holds an fd of (the ring buffer,
    the counters, the few it updates) and every map of a program that shares one of them
    (``bpftool prog show``: the per-flow maps only its programs hold)."""
    ids: set[int] = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:bpf-map":
                continue
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        ids.add(int(info["map_id"]))
    cp = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                        timeout=30, check=True)
    for prog in json.loads(cp.stdout or "[]"):
        used = set(prog.get("map_ids", ()))
        if used & ids:
            ids |= used
    out: dict[str, MapRef] = {}
    for i in sorted(ids):
        fd = _map_fd(i)
        try:
            buf = ctypes.create_string_buffer(_MAP_INFO.size)
            attr = ctypes.create_string_buffer(
                struct.pack("<IIQ", fd, _MAP_INFO.size, ctypes.addressof(buf)), 16)
            if bpfsys._bpf(bpfsys.OBJ_GET_INFO_BY_FD, attr) < 0:
                continue
            _t, mid, ks, vs, _n, _fl, raw = _MAP_INFO.unpack(buf.raw)
            name = raw.rstrip(b"\0").decode(errors="replace")
            out[name] = MapRef(mid, name, ks, vs)
        finally:
            os.close(fd)
    return out


def count_entries(m: MapRef) -> int:
    """Entries of a hash map, key by key (``BPF_MAP_GET_NEXT_KEY``)."""
    fd = _map_fd(m.id)
    try:
        key = ctypes.create_string_buffer(m.key_size)
        nxt = ctypes.create_string_buffer(m.key_size)
        attr = ctypes.create_string_buffer(32)
        n, first = 0, True
        while True:
            struct.pack_into("<I4xQQ", attr, 0, fd, 0 if first else ctypes.addressof(key),
                             ctypes.addressof(nxt))
            if bpfsys._bpf(bpfsys.MAP_GET_NEXT_KEY, attr) < 0:
                return n  # ENOENT: the last key
            n, first = n + 1, False
            ctypes.memmove(key, nxt, m.key_size)
    finally:
        os.close(fd)


def read_s64(m: MapRef) -> int:
    """Element 0 of an array map of one signed 64-bit value."""
    fd = _map_fd(m.id)
    try:
        key = ctypes.create_string_buffer(4)
        val = ctypes.create_string_buffer(m.value_size)
        attr = ctypes.create_string_buffer(32)
        struct.pack_into("<I4xQQ", attr, 0, fd, ctypes.addressof(key), ctypes.addressof(val))
        r = bpfsys._bpf(bpfsys.MAP_LOOKUP_ELEM, attr)
        if r < 0:
            raise HopscopeError(f"BPF map {m.name}: lookup failed ({os.strerror(-r)})")
        return int(struct.unpack_from("<q", val.raw)[0])
    finally:
        os.close(fd)


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it is gone)."""
    n = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                n += os.lstat(os.path.join(root, f)).st_size
    return n


# --------------------------------------------------------------------------
# The collector and the load


@dataclass
class Collector:
    proc: subprocess.Popen[bytes]
    ns: str
    http: str  # ADDR:PORT
    db: Path
    log: Path

    def get(self, path: str) -> dict[str, Any]:
        """``GET path`` of its API (its event loop may be busy stitching for seconds)."""
        def get() -> dict[str, Any]:
            with urllib.request.urlopen(f"http://{self.http}{path}", timeout=60) as r:
                return dict(json.loads(r.read()))
        return netns.call_in_netns(self.ns, get)

    def health(self) -> dict[str, Any]:
        return self.get("/health")

    def stitched(self) -> int:
        """Requests this process stitched (``hopscope_requests_total``, by status: what
        ``--max-db-bytes`` pruned from the store still counts)."""
        def get() -> str:
            with urllib.request.urlopen(f"http://{self.http}/metrics", timeout=60) as r:
                return str(r.read().decode())
        text = netns.call_in_netns(self.ns, get)
        return sum(int(float(m.group(1))) for m in _REQUESTS_TOTAL.finditer(text))

    def lag_ms(self) -> int:
        """How far behind the newest stored request starts (ms; -1: none stored yet): the
        replica's nodes share this machine's clock."""
        reqs = self.get("/requests?limit=1").get("requests") or []
        if not reqs:
            return -1
        return (time.time_ns() - int(reqs[-1]["start_ns"])) // 1_000_000

    def store_bytes(self) -> int:
        return self.db_bytes() + self.raw_bytes()

    def db_bytes(self) -> int:
        """The database with its WAL (the stored requests, drops, offsets, batch index)."""
        return sum(p.stat().st_size for p in self.db.parent.iterdir()
                   if p.name.startswith(self.db.name) and p.is_file())

    def raw_bytes(self) -> int:
        """The raw batches' segment files (kept ``--raw-keep``, 15 min)."""
        return tree_bytes(self.db.parent / f"{self.db.name}.batches")


_REQUESTS_TOTAL = re.compile(r"^hopscope_requests_total\{[^}]*\} (\S+)$", re.M)


@contextlib.contextmanager
def running_collector(inst: Instance, work: Path) -> Iterator[Collector]:
    """``hopscope collector serve`` in the replica's internet namespace until the body
    ends; :data:`agent_overhead.SINK` points the agents at it."""
    ns, gw = inst.topology.ns("inet"), inst.topology.public_gw
    token = work / "token"
    token.write_text(os.urandom(24).hex())
    token.chmod(0o600)
    db, logf = work / "store" / "collector.db", work / "collector.log"
    db.parent.mkdir(parents=True)
    with open(logf, "wb") as lf:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "hopscope", "collector", "serve",
             "--listen", f"{gw}:{COLLECTOR_PORT}", "--http", f"{gw}:{HTTP_PORT}",
             "--token-file", str(token), "--db", str(db), "--reference", "node1"],
            stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, cwd=REPO)
    c = Collector(proc, ns, f"{gw}:{HTTP_PORT}", db, logf)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError):
                c.health()
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise HopscopeError("the collector did not start: "
                                    + logf.read_text(errors="replace")[-300:])
            time.sleep(0.1)
        spool = work / "spool"
        spool.mkdir()
        ao.SINK = ao.Sink(proc, f"{gw}:{COLLECTOR_PORT}", token, work / "frames", spool)
        yield c
    finally:
        ao.SINK = None
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Load:
    """Generators, one after the other, until ``end`` (monotonic)."""

    inst: Instance
    end: float
    concurrency: int
    work: Path
    proc: subprocess.Popen[bytes] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)

    def step(self) -> None:
        """Collect a finished generator; start the next one while time is left."""
        if self.proc is not None:
            if self.proc.poll() is None:
                return
            k = len(self.runs)
            out = (self.work / f"gen-{k}.json").read_text()
            if self.proc.returncode != 0:
                raise HopscopeError(f"load generator {k} exited {self.proc.returncode}: "
                                    + (self.work / f"gen-{k}.log").read_text()[-300:])
            self.runs.append(json.loads(out))
            self.proc = None
        left = self.end - time.monotonic()
        if left < 1.0:
            return
        k = len(self.runs)
        with open(self.work / f"gen-{k}.json", "wb") as so, \
                open(self.work / f"gen-{k}.log", "wb") as se:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hopscope", "testbed", "traffic", "--prefix",
                 self.inst.prefix, "--duration", f"{min(left, GEN_MAX_S):.1f}",
                 "--concurrency", str(self.concurrency), "--seed", str(k), "--json"],
                stdin=subprocess.DEVNULL, stdout=so, stderr=se, cwd=REPO)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def finish(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.proc is not None and time.monotonic() < deadline:
            self.step()
            time.sleep(0.2)
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            raise HopscopeError(f"a load generator still ran {timeout:.0f} s after the end")

    def totals(self) -> dict[str, int]:
        sent = sum(r["sent"] for r in self.runs)
        ok = sum(n for r in self.runs for s, n in r["by_status"].items()
                 if s in ("200", "201"))
        return {"sent": sent, "answered_ok": ok}


# --------------------------------------------------------------------------
# Samples and growth


def sample(t0: float, agents: AgentSet, maps: dict[str, dict[str, MapRef]],
           coll: Collector) -> dict[str, Any]:
    s: dict[str, Any] = {"t_s": round(time.monotonic() - t0, 1), "agents": {}}
    for node, a in agents.agents.items():
        if a.proc.poll() is not None:
            raise HopscopeError(f"the agent on {node} exited {a.proc.returncode}: see {a.log}")
        row = proc_sample(a.proc.pid)
        for name in FLOW_MAPS:
            if name in maps[node]:
                row[f"{name}_entries"] = count_entries(maps[node][name])
        if "follow_open" in maps[node] and "follow" in maps[node]:
            # the counter minus the entries it counts (|drift|: evictions push it up)
            row["follow_drift"] = read_s64(maps[node]["follow_open"]) - row["follow_entries"]
        assert ao.SINK is not None
        row["spool_bytes"] = tree_bytes(ao.SINK.spool / node)
        s["agents"][node] = row
    h = coll.health()
    s["collector"] = {**proc_sample(coll.proc.pid), "requests": int(h["requests"]),
                      "backlog": int(h.get("backlog") or 0), "lag_ms": coll.lag_ms(),
                      "store_bytes": coll.store_bytes()}
    return s


def _slope_per_h(pts: Sequence[tuple[float, float]]) -> float:
    if len(pts) < 2:
        return 0.0
    mt = statistics.fmean(t for t, _ in pts)
    mv = statistics.fmean(v for _, v in pts)
    den = sum((t - mt) ** 2 for t, _ in pts)
    return 0.0 if den == 0 else sum((t - mt) * (v - mv) for t, v in pts) / den * 3600


def growth(pts: Sequence[tuple[float, float]], floor: float) -> dict[str, Any]:
    """Middle third against last third (medians), the slope over both, and the verdict."""
    n = len(pts)
    mid, last = pts[n // 3: 2 * n // 3], pts[2 * n // 3:]
    if not mid or not last:
        return {"verdict": "too few samples"}
    m_mid = statistics.median(v for _, v in mid)
    m_last = statistics.median(v for _, v in last)
    d = m_last - m_mid
    grows = d > floor and d > GROWTH_SHARE * abs(m_mid)
    return {"first": pts[0][1], "middle": m_mid, "last": m_last, "max": max(v for _, v in pts),
            "slope_per_h": round(_slope_per_h(pts[n // 3:]), 1),
            "verdict": "GROWS" if grows else "flat"}


def analyse(samples: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """who (node or 'collector') -> series -> :func:`growth`."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    rows: dict[str, list[tuple[float, dict[str, int]]]] = {}
    for s in samples:
        for node, row in s["agents"].items():
            rows.setdefault(node, []).append((s["t_s"], row))
        rows.setdefault("collector", []).append((s["t_s"], s["collector"]))
    for who, rs in rows.items():
        keys = [k for k in rs[0][1] if k not in ("requests", "store_bytes")]
        out[who] = {}
        for k in keys:
            pts = [(t, float(abs(r[k]) if k == "follow_drift" else r[k])) for t, r in rs]
            floor = FLOORS["entries"] if k.endswith("_entries") else FLOORS.get(k, 0)
            out[who][k] = growth(pts, floor)
    return out


# --------------------------------------------------------------------------
# The run


def soak(inst: Instance, work: Path, minutes: float, interval: float, concurrency: int,
         out: TextIO) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    with running_collector(inst, work) as coll, contextlib.ExitStack() as stack:
        agents = ao.start_agents(inst, work / "agents", False)
        try:
            maps = {n: agent_maps(a.proc.pid) for n, a in agents.agents.items()}
            missing = {n: [m for m in (*FLOW_MAPS, "follow_open") if m not in ms]
                       for n, ms in maps.items()}
            if any(missing.values()):
                raise HopscopeError(f"the agents hold no fd of these maps: {missing}")
            t0 = time.monotonic()
            load = Load(inst, t0 + minutes * 60, concurrency, work)
            stack.callback(load.kill)
            load.step()
            next_at = t0
            while time.monotonic() < load.end:
                load.step()
                if time.monotonic() >= next_at:
                    s = sample(t0, agents, maps, coll)
                    samples.append(s)
                    a1 = s["agents"].get("node1", {})
                    print(f"[{s['t_s']:7.0f} s] stored {s['collector']['requests']:,} "
                          f"(lag {s['collector']['lag_ms'] / 1000:.1f} s), "
                          f"collector RSS {s['collector']['rss_kb'] / 1024:.1f} MB, "
                          f"node1 agent RSS {a1.get('rss_kb', 0) / 1024:.1f} MB, "
                          f"follow {a1.get('follow_entries')}, "
                          f"hs_wait {a1.get('hs_wait_entries')}", file=out, flush=True)
                    next_at += interval
                time.sleep(0.2)
            load.finish(60)
            samples.append(sample(t0, agents, maps, coll))  # at the end of the load
        finally:
            ao.stop_agents(agents)
        events = {n: ao.agent_events(a) for n, a in agents.agents.items()}
        totals = load.totals()
        deadline = time.monotonic() + QUIET_S
        n = coll.stitched()
        while time.monotonic() < deadline:  # stitched (idle flush: 5 s), stored
            time.sleep(2)
            n2 = coll.stitched()
            if n2 == n and n2 >= totals["sent"] and not coll.health().get("backlog"):
                break
            n = n2
        final = coll.health()
        stitched = coll.stitched()
        store, raw = coll.store_bytes(), coll.raw_bytes()
    lost = {n: sum(v for k, v in e.items() if "lost" in k) for n, e in events.items()}
    return {"samples": samples, "growth": analyse(samples), "load": totals,
            "load_runs": len(load.runs),
            "stitched": stitched, "stored": int(final["requests"]),
            "store_bytes": store, "raw_bytes": raw,
            "store_bytes_per_request": round(store / max(1, final["requests"]), 1),
            "raw_bytes_per_request": round(raw / max(1, final["requests"]), 1),
            "lost_events": lost, "agent_events": events,
            "feed_errors": final.get("feed_errors"), "decode_errors": final.get("decode_errors")}


def report(res: dict[str, Any], out: TextIO) -> None:
    def p(line: str = "") -> None:
        print(line, file=out)

    cfg = res["config"]
    p(f"soak: {cfg['minutes']:g} min of {cfg['concurrency']} connections on the replica "
      f"({res['cpus']} CPUs, kernel {res['kernel']}), a sample every {cfg['interval']:g} s "
      f"({len(res['samples'])} samples), {res['seconds']:.0f} s in all")
    ld = res["load"]
    p(f"requests: {ld['sent']:,} sent ({ld['answered_ok']:,} answered 200/201, "
      f"{ld['sent'] / (cfg['minutes'] * 60):,.0f}/s), {res['stitched']:,} stitched by the "
      f"collector ({res['stored']:,} still stored); lost events "
      f"{sum(res['lost_events'].values())} "
      f"({', '.join(f'{n} {v}' for n, v in sorted(res['lost_events'].items()))}); "
      f"feed errors {res['feed_errors']}, decode errors {res['decode_errors']}")
    p(f"store: {res['store_bytes'] / 2**20:,.1f} MB, {res['store_bytes_per_request']:,.0f} "
      f"bytes per stored request, of which the raw batches (kept 15 min) "
      f"{res['raw_bytes'] / 2**20:,.1f} MB, {res['raw_bytes_per_request']:,.0f} bytes; "
      f"the collector's --max-db-bytes (1 GiB) prunes the oldest beyond")
    p()
    p(f"{'who':10} {'series':16} {'first':>10} {'middle':>10} {'last':>10} {'max':>10} "
      f"{'slope/h':>10}  verdict")
    for who, series in sorted(res["growth"].items()):
        for k, g in series.items():
            if "middle" not in g:
                p(f"{who:10} {k:16} {g['verdict']}")
                continue
            p(f"{who:10} {k:16} {g['first']:>10,.0f} {g['middle']:>10,.0f} {g['last']:>10,.0f}"
              f" {g['max']:>10,.0f} {g['slope_per_h']:>10,.0f}  {g['verdict']}")
    grows = [f"{w}.{k}" for w, s in res["growth"].items() for k, g in s.items()
             if g.get("verdict") == "GROWS"]
    p()
    p("growing: " + (", ".join(grows) if grows else "nothing"))
    p(f"stitched every request sent: {'yes' if res['stitched'] >= ld['sent'] else 'NO'}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0,
                    help="minutes of load (default 10)")
    ap.add_argument("--interval", type=float, default=30.0,
                    help="seconds between samples (default 30)")
    ap.add_argument("--concurrency", type=int, default=2,
                    help="connections of the load generator (default 2)")
    ap.add_argument("--keep", type=Path,
                    help="keep the work directory (store, logs, samples) here")
    ap.add_argument("--json", action="store_true",
                    help="print the results as JSON on stdout (the table goes to stderr)")
    a = ap.parse_args(argv)
    if a.minutes <= 0 or a.interval <= 0 or a.concurrency < 1:
        ap.error("--minutes and --interval > 0, --concurrency >= 1")
    if a.minutes * 60 / a.interval < 6:
        ap.error("fewer than 6 samples: lengthen --minutes or shorten --interval")
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces, BPF)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = sys.stderr if a.json else sys.stdout
    signal.signal(signal.SIGTERM, ao._raise_interrupt)
    prefix = f"hssk{os.urandom(2).hex()}-"
    work_ctx = (contextlib.nullcontext(str(a.keep / prefix.rstrip("-"))) if a.keep
                else tempfile.TemporaryDirectory(prefix="hopscope-soak-"))
    t_start = time.monotonic()
    try:
        build.down(prefix)
        with work_ctx as wd, build.replica(prefix, access_log=False, progress=lambda m: print(
                f"replica: {m}", file=sys.stderr)) as inst:
            Path(wd).mkdir(parents=True, exist_ok=True)
            res = soak(inst, Path(wd), a.minutes, a.interval, a.concurrency, out)
            if a.keep:
                (Path(wd) / "soak.json").write_text(json.dumps(res, indent=1))
    except KeyboardInterrupt:
        print("soak: interrupted (replica torn down)", file=sys.stderr)
        return 130
    except (HopscopeError, OSError) as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    left = netns.list_namespaces(prefix)
    if left:
        print(f"soak: left behind: namespaces {left}", file=sys.stderr)
        return 1
    res.update({"prefix": prefix, "cpus": os.cpu_count(), "python": platform.python_version(),
                "kernel": platform.release(), "seconds": round(time.monotonic() - t_start, 1),
                "config": {"minutes": a.minutes, "interval": a.interval,
                           "concurrency": a.concurrency}})
    report(res, out)
    if a.json:
        json.dump(res, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
