"""Hold packets for a fixed time in an NFQUEUE, then let netfilter go on.

Run inside the network namespace whose hook should be slowed down (the
fault code starts it with ``ip netns exec NS python -m
hopscope.testbed.nfq_holder ...``). It

1. binds NFQUEUE ``--queue`` (metadata only: the payload is never copied);
2. inserts, at the top of ``--chain`` of the filter table, the rule that
   feeds the queue::

       iptables -w -I CHAIN 1 -p PROTO --dport PORT \\
           -m mark ! --mark BIT/BIT -m comment --comment TAG \\
           -j NFQUEUE --queue-num Q --queue-bypass

3. for every queued packet, after ``--ms`` milliseconds, sets ``BIT`` in the
   packet's mark (keeping the other bits) and gives the **repeat** verdict.
   The packet goes through the same hook again, from the top; the queue rule
   no longer matches (the bit is set), so the rest of the chain (UFW,
   kube-proxy) decides as if the holder were not there. An *accept* verdict
   would skip the rest of the chain, i.e. bypass UFW.

Packets are held concurrently: each gets a deadline in a heap and the main
loop sleeps in ``select`` until the earliest deadline or the next packet,
so a burst of packets all leave ``--ms`` after their own arrival.

On SIGTERM or SIGINT it deletes its rule first, then releases every held
packet at once (nothing is dropped), unbinds and exits 0. With
``--queue-bypass`` the kernel lets packets through unqueued whenever no
holder is bound, so a crashed holder does not black-hole traffic; the rule
itself is then removed by ``hopscope testbed fault clear``.

It prints ``ready`` on stdout once the rule is in place, and a one-line JSON
summary (packets held, lateness percentiles) on stdout when it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import heapq
import itertools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: The mark bit that says "already held once". Chosen away from kube-proxy's
#: 0x4000 (masquerade) and 0x8000 (drop) and Flannel's bits.
DEFAULT_MARK_BIT = 0x01000000

#: Real-time priority of the holder (SCHED_FIFO, 1-99; low: above normal tasks only).
RT_PRIORITY = 10

#: Bounds of the adaptive early wake-up (the spin before a deadline), ns.
_EARLY_MIN_NS = 20_000
_EARLY_MAX_NS = 400_000
#: Longest sleep without a deadline (to notice SIGTERM), seconds.
_IDLE_S = 0.2

#: The holder's lateness samples kept for the summary (a ring of this size).
_SAMPLES = 65536


@dataclass(frozen=True)
class RuleSpec:
    """Where the queue rule goes and what it matches."""

    chain: str
    proto: str
    dport: int
    queue: int
    mark_bit: int
    comment: str

    def match_args(self) -> list[str]:
        """The iptables arguments after ``-I CHAIN 1`` / ``-D CHAIN``."""
        bit = f"0x{self.mark_bit:x}"
        return [
            "-p", self.proto, "--dport", str(self.dport),
            "-m", "mark", "!", "--mark", f"{bit}/{bit}",
            "-m", "comment", "--comment", self.comment,
            "-j", "NFQUEUE", "--queue-num", str(self.queue), "--queue-bypass",
        ]

    def insert_cmd(self) -> list[str]:
        return ["iptables", "-w", "5", "-t", "filter", "-I", self.chain, "1", *self.match_args()]

    def delete_cmd(self) -> list[str]:
        return ["iptables", "-w", "5", "-t", "filter", "-D", self.chain, *self.match_args()]


@dataclass
class Stats:
    """Counters and lateness samples (release time minus deadline, ns)."""

    held: int = 0
    released: int = 0
    max_in_flight: int = 0
    late_ns: list[int] = field(default_factory=list)

    def add_late(self, ns: int) -> None:
        if len(self.late_ns) < _SAMPLES:
            self.late_ns.append(ns)
        else:
            self.late_ns[self.released % _SAMPLES] = ns

    def summary(self) -> dict[str, Any]:
        xs = sorted(self.late_ns)

        def pct(p: float) -> float | None:
            if not xs:
                return None
            return round(xs[min(len(xs) - 1, int(p * len(xs)))] / 1000.0, 1)

        return {
            "held": self.held,
            "released": self.released,
            "max_in_flight": self.max_in_flight,
            "late_us_p50": pct(0.50),
            "late_us_p99": pct(0.99),
            "late_us_max": pct(1.0),
        }


class Holder:
    """The heap of held packets and the loop that releases them."""

    def __init__(self, hold_ns: int, mark_bit: int,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.clock = clock
        self.hold_ns = hold_ns
        self.mark_bit = mark_bit
        self.heap: list[tuple[int, int, Any]] = []
        self.seq = itertools.count()
        self.stats = Stats()
        self.stopping = False
        #: wake up this long before a deadline, then spin to it
        self.early_ns = _EARLY_MIN_NS + 100_000
        self.oversleep_ewma = 50_000.0

    def on_packet(self, pkt: Any) -> None:
        """NetfilterQueue callback: remember the packet and its deadline."""
        deadline = self.clock() + self.hold_ns
        heapq.heappush(self.heap, (deadline, next(self.seq), pkt))
        self.stats.held += 1
        if len(self.heap) > self.stats.max_in_flight:
            self.stats.max_in_flight = len(self.heap)

    def release(self, pkt: Any, late_ns: int | None) -> None:
        try:
            pkt.set_mark(pkt.get_mark() | self.mark_bit)
            pkt.repeat()
        except (RuntimeError, OSError) as exc:  # the queue went away under us
            log.warning("could not re-inject a held packet: %s", exc)
            return
        self.stats.released += 1
        if late_ns is not None:
            self.stats.add_late(late_ns)

    def release_due(self) -> None:
        heap = self.heap
        clock = self.clock
        now = clock()
        while heap and heap[0][0] <= now:
            deadline, _, pkt = heapq.heappop(heap)
            self.release(pkt, now - deadline)
            now = clock()

    def release_all(self) -> None:
        while self.heap:
            _, _, pkt = heapq.heappop(self.heap)
            self.release(pkt, None)

    def next_wake_ns(self) -> int | None:
        """When to wake for the earliest deadline: ``early_ns`` before it."""
        if not self.heap:
            return None
        return self.heap[0][0] - self.early_ns

    def learn_oversleep(self, planned_ns: int, woke_ns: int) -> None:
        """Adapt ``early_ns`` to how late the kernel wakes us (idle CPUs are slow)."""
        over = max(0, woke_ns - planned_ns)
        self.oversleep_ewma = 0.9 * self.oversleep_ewma + 0.1 * over
        self.early_ns = int(min(_EARLY_MAX_NS, _EARLY_MIN_NS + 2 * self.oversleep_ewma))


def _tune_scheduling(realtime: bool) -> str:
    """Best effort low wake-up latency: 1 ns timer slack, then SCHED_FIFO or nice -10.

    SCHED_FIFO (priority :data:`RT_PRIORITY`) makes the holder preempt
    Traefik, the pods and the load generator when a deadline comes, the way
    netem's hrtimers would; without it a busy 2-CPU machine wakes the holder
    milliseconds late. The holder sleeps between deadlines (its spin is
    bounded by :data:`_EARLY_MAX_NS`), and the kernel's RT throttling still
    applies. Returns the policy in force.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK = 29
    except (OSError, AttributeError):
        pass
    if realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
            return f"SCHED_FIFO {RT_PRIORITY}"
        except OSError as exc:
            log.warning("SCHED_FIFO refused (%s); using nice -10, expect more jitter", exc)
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    return "nice -10"


def _run_iptables(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")


def serve(spec: RuleSpec, hold_ms: float, max_len: int, realtime: bool = True) -> dict[str, Any]:
    """Bind the queue, insert the rule, hold packets until signalled."""
    from netfilterqueue import COPY_META, NetfilterQueue

    holder = Holder(int(hold_ms * 1_000_000), spec.mark_bit)

    def _stop(signum: int, _frame: Any) -> None:
        holder.stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    nfq = NetfilterQueue()
    # Metadata only; a large kernel queue so a burst is never dropped
    # (--queue-bypass only covers "no listener", not "queue full").
    nfq.bind(spec.queue, holder.on_packet, max_len=max_len, mode=COPY_META, range=0,
             sock_len=8 * 1024 * 1024)
    fd = nfq.get_fd()
    os.set_blocking(fd, False)
    rule_in = False
    try:
        _run_iptables(spec.insert_cmd())
        rule_in = True
        gc.disable()  # no collector pauses while packets wait on us
        policy = _tune_scheduling(realtime)
        log.info("queue %d, hold %.3f ms, %s", spec.queue, hold_ms, policy)
        print("ready", flush=True)
        while not holder.stopping:
            holder.release_due()
            wake = holder.next_wake_ns()
            now = time.monotonic_ns()
            timeout = _IDLE_S if wake is None else min(_IDLE_S, max(0, wake - now) / 1e9)
            try:
                readable, _, _ = select.select([fd], [], [], timeout)
            except InterruptedError:
                continue
            if readable:
                nfq.run(block=False)
            elif wake is not None and timeout > 0:
                holder.learn_oversleep(wake, time.monotonic_ns())
            # Spin (still taking packets in) up to the earliest deadline.
            while holder.heap and not holder.stopping:
                left = holder.heap[0][0] - time.monotonic_ns()
                if left <= 0 or left > holder.early_ns:
                    break
                if select.select([fd], [], [], 0)[0]:
                    nfq.run(block=False)
            holder.release_due()
    finally:
        if rule_in:
            try:
                _run_iptables(spec.delete_cmd())
            except (RuntimeError, subprocess.SubprocessError) as exc:
                log.error("%s", exc)
        # Anything still in the socket, then everything held: out at once.
        with contextlib.suppress(OSError):
            nfq.run(block=False)
        holder.release_all()
        nfq.unbind()
    return holder.stats.summary()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hopscope.testbed.nfq_holder",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--queue", type=int, required=True, help="NFQUEUE number")
    ap.add_argument("--ms", type=float, required=True, help="hold time, milliseconds")
    ap.add_argument("--chain", default="INPUT", help="filter-table chain (default INPUT)")
    ap.add_argument("--proto", choices=["tcp", "udp"], required=True)
    ap.add_argument("--dport", type=int, required=True)
    ap.add_argument("--mark-bit", type=lambda s: int(s, 0), default=DEFAULT_MARK_BIT)
    ap.add_argument("--comment", required=True, help="iptables comment naming the rule")
    ap.add_argument("--max-len", type=int, default=65536, help="kernel queue length")
    ap.add_argument("--no-realtime", action="store_true",
                    help="do not ask for SCHED_FIFO (more jitter on a busy machine)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="nfq_holder: %(message)s")
    if args.ms < 0:
        ap.error("--ms must be >= 0")
    spec = RuleSpec(chain=args.chain, proto=args.proto, dport=args.dport, queue=args.queue,
                    mark_bit=args.mark_bit, comment=args.comment)
    try:
        summary = serve(spec, args.ms, args.max_len, realtime=not args.no_realtime)
    except (OSError, RuntimeError) as exc:
        print(f"nfq_holder: {exc}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
