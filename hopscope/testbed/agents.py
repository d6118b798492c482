"""Run the live agent on the replica's nodes: one per node, inside its namespace.

All the replica's nodes share one kernel, so each agent keeps only the events
of its own network namespace (the BPF programs' ``netns_ok`` map); the tc
classifiers are attached to the interfaces of that namespace only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hopscope.errors import HopscopeError
from hopscope.testbed.topology import Instance

log = logging.getLogger(__name__)

#: from the start to the ready file: the programs' compile (clang, in bcc), their load, the
#: exec without bcc and the attach. An agent that fails exits and is reported at once; this
#: only bounds one that hangs. 60 s was too tight in the VM suite on a slow hour (a run's
#: node1 agent was still in its exec after 60 s, 2026-11-29)
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0


@dataclass
class AgentProc:
    node: str
    ns: str
    proc: subprocess.Popen[bytes]
    out: Path
    record: Path
    log: Path


@dataclass
class AgentSet:
    agents: dict[str, AgentProc] = field(default_factory=dict)


def start_agent(inst: Instance, node: str, out_dir: Path, extra: Iterable[str] = (),
                stitch: bool = True) -> AgentProc:
    """One agent in ``node``'s namespace, recording what it sees (``--record``); with
    ``stitch`` it also stitches in-process (``--out``), else it only records (and ships,
    given ``--collector`` in ``extra``), as a production agent does."""
    ns = inst.ns(node)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"agent-{node}.json"
    rec = out_dir / f"agent-{node}.obs"
    logf = out_dir / f"agent-{node}.log"
    ready = out_dir / f"agent-{node}.ready"
    ready.unlink(missing_ok=True)
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "hopscope", "-v", "agent", "run",
            "--node", node, *(["--out", str(out)] if stitch else []), "--record", str(rec),
            "--ready-file", str(ready), *extra]
    with open(logf, "wb") as lf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)
    a = AgentProc(node, ns, proc, out, rec, logf)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_agent(a)
            tail = logf.read_text(errors="replace").strip().splitlines()[-3:]
            raise HopscopeError(f"agent on {node} did not start: " + " | ".join(tail))
        time.sleep(0.1)
    return a


def stop_agent(a: AgentProc, sig: int = signal.SIGTERM) -> int | None:
    """Stop one agent (SIGTERM: it detaches); returns its exit status."""
    if a.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(a.proc.pid, sig)
        try:
            a.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            a.proc.kill()
            a.proc.wait()
    return a.proc.returncode


def remove_stale_in(ns: str) -> None:
    """Remove hopscope filters in a namespace (a killed agent's), from a child process."""
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                    "from hopscope.agent.bpfprog import remove_stale; remove_stale()"],
                   check=False, capture_output=True, timeout=60)


@contextlib.contextmanager
def running_agents(inst: Instance, out_dir: Path, nodes: Iterable[str] | None = None,
                   extra: Iterable[str] = (), stitch: bool = True) -> Iterator[AgentSet]:
    """Agents on ``nodes`` (default all) while the body runs; stopped (detached) after."""
    names = list(nodes) if nodes is not None else [n.name for n in inst.topology.nodes]
    s = AgentSet()
    try:
        for n in names:
            s.agents[n] = start_agent(inst, n, out_dir, extra, stitch)
        yield s
    finally:
        for a in s.agents.values():
            rc = stop_agent(a)
            if rc not in (0, None):
                log.warning("agent %s exited %s", a.node, rc)
                remove_stale_in(a.ns)


def stitch_records(agents: AgentSet, nodes: Iterable[str]) -> dict[str, Any]:
    """One envelope from what every agent recorded (``--record``), stitched together."""
    from hopscope.agent.run import read_record
    from hopscope.stitch import Stitcher

    names = list(nodes)
    st = Stitcher(names)
    for n in names:
        st.feed(n, sorted(read_record(str(agents.agents[n].record)), key=lambda o: o.ts_mono_ns))
    return st.result()
