"""Build, load, attach and detach the agent's BPF programs (bcc + pyroute2).

* :func:`prepare_kernel_env` gives the agent a private mount namespace with
  tracefs mounted and, when this kernel has no matching headers, another
  version's headers linked where bcc looks (the host's mounts stay as they
  are; see ``hopscope doctor``).
* :func:`cflags` turns settings and kernel struct offsets read from BTF into
  ``-D`` defines: the C sources are never edited as strings.
* :class:`AgentProgram` compiles ``bpf/agent.c``, fills its config maps,
  attaches the tc classifiers (filters named ``hopscope-in``/``hopscope-out``)
  and detaches them again; :func:`remove_stale` deletes what a killed agent
  left behind, found by that name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hopscope.agent import bpfsys
from hopscope.agent import events as ev
from hopscope.agent import features as ft

from hopscope.errors import HopscopeError

log = logging.getLogger(__name__)

BPF_DIR = ev.BPF_DIR
#: tc filter names: how a later agent (and ``hopscope doctor``) knows them as hopscope's
FILTER_IN = f"{ft.HOPSCOPE_PREFIX}-in"
FILTER_OUT = f"{ft.HOPSCOPE_PREFIX}-out"
FILTER_NAMES = (FILTER_IN, FILTER_OUT)
TC_INGRESS = "ffff:fff2"
TC_EGRESS = "ffff:fff3"
FILTER_PRIO = 0xC0DE


class AgentError(HopscopeError):
    """The agent could not set up its probes."""


# -- the kernel environment ----------------------------------------------------------------


def prepare_kernel_env(release: str | None = None) -> list[str]:
    """Private mounts for bcc: tracefs when none is mounted, and another version's
    headers when none match this kernel (:func:`features.private_mounts`).

    Must run before any thread starts and before ``bcc`` is imported. Returns
    notes on what was done, for the log.
    """
    release = release or ft.kernel_release()
    notes: list[str] = []
    tracefs = None
    if ft.find_tracefs() is None:
        tracefs = ft.TRACEFS_CANDIDATES[0]
        notes.append(f"tracefs mounted privately at {tracefs}")
    info = ft.probe_headers(release)
    stage = None
    if not (info.present and info.has_kconfig_h):
        stage = next((c for c in info.candidates if c.source), None) or (
            info.candidates[0] if info.candidates else None)
        if stage is None:
            raise AgentError(f"no kernel headers for {release} and none of another version: "
                             f"{ft.headers_fix(info, None)}")
        notes.append(f"no headers for {release}: using {stage.version}'s UAPI headers "
                     "(the programs read kernel structs only at BTF offsets)")
    elif not info.matches:
        notes.append(f"headers are {info.version}, kernel is {release}")
    if tracefs or stage:
        # only then: a private mount namespace needs CAP_SYS_ADMIN, which the systemd unit
        # does not grant (it gets tracefs and, when needed, the headers from systemd)
        ft.private_mounts(tracefs=tracefs, stage=stage, release=release)
    return notes


# -- settings -------------------------------------------------------------------------------

#: (define, struct, member path) read from the running kernel's BTF
BTF_OFFSETS = (
    ("HS_SKB_DATA_OFF", "sk_buff", "data"),
    ("HS_SKB_HEAD_OFF", "sk_buff", "head"),
    ("HS_SKB_NH_OFF", "sk_buff", "network_header"),
    ("HS_SKB_DEV_OFF", "sk_buff", "dev"),
    ("HS_DEV_NET_OFF", "net_device", "nd_net"),
    ("HS_DEV_IFINDEX_OFF", "net_device", "ifindex"),
    ("HS_NET_INUM_OFF", "net", "ns.inum"),
    ("HS_SK_NET_OFF", "sock_common", "skc_net"),
    ("HS_SKB_SK_OFF", "sk_buff", "sk"),
)
#: how many proxy processes the programs tell apart (bpf/hopscope.h HS_MAX_PROXY)
MAX_PROXY = 16
#: maps the agent updates or reads after loading: name -> (key size, value size, per CPU)
MAPS: dict[str, tuple[int, int, bool]] = {
    "netns_ok": (4, 1, False),
    "proxy_set": (4, 4 * MAX_PROXY, False),
    "ifroles": (4, 1, False),
    "stats": (4, 8, True),
    "events": (0, 0, False),  # the ring buffer: only its fd (agent/ringbuf.py maps it)
}
#: the proxy's syscalls ``bpf/agent.c`` can trace (``sys_enter_*``/``sys_exit_*``: the
#: thread is sending), each compiled in by its ``HS_SC_*`` define
PROXY_CALLS = ("write", "writev", "sendto", "sendmsg", "connect")
#: traced by default: Traefik's (Go's net package writes with write(2), connects with
#: connect(2); writev for vectored writes). Each one traced runs its two programs on every
#: such call of every process of the machine: sendto/sendmsg (most other programs' sends)
#: cost a proxy that never makes them 1.5 to 1.9 µs a request in the replica (bench/README.md).
PROXY_CALLS_DEFAULT = ("write", "writev", "connect")
#: the roles array's size (bpf/maps.h HS_MAX_IFINDEX): interfaces beyond are not watched
MAX_IFINDEX = 65536
#: offsets only the kprobe programs need (netfilter may be absent from a kernel)
KPROBE_BTF_OFFSETS = (
    ("HS_NFSTATE_HOOK_OFF", "nf_hook_state", "hook"),
    ("HS_NFSTATE_PF_OFF", "nf_hook_state", "pf"),
    ("HS_SKC_NUM_OFF", "sock_common", "skc_num"),
    ("HS_SKC_DPORT_OFF", "sock_common", "skc_dport"),
    ("HS_SKC_RCV_SADDR_OFF", "sock_common", "skc_rcv_saddr"),
    ("HS_SKC_DADDR_OFF", "sock_common", "skc_daddr"),
    ("HS_SKB_LEN_OFF", "sk_buff", "len"),
)
#: (BPF function, kernel function, on return?): attached when the function is in kallsyms
KPROBES = (
    ("hs_nf_enter", "nf_hook_slow", False),
    ("hs_nf_return", "nf_hook_slow", True),
    ("hs_ipvs_schedule", "ip_vs_schedule", False),
    ("hs_ipvs_conn_new", "ip_vs_conn_new", False),
    ("hs_tcp_rcv", "tcp_rcv_established", False),  # only built where tcp_probe has no skb
)


@dataclass
class Settings:
    entry_port: int = 80
    vxlan_ports: tuple[int, int] = (8472, 4789)
    ringbuf_pages: int = 1024
    follow: int = 8
    drop_reason_min: int = 2  # NOT_SPECIFIED and below are not drops worth reporting
    kprobes: bool = False  # compile bpf/kprobes.c in (the kernel has kprobes)
    #: tracepoint fields this kernel has (from their format files): tcp:tcp_probe's
    #: skaddr+skbaddr (else the kernel point needs the tcp_rcv_established kprobe) and
    #: skb:kfree_skb's rx_sk
    tp_probe_skb: bool = True
    tp_kfree_rx_sk: bool = True
    #: tc programs may call bpf_get_current_pid_tgid (6.10+): the proxy point
    tc_pid_tgid: bool = True
    #: the proxy's syscalls traced (of PROXY_CALLS)
    proxy_calls: tuple[str, ...] = PROXY_CALLS_DEFAULT


def proxy_set_value(tgids: Sequence[int]) -> int:
    """``struct hs_proxy_set`` holding ``tgids`` (at most MAX_PROXY; the rest 0), as the
    little-endian integer bpfsys.Map.set writes."""
    if len(tgids) > MAX_PROXY:
        raise AgentError(f"{len(tgids)} proxy processes: the programs hold {MAX_PROXY}")
    return int.from_bytes(struct.pack(f"<{MAX_PROXY}I", *tgids, *[0] * (MAX_PROXY - len(tgids))),
                          "little")


def btf_offsets(btf: ft.Btf, kprobes: bool = False) -> dict[str, int]:
    out = {}
    for define, struct_name, path in (*BTF_OFFSETS, *(KPROBE_BTF_OFFSETS if kprobes else ())):
        out[define] = btf.member_offset(struct_name, path)
    return out


def cflags(settings: Settings, offsets: Mapping[str, int], extra: Mapping[str, int] = {}
           ) -> list[str]:
    pages = settings.ringbuf_pages
    if pages <= 0 or pages & (pages - 1):
        raise AgentError(f"ring buffer pages {pages} is not a power of two")
    unknown = sorted(set(settings.proxy_calls) - set(PROXY_CALLS))
    if unknown:
        raise AgentError(f"proxy syscalls {', '.join(unknown)}: not traceable here (choose "
                         f"from {', '.join(PROXY_CALLS)})")
    defs = {
        "HS_ENTRY_PORT": settings.entry_port,
        "HS_VXLAN_PORT": settings.vxlan_ports[0],
        "HS_VXLAN_PORT2": settings.vxlan_ports[1],
        "HS_RINGBUF_PAGES": pages,
        "HS_FOLLOW": settings.follow,
        "HS_MAX_PROXY": MAX_PROXY,
        "HS_DROP_REASON_MIN": settings.drop_reason_min,
        **({"HS_KPROBES": 1} if settings.kprobes else {}),
        "HS_TP_PROBE_SKB": int(settings.tp_probe_skb),
        "HS_TP_KFREE_RX_SK": int(settings.tp_kfree_rx_sk),
        "HS_TC_PID_TGID": int(settings.tc_pid_tgid),
        **{f"HS_SC_{c.upper()}": int(c in settings.proxy_calls) for c in PROXY_CALLS},
        **offsets, **extra,
    }
    return [f"-I{BPF_DIR}", *(f"-D{k}={int(v)}" for k, v in defs.items())]


_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')


def program_text(main: Path) -> str:
    """``main`` with its local ``#include "..."`` files inlined (once each).

    bcc rewrites map calls and generates tracepoint argument structs only in
    the text it is given, not in files it includes.
    """
    seen: set[Path] = set()

    def inline(path: Path) -> list[str]:
        out = []
        for line in path.read_text().splitlines(keepends=True):
            m = _INCLUDE.match(line)
            if m:
                inc = (path.parent / m.group(1)).resolve()
                if inc not in seen:
                    seen.add(inc)
                    out.append(f"/* ---- {inc.name} ---- */\n")
                    out.extend(inline(inc))
                continue
            out.append(line)
        return out

    return "".join(inline(main))


def netns_inode(path: str = "/proc/self/ns/net") -> int:
    return os.stat(path).st_ino


# -- the program ----------------------------------------------------------------------------

ROLE_CODES = {"nic": ev.ROLE_NIC, "overlay": ev.ROLE_OVERLAY, "underlay": ev.ROLE_UNDERLAY,
              "pod": ev.ROLE_POD, "nic+underlay": ev.ROLE_NIC_UNDERLAY}


@dataclass
class Attached:
    ifindex: int
    name: str
    point: str
    created_clsact: bool


class AgentProgram:
    """The loaded ``bpf/agent.c``: maps, tc attachments, counters."""

    def __init__(self, settings: Settings, btf: ft.Btf | None = None,
                 source: Path = BPF_DIR / "agent.c", extra: Mapping[str, int] = {},
                 handed: Mapping[str, Any] | None = None) -> None:
        """Compile and load ``source`` with bcc, or take over the objects an earlier image
        of this process loaded (``handed``: :meth:`handoff`'s description)."""
        self.settings = settings
        self.attached: dict[int, Attached] = {}
        self._ipr: Any = None
        self.ring_size = settings.ringbuf_pages * 4096
        #: kernel function -> BPF functions attached to it (kprobes)
        self.kprobes: dict[str, list[str]] = {}
        self.bpf: Any = None
        self._fds: dict[str, Any] = {}
        if handed is not None:
            self._fds = dict(handed["fds"])
            self.kprobes = {k: list(v) for k, v in handed.get("kprobes", {}).items()}
            self.tracepoints = len(self._fds.get("tracepoints", []))
        else:
            try:
                from bcc import BPF  # after prepare_kernel_env
            except ImportError as exc:  # no python3-bpfcc, a venv without it, PyPI's "bcc"
                raise AgentError(
                    f"bcc cannot be imported ({exc}): install Debian/Ubuntu's python3-bpfcc "
                    "and run hopscope from a venv made with --system-site-packages (PyPI's "
                    "package named bcc is another project: pip uninstall it)") from None

            self._BPF = BPF
            btf = btf or ft.Btf.load()
            flags = cflags(settings, btf_offsets(btf, settings.kprobes), extra)
            try:
                self.bpf = BPF(text=program_text(source), cflags=flags)
            except Exception as exc:  # bcc raises bare Exception
                raise AgentError(f"cannot compile/load {source.name}: {exc}") from exc
            self.tracepoints = int(self.bpf.num_open_tracepoints())
            for name in MAPS:
                with contextlib.suppress(KeyError):
                    self._fds[name] = int(self.bpf[name].map_fd)
        self._maps = {name: bpfsys.Map(self._fds[name], *shape)
                      for name, shape in MAPS.items() if name in self._fds and shape[0]}

    def _tc_fds(self) -> tuple[int, int]:
        if "tc_in" not in self._fds:
            self._fds["tc_in"] = self.bpf.load_func("hs_tc_ingress", self._BPF.SCHED_CLS).fd
            self._fds["tc_out"] = self.bpf.load_func("hs_tc_egress", self._BPF.SCHED_CLS).fd
        return int(self._fds["tc_in"]), int(self._fds["tc_out"])

    def handoff(self) -> dict[str, Any]:
        """What a fresh image of this process (``exec``, without bcc and LLVM: about
        60 MB less) needs to go on: the fds of the programs, maps, tracepoint and kprobe
        attachments, made inheritable. bcc must not clean up after this."""
        self._tc_fds()
        fds = dict(self._fds)
        fds["tracepoints"] = [int(fd) for fd in self.bpf.tracepoint_fds.values()]
        # bcc keeps a kprobe's perf event fd per event, or per event and function
        fds["kprobe_links"] = [int(fd) for v in self.bpf.kprobe_fds.values()
                               for fd in (v.values() if isinstance(v, dict) else [v])]
        for v in fds.values():
            for fd in (v if isinstance(v, list) else [v]):
                os.set_inheritable(int(fd), True)
        return {"fds": fds, "kprobes": self.kprobes}

    def attach_kprobes(self, have: Mapping[str, bool]) -> list[str]:
        """Attach the kprobes whose functions the kernel has (``have``: kallsyms lookup)
        and are not attached yet; returns what was newly attached (only before a
        handoff: attaching needs bcc)."""
        if not self.settings.kprobes or self.bpf is None:
            return []
        done = []
        for fn, event, ret in KPROBES:
            if not have.get(event) or fn in self.kprobes.get(event, []):
                continue
            if fn == "hs_tcp_rcv" and self.settings.tp_probe_skb:
                continue  # the tracepoint gives the kernel point
            try:
                if ret:
                    self.bpf.attach_kretprobe(event=event, fn_name=fn)
                else:
                    self.bpf.attach_kprobe(event=event, fn_name=fn)
            except Exception as exc:  # bcc raises bare Exception
                log.warning("cannot attach %s to %s: %s", fn, event, exc)
                continue
            self.kprobes.setdefault(event, []).append(fn)
            done.append(f"{'kretprobe' if ret else 'kprobe'} {event}")
        return done

    # config maps
    def _set_keys(self, name: str, want: set[int]) -> None:
        m = self._maps[name]
        for k in m.list_keys():
            if k not in want:
                m.delete(k)
        for k in want:
            m.set(k, 1)

    def set_netns(self, inodes: Iterable[int]) -> None:
        """The network namespaces (inodes) whose socket events and drops are this agent's."""
        self._set_keys("netns_ok", set(inodes))

    def set_proxy_tgids(self, tgids: Iterable[int]) -> None:
        """The proxy's processes: at most MAX_PROXY of them (the lowest pids; the rest are
        not watched, with a warning)."""
        tg = sorted(set(tgids))
        if len(tg) > MAX_PROXY:
            log.warning("%d proxy processes: watching the first %d (pids %s) for the proxy "
                        "sub-hop", len(tg), MAX_PROXY, ", ".join(map(str, tg[:MAX_PROXY])))
            tg = tg[:MAX_PROXY]
        self._maps["proxy_set"].set(0, proxy_set_value(tg))

    def ring_fd(self) -> int:
        return int(self._fds["events"])

    def stats(self) -> dict[str, int]:
        m = self._maps["stats"]
        return {f"{src}_{what}": sum(m.get(i) or [0]) for i, (src, what) in enumerate(ev.STATS)}

    # tc
    def _iproute(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    def attach(self, ifindex: int, name: str, point: str) -> None:
        """clsact ingress + egress classifiers on one interface, role ``point``."""
        if ifindex in self.attached:
            return
        role = ROLE_CODES.get(point)
        if role is None:
            raise AgentError(f"{name}: no observation point for role {point!r}")
        if not 0 < ifindex < MAX_IFINDEX:
            raise AgentError(f"{name}: ifindex {ifindex} is beyond the roles array "
                             f"({MAX_IFINDEX}): not watched")
        fn_in, fn_out = self._tc_fds()
        self._maps["ifroles"].set(ifindex, role)
        ipr = self._iproute()
        created = False
        try:
            ipr.tc("add", "clsact", ifindex)
            created = True
        except Exception as exc:  # NetlinkError EEXIST: someone's clsact is there already
            if getattr(exc, "code", None) != errno.EEXIST:
                raise AgentError(f"cannot add clsact on {name}: {exc}") from exc
        try:
            for fd, parent, fname in ((fn_in, TC_INGRESS, FILTER_IN),
                                      (fn_out, TC_EGRESS, FILTER_OUT)):
                ipr.tc("add-filter", "bpf", ifindex, ":1", fd=fd, name=fname, parent=parent,
                       classid=1, direct_action=True, prio=FILTER_PRIO)
        except Exception as exc:
            self.attached[ifindex] = Attached(ifindex, name, point, created)
            self.detach(ifindex)
            raise AgentError(f"cannot attach tc filters on {name}: {exc}") from exc
        self.attached[ifindex] = Attached(ifindex, name, point, created)
        log.info("attached tc ingress+egress on %s (%s)", name, point)

    def detach(self, ifindex: int) -> None:
        a = self.attached.pop(ifindex, None)
        if a is None:
            return
        self._maps["ifroles"].set(ifindex, 0)
        remove_filters(self._iproute(), ifindex, drop_empty_clsact=a.created_clsact)

    def close(self) -> None:
        for idx in list(self.attached):
            try:
                self.detach(idx)
            except Exception as exc:  # the interface may be gone
                log.debug("detach %d: %s", idx, exc)
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self.bpf is not None:
            self.bpf.cleanup()
        else:  # handed over: the attachments and programs go with their last fd
            for v in self._fds.values():
                for fd in (v if isinstance(v, list) else [v]):
                    with contextlib.suppress(OSError):
                        os.close(int(fd))
            self._fds = {}


def _filter_name(msg: Any) -> str:
    opts = msg.get_attr("TCA_OPTIONS")
    if opts is None:
        return ""
    try:
        return str(opts.get_attr("TCA_BPF_NAME") or "")
    except Exception:
        return ""


def remove_filters(ipr: Any, ifindex: int, drop_empty_clsact: bool = False,
                   failed: list[str] | None = None) -> int:
    """Delete hopscope's tc filters on one interface; returns how many (those that could not
    be deleted are logged, and told in ``failed``)."""
    n = 0
    left = 0
    for parent in (TC_INGRESS, TC_EGRESS):
        try:
            msgs = list(ipr.get_filters(ifindex, parent=parent))
        except Exception:
            continue
        for m in msgs:
            if not m["handle"]:
                continue  # the chain's head entry
            if m.get_attr("TCA_KIND") == "bpf" and _filter_name(m) in FILTER_NAMES:
                prio = m["info"] >> 16
                try:
                    ipr.tc("del-filter", "bpf", ifindex, m["handle"], parent=parent, prio=prio)
                    n += 1
                except Exception as exc:
                    log.log(logging.WARNING if failed is None else logging.DEBUG,
                            "cannot remove filter %s on ifindex %d: %s", _filter_name(m),
                            ifindex, exc)
                    if failed is not None:
                        failed.append(f"{_filter_name(m)} on ifindex {ifindex}: {exc}")
                    left += 1
            else:
                left += 1
    if drop_empty_clsact and not left:
        with contextlib.suppress(Exception):
            ipr.tc("del", "clsact", ifindex)
    return n


def remove_stale() -> int:
    """Filters a killed agent left on this namespace's interfaces (found by name); a clsact
    qdisc left empty by their removal goes too. Raises AgentError when some could not be
    removed (no CAP_NET_ADMIN)."""
    from pyroute2 import IPRoute

    n = 0
    failed: list[str] = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            n += remove_filters(ipr, link["index"], drop_empty_clsact=True, failed=failed)
    if failed:
        raise AgentError(f"could not remove {len(failed)} hopscope tc filter(s) ({failed[0]}): "
                         "run it as root (CAP_NET_ADMIN)")
    return n

