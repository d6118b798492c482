"""``hopscope agent run``: the live agent of one node.

Start-up (in this order): a private mount namespace for tracefs and headers
(:func:`~hopscope.agent.bpfprog.prepare_kernel_env`), stale tc filters of a
killed agent removed, ``bpf/agent.c`` compiled and loaded, the node's
network namespace allowed in the tracepoint filters, the proxy's processes
found (by comm or argv[0] in /proc, in this namespace; re-scanned as it restarts), tc
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
import collections
import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hopscope.agent import bpfprog
from hopscope.agent import events as ev
from hopscope.agent import features as ft
from hopscope.agent.nfrules import RuleNamer
from hopscope.agent.pktbuf import PacketBuffer
from hopscope.agent.ringbuf import DISCARD

from hopscope import memtrim
from hopscope.errors import HopscopeError
from hopscope.model import KIND_DROP, Observation, Reorder
from hopscope.stitch import Stitcher

log = logging.getLogger(__name__)

#: events are fed once they are this old: the ring buffer interleaves CPUs
REORDER_NS = 3_000_000
#: a slow request's packets are written this long after it was stitched (its response's
#: last segments and the connection's close may follow the first byte of the response)
EXPORT_TAIL_NS = 1_000_000_000
#: AF_PACKET hands over a block when full or after its timeout: wait that long too
CAPTURE_REORDER_NS = 10_000_000
SOURCES = ("auto", "tc", "capture")
DRAIN_BATCH = 1 << 16  # records handed to the decoder at once (RingReader.drain's limit)
#: raw records (wire v3) are shipped in batches of at most this many bytes
RAW_BATCH_BYTES = 2 << 20
_DROP_KINDS = frozenset({ev.EV_DROP})
#: the frame cap of --record files written in raw mode (read back by read_record): under
#: 16 MiB, so that a frame's length prefix starts with a zero byte (no msgpack array does)
RECORD_MAX_FRAME = (1 << 24) - 1
_FAR = 1 << 62
NF_DROP = b"NETFILTER_DROP"
#: batches waiting for the shipping thread, at most (more are dropped, counted as
#: ``ship_queue``: the thread fell that far behind)
SHIP_QUEUE = 256
#: the shipping thread takes the batches queued for it this often (each wake-up of a
#: thread costs this VM about 60 µs of CPU before it does anything)
SHIP_POLL_S = 0.2
#: batches not yet acked kept in memory, not on disk, up to this many bytes (the spool's
#: memory tier): a kill -9 loses at most this much, a clean stop writes it to the spool
SPOOL_MEMORY = 16 << 20
#: at a stop, how long the shipping thread tries to hand the collector what it holds
#: before the spool keeps the rest (written to --spool's disk)
SHIP_DRAIN_S = 5.0
IPVS_FUNCS = {"ip_vs_schedule", "ip_vs_conn_new"}


def kprobes_available(tracefs: str | None) -> bool:
    """Can kprobes be attached here (kprobe_events in tracefs, or the kprobe PMU)?"""
    return bool((tracefs and os.path.exists(os.path.join(tracefs, "kprobe_events")))
                or os.path.isdir("/sys/bus/event_source/devices/kprobe"))
#: the loop drains its source this often: events are not woken up for one by one (the BPF
#: programs submit with BPF_RB_NO_WAKEUP), so an agent wakes ~10 times a second, not once
#: per burst of events (measured: 480-730 wake-ups a second had been half the agent's CPU;
#: a 20 ms loop cost the agents' processes 1.7 times a 50 ms one, and that 1.2 times this
#: one, whose batches are also half as many: bench/README.md)
LOOP_S = 0.1
#: ... and this soon after a drain that took more than a quarter of the ring buffer: a
#: burst gets the drain rate of a 10 ms loop (a 4 MiB ring then keeps up with ~400 MB/s)
LOOP_BUSY_S = 0.01
#: interfaces are scanned again when netlink says a link changed, and at least this often
RESCAN_S = 30.0
#: freed memory is given back to the kernel this often (hopscope.memtrim)
TRIM_S = 60.0
#: the proxy's known processes are checked this often (a full process scan only when one
#: is gone or none is known)
PROXY_CHECK_S = 2.0
CLOCK_EVERY_S = 1.0
#: the loss counters are read this often, and a warning says what was lost at most this
#: often (with what was lost since the last one, and how far the loop fell behind)
LOSS_CHECK_S = 1.0
LOSS_WARN_EVERY_S = 10.0


def next_tick_s(taken: int, ring_bytes: int) -> float:
    """How long the loop sleeps after a drain that took ``taken`` of ``ring_bytes``."""
    return LOOP_BUSY_S if taken > ring_bytes // 4 else LOOP_S


class LossWatch:
    """Turns the cumulative loss counters into at most one warning per ``every`` seconds,
    naming each source that lost events since the last warning, how many, and the
    longest the agent's loop was late meanwhile (a loop that falls behind lets the ring
    fill up; the single events once lost in the replica at saturation, with the ring far
    from full, were a torn consumer position, since fixed: docs/agent.md)."""

    def __init__(self, every: float = LOSS_WARN_EVERY_S) -> None:
        self.every = every
        self.seen: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self.next_warn = 0.0
        self.max_lag = 0.0

    def late(self, seconds: float) -> None:
        """The loop started an iteration ``seconds`` late."""
        self.max_lag = max(self.max_lag, seconds)

    def update(self, lost: Mapping[str, int], now: float) -> str | None:
        """The counters now; the warning to log, if one is due."""
        for k, v in lost.items():
            d = v - self.seen.get(k, 0)
            if d > 0:
                self.pending[k] = self.pending.get(k, 0) + d
            self.seen[k] = v
        if not self.pending or now < self.next_warn:
            return None
        what = ", ".join(f"{k.removesuffix('_lost')} {n}" for k, n in sorted(self.pending.items()))
        total = sum(v for k, v in self.seen.items() if k in self.pending)
        msg = (f"event=lost {what} (total {total}): events the BPF ring buffer refused (or, "
               "capture, packets the AF_PACKET ring had no room for); this"
               f" agent's loop was up to {self.max_lag * 1000:.0f} ms late meanwhile")
        self.pending = {}
        self.max_lag = 0.0
        self.next_warn = now + self.every
        return msg


@dataclass
class AgentConfig:
    node: str
    local: bool = False
    out: str | None = None  # write the envelope (JSON) here on stop
    proxy: str = "traefik"
    #: the proxy's syscalls traced (bpfprog.PROXY_CALLS; default Traefik's)
    proxy_calls: tuple[str, ...] = bpfprog.PROXY_CALLS_DEFAULT
    entry_port: int = 80
    #: the scheduling policy of the agent's threads: "batch" (SCHED_BATCH) or "normal"
    sched: str = "batch"
    interfaces: dict[str, str] = field(default_factory=dict)  # name -> point (override)
    duration: float = 0.0  # 0: until signalled
    ship: Any = None  # a ShipConfig-like object for the collector, or None
    ready_file: str | None = None  # written once everything is attached
    record: str | None = None  # append every observation batch here (msgpack)
    #: where packets come from: "tc" (BPF classifiers), "capture" (AF_PACKET, no BPF at
    #: all), "auto" (tc, or capture when the BPF programs cannot be loaded)
    source: str = "auto"
    #: recent packets kept (0: none) for exporting slow requests' packets
    packet_buffer: int = 20_000
    slow_pcap: str | None = None  # write the packets of slow requests here (pcapng)
    slower_than_ns: int = 500_000_000
    kprobes: bool = True  # use kprobes where the kernel has them
    #: decode the events here even when only the collector (or --record) needs them,
    #: shipping observations (wire v2: for a collector older than this agent)
    decode_here: bool = False
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


def wanted_interfaces(override: dict[str, str], ls: ft.Listing) -> dict[int, ev.Iface]:
    """ifindex -> interface to attach to, by role (or as ``override`` names them)."""
    by_name = {str(link["ifname"]): int(link["ifindex"]) for link in ls.links}
    if override:
        return {by_name[n]: ev.Iface(n, p) for n, p in override.items() if n in by_name}
    ifaces = ft.classify_interfaces(ls.links, ls.defaults, ls.addrs, ls.route_devs)
    return {by_name[i.name]: ev.Iface(i.name, i.point)
            for i in ft.attached_interfaces(ifaces)}


_Queued = tuple[list[Observation], list[tuple[int, int]], dict[str, int], "ev.RawEvents | None"]


class LiveShip:
    """Ship observation batches to the collector from a background thread.

    The thread runs an event loop that takes the batches :meth:`put` queued every
    :data:`SHIP_POLL_S`: no wake-up per batch, no executor thread. The spool keeps up
    to :data:`SPOOL_MEMORY` bytes of batches in memory (``Spool(memory_bytes=)``):
    with a collector that acks, nothing goes to disk. (Measured in the replica, py-spy:
    a queue read through ``run_in_executor`` per batch and a spool file per batch,
    written, read back and deleted, had been most of a shipping agent's CPU.)
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.dropped = 0
        self._pending: collections.deque[_Queued] = collections.deque()
        self._closing = False
        self._running = True
        #: at the end: batches the collector had not acked, and where they stayed
        self.left = 0
        self.kept_in: str | None = None
        self.t = threading.Thread(target=self._main, name="hopscope-ship", daemon=True)
        self.t.start()

    def put(self, obs: list[Observation], clock: list[tuple[int, int]], lost: dict[str, int],
            raw: ev.RawEvents | None = None, records: int = 0) -> None:
        """Queue a batch: observations, or (``raw``) drops and ``records`` raw events."""
        if not self._running or len(self._pending) >= SHIP_QUEUE:
            self.dropped += len(obs) + records  # stopped (logged there), or that far behind
        else:
            self._pending.append((obs, clock, lost, raw))

    def close(self, timeout: float = SHIP_DRAIN_S + 30) -> None:
        """Stop: the thread drains for SHIP_DRAIN_S, then the spool writes what memory holds
        (well within ``timeout``: a thread cut off then would lose it)."""
        self._closing = True
        self.t.join(timeout)
        if self.t.is_alive():
            log.error("the shipping thread did not finish in %.0f s: batches it held in "
                      "memory are lost", timeout)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # the agent goes on stitching/recording locally
            log.error("shipping stopped: %s", exc)
        finally:
            self._running = False

    async def _run(self) -> None:
        import tempfile

        from hopscope.agent.ship import Shipper
        from hopscope.collector import wire
        from hopscope.collector.spool import Spool

        # without --spool: a temporary directory, gone when the agent stops (as documented)
        tmp = (contextlib.nullcontext(self.cfg.spool_dir) if self.cfg.spool_dir
               else tempfile.TemporaryDirectory(prefix="hopscope-spool-"))
        with tmp as spool_dir, Spool(Path(spool_dir), max_bytes=self.cfg.spool_max,
                                     memory_bytes=SPOOL_MEMORY) as spool:
            sh = Shipper(self.cfg, spool)
            await sh.pump()  # connect first: the sequence goes on from what the collector has
            pending = self._pending
            idle = 0.0
            while True:
                closing = self._closing  # read first: every batch put before it is queued
                if pending:
                    for _ in range(min(len(pending), 8)):
                        obs, clock, lost, raw = pending.popleft()
                        sh.append(obs, clock, {**lost, "ship_queue": self.dropped}, raw)
                    await sh.pump()
                    idle = 0.0
                    continue
                if closing:
                    break
                if idle >= 0.5:  # acks, and a reconnect when due
                    await sh.pump()
                    idle = 0.0
                await asyncio.sleep(SHIP_POLL_S)
                idle += SHIP_POLL_S
            deadline = time.monotonic() + SHIP_DRAIN_S
            while len(spool) and time.monotonic() < deadline:
                await sh.pump(until_empty=True)
                if len(spool):
                    if sh.writer is None and sh.next_try >= deadline:
                        break  # no connection, and none to be tried in time
                    await asyncio.sleep(0.2)
            if sh.writer is not None:
                await wire.close_writer(sh.writer)
            self.left = len(spool)
            self.kept_in = self.cfg.spool_dir
            if self.left:
                log.warning("%d batches not acked by the collector: %s", self.left,
                            f"kept in the spool {self.cfg.spool_dir} for the next start"
                            if self.cfg.spool_dir else
                            "lost with the temporary spool (give --spool DIR to keep them)")


class Agent:
    def __init__(self, cfg: AgentConfig, emit: Callable[[dict[str, Any]], None] | None = None,
                 handed: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        #: the BPF objects an earlier image of this process loaded (run_agent's handoff)
        self.handed = handed
        self.emit = emit
        self.netns = bpfprog.netns_inode()
        self.prog: bpfprog.AgentProgram | None = None
        self.ring: Any = None
        self.cap: Any = None  # the AF_PACKET source, when packets come from capture
        self.reorder_ns = REORDER_NS
        self.pod_netns: list[int] = []
        self._proxy: list[int] = []
        self.rules: RuleNamer | None = None  # names the rules behind NETFILTER_DROP drops
        self.sources: dict[str, str] = {}
        self._pkt_source = ""  # the packet source, named once chosen (sources["packets"])
        self.ifaces: dict[int, ev.Iface] = {}
        self.offset = 0
        self.clock: list[tuple[int, int]] = []
        self.pending: list[Observation] = []  # decoded, not yet in time order
        self.reorder = Reorder()
        #: ship the ring's records as they are (wire v3): set by start() when nothing
        #: here needs observations (no stitching, no packet buffer) and the events come
        #: from the ring buffer; the collector (or read_record) decodes them
        self.raw = False
        #: records taken from the ring and not yet shipped: (bytes, how many records)
        self._raw: list[tuple[bytes, int]] = []
        self._raw_tail = False  # records went out since the last batch with an empty ring
        self.raw_records = 0
        self.stitcher = Stitcher([cfg.node], entry_ports=(cfg.entry_port,))
        self.tracker = self.stitcher.tracker(cfg.node)
        #: stitch here (for --local, --out, --slow-pcap); requests are kept only for --out
        self._stitching = cfg.local or bool(cfg.out) or bool(cfg.slow_pcap)
        self.requests: list[dict[str, Any]] = []
        self.nrequests = 0
        self.final_stats: dict[str, int] = {}
        self.decode_errors = 0
        self._lost_cache: dict[str, int] = {}
        self._lost_sent: dict[str, int] = {}  # the loss counters the last batch shipped carried
        self._lost_at = 0.0  # when the cached loss counters are read again
        self.observations = 0
        self.ship: LiveShip | None = None
        self._stop = False
        self._record: Any = None
        self.pktbuf: PacketBuffer | None = None
        if cfg.packet_buffer and cfg.slow_pcap:
            self.pktbuf = PacketBuffer(cfg.packet_buffer)
        #: (due, request id, until) of slow requests whose packets are still to be written
        self._exports: list[tuple[float, str, int]] = []
        self.exported = 0
        if cfg.record:
            import msgpack

            self._record = open(cfg.record, "wb")  # noqa: SIM115 - closed in close()
            self._packer = msgpack.Packer()
            self._record_seq = 0

    # -- set-up ------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        if cfg.source not in SOURCES:
            raise bpfprog.AgentError(f"unknown packet source {cfg.source!r}: "
                                     f"one of {', '.join(SOURCES)}")
        self._sample_clock()
        self.reasons: dict[int, str] = {}
        if cfg.source != "capture":
            try:
                self._start_bpf()
            except Exception as exc:
                if cfg.source == "tc":
                    raise
                log.warning("the BPF programs cannot be used here (%s): packets come from "
                            "AF_PACKET capture instead, without the kernel_in/proxy/"
                            "service_nat sub-hops and kernel drop reasons", exc)
                self._close_bpf()
        if self.prog is None:
            self._start_capture()
        self.decoder = ev.Decoder(cfg.node, self.ifaces, lambda: self.offset, self.reasons)
        self.raw = (self.ring is not None and not self._stitching and self.pktbuf is None
                    and not cfg.decode_here)
        if self.raw:
            self.sources["events"] = ("shipped as the ring buffer's records (wire v3), decoded"
                                      " by the collector; drops decoded here")
        for k, v in self.sources.items():
            log.info("source %s: %s", k, v)
        if cfg.ship is not None:
            self.ship = LiveShip(cfg.ship)
        if cfg.ready_file:
            Path(cfg.ready_file).write_text(json.dumps({
                "pid": os.getpid(), "sources": self.sources, "netns": self.netns,
                "pod_netns": self.pod_netns}))

    def _start_bpf(self) -> None:
        cfg = self.cfg
        self.reasons = drop_reasons()
        if self.handed is not None:  # loaded by this process's earlier image (run_agent)
            cfg.settings = bpfprog.Settings(**self.handed["settings"])
            self.prog = bpfprog.AgentProgram(cfg.settings, handed=self.handed)
        else:
            self.prog = load_program(cfg, self.reasons)
        self.rules = RuleNamer()
        self._pod_nsids: set[int] | None = None
        self._rescan(first=True)
        from hopscope.agent.ringbuf import RingReader

        self.ring = RingReader(self.prog.ring_fd(), self.prog.ring_size)
        self.sources = {
            "packets": "",  # below
            "kernel_in": ("tracepoint tcp:tcp_probe on entry-port sockets"
                          if cfg.settings.tp_probe_skb else
                          "kprobe tcp_rcv_established on entry-port sockets (tcp:tcp_probe "
                          "has no skb here)"),
            "proxy": (f"syscalls:sys_enter_{{{','.join(cfg.proxy_calls)}}} of {cfg.proxy} + tc "
                      "egress in its thread"
                      if cfg.settings.tc_pid_tgid else "none: tc cannot tell the thread here "
                      "(proxy+service_nat merged)"),
            "drops": "tracepoint skb:kfree_skb (reasons from its format file); the rule behind "
                     "NETFILTER_DROP from iptables-save -c counters",
        }
        self._watching("tc clsact (bpf/tc.c)", first=True)
        self._attach_kprobes()

    def _attach_kprobes(self) -> None:
        """kprobes for the functions the kernel has now (ip_vs's appear when IPVS is
        loaded: looked for again at each rescan until attached)."""
        prog = self.prog
        if prog is None or not prog.settings.kprobes:
            return
        want = [ev for _fn, ev, _r in bpfprog.KPROBES if ev not in prog.kprobes]
        if prog.bpf is not None and want and not (
                set(want) <= IPVS_FUNCS and not os.path.isdir("/sys/module/ip_vs")):
            for what in prog.attach_kprobes(ft.kallsyms_find(want)):
                log.info("attached %s", what)
        if "nf_hook_slow" in prog.kprobes:
            self.sources["netfilter"] = "kprobe+kretprobe nf_hook_slow (INPUT hook, entry port)"
        if "ip_vs_conn_new" in prog.kprobes and "ip_vs_schedule" in prog.kprobes:
            self.sources["ipvs"] = "kprobes ip_vs_schedule + ip_vs_conn_new (real server chosen)"

    def _start_capture(self) -> None:
        from hopscope.agent.afpacket import CaptureSource

        self.cap = CaptureSource(self.cfg.node, lambda: self.offset,
                                 entry_port=self.cfg.entry_port)
        self.reorder_ns = CAPTURE_REORDER_NS
        self._rescan(first=True)
        self.sources = {}
        self._watching("AF_PACKET capture (TPACKET_V3, socket filter)", first=True)

    def _iface_list(self) -> str:
        return ", ".join(f"{f.name}={f.point}" for f in self.ifaces.values()) or "(none yet)"

    def _watching(self, source: str | None = None, first: bool = False) -> None:
        """The packet source's description, with the interfaces watched now (kept in step
        by each rescan: ``--out``'s ``agent.sources``); at start, a warning when there are
        none: an agent in the wrong namespace would otherwise run on, seeing nothing."""
        if source is not None:
            self._pkt_source = source
        if not self._pkt_source:
            return  # the first scan, before the source is named
        self.sources["packets"] = f"{self._pkt_source} on {self._iface_list()}"
        if first and not self.ifaces:
            log.warning("no interface to watch in this network namespace (no default-route "
                        "NIC, flannel.1, VXLAN underlay or pod veth found): is this the "
                        "node's namespace? Name them with --iface NAME=POINT; interfaces "
                        "that appear later are watched then")

    def _close_bpf(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.prog is not None:
            self.prog.close()
            self.prog = None
        self.ifaces.clear()

    def _rescan(self, first: bool = False) -> None:
        try:
            listing = ft.node_listing()
            want = wanted_interfaces(self.cfg.interfaces, listing)
        except Exception as exc:
            log.warning("interface scan failed: %s", exc)
            return
        if first:
            names = {str(link["ifname"]) for link in listing.links}
            for name in self.cfg.interfaces:
                if name not in names:
                    log.warning("--iface %s: no interface of that name in this network "
                                "namespace (yet): watched once it appears", name)
        if self.cap is not None:
            if want != self.ifaces:
                self.ifaces.clear()
                self.ifaces.update(want)
                self.cap.set_interfaces(want)
                log.info("capturing on %s", self._iface_list())
                self._watching()
            return
        assert self.prog is not None
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
        self._watching()
        self._pods_netns(listing.links)
        if not first:
            self._attach_kprobes()
        tg = ft.process_pids(self.cfg.proxy, self.netns)
        self.prog.set_proxy_tgids(tg)
        self._proxy = tg
        if first and not tg:
            log.warning("no %s process in this network namespace yet: the proxy sub-hop "
                        "waits for it", self.cfg.proxy)

    def _check_proxy(self) -> None:
        """The proxy's processes are still there (cheap); else find them again."""
        if self.prog is None:
            return
        if self._proxy and all(os.path.exists(f"/proc/{p}") for p in self._proxy):
            return
        tg = ft.process_pids(self.cfg.proxy, self.netns)
        if tg != self._proxy:
            log.info("%s processes: %s", self.cfg.proxy, tg or "none")
            self.prog.set_proxy_tgids(tg)
            self._proxy = tg

    def _pods_netns(self, links: list[dict[str, Any]]) -> None:
        """Socket events and drops of the node's pods are the node's: allow their
        namespaces (found again only when the pod veths' peers change)."""
        assert self.prog is not None
        nsids = ft.pod_peer_nsids(links)
        if nsids == self._pod_nsids:
            return
        pods = ft.namespaces_with_nsids(nsids, self.netns)
        self.prog.set_netns([self.netns, *pods])
        self._pod_nsids = nsids
        self.pod_netns = sorted(pods)
        log.info("namespaces: the node's %d and %d of pods %s", self.netns, len(pods),
                 self.pod_netns)

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
        next_scan = next_clock = next_take = next_proxy = tick = time.monotonic()
        next_loss = tick + LOSS_CHECK_S
        next_trim = tick + TRIM_S
        losses = LossWatch()
        links = _link_watch()
        step = LOOP_S
        try:
            while not self._stop:
                tick += step
                now = time.monotonic()
                if tick > now:
                    time.sleep(tick - now)
                    now = tick
                else:
                    losses.late(now - tick)
                    tick = now  # behind: no catching up in a burst
                if t_end is not None and now >= t_end:
                    break
                ring = self.ring
                before = ring.consumed if ring is not None else 0
                self._drain(0)
                if ring is not None:
                    step = next_tick_s(ring.consumed - before, ring.size)
                self._feed(final=False)
                if now >= next_clock:
                    self._sample_clock()
                    next_clock = now + CLOCK_EVERY_S
                if now >= next_take:
                    self._take()
                    next_take = now + 0.2
                if now >= next_loss:
                    lost = self._lost_recent(fresh=True)
                    warn = losses.update(lost, now)
                    if warn:
                        log.warning("%s", warn)
                    self._ship_losses(lost)
                    next_loss = now + LOSS_CHECK_S
                if now >= next_scan or (links is not None and links.changed()):
                    self._rescan()
                    next_scan = now + RESCAN_S
                    next_proxy = now + PROXY_CHECK_S
                elif now >= next_proxy:
                    self._check_proxy()
                    next_proxy = now + PROXY_CHECK_S
                if now >= next_trim:
                    memtrim.trim()
                    next_trim = now + TRIM_S
        finally:
            if links is not None:
                links.close()
            self.close()

    def _drain(self, timeout: float, final: bool = False) -> None:
        if self.cap is not None:
            if final:  # the packets of the block the kernel is still filling too
                self.cap.flush(self.pending)
                return
            if timeout:
                self.cap.wait(timeout)
            self.cap.drain(self.pending)
        elif self.ring is not None:
            if timeout:
                self.ring.wait(timeout)
            if self.raw:
                for _ in range(16):  # bounded: producers never keep this loop going
                    if not self._take_raw():
                        break
                return
            while self.ring.drain(self._handle) >= DRAIN_BATCH:
                pass

    def _take_raw(self) -> int:
        """Copy the ring's complete records out as they are; decode only the drops here
        (their iptables rule is named on this node), marking them discarded in the copy."""
        blob, n, drops = self.ring.take(DRAIN_BATCH, ev.KIND_AT, _DROP_KINDS, RAW_BATCH_BYTES)
        if not n:
            return 0
        if drops:
            buf = bytearray(blob)
            for at, size in drops:
                buf[at - 8:at - 4] = (size | DISCARD).to_bytes(4, "little")
            blob = bytes(buf)
            self.decode_errors += self.decoder.decode(blob, drops, self.pending)
        self._raw.append((blob, n))
        return n

    def _handle(self, buf: Any, recs: list[tuple[int, int]]) -> None:
        self.decode_errors += self.decoder.decode(buf, recs, self.pending)

    def _feed(self, final: bool) -> None:
        cut = _FAR if final else time.clock_gettime_ns(time.CLOCK_MONOTONIC) - self.reorder_ns
        if self.raw:
            self._ship_raw(cut)
            return
        if not self.pending and not len(self.reorder):
            return
        p, self.pending = self.pending, []
        ready = self.reorder.push(p, cut)
        if not ready:
            return
        self.observations += len(ready)
        if self.rules is not None:
            self._name_rules(ready)
        if self._record is not None:
            self._record.write(self._packer.pack(ready))
        if self._stitching:
            self.tracker.feed(ready)
        if self.pktbuf is not None:
            self.pktbuf.add(ready)
        if self.ship is not None:
            self._put(ready, self._lost_recent(final))

    def _put(self, obs: list[Observation], lost: dict[str, int], raw: ev.RawEvents | None = None,
             records: int = 0) -> None:
        assert self.ship is not None
        clock, self.clock = self.clock, []
        self._lost_sent = lost
        self.ship.put(obs, clock, lost, raw, records)

    def _ship_losses(self, lost: dict[str, int]) -> None:
        """Ship loss counters that no batch has carried yet: a batch of no observations (raw:
        no records, holding the collector's cut where it is). Else a loss after the last
        batch with observations, or between two reads of the counters, would never reach
        the collector."""
        if self.ship is None or lost == self._lost_sent:
            return
        self._put([], lost, ev.RawEvents(b"", self._raw_ifaces(), self.offset, -1)
                  if self.raw else None)

    def _raw_ifaces(self) -> tuple[tuple[int, str, str], ...]:
        """The interface table a raw batch carries (ifindex, name, point)."""
        return tuple((i, f.name, f.point) for i, f in self.ifaces.items())

    def _ship_raw(self, cut: int) -> None:
        """Hand the records taken since the last call (and the drops decoded from them) to
        the collector and the record file as v3 batches of at most RAW_BATCH_BYTES: the
        collector sorts them up to ``cut`` (the last batch's; -1 in the others: hold all),
        as :meth:`_feed` would, holding the newest back until the next."""
        drops, self.pending = self.pending, []
        if not self._raw and not drops:
            if not self._raw_tail:
                return
            # the last records shipped may wait behind their cut: one empty batch moves it
            self._raw.append((b"", 0))
        self._raw_tail = bool(self._raw[-1][1]) if self._raw else bool(drops)
        if self.rules is not None and drops:
            self._name_rules(drops)
        ifaces = self._raw_ifaces()
        chunks: list[list[tuple[bytes, int]]] = [[]]
        size = 0
        for item in self._raw:
            if chunks[-1] and size + len(item[0]) > RAW_BATCH_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(item)
            size += len(item[0])
        self._raw = []
        self.observations += len(drops)
        for k, chunk in enumerate(chunks):
            n = sum(c[1] for c in chunk)
            self.raw_records += n
            raw = ev.RawEvents(b"".join(c[0] for c in chunk), ifaces, self.offset,
                               cut if k == len(chunks) - 1 else -1)
            obs = drops if k == 0 else []
            if self._record is not None:
                from hopscope.collector import wire

                self._record.write(wire.encode_batch(
                    "record", self._record_seq, self.cfg.node, time.time_ns(), obs, raw=raw,
                    max_frame=RECORD_MAX_FRAME))
                self._record_seq += 1
            if self.ship is not None:
                self._put(obs, self._lost_recent(cut == _FAR), raw, n)

    def _name_rules(self, obs: list[Observation]) -> None:
        """Add the iptables rule to NETFILTER_DROP drops (payload ``REASON<TAB>rule``)."""
        assert self.rules is not None
        at = [i for i, o in enumerate(obs) if o.kind == KIND_DROP and o.payload == NF_DROP]
        if not at:
            return
        names = self.rules.name([(obs[i].proto, obs[i].src, obs[i].sport, obs[i].dst,
                                  obs[i].dport) for i in at])
        for i, name in zip(at, names, strict=True):
            if name:
                obs[i] = obs[i]._replace(payload=NF_DROP + b"\t" + name.encode())

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
            if self.pktbuf is not None and (r["total_ns"] or 0) >= self.cfg.slower_than_ns:
                # its response's last packets may still be on their way: write it a bit later
                until = r["start_ns"] + r["total_ns"] + EXPORT_TAIL_NS
                self._exports.append((time.monotonic() + EXPORT_TAIL_NS / 1e9, r["request_id"],
                                      until))
        self._export(final)

    def _export(self, final: bool = False) -> None:
        """Write the packets of the slow requests that are due (all of them when final)."""
        from hopscope.pcapwrite import write_pcapng

        if self.pktbuf is None or not self._exports:
            return
        now = time.monotonic()
        due = [e for e in self._exports if final or e[0] <= now]
        self._exports = [e for e in self._exports if not (final or e[0] <= now)]
        for _t, rid, until in due:
            pkts = self.pktbuf.request(rid, until)
            if not pkts:
                log.info("request %s: its packets are no longer in the buffer", rid)
                continue
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in rid)
            path = Path(self.cfg.slow_pcap or ".") / f"{self.cfg.node}-{name}.pcapng"
            try:
                write_pcapng(path, pkts, _comment(rid))
                self.exported += 1
            except OSError as exc:
                log.warning("cannot write %s: %s", path, exc)

    def stats(self) -> dict[str, int]:
        """Events sent and lost, per source (the kernel's counters)."""
        if self.prog is not None:
            return self.prog.stats()
        if self.cap is not None:
            return self.cap.stats()
        return dict(self.final_stats)

    def lost(self) -> dict[str, int]:
        s = self.stats()
        out = {k: v for k, v in s.items() if k.endswith("_lost")}
        out["decode_errors"] = self.decode_errors
        return out

    def _lost_recent(self, fresh: bool) -> dict[str, int]:
        """The loss counters (cumulative), read from the kernel when ``fresh`` (the loop's
        loss check, the last batch) or older than LOSS_CHECK_S; shipped batches carry these
        (a read per batch, a bpf(2) call per counter and CPU, had been 7 % of a shipping
        agent's samples)."""
        now = time.monotonic()
        if fresh or now >= self._lost_at:
            self._lost_cache = self.lost()
            self._lost_at = now + LOSS_CHECK_S
        return self._lost_cache

    def close(self) -> None:
        try:
            self._drain(0, final=True)
            self._feed(final=True)
            self._take(final=True)
            if self.prog is not None or self.cap is not None:
                self._ship_losses(self._lost_recent(fresh=True))  # what no batch carried
        finally:
            if self.prog is not None or self.cap is not None:
                self.final_stats = self.stats()
                log.info("detached; events %s", json.dumps(self.final_stats, sort_keys=True))
            self._close_bpf()
            if self.cap is not None:
                self.cap.close()
                self.cap = None
            if self.ship is not None:
                self.ship.close()
            if self._record is not None:
                self._record.close()
        if self.cfg.out:
            reqs, drops = self.stitcher.finish()
            env = self.stitcher.envelope(self.requests + list(reqs), drops)
            env["agent"] = {"node": self.cfg.node, "sources": self.sources,
                            "netns": self.netns, "pod_netns": self.pod_netns,
                            "events": self.final_stats,
                            "observations": self.observations,
                            "decode_errors": self.decode_errors}
            tmp = self.cfg.out + ".tmp"
            try:
                with open(tmp, "w") as f:
                    json.dump(env, f)
                os.replace(tmp, self.cfg.out)
            except OSError as exc:
                log.error("cannot write %s: %s: the run's envelope is lost", self.cfg.out,
                          exc.strerror or exc)


def _comment(rid: str) -> Callable[[Observation], str]:
    return lambda _o: f"request {rid}"


class LinkWatch:
    """A netlink socket that hears of links coming and going.

    :meth:`changed` runs on every tick of the agent's loop: one ``poll(2)`` on the
    socket's fd, looked up once (pyroute2's ``fileno()`` walks several Python layers).
    """

    def __init__(self, ipr: Any) -> None:
        self.ipr = ipr
        self._poll = select.poll()
        self._poll.register(ipr.fileno(), select.POLLIN)

    def changed(self) -> bool:
        """Were there link events since the last call (drains them)?"""
        changed = False
        while self._poll.poll(0):
            try:
                msgs = self.ipr.get()
            except Exception:  # a partial read: rescan anyway
                return True
            changed = changed or bool(msgs)
            if not msgs:
                break
        return changed

    def close(self) -> None:
        self.ipr.close()


def _link_watch() -> LinkWatch | None:
    """A :class:`LinkWatch` (None if netlink cannot be had)."""
    try:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_LINK

        ipr = IPRoute()
        ipr.bind(groups=RTMGRP_LINK)
        return LinkWatch(ipr)
    except Exception as exc:  # pyroute2 raises its own and OSError
        log.warning("no netlink link events (%s): interfaces are rescanned every %.0f s",
                    exc, RESCAN_S)
        return None


def read_record(path: str) -> list[Observation]:
    """The observations an agent wrote with ``--record``: msgpack arrays of observations
    when it decoded its events, else wire frames (v3 batches of raw records, decoded and
    put in time order here as the collector does)."""
    import msgpack

    out: list[Observation] = []
    with open(path, "rb") as f:
        if f.read(1) != b"\0":  # a frame's length prefix; never a msgpack array's first byte
            f.seek(0)
            for batch in msgpack.Unpacker(f, use_list=False):
                out.extend(Observation(*o) for o in batch)
            return out
        f.seek(0)
        from hopscope.collector import wire

        dec = wire.FrameDecoder(RECORD_MAX_FRAME)
        ro = Reorder()
        while chunk := f.read(1 << 20):
            for fr in dec.feed(chunk):
                if isinstance(fr, wire.Batch):
                    raw = isinstance(fr.obs, wire.RawObs)
                    out.extend(ro.push(fr.obs, fr.obs.cut_mono_ns if raw else _FAR))
        dec.eof()
    out.extend(ro.flush())
    return out


def drop_reasons() -> dict[int, str]:
    """The kernel's drop reason names by number, from the tracepoint's format file."""
    fmt = ft.find_tracefs()
    if not fmt:
        return {}
    text = ft._read_text(os.path.join(ft.tracepoint_dir(fmt, "skb:kfree_skb"), "format"))
    return ft.parse_drop_reasons(text) if text else {}


def tracepoint_fields(tracefs: str | None, tracepoint: str) -> set[str]:
    """The field names of a tracepoint's format file (empty when it cannot be read)."""
    if not tracefs:
        return set()
    text = ft._read_text(os.path.join(ft.tracepoint_dir(tracefs, tracepoint), "format"))
    return set(ft.parse_tracepoint_format(text).fields) if text else set()


def load_program(cfg: AgentConfig, reasons: Mapping[int, str]) -> bpfprog.AgentProgram:
    """Remove a killed agent's filters, compile and load bpf/agent.c (tracepoints attached),
    and attach the kprobes the kernel has."""
    stale = bpfprog.remove_stale()
    if stale:
        log.warning("removed %d stale tc filter(s) a previous agent left", stale)
    cfg.settings.drop_reason_min = next(
        (k for k, v in reasons.items() if v == "NOT_SPECIFIED"), 2)
    cfg.settings.entry_port = cfg.entry_port
    cfg.settings.proxy_calls = cfg.proxy_calls
    fmt = ft.find_tracefs()
    cfg.settings.kprobes = cfg.kprobes and kprobes_available(fmt)
    probe, kfree = (tracepoint_fields(fmt, tp) for tp in ("tcp:tcp_probe", "skb:kfree_skb"))
    cfg.settings.tp_probe_skb = ft.tcp_probe_has_skb(probe)  # as doctor's probe plan says
    cfg.settings.tp_kfree_rx_sk = "rx_sk" in kfree
    cfg.settings.tc_pid_tgid = ft.tc_helper_pid_tgid()
    if not cfg.settings.tc_pid_tgid:
        log.warning("tc programs cannot call bpf_get_current_pid_tgid on this kernel (before "
                    "6.10): the proxy's write is not tied to its upstream packet, so "
                    "`proxy` and `service_nat` come merged (proxy+service_nat)")
    if not cfg.settings.tp_probe_skb:
        log.info("tcp:tcp_probe has no socket/skb fields here: the kernel point comes from "
                 "a kprobe on tcp_rcv_established%s",
                 "" if cfg.settings.kprobes else " (no kprobes: no kernel_in split)")
    prog = bpfprog.AgentProgram(cfg.settings)
    if cfg.settings.kprobes:
        want = [ev for _fn, ev, _r in bpfprog.KPROBES
                if ev not in IPVS_FUNCS or os.path.isdir("/sys/module/ip_vs")]
        for what in prog.attach_kprobes(ft.kallsyms_find(want)):
            log.info("attached %s", what)
    return prog


#: the environment variable that carries the loaded objects across the agent's exec
HANDOFF_ENV = "HOPSCOPE_AGENT_HANDOFF"


def _handoff(cfg: AgentConfig) -> None:
    """Load the BPF programs here, then ``exec`` this same command without bcc: the new
    image takes the programs, maps and attachments over by their (inherited) fds.
    bcc's LLVM is about 60 MB of RSS that the hours after loading do not need."""
    prog = load_program(cfg, drop_reasons())
    desc = prog.handoff()
    desc["settings"] = asdict(cfg.settings)
    os.environ[HANDOFF_ENV] = json.dumps(desc)
    argv = [sys.executable, "-m", "hopscope", *sys.argv[1:]]
    log.info("programs loaded; continuing without bcc (exec)")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


#: glibc's mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks from this size on come from mmap(), each its own mapping
MMAP_THRESHOLD = 32 << 20
#: free memory at the top of a heap kept for reuse up to this much
TRIM_THRESHOLD = 64 << 20


def keep_heap() -> None:
    """Have glibc's malloc keep the memory the agent frees for the next batch. The agent
    allocates a few blocks of 0.1 to 2 MB every tick (the records it takes from the ring,
    the frames it ships) and frees them again; by default glibc maps such blocks afresh
    and unmaps them on free (and trims a thread's heap as soon as its top is free), so
    that every tick faulted their pages in again, zeroed by the kernel: in the replica at
    saturation 225 page faults a second per agent against 16 with these thresholds, and
    the agents' share of their time in the kernel 21 to 26 % against 6 to 24 %
    (bench/README.md). The blocks now come from the heap and stay there, reused: the
    resident size is about the same. Without glibc (musl) this does nothing."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def set_sched(policy: str) -> None:
    """``--sched``: with ``"batch"``, this thread runs as SCHED_BATCH, and so do the threads
    it starts later (they inherit it), across the handoff's exec too. The scheduler then
    never lets the agent preempt a running task when it wakes (its drains come on a timer
    and can wait for the next tick of the scheduler); over time it gets the same share of
    the CPU as before. Needs no privilege; a failure is logged and the agent goes on."""
    if policy != "batch":
        return
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:
        log.warning("cannot run as SCHED_BATCH (%s): scheduled as any process", exc.strerror)


def run_agent(cfg: AgentConfig, emit: Callable[[dict[str, Any]], None] | None = None,
              handoff: bool = False) -> Agent:
    """Set up the mounts, run until signalled (or ``duration``), detach. Returns the agent.

    With ``handoff`` (the command line's way) the programs are loaded first and the
    process re-executes itself without bcc (:func:`_handoff`); the new image comes back
    here and goes on with what was loaded."""
    keep_heap()
    set_sched(cfg.sched)  # first: the compile and every thread started below inherit it
    raw = os.environ.pop(HANDOFF_ENV, None)
    handed = json.loads(raw) if raw else None
    if handed is None and cfg.source != "capture":
        try:
            for n in bpfprog.prepare_kernel_env():
                log.info("%s", n)
            if handoff:
                _handoff(cfg)  # does not return
        except Exception as exc:  # bcc, BTF, mounts: with auto, capture instead
            if cfg.source == "tc" or not isinstance(exc, HopscopeError | OSError):
                raise
            log.warning("%s: packets come from AF_PACKET capture instead", exc)
            cfg.source = "capture"
    agent = Agent(cfg, emit, handed)

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
