"""An empty tc classifier beside the agent's, to measure the floor of a run in place.

``load()`` loads a two-instruction program (``r0 = TC_ACT_UNSPEC; exit``) with
bpf(2) directly (no compiler); :class:`NoopBeside` attaches it in front of
the agent's own filters (a lower priority number runs first; ``TC_ACT_UNSPEC``
hands the packet on to the next filter) on every interface of the given
namespaces where the agent has its filters, and removes exactly those filters
again. Its ``run_time_ns``/``run_cnt`` (``kernel.bpf_stats_enabled``) is what
any classifier costs there, on the same packets, at the same time: cold cache
lines, the run-time accounting itself, this VM's steal.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import struct
from typing import Any

from hopscope.agent import bpfsys
from hopscope.agent.bpfprog import FILTER_NAMES, TC_EGRESS, TC_INGRESS, _filter_name

from hopscope.testbed import netns

log = logging.getLogger(__name__)

BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
NAME = "hsbench_noop"  # the program's name (at most 15 characters)
FILTER = "hsbench-noop"  # the tc filters' name
PRIO = 1  # before the agent's (bpfprog.FILTER_PRIO)
_INSNS = (struct.pack("<BBhi", 0xB7, 0, 0, -1)  # r0 = -1 (TC_ACT_UNSPEC)
          + struct.pack("<BBhi", 0x95, 0, 0, 0))  # exit


def load() -> int:
    """The program's fd (close it to unload)."""
    insns = ctypes.create_string_buffer(_INSNS, len(_INSNS))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQIIQII16s", attr, 0, BPF_PROG_TYPE_SCHED_CLS, len(_INSNS) // 8,
                     ctypes.addressof(insns), ctypes.addressof(lic), 0, 0, 0, 0, 0,
                     NAME.encode())
    fd = bpfsys._bpf(BPF_PROG_LOAD, attr)
    if fd < 0:
        raise OSError(-fd, f"BPF_PROG_LOAD {NAME}: {os.strerror(-fd)}")
    return fd


def run_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the program behind ``fd`` in this process."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        info = dict(line.split(":", 1) for line in f if ":" in line)
    return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))


class NoopBeside:
    """The empty classifier in front of the agent's filters in some namespaces."""

    def __init__(self, fd: int, namespaces: list[str]) -> None:
        self.fd = fd
        self.namespaces = namespaces
        self.attached: list[tuple[str, int, str]] = []  # (netns, ifindex, parent)

    # (pyroute2's NetNS forks a copy of this process, whose clean-up on SIGTERM would
    # unwind the bench's own stack: a thread setns(2)-ed into the namespace instead)
    def __enter__(self) -> NoopBeside:
        def attach(ns: str) -> None:
            from pyroute2 import IPRoute

            with contextlib.closing(IPRoute()) as ipr:
                for link in ipr.get_links():
                    idx = link["index"]
                    for parent in (TC_INGRESS, TC_EGRESS):
                        if not self._agent_there(ipr, idx, parent):
                            continue
                        ipr.tc("add-filter", "bpf", idx, ":1", fd=self.fd, name=FILTER,
                               parent=parent, classid=1, direct_action=True, prio=PRIO)
                        self.attached.append((ns, idx, parent))

        try:
            for ns in self.namespaces:
                netns.call_in_netns(ns, attach, ns)
        except BaseException:
            self.__exit__()
            raise
        return self

    @staticmethod
    def _agent_there(ipr: Any, idx: int, parent: str) -> bool:
        try:
            msgs = list(ipr.get_filters(idx, parent=parent))
        except Exception:
            return False
        return any(m["handle"] and _filter_name(m) in FILTER_NAMES for m in msgs)

    def __exit__(self, *exc: object) -> None:
        def detach(where: list[tuple[int, str]]) -> None:
            from pyroute2 import IPRoute

            with contextlib.closing(IPRoute()) as ipr:
                for idx, parent in where:
                    for m in list(ipr.get_filters(idx, parent=parent)):
                        if m["handle"] and _filter_name(m) == FILTER:
                            with contextlib.suppress(Exception):  # the link may be gone
                                ipr.tc("del-filter", "bpf", idx, m["handle"], parent=parent,
                                       prio=m["info"] >> 16)

        by_ns: dict[str, list[tuple[int, str]]] = {}
        for ns, idx, parent in self.attached:
            by_ns.setdefault(ns, []).append((idx, parent))
        for ns, where in by_ns.items():
            try:
                netns.call_in_netns(ns, detach, where)
            except Exception as exc:  # the namespace may be gone
                log.warning("removing %s filters in %s: %s", FILTER, ns, exc)
        self.attached.clear()
