"""Which firewall rule dropped a packet: iptables' per-rule counters, read around a drop.

The kernel's drop reason says ``NETFILTER_DROP`` but not which rule. Every
iptables rule counts the packets it matched, so the agent reads the counters
of the rules that drop (``-j DROP``/``-j REJECT``, and chains whose policy is
DROP) with ``iptables-save -c`` when it sees such a drop, and names the rule
whose counter moved since the previous reading. When several moved, the one
whose plain matches (``-p``, ``-s``, ``-d``, ``--dport``, ``--sport``,
``-i``) fit the dropped packet is chosen; a rule whose matches are not all
understood still fits. Readings are rate-limited; drops between two
readings are named from the last rules seen to move that fit them (a drop
that none fits brings the next reading forward, to a fifth of the interval).

This works on every kernel (UFW is iptables, legacy or nft backend) and
needs no kprobe. Rule text is iptables-save's, less ``-A CHAIN``:
``ufw-user-input: -p tcp -m tcp --dport 80 -j DROP``; a policy is
``INPUT: policy DROP``.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

DROPPING = ("DROP", "REJECT")
MIN_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    spec: str  # iptables-save text after "-A CHAIN ", or "policy DROP"

    def text(self) -> str:
        return f"{self.chain}: {self.spec}"

    def fits(self, proto: int, src: bytes, sport: int, dst: bytes, dport: int) -> bool:
        """Could this rule have matched a packet with these fields?"""
        toks = self.spec.split()
        i = 0
        while i < len(toks):
            t = toks[i]
            neg = False
            if t == "!" and i + 1 < len(toks):
                neg, i = True, i + 1
                t = toks[i]
            arg = toks[i + 1] if i + 1 < len(toks) else ""
            ok: bool | None = None
            if t in ("-p", "--protocol"):
                ok = _proto_ok(arg, proto)
            elif t in ("-s", "--source"):
                ok = _addr_ok(arg, src)
            elif t in ("-d", "--destination"):
                ok = _addr_ok(arg, dst)
            elif t in ("--dport", "--destination-port", "--dports"):
                ok = _port_ok(arg, dport)
            elif t in ("--sport", "--source-port", "--sports"):
                ok = _port_ok(arg, sport)
            if ok is not None and ok == neg:
                return False
            i += 1
        return True


def _proto_ok(arg: str, proto: int) -> bool:
    names = {"tcp": 6, "udp": 17, "icmp": 1, "all": -1}
    want = names.get(arg.lower(), int(arg) if arg.isdigit() else -2)
    return want == -1 or want == proto


def _addr_ok(arg: str, addr: bytes) -> bool:
    try:
        return ipaddress.ip_address(addr) in ipaddress.ip_network(arg, strict=False)
    except ValueError:
        return True


def _port_ok(arg: str, port: int) -> bool:
    try:
        for part in arg.split(","):
            lo, _, hi = part.partition(":")
            if int(lo or 0) <= port <= int(hi or lo or 65535):
                return True
    except ValueError:
        return True
    return False


def parse_save(text: str) -> dict[Rule, int]:
    """Packet counters of the dropping rules and DROP policies in ``iptables-save -c`` text."""
    out: dict[Rule, int] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            # :INPUT DROP [12:3456]
            parts = line[1:].split()
            if len(parts) >= 3 and parts[1] == "DROP":
                out[Rule(table, parts[0], "policy DROP")] = _pkts(parts[2])
        elif line.startswith("[") and " -A " in line:
            counters, _, rest = line.partition(" -A ")
            chain, _, spec = rest.partition(" ")
            toks = spec.split()
            if "-j" in toks and toks.index("-j") + 1 < len(toks) and \
                    toks[toks.index("-j") + 1] in DROPPING:
                out[Rule(table, chain, spec)] = _pkts(counters)
    return out


def _pkts(counters: str) -> int:
    try:
        return int(counters.strip("[]").split(":")[0])
    except ValueError:
        return 0


def iptables_save() -> str:
    """``iptables-save -c`` of this namespace ("" when iptables is not installed)."""
    exe = shutil.which("iptables-save")
    if exe is None:
        return ""
    r = subprocess.run([exe, "-c"], capture_output=True, text=True, timeout=10)
    return r.stdout if r.returncode == 0 else ""


class RuleNamer:
    """Names the rule behind NETFILTER_DROP drops from counter readings."""

    def __init__(self, read: Callable[[], str] = iptables_save,
                 clock: Callable[[], float] = time.monotonic,
                 min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.read = read
        self.clock = clock
        self.min_interval_s = min_interval_s
        self.readings = 0
        self._last_at = -1e9
        self._prev: dict[Rule, int] = {}
        self._recent: list[Rule] = []  # rules that moved in the last reading that moved
        self.available = True
        self._prev = self._reading()

    def _reading(self) -> dict[Rule, int]:
        try:
            now = parse_save(self.read())
        except (OSError, subprocess.SubprocessError) as exc:
            if self.available:
                log.warning("cannot read iptables counters (%s): drops are not named by rule",
                            exc)
            self.available = False
            now = {}
        self.readings += 1
        self._last_at = self.clock()
        return now

    def name(self, drops: Sequence[tuple[int, bytes, int, bytes, int]]) -> list[str]:
        """Rule text (or "") for each drop (proto, src, sport, dst, dport) seen since the
        last call."""
        if not drops or not self.available:
            return [""] * len(drops)
        since = self.clock() - self._last_at
        if since >= self.min_interval_s or (
                since >= self.min_interval_s / 5 and not all(self._named(d) for d in drops)):
            self._update()
        return [self._named(d) for d in drops]

    def _update(self) -> None:
        now = self._reading()
        delta = {r: n - self._prev.get(r, 0) for r, n in now.items()}
        self._prev = now
        moved = [r for r, d in delta.items() if d > 0]
        if moved:
            # the most-moved first: what most of these drops are
            moved.sort(key=lambda r: -delta[r])
            self._recent = moved

    def _named(self, d: tuple[int, bytes, int, bytes, int]) -> str:
        fit = [r for r in self._recent if r.fits(*d)]
        # a rule before a policy: the policy only sees what no rule took
        fit.sort(key=lambda r: r.spec == "policy DROP")
        return fit[0].text() if fit else ""
