"""Faults injected into the running network replica, and their undoing.

``hopscope testbed fault KIND ...`` injects one fault; ``fault clear``
undoes them (all, or those of one node), ``fault list`` shows them. Every
active fault is recorded in ``/run/hopscope/testbed-<key>-faults.json``
(beside the replica's state file) with what is needed to undo it, so that a
later ``clear`` -- or ``testbed down`` through :func:`clear_all` -- can undo
faults made by another process.

Kinds (see ``docs/faults.md`` for the exact rules and what hopscope shows):

``delay --at ufw|app|vxlan --node NODE --ms N``
    An :mod:`~hopscope.testbed.nfq_holder` process in the right namespace
    holds matching packets N ms in an NFQUEUE, then re-injects them with a
    mark and the *repeat* verdict (so UFW still decides). ``ufw``: node
    INPUT, tcp dport 80, ahead of UFW. ``app``: each pod's INPUT (the pods
    of NODE, or ``--pod``), tcp dport 8000. ``vxlan``: node INPUT, udp dport
    8472 (VXLAN arriving at NODE).
``ufw-deny-http --node NODE``
    ``ufw insert 1 deny in on eth0 to any port 80 proto tcp`` in the node's
    confined UFW (before its ``allow 80/tcp``).
``ufw-block-vxlan --node NODE``
    Deletes the node's ``allow ... port 8472 proto udp`` rules.
``kill-pod --pod NAME``
    SIGKILLs the pod server (an OOM kill); ``clear`` starts it again with
    the same command line.
``slow-app --ms N [--pod NAME]``
    Adds N ms to the pods' service time (their control file + SIGUSR1).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from hopscope.errors import HopscopeError, TestbedError, UsageError
from hopscope.testbed import netns
from hopscope.testbed.nfq_holder import DEFAULT_MARK_BIT
from hopscope.testbed.topology import (
    DEFAULT_PREFIX,
    ROLE_NIC,
    VXLAN_PORT,
    Instance,
    load_instance,
    normalize_prefix,
    prefix_key,
    run_base,
)

log = logging.getLogger(__name__)

KINDS = ("delay", "ufw-deny-http", "ufw-block-vxlan", "kill-pod", "slow-app")
DELAY_POINTS = ("ufw", "app", "vxlan")
#: First NFQUEUE number used by delay faults (one queue per holder).
QUEUE_BASE = 100
#: Seconds to wait for a holder to report "ready".
HOLDER_START_TIMEOUT = 15.0
#: Seconds to wait for a holder to exit after SIGTERM before SIGKILL.
HOLDER_STOP_TIMEOUT = 5.0
#: Seconds to wait for a restarted pod to accept connections.
POD_START_TIMEOUT = 20.0
#: Comment prefix of every iptables rule a fault adds.
RULE_TAG = "hopscope-fault"


def faults_path(prefix: str) -> Path:
    """``/run/hopscope/testbed-<key>-faults.json``: the active faults of a replica."""
    return run_base() / f"testbed-{prefix_key(prefix)}-faults.json"


@dataclass
class Fault:
    """One active fault and what undoes it."""

    id: str
    kind: str
    node: str  # the node it acts on (a pod's node for pod faults)
    pod: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    undo: dict[str, Any] = field(default_factory=dict)
    created_ns: int = 0

    def describe(self) -> str:
        p = self.params
        if self.kind == "delay":
            where = f"pod {self.pod}" if self.pod else f"node {self.node}"
            return f"delay {p['ms']:g} ms at {p['at']} on {where}"
        if self.kind == "slow-app":
            return f"slow-app +{p['ms']:g} ms on pod {self.pod}"
        if self.kind == "kill-pod":
            return f"kill-pod {self.pod} (on {self.node})"
        return f"{self.kind} on {self.node}"


# ---------------------------------------------------------------------------
# the state file
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(prefix: str) -> Iterator[None]:
    """Serialise fault commands on one replica (an flock beside the state file)."""
    path = faults_path(prefix).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_faults(inst: Instance) -> list[Fault]:
    """Active faults of the replica (empty when none or when the file is stale)."""
    path = faults_path(inst.prefix)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise TestbedError(
            f"cannot read the fault state {path}: {exc}; remove it and check the replica "
            f"(`hopscope testbed status`)"
        ) from exc
    if data.get("instance_created_ns") != inst.created_ns:
        log.warning("ignoring %s: it belongs to an earlier replica", path)
        return []
    return [Fault(**f) for f in data.get("faults", [])]


def save_faults(inst: Instance, faults: list[Fault]) -> None:
    path = faults_path(inst.prefix)
    if not faults:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    doc = {"version": 1, "prefix": inst.prefix, "instance_created_ns": inst.created_ns,
           "faults": [asdict(f) for f in faults]}
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _pid_is(pid: int, marker: str) -> bool:
    """True when ``pid`` is alive and its command line contains ``marker``."""
    return netns.pid_alive(pid) and any(marker in a for a in _cmdline(pid))


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not netns.pid_alive(pid):
            return True
        time.sleep(0.02)
    return not netns.pid_alive(pid)


def _rules_tagged(ns: str, chain: str, tag: str) -> list[list[str]]:
    """``iptables -S CHAIN`` lines of namespace ``ns`` carrying comment ``tag``, as argv."""
    cp = netns.run(["iptables", "-w", "5", "-t", "filter", "-S", chain], ns=ns, check=False)
    out = []
    for line in cp.stdout.splitlines():
        args = shlex.split(line)
        if "--comment" in args and args[args.index("--comment") + 1] == tag:
            out.append(args)
    return out


def _delete_tagged(ns: str, chain: str, tag: str) -> int:
    """Delete every rule of ``chain`` in ``ns`` commented ``tag``; return how many."""
    n = 0
    for args in _rules_tagged(ns, chain, tag):
        if args[:1] != ["-A"]:
            continue
        netns.run(["iptables", "-w", "5", "-t", "filter", "-D", *args[1:]], ns=ns)
        n += 1
    return n


def _ufw_dir(inst: Instance, node: str) -> str:
    dirs = inst.extra.get("ufw_dirs") or {}
    d = dirs.get(node)
    if not d or not Path(d).is_dir():
        raise TestbedError(
            f"UFW of {node} is not set up (no ufw_dirs[{node!r}] in the replica state): "
            "bring the replica up again (`hopscope testbed down && hopscope testbed up`)"
        )
    return str(d)


def _ufw(inst: Instance, node: str, *cmds: list[str]) -> str:
    return netns.ufw(inst.ns(node), _ufw_dir(inst, node), *cmds)


def _ufw_added(inst: Instance, node: str) -> list[list[str]]:
    """``ufw show added``, as argv lists without the leading ``ufw``."""
    out = _ufw(inst, node, ["show", "added"])
    rules = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("ufw "):
            rules.append(shlex.split(line)[1:])
    return rules


def _check_instance(inst: Instance) -> None:
    netns.require_root("hopscope testbed fault")
    if inst.phase != "ready":
        raise TestbedError(
            f"testbed {inst.prefix!r} is not ready (phase {inst.phase!r}): run "
            f"`hopscope testbed down --prefix {prefix_key(inst.prefix)}` and `up` again"
        )


def _add(inst: Instance, fault: Fault, apply: Any) -> Fault:
    """Apply a fault under the lock and record it; refuse a duplicate id."""
    _check_instance(inst)
    with _locked(inst.prefix):
        faults = load_faults(inst)
        if any(f.id == fault.id for f in faults):
            raise UsageError(
                f"fault {fault.id} is already active: `hopscope testbed fault clear` first"
            )
        fault.created_ns = time.time_ns()
        apply(fault, faults)
        faults.append(fault)
        save_faults(inst, faults)
    log.info("fault %s active: %s", fault.id, fault.describe())
    return fault


# ---------------------------------------------------------------------------
# delay (NFQUEUE holder)
# ---------------------------------------------------------------------------


def _free_queue(faults: list[Fault]) -> int:
    used = {int(f.undo.get("queue", -1)) for f in faults}
    q = QUEUE_BASE
    while q in used:
        q += 1
    return q


def _start_holder(inst: Instance, ns: str, *, proto: str, dport: int, queue: int, ms: float,
                  tag: str) -> tuple[int, str]:
    """Start an nfq_holder in ``ns``; return (pid, log path) once its rule is in."""
    logp = Path(inst.run_dir) / f"fault-{tag}.log"
    argv = [sys.executable, "-m", "hopscope.testbed.nfq_holder", "--queue", str(queue),
            "--ms", f"{ms:g}", "--chain", "INPUT", "--proto", proto, "--dport", str(dport),
            "--mark-bit", hex(DEFAULT_MARK_BIT), "--comment", tag]
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                    else "")
    logp.write_text("")
    proc = netns.spawn(ns, argv, logp, env=env)
    deadline = time.monotonic() + HOLDER_START_TIMEOUT
    while time.monotonic() < deadline:
        text = logp.read_text(errors="replace")
        if re.search(r"^ready$", text, re.M):
            return proc.pid, str(logp)
        if proc.poll() is not None:
            raise TestbedError(
                f"the NFQUEUE holder in {ns} exited ({proc.returncode}) before it was ready: "
                f"{text.strip()[-400:] or '(no output)'}; is NetfilterQueue installed in "
                f"{sys.executable}? (`pip install NetfilterQueue`)"
            )
        time.sleep(0.02)
    proc.kill()
    proc.wait(5)
    _delete_tagged(ns, "INPUT", tag)
    raise TestbedError(f"the NFQUEUE holder in {ns} did not get ready within "
                       f"{HOLDER_START_TIMEOUT:.0f} s; see {logp}")


def _stop_holder(undo: dict[str, Any]) -> dict[str, Any] | None:
    """Stop a holder (SIGTERM: it removes its rule); make sure the rule is gone."""
    pid = int(undo.get("pid", 0))
    tag = str(undo["tag"])
    ns = str(undo["ns"])
    summary: dict[str, Any] | None = None
    if pid and _pid_is(pid, tag):
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, HOLDER_STOP_TIMEOUT):
            log.warning("holder %d (%s) ignored SIGTERM; killing it", pid, tag)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 2.0)
    logp = undo.get("log")
    if logp:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(logp).read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    summary = json.loads(line)
    if netns.exists(ns):
        left = _delete_tagged(ns, "INPUT", tag)
        if left:
            log.warning("removed %d leftover NFQUEUE rule(s) %s in %s", left, tag, ns)
    return summary


def add_delay(inst: Instance, at: str, node: str, ms: float,
              pod: str | None = None) -> list[Fault]:
    """Hold packets ``ms`` milliseconds at ``at`` (ufw, app or vxlan) on ``node``."""
    topo = inst.topology
    if at not in DELAY_POINTS:
        raise UsageError(f"--at {at!r} is not a delay point: use one of {', '.join(DELAY_POINTS)}")
    if not 0 < ms <= 10_000:
        raise UsageError(f"--ms {ms:g} is out of range: give 0 < ms <= 10000")
    topo.node(node)
    targets: list[tuple[str, str]]  # (namespace, pod name or "")
    if at == "app":
        pods = [topo.pod(pod)] if pod else topo.pods_on(node)
        if pod and pods[0].node != node:
            raise UsageError(f"pod {pod} runs on {pods[0].node}, not {node}: "
                             f"use --node {pods[0].node}")
        if not pods:
            raise UsageError(f"no pod runs on {node}: choose another --node")
        targets = [(topo.ns(p.name), p.name) for p in pods]
        proto, dport = "tcp", topo.service_port
    else:
        if pod:
            raise UsageError("--pod only goes with --at app")
        targets = [(topo.ns(node), "")]
        proto, dport = ("tcp", topo.http_port) if at == "ufw" else ("udp", VXLAN_PORT)
    made: list[Fault] = []
    for ns, pname in targets:
        fid = f"delay@{at}/{pname or node}"
        tag = f"{RULE_TAG}-{fid.replace('@', '-').replace('/', '-')}"

        def apply(f: Fault, faults: list[Fault], ns: str = ns, tag: str = tag) -> None:
            queue = _free_queue(faults)
            pid, logp = _start_holder(inst, ns, proto=proto, dport=dport, queue=queue, ms=ms,
                                      tag=tag)
            f.undo = {"ns": ns, "pid": pid, "tag": tag, "queue": queue, "log": logp,
                      "chain": "INPUT", "proto": proto, "dport": dport}

        made.append(_add(inst, Fault(fid, "delay", node, pname,
                                     {"at": at, "ms": ms, "proto": proto, "dport": dport}),
                         apply))
    return made


# ---------------------------------------------------------------------------
# UFW faults
# ---------------------------------------------------------------------------


def add_ufw_deny_http(inst: Instance, node: str) -> Fault:
    """Insert ``deny in on eth0 to any port 80 proto tcp`` first in ``node``'s UFW.

    New connections' SYNs are dropped at the NIC. (A plain ``ufw insert 1
    deny 80/tcp`` is refused by UFW as the same rule as ``allow 80/tcp``;
    naming the public NIC makes it a rule of its own, placed before the
    allow.) Connections already established keep working: UFW accepts
    ESTABLISHED traffic before its user rules.
    """
    topo = inst.topology
    topo.node(node)
    nics = topo.interfaces_by_role(node, ROLE_NIC) or ["eth0"]
    rule = ["deny", "in", "on", nics[0], "to", "any", "port", str(topo.http_port),
            "proto", "tcp"]

    def apply(f: Fault, _faults: list[Fault]) -> None:
        _ufw(inst, node, ["insert", "1", *rule])
        if rule not in _ufw_added(inst, node):
            raise TestbedError(f"UFW on {node} did not take `{' '.join(rule)}`: check "
                               "`ufw show added` there")
        f.undo = {"rule": rule}

    return _add(inst, Fault(f"ufw-deny-http@{node}", "ufw-deny-http", node, "",
                            {"rule": " ".join(rule), "position": 1}), apply)


def _is_vxlan_allow(rule: list[str]) -> bool:
    if not rule or rule[0] not in ("allow", "limit"):
        return False
    text = " ".join(rule)
    return (f"port {VXLAN_PORT}" in text and "proto tcp" not in text) or any(
        a in (f"{VXLAN_PORT}/udp", str(VXLAN_PORT)) for a in rule
    )


def add_ufw_block_vxlan(inst: Instance, node: str) -> Fault:
    """Delete ``node``'s UFW allowances of udp 8472: VXLAN arriving there is dropped."""
    inst.topology.node(node)

    def apply(f: Fault, _faults: list[Fault]) -> None:
        added = _ufw_added(inst, node)
        removed = [(i + 1, r) for i, r in enumerate(added) if _is_vxlan_allow(r)]
        if not removed:
            raise TestbedError(
                f"{node}'s UFW has no rule allowing udp {VXLAN_PORT} (VXLAN is already "
                "blocked, or UFW was changed by hand): check `ufw show added` there"
            )
        for _, r in removed:
            _ufw(inst, node, ["delete", *r])
        f.undo = {"readd": [{"position": pos, "rule": r} for pos, r in removed]}
        f.params["removed"] = [" ".join(r) for _, r in removed]

    return _add(inst, Fault(f"ufw-block-vxlan@{node}", "ufw-block-vxlan", node, "", {}), apply)


def _undo_ufw_block_vxlan(inst: Instance, f: Fault) -> None:
    for item in f.undo.get("readd", []):
        rule = [str(a) for a in item["rule"]]
        present = _ufw_added(inst, f.node)
        if rule in present:
            continue
        pos = int(item["position"])
        if pos <= len(present):
            _ufw(inst, f.node, ["insert", str(pos), *rule])
        else:
            _ufw(inst, f.node, rule)


# ---------------------------------------------------------------------------
# pod faults
# ---------------------------------------------------------------------------


def add_kill_pod(inst: Instance, pod: str) -> Fault:
    """SIGKILL the pod server (like an OOM kill); Traefik answers 502 for it."""
    p = inst.topology.pod(pod)

    def apply(f: Fault, _faults: list[Fault]) -> None:
        pid = inst.pod_pid(pod)
        if pid is None or not _pid_is(pid, "podserver"):
            raise TestbedError(f"pod {pod} is not running (pid {pid}): "
                               "check `hopscope testbed status`")
        argv = _cmdline(pid)
        try:
            env = dict(
                kv.split("=", 1)
                for kv in Path(f"/proc/{pid}/environ").read_text(errors="replace").split("\0")
                if "=" in kv
            )
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError as exc:
            raise TestbedError(f"cannot read pod {pod}'s process {pid}: {exc}") from exc
        os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, 5.0):
            raise TestbedError(f"pod {pod} (pid {pid}) survived SIGKILL")
        f.undo = {"argv": argv, "env": env, "cwd": cwd, "ns": inst.ns(pod), "old_pid": pid}

    return _add(inst, Fault(f"kill-pod@{pod}", "kill-pod", p.node, pod, {"signal": "KILL"}),
                apply)


def _undo_kill_pod(inst: Instance, f: Fault) -> None:
    pod = inst.topology.pod(f.pod)
    rdir = Path(inst.run_dir)
    proc = netns.spawn(str(f.undo["ns"]), list(f.undo["argv"]),
                       rdir / f"pod-{f.pod}.stderr", env=dict(f.undo["env"]),
                       cwd=str(f.undo.get("cwd") or rdir))
    # the replica's state records the new pid (build.py's Instance API)
    fresh = load_instance(inst.prefix)
    fresh.pids[f"pod@{f.pod}"] = proc.pid
    fresh.save()
    inst.pids[f"pod@{f.pod}"] = proc.pid
    if not netns.wait_tcp(inst.ns(pod.node), pod.ip, pod.port, POD_START_TIMEOUT):
        raise TestbedError(f"pod {f.pod} did not accept connections on {pod.ip}:{pod.port} "
                           f"within {POD_START_TIMEOUT:.0f} s after restart; see "
                           f"{rdir / f'pod-{f.pod}.stderr'}")


def _read_control(path: str) -> tuple[str | None, dict[str, Any]]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None, {}
    try:
        data = json.loads(text)
    except ValueError:
        return text, {}
    return text, data if isinstance(data, dict) else {}


def _service_ms(data: dict[str, Any]) -> float:
    try:
        return float(data.get("service_ms", 0.0))
    except (ValueError, TypeError):
        return 0.0


def _write_control(inst: Instance, pod: str, path: str, text: str | None) -> None:
    p = Path(path)
    if text is None:
        p.unlink(missing_ok=True)
    else:
        tmp = p.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(p)
    pid = inst.pod_pid(pod)
    if pid is not None and _pid_is(pid, "podserver"):
        os.kill(pid, signal.SIGUSR1)


def set_pod_close_every(inst: Instance, n: int) -> None:
    """Make every pod end every ``n``-th response's connection (0: never).

    Not a fault (``clear`` leaves it): a test's way to make the proxy open new
    upstream connections while it watches."""
    for p in inst.topology.pods:
        ctl = inst.pod_control(p.name)
        if not ctl:
            raise TestbedError(f"pod {p.name} has no control file in the replica state: "
                               "bring the replica up again")
        _text, data = _read_control(ctl)
        _write_control(inst, p.name, ctl, json.dumps({**data, "close_every": n}) + "\n")


def add_slow_app(inst: Instance, ms: float, pod: str | None = None) -> list[Fault]:
    """Add ``ms`` to the service time of ``pod`` (or of every pod)."""
    if not 0 < ms <= 60_000:
        raise UsageError(f"--ms {ms:g} is out of range: give 0 < ms <= 60000")
    pods = [inst.topology.pod(pod)] if pod else list(inst.topology.pods)
    made = []
    for p in pods:
        ctl = inst.pod_control(p.name)
        if not ctl:
            raise TestbedError(f"pod {p.name} has no control file in the replica state: "
                               "bring the replica up again")

        def apply(f: Fault, _faults: list[Fault], name: str = p.name, ctl: str = ctl) -> None:
            old_text, data = _read_control(ctl)
            old_ms = _service_ms(data)
            _write_control(inst, name, ctl, json.dumps({**data, "service_ms": old_ms + ms}) + "\n")
            f.undo = {"control": ctl, "old_text": old_text}
            f.params["service_ms"] = old_ms + ms

        made.append(_add(inst, Fault(f"slow-app@{p.name}", "slow-app", p.node, p.name,
                                     {"ms": ms}), apply))
    return made


# ---------------------------------------------------------------------------
# clear
# ---------------------------------------------------------------------------


def _undo(inst: Instance, f: Fault) -> None:
    if f.kind == "delay":
        summary = _stop_holder(f.undo)
        if summary:
            log.info("holder %s: %s", f.id, summary)
            f.params["holder_summary"] = summary
    elif f.kind == "ufw-deny-http":
        rule = [str(a) for a in f.undo["rule"]]
        if rule in _ufw_added(inst, f.node):
            _ufw(inst, f.node, ["delete", *rule])
        if rule in _ufw_added(inst, f.node):
            raise TestbedError(f"could not delete UFW rule {f.params['rule']!r} on {f.node}")
    elif f.kind == "ufw-block-vxlan":
        _undo_ufw_block_vxlan(inst, f)
    elif f.kind == "kill-pod":
        _undo_kill_pod(inst, f)
    elif f.kind == "slow-app":
        _write_control(inst, f.pod, str(f.undo["control"]), f.undo.get("old_text"))
    else:
        raise TestbedError(f"unknown fault kind {f.kind!r} in the fault state")


def clear(inst: Instance, node: str | None = None) -> list[Fault]:
    """Undo the active faults (of ``node`` only, when given), newest first.

    Returns the faults undone. A fault whose undoing fails stays recorded;
    the others are still undone, then TestbedError names the failures.
    """
    netns.require_root("hopscope testbed fault clear")
    if node is not None:
        inst.topology.node(node)
    with _locked(inst.prefix):
        faults = load_faults(inst)
        keep: list[Fault] = []
        done: list[Fault] = []
        errors: list[str] = []
        for f in reversed(faults):
            if node is not None and f.node != node:
                keep.append(f)
                continue
            try:
                _undo(inst, f)
                done.append(f)
            except (HopscopeError, OSError) as exc:
                errors.append(f"{f.id}: {exc}")
                keep.append(f)
        keep.reverse()
        save_faults(inst, keep)
    if errors:
        raise TestbedError("could not undo " + "; ".join(errors)
                           + " (they stay recorded: fix and run `fault clear` again, or "
                           "`testbed down`)")
    return done


def clear_all(state: Instance) -> list[str]:
    """Hook for ``testbed down``: undo every fault, best effort, never raising.

    Stops NFQUEUE holders (their rules go with them), restores UFW rules,
    service times and killed pods, then removes the fault state file.
    Returns messages about what could not be undone (also logged).
    """
    problems: list[str] = []
    try:
        faults = load_faults(state)
    except HopscopeError as exc:
        faults = []
        problems.append(str(exc))
    for f in reversed(faults):
        try:
            if f.kind == "kill-pod":
                continue  # down removes the pods anyway
            _undo(state, f)
        except (HopscopeError, OSError) as exc:
            problems.append(f"{f.id}: {exc}")
    faults_path(state.prefix).unlink(missing_ok=True)
    faults_path(state.prefix).with_suffix(".lock").unlink(missing_ok=True)
    for p in problems:
        log.warning("fault clear_all: %s", p)
    return problems


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def _prefix(ctx: click.Context, own: str | None) -> str:
    if own:
        return normalize_prefix(own)
    c: click.Context | None = ctx
    while c is not None:
        v = c.params.get("prefix")
        if v:
            return normalize_prefix(str(v))
        if isinstance(c.obj, dict) and c.obj.get("prefix"):
            return normalize_prefix(str(c.obj["prefix"]))
        c = c.parent
    return DEFAULT_PREFIX


def _inst(ctx: click.Context) -> Instance:
    return load_instance(_prefix(ctx, None))


_prefix_opt = click.option("--prefix", default=None,
                           help=f"Replica prefix (default: the testbed group's, or {DEFAULT_PREFIX}).")


@click.group("fault")
@_prefix_opt
def fault_group(prefix: str | None) -> None:
    """Inject faults into the running replica (undo with `fault clear`)."""


@fault_group.command("delay")
@click.option("--at", "at", type=click.Choice(DELAY_POINTS), required=True,
              help="ufw: node INPUT tcp/80; app: pod INPUT tcp/8000; vxlan: node INPUT udp/8472.")
@click.option("--node", required=True, help="Node (for --at app: the node whose pods).")
@click.option("--ms", type=float, required=True, help="Milliseconds to hold each packet.")
@click.option("--pod", default=None, help="Only this pod (--at app).")
@_prefix_opt
@click.pass_context
def delay_cmd(ctx: click.Context, at: str, node: str, ms: float, pod: str | None,
              prefix: str | None) -> None:
    """Hold every matching packet MS ms (NFQUEUE; UFW's verdict stays in force)."""
    for f in add_delay(_inst(ctx), at, node, ms, pod):
        click.echo(f"{f.id}: {f.describe()} (NFQUEUE {f.undo['queue']}, holder pid "
                   f"{f.undo['pid']})")


@fault_group.command("ufw-deny-http")
@click.option("--node", required=True)
@_prefix_opt
@click.pass_context
def ufw_deny_http_cmd(ctx: click.Context, node: str, prefix: str | None) -> None:
    """`ufw insert 1 deny in on eth0 ... port 80`: NODE drops SYNs from the edge."""
    f = add_ufw_deny_http(_inst(ctx), node)
    click.echo(f"{f.id}: {f.describe()}")


@fault_group.command("ufw-block-vxlan")
@click.option("--node", required=True)
@_prefix_opt
@click.pass_context
def ufw_block_vxlan_cmd(ctx: click.Context, node: str, prefix: str | None) -> None:
    """Delete NODE's UFW allowance of udp 8472: cross-node requests time out (504)."""
    f = add_ufw_block_vxlan(_inst(ctx), node)
    click.echo(f"{f.id}: removed {'; '.join(f.params.get('removed', []))}")


@fault_group.command("kill-pod")
@click.option("--pod", required=True)
@_prefix_opt
@click.pass_context
def kill_pod_cmd(ctx: click.Context, pod: str, prefix: str | None) -> None:
    """SIGKILL the pod's server: Traefik answers 502 for requests routed to it."""
    f = add_kill_pod(_inst(ctx), pod)
    click.echo(f"{f.id}: {f.describe()}")


@fault_group.command("slow-app")
@click.option("--ms", type=float, required=True, help="Milliseconds added to the service time.")
@click.option("--pod", default=None, help="Only this pod (default: every pod).")
@_prefix_opt
@click.pass_context
def slow_app_cmd(ctx: click.Context, ms: float, pod: str | None, prefix: str | None) -> None:
    """Make the pods' service time MS ms longer."""
    for f in add_slow_app(_inst(ctx), ms, pod):
        click.echo(f"{f.id}: {f.describe()} (now {f.params['service_ms']:g} ms)")


@fault_group.command("clear")
@click.option("--node", default=None, help="Only the faults on this node.")
@_prefix_opt
@click.pass_context
def clear_cmd(ctx: click.Context, node: str | None, prefix: str | None) -> None:
    """Undo the active faults (all, or those of one node)."""
    done = clear(_inst(ctx), node)
    for f in done:
        click.echo(f"cleared {f.id}")
    if not done:
        click.echo("no active fault" + (f" on {node}" if node else ""))


@fault_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@_prefix_opt
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool, prefix: str | None) -> None:
    """List the active faults."""
    faults = load_faults(_inst(ctx))
    if as_json:
        click.echo(json.dumps([asdict(f) for f in faults], indent=2))
        return
    if not faults:
        click.echo("no active fault")
    for f in faults:
        note = ""
        if f.kind == "delay" and not _pid_is(int(f.undo.get("pid", 0)), str(f.undo.get("tag"))):
            note = "  (holder NOT running: packets pass unheld; `fault clear` removes the rule)"
        click.echo(f"{f.id:28} {f.describe()}{note}")
