"""``hopscope agent run``: the live agent of one node.

Start-up (in this order): a private mount namespace for tracefs and headers
(:func:`~hopscope.agent.bpfprog.prepare_kernel_env`), stale tc filters of a
killed agent removed, ``bpf/agent.c`` compiled and loaded, the node's
network namespace allowed in the tracepoint filters, the proxy's processes
found (psutil, by name, in this namespace; re-scanned as it restarts), tc
classifiers attached to the interfaces by role (re-scanned as pod veths
come and go). Then, until SIGTERM/SIGINT: the ring buffer is drained in
batches, decoded into observations, held back a few milliseconds so that
events of different CPUs are fed in time order, and fed to the node's
tracker; settled requests are stitched (``--local``) and/or the
observations are shipped to the collector. On stop every tc filter is
removed and the BPF object is closed; counters of what was sent and lost
are logged per source.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hopscope.agent import bpfprog
from hopscope.agent import events as ev
from hopscope.agent import features as ft

from hopscope.model import Observation
from hopscope.stitch import Stitcher

log = logging.getLogger(__name__)

#: events are fed once they are this old: the ring buffer interleaves CPUs
REORDER_NS = 3_000_000
RESCAN_S = 2.0
CLOCK_EVERY_S = 1.0
POINTS_ATTACHED = {"nic", "overlay", "underlay", "pod", "nic+underlay"}


@dataclass
class AgentConfig:
    node: str
    local: bool = False
    out: str | None = None  # write the envelope (JSON) here on stop
    proxy: str = "traefik"
    entry_port: int = 80
    interfaces: dict[str, str] = field(default_factory=dict)  # name -> point (override)
    duration: float = 0.0  # 0: until signalled
    ship: Any = None  # a ShipConfig-like object for the collector, or None
    ready_file: str | None = None  # written once everything is attached
    record: str | None = None  # append every observation batch here (msgpack)
    settings: bpfprog.Settings = field(default_factory=bpfprog.Settings)


def clock_sample() -> tuple[int, int]:
    """(CLOCK_MONOTONIC, CLOCK_REALTIME) read as close together as possible (ns)."""
    best: tuple[int, int, int] | None = None
    for _ in range(3):
        m0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        r = time.clock_gettime_ns(time.CLOCK_REALTIME)
        m1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if best is None or m1 - m0 < best[0]:
            best = (m1 - m0, (m0 + m1) // 2, r)
    assert best is not None
    return best[1], best[2]


def wanted_interfaces(override: dict[str, str]) -> dict[int, ev.Iface]:
    """ifindex -> interface to attach to, by role (or as ``override`` names them)."""
    ifaces, by_name = ft.discover_interfaces()
    if override:
        return {by_name[n]: ev.Iface(n, p) for n, p in override.items() if n in by_name}
    out: dict[int, ev.Iface] = {}
    for i in ifaces:
        if i.point in POINTS_ATTACHED and i.state.upper() != "DOWN":
            out[by_name[i.name]] = ev.Iface(i.name, i.point)
    return out


def proxy_tgids(name: str, netns: int) -> list[int]:
    return sorted(p.pid for p in ft.find_processes(name) if p.netns_inode == netns)


class LiveShip:
    """Ship observation batches to the collector from a background thread."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.q: queue.Queue[tuple[list[Observation], list[tuple[int, int]], dict[str, int]] | None] \
            = queue.Queue(maxsize=256)
        self.dropped = 0
        self.t = threading.Thread(target=self._main, name="hopscope-ship", daemon=True)
        self.t.start()

    def put(self, obs: list[Observation], clock: list[tuple[int, int]], lost: dict[str, int]
            ) -> None:
        try:
            self.q.put_nowait((obs, clock, lost))
        except queue.Full:
            self.dropped += len(obs)

    def close(self, timeout: float = 10.0) -> None:
        self.q.put(None)
        self.t.join(timeout)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # the agent goes on stitching/recording locally
            log.error("shipping stopped: %s", exc)

    async def _run(self) -> None:
        import tempfile

        from hopscope.agent.ship import Shipper
        from hopscope.collector import wire
        from hopscope.collector.spool import Spool

        spool_dir = self.cfg.spool_dir or tempfile.mkdtemp(prefix="hopscope-spool-")
        loop = asyncio.get_running_loop()
        with Spool(Path(spool_dir)) as spool:
            sh = Shipper(self.cfg, spool)
            while True:
                item = await loop.run_in_executor(None, self._get)
                if item is None:
                    break
                if item is _TICK:
                    await sh.pump()
                    continue
                obs, clock, lost = item
                lost = {**lost, **sh.spool_lost(), "ship_queue": self.dropped}
                frame = wire.encode_batch(sh.agent, sh.seq, self.cfg.node, time.time_ns(), obs,
                                          clock=clock, lost=lost, max_frame=sh.max_frame)
                spool.append(sh.seq, frame)
                sh.seq += 1
                await sh.pump()
            deadline = time.monotonic() + 10
            while len(spool) and time.monotonic() < deadline:
                await sh.pump(until_empty=True)
                if len(spool):
                    await asyncio.sleep(0.2)
            if sh.writer is not None:
                await wire.close_writer(sh.writer)

    def _get(self) -> Any:
        try:
            return self.q.get(timeout=0.5)
        except queue.Empty:
            return _TICK


_TICK = object()


class Agent:
    def __init__(self, cfg: AgentConfig, emit: Callable[[dict[str, Any]], None] | None = None
                 ) -> None:
        self.cfg = cfg
        self.emit = emit
        self.netns = bpfprog.netns_inode()
        self.prog: bpfprog.AgentProgram | None = None
        self.ring: Any = None
        self.ifaces: dict[int, ev.Iface] = {}
        self.offset = 0
        self.clock: list[tuple[int, int]] = []
        self.pending: list[Observation] = []
        self.stitcher = Stitcher([cfg.node])
        self.tracker = self.stitcher.tracker(cfg.node)
        #: stitch here (for --local and --out); requests are kept only for --out
        self._stitching = cfg.local or bool(cfg.out)
        self.requests: list[dict[str, Any]] = []
        self.nrequests = 0
        self.final_stats: dict[str, int] = {}
        self.decode_errors = 0
        self.observations = 0
        self.ship: LiveShip | None = None
        self._stop = False
        self.sources: dict[str, str] = {}
        self._record: Any = None
        if cfg.record:
            import msgpack

            self._record = open(cfg.record, "wb")  # noqa: SIM115 - closed in close()
            self._packer = msgpack.Packer()

    # -- set-up ------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        bpfprog.remove_stale()
        fmt = ft.find_tracefs()
        reasons: dict[int, str] = {}
        if fmt:
            text = ft._read_text(os.path.join(ft.tracepoint_dir(fmt, "skb:kfree_skb"), "format"))
            reasons = ft.parse_drop_reasons(text) if text else {}
        not_specified = next((k for k, v in reasons.items() if v == "NOT_SPECIFIED"), 2)
        cfg.settings.drop_reason_min = not_specified
        cfg.settings.entry_port = cfg.entry_port
        self.prog = bpfprog.AgentProgram(cfg.settings)
        self.prog.allow_netns([self.netns])
        self._rescan(first=True)
        from hopscope.agent.ringbuf import RingReader

        self.ring = RingReader(self.prog.ring_fd(), self.prog.ring_size)
        self._sample_clock()
        self.decoder = ev.Decoder(cfg.node, self.ifaces, lambda: self.offset, reasons)
        self.sources = {
            "packets": "tc clsact (bpf/tc.c) on " + ", ".join(
                f"{f.name}={f.point}" for f in self.ifaces.values()),
            "kernel_in": "tracepoint tcp:tcp_probe on entry-port sockets",
            "proxy": f"syscalls:sys_enter_write* of {cfg.proxy} + tc egress in its thread",
            "drops": "tracepoint skb:kfree_skb (reasons from its format file)",
        }
        for k, v in self.sources.items():
            log.info("source %s: %s", k, v)
        if cfg.ship is not None:
            self.ship = LiveShip(cfg.ship)
        if cfg.ready_file:
            Path(cfg.ready_file).write_text(json.dumps({"pid": os.getpid(),
                                                        "sources": self.sources}))

    def _rescan(self, first: bool = False) -> None:
        assert self.prog is not None
        try:
            want = wanted_interfaces(self.cfg.interfaces)
        except Exception as exc:
            log.warning("interface scan failed: %s", exc)
            return
        for idx in list(self.prog.attached):
            if idx not in want:
                log.info("interface %s gone", self.prog.attached[idx].name)
                self.prog.detach(idx)
                self.ifaces.pop(idx, None)
        for idx, itf in want.items():
            if idx not in self.prog.attached:
                try:
                    self.prog.attach(idx, itf.name, itf.point)
                    self.ifaces[idx] = itf
                except bpfprog.AgentError as exc:
                    log.warning("%s", exc)
        tg = proxy_tgids(self.cfg.proxy, self.netns)
        self.prog.set_proxy_tgids(tg)
        if first and not tg:
            log.warning("no %s process in this network namespace yet: the proxy sub-hop "
                        "waits for it", self.cfg.proxy)

    def _sample_clock(self) -> None:
        mono, real = clock_sample()
        self.offset = real - mono
        self.clock.append((mono, real))

    # -- the loop ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop = True

    def run(self) -> None:
        self.start()
        cfg = self.cfg
        t_end = time.monotonic() + cfg.duration if cfg.duration else None
        next_scan = next_clock = next_take = time.monotonic()
        try:
            while not self._stop:
                now = time.monotonic()
                if t_end is not None and now >= t_end:
                    break
                self.ring.wait(0.05)
                self.ring.drain(self._handle)
                self._feed(final=False)
                if now >= next_clock:
                    self._sample_clock()
                    next_clock = now + CLOCK_EVERY_S
                if now >= next_take:
                    self._take()
                    next_take = now + 0.2
                if now >= next_scan:
                    self._rescan()
                    next_scan = now + RESCAN_S
        finally:
            self.close()

    def _handle(self, buf: Any, recs: list[tuple[int, int]]) -> None:
        self.decode_errors += self.decoder.decode(buf, recs, self.pending)

    def _feed(self, final: bool) -> None:
        if not self.pending:
            return
        p = self.pending
        p.sort(key=_mono)
        if final:
            ready, self.pending = p, []
        else:
            cut = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - REORDER_NS
            i = len(p)
            while i and p[i - 1].ts_mono_ns > cut:
                i -= 1
            ready, self.pending = p[:i], p[i:]
        if not ready:
            return
        self.observations += len(ready)
        if self._record is not None:
            self._record.write(self._packer.pack(ready))
        if self._stitching:
            self.tracker.feed(ready)
        if self.ship is not None:
            clock, self.clock = self.clock, []
            self.ship.put(ready, clock, self.lost())

    def _take(self, final: bool = False) -> None:
        if not self._stitching:
            return
        st = self.stitcher
        st.add(self.cfg.node, self.tracker.take(final=final))
        reqs = st.drain(final=final)
        self.nrequests += len(reqs)
        for r in reqs:
            if self.cfg.out:
                self.requests.append(r)
            if self.emit is not None:
                self.emit(r)

    def lost(self) -> dict[str, int]:
        s = self.prog.stats() if self.prog is not None else {}
        out = {k: v for k, v in s.items() if k.endswith("_lost")}
        out["decode_errors"] = self.decode_errors
        return out

    def close(self) -> None:
        try:
            if self.ring is not None:
                self.ring.drain(self._handle)
            self._feed(final=True)
            self._take(final=True)
        finally:
            if self.prog is not None:
                stats = self.prog.stats()
                self.prog.close()
                self.prog = None
                log.info("detached; events %s", json.dumps(stats, sort_keys=True))
                self.final_stats = stats
            if self.ring is not None:
                self.ring.close()
                self.ring = None
            if self.ship is not None:
                self.ship.close()
            if self._record is not None:
                self._record.close()
        if self.cfg.out:
            reqs, drops = self.stitcher.finish()
            env = self.stitcher.envelope(self.requests + list(reqs), drops)
            env["agent"] = {"node": self.cfg.node, "sources": self.sources,
                            "events": self.final_stats,
                            "observations": self.observations,
                            "decode_errors": self.decode_errors}
            tmp = self.cfg.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(env, f)
            os.replace(tmp, self.cfg.out)


def read_record(path: str) -> list[Observation]:
    """The observations an agent wrote with ``--record``."""
    import msgpack

    out: list[Observation] = []
    with open(path, "rb") as f:
        for batch in msgpack.Unpacker(f, use_list=False):
            out.extend(Observation(*o) for o in batch)
    return out


def _mono(o: Observation) -> int:
    return o.ts_mono_ns


def run_agent(cfg: AgentConfig, emit: Callable[[dict[str, Any]], None] | None = None) -> Agent:
    """Set up the mounts, run until signalled (or ``duration``), detach. Returns the agent."""
    for n in bpfprog.prepare_kernel_env():
        log.info("%s", n)
    agent = Agent(cfg, emit)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()
    return agent


def print_request(r: dict[str, Any]) -> None:
    from hopscope.render import waterfall

    sys.stdout.write(waterfall(r) + "\n")
    sys.stdout.flush()
