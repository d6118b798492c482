"""``hopscope doctor``: what the eBPF agent could use on this node, and why.

Read-only: it reads ``/proc``, ``/sys``, tracefs and ``ip``/``tc`` listings;
the kernel is only asked to create a ring buffer and to load two- or
three-instruction programs whose descriptors are closed at once. When tracefs is not mounted it
is read through a private mount namespace (the host's mounts do not change).
``--compile-test`` additionally runs bcc in a child process that attaches one
tracepoint program and detaches it.

The probing lives in :mod:`hopscope.agent.features`; this module assembles the
findings into sections and prints them (text, or one JSON document with
``--json``). The ``probe_plan`` section is :func:`features.plan_probes` fed
with the facts the agent's start-up decides on, read with the agent's own
functions (:func:`agent_facts`). Exit code: 0 when the agent can run at all
(the BPF programs with tc, or else AF_PACKET capture: packets only), 1 when
it cannot, 77 when not run as root (the sections that can be read without
root are still printed).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from hopscope.errors import HopscopeError

from . import bpfprog
from . import features as ft
from .features import DEGRADED, MISSING, OK, Finding

log = logging.getLogger(__name__)

EXIT_OK, EXIT_CANNOT_RUN, EXIT_NOT_ROOT = 0, 1, 77

#: Sections in print order (compile_test only with --compile-test).
SECTIONS = (
    "kernel", "kprobes", "fentry", "ipvs", "tc_clsact", "af_packet", "ringbuf", "btf",
    "tracefs", "tracepoints", "drop_reasons", "bcc", "kernel_headers", "compile_test",
    "capabilities", "sysctls", "interfaces", "proxy", "probe_plan", "build", "agent",
)

#: Tracepoints without which the agent's programs do not load (with the default
#: ``--proxy-calls``; tcp:tcp_probe is used only where it has the socket and skb fields).
CORE_TRACEPOINTS = ft.bpf_tracepoints_needed(bpfprog.PROXY_CALLS_DEFAULT)

#: The capabilities the hopscope-agent unit gives its uid 0 (systemd/hopscope-agent.service,
#: CapabilityBoundingSet; tests/test_doctor.py holds the two together).
UNIT_CAPS = ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_PTRACE")
#: Where the agent can run: ``agent run`` refuses any uid but 0.
RUN_AS_ROOT = ("run the agent as root (sudo hopscope agent run) or as the hopscope-agent unit "
               f"(uid 0 with {', '.join(UNIT_CAPS)}); `agent run` refuses any other uid")
#: ``agent run --entry-port``'s default
ENTRY_PORT = 80

#: Raw tracepoints as BTF names them (``btf_trace_<event>``), for when tracefs is unreadable.
_BTF_TRACE = {"net:netif_receive_skb": "btf_trace_netif_receive_skb",
              "tcp:tcp_probe": "btf_trace_tcp_probe",
              "skb:kfree_skb": "btf_trace_kfree_skb",
              "sock:inet_sock_set_state": "btf_trace_inet_sock_set_state",
              "sock:sk_data_ready": "btf_trace_sk_data_ready"}

_KEY_REASONS = ("NETFILTER_DROP", "NO_SOCKET", "OTHERHOST", "IP_RPFILTER", "SOCKET_RCVBUFF",
                "TCP_LISTEN_OVERFLOW")


@dataclass
class Context:
    """Facts gathered once and shared by the section builders."""

    root: bool
    release: str
    version: tuple[int, int, int]
    config: ft.KernelConfig
    tracefs_mounted: str | None
    tracefs: str | None  # where to read it (the mount, or a private one)
    tracefs_private: bool
    btf: ft.Btf | None
    btf_error: str | None
    kallsyms: dict[str, bool]
    filter_functions: set[str] | None
    filter_functions_error: str | None
    tracepoints: dict[str, bool] = field(default_factory=dict)
    tracepoint_source: str = ""
    results: dict[str, Any] = field(default_factory=dict)  # shared with later sections


def _cfg(ctx: Context, *names: str) -> dict[str, str]:
    return {n.removeprefix("CONFIG_"): (ctx.config.value(n) or "?") for n in names}


def _fmt_cfg(vals: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in vals.items())


# -- sections ------------------------------------------------------------------------------


def kernel_section(ctx: Context) -> Finding:
    c = ctx.config
    opts = {n: c.value(n) for n in ft.CONFIG_OPTIONS}
    details: dict[str, Any] = {"release": ctx.release, "version": ".".join(map(str, ctx.version)),
                               "machine": platform.machine(), "config_source": c.source,
                               "config": opts}
    lines = [f"config: {c.source or 'none'}",
             _fmt_cfg({k.removeprefix('CONFIG_'): (v or '?') for k, v in opts.items()})]
    if c.value("CONFIG_MODULES") == "n":
        lines.append("CONFIG_MODULES=n: everything is built in or absent; nothing can be loaded")
    if c.source is None:
        return Finding(DEGRADED, f"{ctx.release}, no kernel config readable ({c.error})",
                       details, "boot a kernel with CONFIG_IKCONFIG_PROC=y or install "
                       f"/boot/config-{ctx.release}; the other checks fall back to run-time "
                       "probes", )
    f = Finding(OK, f"{ctx.release} ({details['version']}), config from {c.source}", details)
    f.details["_lines"] = lines
    return f


def kprobes_section(ctx: Context) -> Finding:
    kprobe_events = (os.path.exists(os.path.join(ctx.tracefs, "kprobe_events"))
                     if ctx.tracefs else None)
    pmu = os.path.isdir("/sys/bus/event_source/devices/kprobe")
    cfg = ctx.config.enabled("CONFIG_KPROBES")
    usable = bool(kprobe_events or pmu or (kprobe_events is None and cfg))
    ff = ctx.filter_functions
    targets = {t: {"kallsyms": ctx.kallsyms.get(t, False),
                   "available_filter_functions": (t in ff) if ff is not None else None}
               for t in ft.KPROBE_TARGETS}
    details: dict[str, Any] = {
        "config": _cfg(ctx, "CONFIG_KPROBES", "CONFIG_KPROBE_EVENTS"),
        "kprobe_events": kprobe_events, "kprobe_pmu": pmu, "usable": usable,
        "filter_functions": ("readable" if ff is not None else ctx.filter_functions_error),
        "targets": targets,
    }
    present = [t for t, v in targets.items() if v["kallsyms"] or v["available_filter_functions"]]
    absent = [t for t in ft.KPROBE_TARGETS if t not in present]
    lines = [_fmt_cfg(details["config"]),
             f"kprobe_events: {_yn(kprobe_events)}; kprobe PMU: {_yn(pmu)}",
             f"available_filter_functions: {details['filter_functions']}",
             f"target functions in the kernel: {', '.join(present) or 'none'}"
             + (f"; absent: {', '.join(absent)}" if absent else "")]
    details["_lines"] = lines
    ctx.results["kprobes"] = usable
    if not usable:
        why = ("CONFIG_KPROBES not set" if cfg is False else
               "no kprobe_events file and no kprobe PMU")
        if present:
            why += f" (the functions exist, e.g. {present[0]}, but cannot be probed)"
        return Finding(MISSING, f"kprobes unavailable: {why}", details,
                       "none on this kernel (needs CONFIG_KPROBES=y, CONFIG_KPROBE_EVENTS=y); "
                       "the agent goes without them: no netfilter child, no IPVS real server, "
                       "and no kernel_in where tcp:tcp_probe has no skb (see probe_plan)")
    if absent:
        return Finding(DEGRADED, f"kprobes available; not in this kernel: {', '.join(absent)}",
                       details)
    return Finding(OK, "kprobes available; every target function present", details)


def fentry_section(ctx: Context) -> Finding:
    btf_ok = ctx.btf is not None
    tramp = ctx.kallsyms.get("bpf_trampoline_link_prog", False)
    ff = ctx.filter_functions
    lists = ("tcp_v4_connect" in ff) if ff is not None else None
    details: dict[str, Any] = {
        "config": _cfg(ctx, "CONFIG_DEBUG_INFO_BTF", "CONFIG_FPROBE", "CONFIG_FUNCTION_TRACER",
                       "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS"),
        "btf_vmlinux": btf_ok, "bpf_trampoline": tramp,
        "available_filter_functions_lists_tcp_v4_connect":
            lists if lists is not None else ctx.filter_functions_error,
    }
    lines = [_fmt_cfg(details["config"]),
             f"/sys/kernel/btf/vmlinux: {_yn(btf_ok)}; BPF trampoline "
             f"(bpf_trampoline_link_prog): {_yn(tramp)}",
             "available_filter_functions lists tcp_v4_connect: "
             + (_yn(lists) if lists is not None else str(ctx.filter_functions_error))]
    load: ft.BpfResult | None = None
    if ctx.root and ctx.btf is not None:
        fid = ctx.btf.find(ft.BTF_KIND_FUNC, "tcp_v4_connect")
        if fid is not None:
            load = ft.bpf_load_trivial(ft.BPF_PROG_TYPE_TRACING, ft.BPF_TRACE_FENTRY, fid)
            details["load_test"] = {"target": "tcp_v4_connect", "btf_id": fid, "ok": load.ok,
                                    "error": load.error, "log": load.log[-300:]}
            msg = "ok (attach not tried)" if load.ok else f"refused, {load.error}"
            if not load.ok and load.errno == 1:
                bogus = ft.bpf_load_trivial(ft.BPF_PROG_TYPE_TRACING, ft.BPF_TRACE_FENTRY, 1)
                details["load_test"]["bogus_target_error"] = bogus.error
                if bogus.errno == 1:
                    msg += " (also for a bogus BTF id: refused before the target is looked at)"
            lines.append(f"loading an fentry program on tcp_v4_connect: {msg}")
    details["_lines"] = lines
    ctx.results["fentry"] = bool(load and load.ok)
    if load is not None:
        if load.ok:
            return Finding(OK, "fentry programs load (BTF + BPF trampoline)", details)
        return Finding(MISSING, f"fentry/fexit refused by this kernel ({load.error}) although "
                       "BTF and the BPF trampoline are present", details,
                       "none on this node (a kernel policy, not a missing option); the agent "
                       "does not need fentry (see probe_plan)")
    if not btf_ok or not tramp:
        return Finding(MISSING, "no BTF or no BPF trampoline: fentry unavailable", details)
    return Finding(DEGRADED, "fentry looks possible (BTF + trampoline); load test needs root",
                   details, "run `hopscope doctor` as root to try a load")


def ipvs_section(ctx: Context) -> Finding:
    cfg = ctx.config.value("CONFIG_IP_VS")
    loaded = os.path.exists("/proc/net/ip_vs")
    modinfo: str | None = None
    if not loaded and cfg in ("m", None):
        modinfo = _modinfo("ip_vs")
    details: dict[str, Any] = {"config": cfg, "proc_net_ip_vs": loaded, "modinfo": modinfo,
                               "ip_vs_conn_new_symbol": ctx.kallsyms.get("ip_vs_conn_new", False)}
    ctx.results["ipvs_config"] = loaded or cfg in ("y", "m")
    ctx.results["ipvs_active"] = loaded
    if loaded:
        return Finding(OK, "IPVS loaded (/proc/net/ip_vs present)", details)
    if cfg == "m" or (cfg is None and modinfo and not modinfo.startswith("not found")):
        return Finding(DEGRADED, f"IPVS is a module, not loaded ({modinfo})", details,
                       "nothing to do unless kube-proxy runs in IPVS mode (it loads ip_vs)")
    return Finding(MISSING, "no IPVS in this kernel"
                   + (" (CONFIG_IP_VS not set)" if cfg == "n" else ""), details,
                   "kube-proxy must use iptables mode here (the k3s default); hopscope measures "
                   "its DNAT without IPVS probes")


def tc_section(ctx: Context) -> Finding:
    cfg = _cfg(ctx, "CONFIG_NET_SCH_INGRESS", "CONFIG_NET_CLS_BPF", "CONFIG_NET_CLS_ACT")
    details: dict[str, Any] = {"config": cfg}
    lines = [_fmt_cfg(cfg)]
    built = all(v in ("y", "m", "?") for v in cfg.values())
    load = None
    if ctx.root:
        load = ft.bpf_load_trivial(ft.BPF_PROG_TYPE_SCHED_CLS)
        details["sched_cls_load"] = {"ok": load.ok, "error": load.error}
        lines.append("loading a sched_cls program: " + ("ok" if load.ok else str(load.error)))
    lines.append("creating a clsact qdisc is not tried (that would change the node)")
    details["_lines"] = lines
    # without root only the config speaks (the verdict is 77 then anyway)
    ctx.results["tc"] = built and (load is None or load.ok)
    if not built:
        missing = [k for k, v in cfg.items() if v == "n"]
        return Finding(MISSING, f"tc clsact unavailable ({', '.join(missing)} not set)", details,
                       "a kernel with CONFIG_NET_SCH_INGRESS and CONFIG_NET_CLS_BPF; "
                       "meanwhile the agent falls back to AF_PACKET")
    if load is None:
        return Finding(DEGRADED, "clsact and cls_bpf built in; program load needs root", details)
    if not load.ok:
        return Finding(MISSING, f"sched_cls programs do not load ({load.error})", details,
                       "run as root (CAP_BPF + CAP_NET_ADMIN)")
    return Finding(OK, "tc clsact + cls_bpf usable (sched_cls program loads)", details)


def af_packet_section(ctx: Context) -> Finding:
    r = ft.af_packet_usable()
    ctx.results["af_packet"] = r.ok
    details = {"config": ctx.config.value("CONFIG_PACKET"), "ok": r.ok, "error": r.error}
    if r.ok:
        return Finding(OK, "AF_PACKET raw socket opens (fallback packet source)", details)
    return Finding(MISSING, f"AF_PACKET raw socket refused ({r.error})", details,
                   "run as root (CAP_NET_RAW)" if r.errno == 1 else None)


def ringbuf_section(ctx: Context) -> Finding:
    new_enough = ctx.version >= (5, 8, 0)
    details: dict[str, Any] = {"kernel_at_least_5_8": new_enough}
    if not ctx.root:
        ctx.results["ringbuf"] = new_enough
        return Finding(DEGRADED, "kernel >= 5.8; creating a ring buffer needs root"
                       if new_enough else "kernel < 5.8: no BPF ring buffer", details,
                       "run as root" if new_enough else None)
    r = ft.bpf_create_ringbuf()
    details.update({"created": r.ok, "error": r.error})
    ctx.results["ringbuf"] = r.ok
    if r.ok:
        return Finding(OK, "BPF_MAP_TYPE_RINGBUF created and closed", details)
    return Finding(MISSING, f"BPF_MAP_TYPE_RINGBUF not creatable ({r.error})", details,
                   "a kernel >= 5.8; the agent's BPF programs need the ring buffer (it has no "
                   "perf-buffer fallback): meanwhile packets come from AF_PACKET capture")


def btf_section(ctx: Context) -> Finding:
    path = "/sys/kernel/btf/vmlinux"
    details: dict[str, Any] = {"path": path, "exists": os.path.exists(path),
                               "config": ctx.config.value("CONFIG_DEBUG_INFO_BTF")}
    if ctx.btf is not None:
        details.update({"bytes": os.path.getsize(path), "types": ctx.btf.type_count})
        return Finding(OK, f"{path}: {ctx.btf.type_count} types", details)
    details["error"] = ctx.btf_error
    return Finding(MISSING, f"no usable kernel BTF ({ctx.btf_error})", details,
                   "a kernel with CONFIG_DEBUG_INFO_BTF=y; the agent needs BTF only for kernel "
                   "struct offsets")


def tracefs_section(ctx: Context) -> Finding:
    details: dict[str, Any] = {"mounted_at": ctx.tracefs_mounted,
                               "read_through_private_mount": ctx.tracefs_private}
    fix_mount = ("mount -t tracefs tracefs /sys/kernel/tracing (persist: "
                 "'tracefs /sys/kernel/tracing tracefs defaults 0 0' in /etc/fstab)")
    if ctx.tracefs_mounted:
        if ctx.tracefs and os.access(os.path.join(ctx.tracefs, "events"), os.R_OK | os.X_OK):
            return Finding(OK, f"tracefs mounted at {ctx.tracefs_mounted}", details)
        return Finding(DEGRADED, f"tracefs mounted at {ctx.tracefs_mounted} but not readable "
                       "by this process", details, "run as root")
    if ctx.tracefs_private:
        return Finding(DEGRADED, "tracefs is not mounted on this node (read here through a "
                       "private mount namespace); bcc needs it mounted", details, fix_mount)
    return Finding(MISSING, "tracefs is not mounted"
                   + ("" if ctx.root else " (and reading it privately needs root)"),
                   details, fix_mount)


def tracepoints_section(ctx: Context) -> Finding:
    tps = ctx.tracepoints
    details: dict[str, Any] = {"source": ctx.tracepoint_source, "present": tps}
    lines = [f"read from: {ctx.tracepoint_source}",
             "present: " + (", ".join(n for n, v in tps.items() if v) or "none")]
    absent = [n for n, v in tps.items() if not v]
    if absent:
        lines.append("absent: " + ", ".join(absent))
    if not tps.get("tcp:tcp_probe", True):
        lines.append("tcp:tcp_probe absent: the kernel point (end of kernel_in) needs the "
                     "tcp_rcv_established kprobe (see probe_plan)")
    load = None
    if ctx.root:
        load = ft.bpf_load_trivial(ft.BPF_PROG_TYPE_TRACEPOINT)
        details["tracepoint_prog_load"] = {"ok": load.ok, "error": load.error}
        lines.append("loading a tracepoint program: " + ("ok" if load.ok else str(load.error)))
    details["_lines"] = lines
    core_ok = all(tps.get(n) for n in CORE_TRACEPOINTS)
    ctx.results["tracepoints"] = core_ok and load is not None and load.ok
    ctx.results["tracepoint_load"] = None if load is None else load.ok
    if not tps:
        return Finding(MISSING, "tracepoints could not be listed (no tracefs, no BTF)", details,
                       "mount tracefs and run as root")
    if load is not None and not load.ok:
        return Finding(MISSING, f"tracepoint programs do not load ({load.error})", details,
                       "run as root (CAP_BPF + CAP_PERFMON)")
    if not core_ok:
        return Finding(MISSING, "needed tracepoints absent: "
                       + ", ".join(n for n in CORE_TRACEPOINTS if not tps.get(n)), details,
                       "a kernel with CONFIG_FTRACE_SYSCALLS and the skb/sock tracepoints; "
                       "meanwhile the agent takes packets from AF_PACKET capture (no sub-hops)")
    if absent:
        return Finding(DEGRADED, f"{len(tps) - len(absent)}/{len(tps)} present; absent: "
                       + ", ".join(absent), details)
    return Finding(OK, f"all {len(tps)} present", details)


def drop_reasons_section(ctx: Context) -> Finding:
    reasons: dict[int, str] = {}
    source = ""
    has_field = None
    if ctx.tracefs and ctx.tracepoints.get("skb:kfree_skb"):
        text = _read(os.path.join(ft.tracepoint_dir(ctx.tracefs, "skb:kfree_skb"), "format"))
        if text:
            reasons = ft.parse_drop_reasons(text)
            has_field = "reason" in ft.parse_tracepoint_format(text).fields
            source = "tracefs events/skb/kfree_skb/format"
    btf_reasons = ft.drop_reasons_from_btf(ctx.btf) if ctx.btf is not None else {}
    if not reasons and btf_reasons:
        reasons, source = btf_reasons, "BTF enum skb_drop_reason (tracefs unreadable)"
    by_name = {v: k for k, v in reasons.items()}
    key = {n: by_name[n] for n in _KEY_REASONS if n in by_name}
    details: dict[str, Any] = {"source": source, "reason_field": has_field, "count": len(reasons),
                               "key": key, "reasons": {str(k): v for k, v in reasons.items()}}
    if reasons and btf_reasons and source.startswith("tracefs"):
        details["btf_agrees"] = btf_reasons == reasons
    ctx.results["drop_reasons"] = bool(reasons)
    lines = [f"from: {source or 'nowhere'}",
             ", ".join(f"{n}={v}" for n, v in key.items()) + f" ({len(reasons)} reasons)"]
    if "btf_agrees" in details:
        lines.append("BTF enum skb_drop_reason agrees: " + _yn(details["btf_agrees"]))
    lines.append("numbers differ between kernels: the agent reads them at run time")
    details["_lines"] = lines
    if not reasons:
        if ctx.tracepoints.get("skb:kfree_skb"):
            return Finding(DEGRADED, "skb:kfree_skb has no drop reasons here (before 5.17?)",
                           details)
        return Finding(MISSING, "no drop reasons readable", details,
                       "mount tracefs and run as root")
    nf = by_name.get("NETFILTER_DROP")
    return Finding(OK, f"{len(reasons)} reasons; NETFILTER_DROP = {nf}", details)


def bcc_section(ctx: Context) -> Finding:
    info = ft.probe_bcc()
    details = asdict(info)
    ctx.results["bcc"] = info.importable and info.is_iovisor
    if not info.importable:
        return Finding(MISSING, f"bcc not importable ({info.error})", details,
                       "apt-get install python3-bpfcc, and make the venv with "
                       "--system-site-packages")
    if not info.is_iovisor:
        return Finding(MISSING, f"'bcc' at {info.path} is not iovisor's bcc (no bcc.BPF)",
                       details, "pip uninstall bcc (PyPI's unrelated package) and "
                       "apt-get install python3-bpfcc")
    return Finding(OK, f"bcc {info.version or '?'} ({info.path})", details)


def headers_section(ctx: Context) -> Finding:
    info = ft.probe_headers(ctx.release)
    pkg = None if info.present and info.matches else ft.apt_headers_package(ctx.release)
    details = asdict(info)
    details["apt_package"] = pkg
    details["ikheaders"] = ctx.config.value("CONFIG_IKHEADERS")
    ctx.results["headers"] = info
    fix = ft.headers_fix(info, pkg)
    lines = [f"{info.build}: " + (f"-> {info.target} (for {info.version})" if info.present
                                  else "absent")]
    if info.candidates:
        lines.append("other header trees: " + ", ".join(
            f"{c.version} ({c.build})" for c in info.candidates))
    if details["ikheaders"] == "n":
        lines.append("CONFIG_IKHEADERS not set: bcc has no /sys/kernel/kheaders.tar.xz fallback")
    details["_lines"] = lines
    if info.present and info.has_kconfig_h and info.matches:
        return Finding(OK, f"{info.build} matches {ctx.release}", details)
    if info.present and info.has_kconfig_h:
        return Finding(DEGRADED, f"{info.build} is for {info.version}, running {ctx.release}: "
                       "usable for UAPI headers and tracepoint formats only (hopscope's "
                       "design), not kernel struct layouts", details, fix)
    what = (f"{info.build} exists but has no include/linux/kconfig.h (incomplete tree, or its "
            "source link is missing)" if info.present
            else f"no kernel headers for {ctx.release}")
    stage = ft.headers_stage(info)
    if stage is None:
        return Finding(MISSING, f"{what}: bcc cannot compile, and there are no other headers "
                       "to link: the agent takes packets from AF_PACKET capture", details, fix)
    dropin = unit_headers_dropin()
    details["stage"] = asdict(stage)
    details["unit_dropin"] = {"path": str(dropin), "exists": dropin.exists()}
    lines.append(f"the agent links {stage.version}'s ({stage.build}) in its own mount "
                 f"namespace; the unit's drop-in {dropin}: "
                 + ("present" if dropin.exists() else "absent"))
    return Finding(
        DEGRADED, f"{what}: the agent run as root links {stage.version}'s in its own mount "
        "namespace (UAPI headers suffice); the hopscope-agent unit gets them from its headers "
        "drop-in", details,
        "nothing to do for `sudo hopscope agent run` (it links them itself, with "
        "CAP_SYS_ADMIN); for the hopscope-agent unit (no CAP_SYS_ADMIN) `hopscope install "
        f"agent` writes {dropin}" + (f"; or, host-wide instead: {fix}" if fix else ""))


def unit_headers_dropin() -> Path:
    """The drop-in with which ``hopscope install agent`` gives the hopscope-agent unit
    another version's headers (systemd binds them in the unit's own mount namespace)."""
    from hopscope import install

    return install.UNIT_DIR / f"{install.unit_name('agent')}.d" / install.HEADERS_DROPIN


def compile_test_section(ctx: Context) -> Finding:
    if not ctx.root:
        return Finding(DEGRADED, "skipped: needs root", {}, "run as root")
    if not ctx.results.get("bcc"):
        return Finding(MISSING, "skipped: bcc not importable", {})
    headers: ft.HeadersInfo | None = ctx.results.get("headers")
    need_headers = headers is not None and not (headers.present and headers.has_kconfig_h)
    details: dict[str, Any] = {"tracepoint": ft.COMPILE_TEST_TRACEPOINT}
    if need_headers and not os.path.exists("/sys/kernel/kheaders.tar.xz"):
        # bcc would fail, and first run `modprobe kheaders` (a module load on some kernels)
        asis = ft.CompileResult(False, "as the system is", None,
                                "not tried: no kernel headers (bcc would fail, after trying "
                                "`modprobe kheaders`)")
        lines = [f"{asis.how}: {asis.error}"]
    else:
        asis = ft.run_compile_test()
        lines = [_compile_line(asis)]
    details["as_is"] = asdict(asis)
    if asis.ok:
        details["_lines"] = lines
        return Finding(OK, f"compiled, loaded, attached and detached in {asis.seconds} s",
                       details)
    stage = None
    if need_headers and headers is not None:
        stage = next((c for c in headers.candidates if c.source), None)
    staged = None
    if stage is not None or not ctx.tracefs_mounted:
        staged = ft.run_compile_test(mount_tracefs=not ctx.tracefs_mounted, stage=stage,
                                     release=ctx.release)
        details["with_fix"] = asdict(staged)
        lines.append(_compile_line(staged))
    details["_lines"] = lines
    if staged is not None and staged.ok:
        return Finding(DEGRADED, "not usable as the system is; works in a private mount "
                       "namespace with tracefs and headers as the agent sets them up "
                       f"({staged.seconds} s)", details,
                       "nothing to do for `sudo hopscope agent run`; for the hopscope-agent "
                       "unit see kernel_headers and tracefs")
    return Finding(MISSING, f"bcc cannot compile+attach ({asis.error})", details,
                   "see kernel_headers and tracefs")


def _compile_line(r: ft.CompileResult) -> str:
    if r.ok:
        return f"{r.how}: ok in {r.seconds} s (attached, then detached)"
    return f"{r.how}: failed after {r.seconds} s: {r.error}"


def capabilities_section(ctx: Context) -> Finding:
    caps = ft.read_caps()
    if caps is None:
        return Finding(DEGRADED, "CapEff not readable from /proc/self/status", {})
    have = {c: c in caps for c in ft.AGENT_CAPS}
    details: dict[str, Any] = {"euid": os.geteuid(), "effective": have,
                               "all_effective": sorted(caps)}
    admin = have["CAP_SYS_ADMIN"]
    missing_req = [c for c in ("CAP_BPF", "CAP_PERFMON") if not (have[c] or admin)]
    if not have["CAP_NET_ADMIN"]:
        missing_req.append("CAP_NET_ADMIN")
    notes = []
    if not have["CAP_SYS_RESOURCE"]:
        notes.append("no CAP_SYS_RESOURCE: RLIMIT_MEMLOCK cannot be raised"
                     + (" (irrelevant on >= 5.11: BPF memory is charged to the cgroup)"
                        if ctx.version >= (5, 11, 0) else " (BPF maps may fail: kernel < 5.11)"))
    if not have["CAP_NET_RAW"]:
        notes.append("no CAP_NET_RAW: no AF_PACKET fallback")
    if not admin:
        notes.append("no CAP_SYS_ADMIN: no private mount namespace (tracefs, other headers), "
                     "no entering other namespaces")
    details["_lines"] = [" ".join(f"{c.removeprefix('CAP_')}={_yn(v)}" for c, v in have.items()),
                         *notes]
    details["unit_caps"] = list(UNIT_CAPS)
    euid = os.geteuid()
    if euid != 0:
        return Finding(MISSING, f"uid {euid}: `hopscope agent run` runs only as uid 0"
                       + (f" (and missing {', '.join(missing_req)})" if missing_req else
                          ", whatever its capabilities"), details, RUN_AS_ROOT)
    if missing_req:
        return Finding(MISSING, "missing " + ", ".join(missing_req), details, RUN_AS_ROOT)
    if not have["CAP_SYS_RESOURCE"] and ctx.version < (5, 11, 0):
        return Finding(DEGRADED, "no CAP_SYS_RESOURCE on a kernel < 5.11", details,
                       "run as full root")
    summary = "BPF, PERFMON, NET_ADMIN effective"
    if not have["CAP_SYS_RESOURCE"]:
        summary += "; CAP_SYS_RESOURCE not effective (harmless here)"
    return Finding(OK, summary, details)


def sysctls_section(ctx: Context) -> Finding:
    names = ("kernel.unprivileged_bpf_disabled", "kernel.bpf_stats_enabled",
             "kernel.perf_event_paranoid", "kernel.kptr_restrict")
    vals = {n: ft.read_sysctl(n) for n in names}
    lines = [" ".join(f"{n}={v}" for n, v in vals.items())]
    ub = vals["kernel.unprivileged_bpf_disabled"]
    if ub in ("1", "2"):
        lines.append("unprivileged BPF disabled: the agent must run privileged")
    if vals["kernel.bpf_stats_enabled"] == "0":
        lines.append("bpf_stats_enabled=0: per-program run time not counted (set it to 1 "
                     "only while measuring the agent's overhead)")
    return Finding(OK, ", ".join(f"{n.split('.')[-1]}={v}" for n, v in vals.items()),
                   {"values": vals, "_lines": lines})


def interfaces_section(ctx: Context, netns: str | None) -> Finding:
    where = f"namespace {netns}" if netns else "this network namespace"
    try:
        listing = ft.node_listing(netns)
        qdiscs = ft.tc_qdiscs(netns)
    except HopscopeError as exc:
        return Finding(DEGRADED, f"cannot list interfaces of {where}: {exc}", {},
                       "install iproute2 (ip, tc) and run as root")
    try:
        hooks = ft.tc_hooks(qdiscs, lambda dev, d: ft.tc_filters(dev, d, netns))
    except HopscopeError as exc:
        log.debug("tc filters unreadable: %s", exc)
        hooks = ft.tc_hooks(qdiscs)
    defaults = listing.defaults
    ifaces = ft.classify_interfaces(listing.links, defaults, listing.addrs, listing.route_devs)
    for i in ifaces:
        i.tc = hooks.get(i.name, ft.TcHook())
    watched = {i.name for i in ft.attached_interfaces(ifaces)}
    details: dict[str, Any] = {"netns": netns, "default_route_devs": defaults,
                               "interfaces": [asdict(i) for i in ifaces],
                               "watched": sorted(watched)}
    lines = []
    for i in ifaces:
        if i.role == ft.ROLE_LOOPBACK:
            continue
        extra = []
        if i.name in watched:
            extra.append("watched")
        elif i.role == ft.ROLE_POD_BRIDGE:
            extra.append("not watched: its pod veths are (the same packets, next to the pods)")
        elif i.point == "-":
            extra.append("not watched: no point of the hop model (--iface NAME=POINT names one)")
        elif i.state.upper() == "DOWN":
            extra.append("not watched: down")
        if i.vxlan:
            extra.append(f"vni {i.vxlan['id']} port {i.vxlan['port']} "
                         f"local {i.vxlan['local'] or '-'} "
                         f"underlay {', '.join(i.vxlan['underlay']) or '?'}")
        if i.master:
            extra.append(f"master {i.master}")
        if i.tc.clsact or i.tc.ingress_qdisc:
            extra.append("clsact" if i.tc.clsact else "ingress qdisc")
            extra.append("filters: " + (", ".join(i.tc.filters) or "none"))
        lines.append(f"{i.name:<16} {i.role:<22} point={i.point:<12} {i.kind:<7} {i.state}"
                     + (f"  [{'; '.join(extra)}]" if extra else ""))
    details["_lines"] = lines
    roles = {i.role for i in ifaces}
    ours = [f"{i.name} {f}" for i in ifaces for f in i.tc.hopscope_filters]
    others = [f"{i.name} {f}" for i in ifaces for f in i.tc.filters
              if f not in i.tc.hopscope_filters]
    details["hopscope_filters"] = ours
    details["other_filters"] = others
    has_public = bool(roles & {ft.ROLE_PUBLIC_NIC, ft.ROLE_PUBLIC_UNDERLAY})
    k3s = [r for r in (ft.ROLE_OVERLAY, ft.ROLE_POD_BRIDGE) if r in roles]
    parts = [f"{len(lines)} interfaces in {where}"]
    if has_public:
        parts.append("public NIC " + ", ".join(i.name for i in ifaces if i.role in (
            ft.ROLE_PUBLIC_NIC, ft.ROLE_PUBLIC_UNDERLAY)))
    if ours:
        return Finding(DEGRADED, "; ".join(parts) + f"; hopscope tc filters already attached: "
                       f"{', '.join(ours)}", details,
                       "another hopscope agent runs here, or one left filters behind: check "
                       "`tc filter show dev DEV ingress` and stop that agent")
    if not has_public or not k3s:
        missing = ([] if has_public else ["no default route"]) + (
            [] if k3s else ["no flannel.1 or cni0 (not a k3s node, or another namespace?)"])
        return Finding(DEGRADED, "; ".join(parts + missing), details)
    return Finding(OK, "; ".join(parts), details)


def proxy_section(ctx: Context, proxy_name: str, netns: str | None,
                  entry_port: int = ENTRY_PORT) -> Finding:
    try:
        procs = ft.find_processes(proxy_name, entry_port)
    except Exception as exc:  # psutil missing or /proc unreadable
        return Finding(DEGRADED, f"cannot list processes: {exc}", {}, "pip install psutil")
    want_ino = ft.netns_inode_of_name(netns)
    where = f"namespace {netns}" if netns else "this network namespace"
    here = [p for p in procs if p.netns_inode == want_ino]
    details: dict[str, Any] = {"name": proxy_name, "netns_inode": want_ino,
                               "entry_port": entry_port,
                               "processes": [asdict(p) for p in procs],
                               "in_this_netns": [p.pid for p in here]}
    if not procs:
        return Finding(MISSING, f"no process named {proxy_name!r}", details,
                       f"start {proxy_name}, or name the proxy: `hopscope doctor --proxy-name "
                       "NAME` here, `hopscope agent run --proxy NAME` for the agent")
    lines = []
    for p in here:
        ls = ", ".join(f"[{s.address}]:{s.port}" if s.family == socket.AF_INET6
                       else f"{s.address}:{s.port}" for s in p.listeners) or (
                           f"no :{entry_port} listener")
        lines.append(f"pid {p.pid} netns inode {p.netns_inode}: {ls}")
    elsewhere = [p for p in procs if p not in here]
    if elsewhere:
        lines.append("in other network namespaces: pid "
                     + ", ".join(f"{p.pid} (netns {p.netns_inode})" for p in elsewhere[:8])
                     + (" ..." if len(elsewhere) > 8 else ""))
    if any(s.dual_stack_candidate for p in here for s in p.listeners):
        lines.append(f"dual-stack [::]:{entry_port}: IPv4 clients appear as family 10 with "
                     "::ffff:a.b.c.d addresses in sock tracepoints; key sockets by address")
    details["_lines"] = lines
    if not here:
        return Finding(MISSING, f"{len(procs)} {proxy_name} process(es), none in {where}",
                       details, "pass the proxy's namespace with --netns (Traefik on the host "
                       "network shares the node's namespace)")
    listening = [p for p in here if p.listeners]
    if not listening:
        return Finding(DEGRADED, f"{proxy_name} pid {', '.join(str(p.pid) for p in here)} in "
                       f"{where}, none listening on :{entry_port}", details,
                       "check the entry point's port (Traefik's web entrypoint is :80) and give "
                       "it with --entry-port, here and to `hopscope agent run --entry-port`")
    return Finding(OK, f"{proxy_name} pid {', '.join(str(p.pid) for p in listening)} listening "
                   f"on :{entry_port} in {where}", details)


def agent_facts(tracefs: str | None, root: bool, version: tuple[int, int, int]
                ) -> dict[str, Any]:
    """What ``run.load_program`` reads to build ``bpf/agent.c`` for this kernel, read with
    its own functions: whether kprobes can be attached, tcp:tcp_probe's fields, and whether
    tc programs may call bpf_get_current_pid_tgid (probed as root; else the kernel version
    says it: 6.10+)."""
    from . import run  # the agent's start-up; imported only here (the doctor needs no more)

    return {"kprobes": run.kprobes_available(tracefs),
            "tcp_probe_fields": frozenset(run.tracepoint_fields(tracefs, "tcp:tcp_probe")),
            "tc_pid_tgid": ft.tc_helper_pid_tgid() if root else version >= (6, 10, 0)}


def plan_inputs(ctx: Context) -> ft.PlanInputs:
    """The plan's facts: the sections' results, and what the agent's start-up checks."""
    r = ctx.results
    headers: ft.HeadersInfo | None = r.get("headers")
    caps = ft.read_caps() or set()
    facts = agent_facts(ctx.tracefs, ctx.root, ctx.version)
    return ft.PlanInputs(
        kprobes=facts["kprobes"],
        kprobe_symbols=ctx.kallsyms,
        fentry=bool(r.get("fentry")),
        ipvs_config=bool(r.get("ipvs_config")),
        ipvs_active=bool(r.get("ipvs_active")),
        tc_clsact=bool(r.get("tc")),
        af_packet=bool(r.get("af_packet")),
        tracepoints=ctx.tracepoints,
        drop_reasons=bool(r.get("drop_reasons")),
        ringbuf=bool(r.get("ringbuf")),
        bcc=bool(r.get("bcc")),
        headers=headers if headers is not None else ft.probe_headers(ctx.release),
        tracefs_mounted=ctx.tracefs_mounted is not None,
        sys_admin="CAP_SYS_ADMIN" in caps,
        tracepoint_progs=r.get("tracepoint_load") is not False,  # None: not root, not tried
        tcp_probe_fields=facts["tcp_probe_fields"],
        tc_pid_tgid=facts["tc_pid_tgid"],
        proxy_calls=bpfprog.PROXY_CALLS_DEFAULT,
    )


_PACKETS = {ft.PACKETS_TC: "tc clsact (BPF)", ft.PACKETS_CAPTURE: "AF_PACKET capture",
            ft.PACKETS_NONE: "nowhere"}


def plan_section(ctx: Context) -> Finding:
    inputs = plan_inputs(ctx)
    items = ft.plan_probes(inputs)
    src, why = ft.packet_source(inputs)
    ctx.results["packet_source"] = src
    ctx.results["packet_source_why"] = why
    details: dict[str, Any] = {
        "items": ft.plan_to_dicts(items), "packet_source": src, "packet_source_why": why,
        "agent_facts": {"kprobes": inputs.kprobes, "tcp_probe_fields": sorted(
            inputs.tcp_probe_fields), "tcp_probe_has_skb": ft.tcp_probe_has_skb(
            inputs.tcp_probe_fields), "tc_pid_tgid": inputs.tc_pid_tgid,
            "sys_admin": inputs.sys_admin, "proxy_calls": list(inputs.proxy_calls)}}
    # same source, reason and unbuilt alternative: one line for several hops
    merged: list[tuple[list[str], ft.PlanItem]] = []
    for i in items:
        last = merged[-1][1] if merged else None
        if last is not None and (last.source, last.reason, last.not_built) == (
                i.source, i.reason, i.not_built):
            merged[-1][0].append(i.hop.removesuffix(" packets"))
        else:
            merged.append(([i.hop.removesuffix(" packets") if i.hop.endswith(" packets")
                            else i.hop], i))
    lines = [f"as `hopscope agent run` would start here (uid {os.geteuid()}, CAP_SYS_ADMIN "
             f"{_yn(inputs.sys_admin)}; kprobes {_yn(inputs.kprobes)}, unless --no-kprobes)"]
    if not ctx.root:
        lines.append("not root: BPF loads not tried; tc's bpf_get_current_pid_tgid judged by "
                     "the kernel version")
    for hops, i in merged:
        hop = "/".join(hops) + (" packets" if i.hop.endswith(" packets") else "")
        lines.append(f"{hop}: {i.source}" + ("" if i.usable else "  [UNUSABLE]"))
        lines.append(f"    why: {i.reason}")
        if i.not_built:
            lines.append(f"    not built, never used: {i.not_built}")
    details["_lines"] = lines
    bad = [i.hop for i in items if not i.usable]
    head = f"packets from {_PACKETS[src]}"
    if bad:
        return Finding(DEGRADED, f"{head}; no source for " + ", ".join(bad), details)
    return Finding(OK, f"{head}; a source for every hop", details)


def build_section() -> Finding:
    """Whether the hot path (replay's, and the agent's ring walk) runs as its mypyc build or
    as the Python sources."""
    import hopscope

    details = {"compiled": hopscope.COMPILED, "reason": hopscope.PURE_REASON,
               "stale": hopscope.STALE}
    if hopscope.COMPILED:
        return Finding(OK, "the hot path (replay, the agent's ring walk) runs compiled (mypyc)",
                       details)
    fix = ("pip install -e . (or ./dev.sh setup) to rebuild" if hopscope.STALE else
           None if "HOPSCOPE_PURE" in hopscope.PURE_REASON else
           "install gcc and python3-dev, then reinstall hopscope, to compile it")
    return Finding(DEGRADED, "the hot path (replay, the agent's ring walk) runs as Python "
                   "sources, 1.4 to 2.5x slower: "
                   f"{hopscope.PURE_REASON}", details, fix)


def agent_section(ctx: Context, sections: dict[str, Finding]) -> tuple[Finding, int]:
    """The verdict: the packet source the plan found (tc with the BPF programs, else
    AF_PACKET capture, which needs no BPF and no tracepoints), and the exit code."""
    r = ctx.results
    tp, tc, pkt = bool(r.get("tracepoints")), bool(r.get("tc")), bool(r.get("af_packet"))
    bcc = bool(r.get("bcc"))
    src = r.get("packet_source")
    why: dict[str, str] = dict(r.get("packet_source_why") or {})
    if src is None:  # the plan did not come out: judge from the sections
        why = {name: f"no usable {name}" for name, ok in (
            ("tracepoints", tp), ("tc_clsact", tc), ("bcc", bcc)) if not ok}
        src = (ft.PACKETS_TC if not why else ft.PACKETS_CAPTURE if pkt else ft.PACKETS_NONE)
    can_run = src != ft.PACKETS_NONE
    # the fixes of what keeps the BPF programs from loading
    todo = [f"{name}: {f.fix}" for name, f in sections.items()
            if f.fix and f.status != OK and (name in why or (
                name in ("tracefs", "bcc", "kernel_headers") and f.status == MISSING))]
    details: dict[str, Any] = {"can_run": can_run, "packet_source": src, "tracepoints": tp,
                               "tc_clsact": tc, "af_packet": pkt, "bcc": bcc,
                               "root": ctx.root, "before_starting": todo}
    if not ctx.root:
        details["exit_code"] = EXIT_NOT_ROOT
        return Finding(DEGRADED, "not root: BPF loads, tracefs and tc were not (all) probed",
                       details, "run `sudo hopscope doctor`"), EXIT_NOT_ROOT
    if not can_run:
        details["exit_code"] = EXIT_CANNOT_RUN
        return Finding(MISSING, "the agent cannot run: no packet source (BPF programs: "
                       + "; ".join(why.values() or ["?"]) + "; AF_PACKET: refused)", details,
                       "see the sections above"), EXIT_CANNOT_RUN
    details["exit_code"] = EXIT_OK
    fixes = " ; ".join(t.split(": ", 1)[1] for t in todo) or None
    if src == ft.PACKETS_CAPTURE:
        return Finding(DEGRADED, "the agent can run, packets only (AF_PACKET capture): no "
                       "kernel_in/proxy/service_nat sub-hops, no kernel drops; the BPF programs "
                       "cannot be used: " + "; ".join(why.values()), details,
                       fixes or "see probe_plan"), EXIT_OK
    if todo:
        return Finding(DEGRADED, "the kernel can run the agent; first fix: "
                       + ", ".join(t.split(":", 1)[0] for t in todo), details, fixes), EXIT_OK
    return Finding(OK, "the agent can run on this node (tc clsact and the BPF programs)",
                   details), EXIT_OK


# -- assembling --------------------------------------------------------------------------


def _yn(v: object) -> str:
    return "yes" if v is True else "no" if v is False else "unknown" if v is None else str(v)


def _read(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _modinfo(module: str) -> str | None:
    import shutil
    import subprocess

    exe = shutil.which("modinfo") or ("/usr/sbin/modinfo" if os.path.exists("/usr/sbin/modinfo")
                                      else None)
    if exe is None:
        return None
    try:
        cp = subprocess.run([exe, "-F", "filename", module], capture_output=True, text=True,
                            timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return cp.stdout.strip() if cp.returncode == 0 else "not found"


def _tracepoints_from(ctx: Context) -> None:
    if ctx.tracefs and os.access(os.path.join(ctx.tracefs, "events"), os.R_OK | os.X_OK):
        ctx.tracepoints = ft.tracepoints_present(ctx.tracefs)
        ctx.tracepoint_source = ("private tracefs mount" if ctx.tracefs_private
                                 else f"tracefs at {ctx.tracefs}")
        return
    if ctx.btf is None:
        return
    syscalls = ctx.config.enabled("CONFIG_FTRACE_SYSCALLS")
    out = {}
    for name in ft.AGENT_TRACEPOINTS:
        if name in _BTF_TRACE:
            out[name] = ctx.btf.find(ft.BTF_KIND_TYPEDEF, _BTF_TRACE[name]) is not None
        else:
            out[name] = bool(syscalls)
    ctx.tracepoints = out
    ctx.tracepoint_source = ("BTF btf_trace_* types; syscalls:* inferred from "
                             "CONFIG_FTRACE_SYSCALLS (tracefs unreadable)")


def collect(*, proxy_name: str = "traefik", netns: str | None = None,
            compile_test: bool = False, entry_port: int = ENTRY_PORT
            ) -> tuple[dict[str, Finding], int]:
    """Every section, in print order, and the exit code."""
    ft.check_netns(netns)
    release = ft.kernel_release()
    root = os.geteuid() == 0
    config = ft.read_kernel_config(release)
    try:
        btf: ft.Btf | None = ft.Btf.load()
        btf_error = None
    except ft.BtfError as exc:
        btf, btf_error = None, str(exc)
    kallsyms = ft.kallsyms_find((*ft.KPROBE_TARGETS, *(fn for _p, fn, _r in bpfprog.KPROBES),
                                 "bpf_trampoline_link_prog"))
    mounted = ft.find_tracefs()
    sections: dict[str, Finding] = {}
    with _tracefs_view(mounted) as (tracefs, private):
        ff, ff_err = (ft.read_filter_functions(tracefs) if tracefs
                      else (None, "tracefs not readable"))
        ctx = Context(root, release, ft.kernel_version(release), config, mounted, tracefs,
                      private, btf, btf_error, kallsyms, ff, ff_err)
        _tracepoints_from(ctx)
        builders: list[tuple[str, Callable[[], Finding]]] = [
            ("kernel", lambda: kernel_section(ctx)),
            ("kprobes", lambda: kprobes_section(ctx)),
            ("fentry", lambda: fentry_section(ctx)),
            ("ipvs", lambda: ipvs_section(ctx)),
            ("tc_clsact", lambda: tc_section(ctx)),
            ("af_packet", lambda: af_packet_section(ctx)),
            ("ringbuf", lambda: ringbuf_section(ctx)),
            ("btf", lambda: btf_section(ctx)),
            ("tracefs", lambda: tracefs_section(ctx)),
            ("tracepoints", lambda: tracepoints_section(ctx)),
            ("drop_reasons", lambda: drop_reasons_section(ctx)),
        ]
        for name, build in builders:
            sections[name] = _safely(name, build)
    rest: list[tuple[str, Callable[[], Finding]]] = [
        ("bcc", lambda: bcc_section(ctx)),
        ("kernel_headers", lambda: headers_section(ctx)),
    ]
    if compile_test:
        rest.append(("compile_test", lambda: compile_test_section(ctx)))
    rest += [
        ("capabilities", lambda: capabilities_section(ctx)),
        ("sysctls", lambda: sysctls_section(ctx)),
        ("interfaces", lambda: interfaces_section(ctx, netns)),
        ("proxy", lambda: proxy_section(ctx, proxy_name, netns, entry_port)),
        ("probe_plan", lambda: plan_section(ctx)),
        ("build", build_section),
    ]
    for name, build in rest:
        sections[name] = _safely(name, build)
    verdict, code = agent_section(ctx, sections)
    sections["agent"] = verdict
    return sections, code


class _tracefs_view:
    """``(path, private)``: the mounted tracefs, else a private mount, else (None, False)."""

    def __init__(self, mounted: str | None) -> None:
        self.mounted = mounted
        self._cm: Any = None

    def __enter__(self) -> tuple[str | None, bool]:
        if self.mounted:
            return self.mounted, False
        self._cm = ft.private_tracefs()
        path = self._cm.__enter__()
        return path, path is not None

    def __exit__(self, *exc: object) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)


def _safely(name: str, build: Callable[[], Finding]) -> Finding:
    """A section whose probe crashed becomes a degraded section, not a traceback."""
    try:
        return build()
    except HopscopeError as exc:
        return Finding(DEGRADED, f"probe failed: {exc}", {})
    except Exception as exc:
        log.debug("section %s crashed", name, exc_info=True)
        return Finding(DEGRADED, f"probe failed unexpectedly: {type(exc).__name__}: {exc}", {},
                       "rerun with -vv and report it")


def to_json(sections: dict[str, Finding]) -> dict[str, Any]:
    out = {}
    for name, f in sections.items():
        d = f.to_dict()
        d["details"] = {k: v for k, v in f.details.items() if not k.startswith("_")}
        out[name] = d
    return out


def render_text(sections: dict[str, Finding]) -> str:
    tag = {OK: "ok", MISSING: "MISSING", DEGRADED: "degraded"}
    out = []
    for name, f in sections.items():
        out.append(f"{name:<15} {tag.get(f.status, f.status):<9} {f.summary}")
        for line in f.details.get("_lines", []):
            for sub in str(line).splitlines():
                out.append(f"{'':<26}{sub}")
        if f.fix:
            out.append(f"{'':<26}fix: {f.fix}")
    return "\n".join(out)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (a dict of "
              "sections, each with status, summary, details, fix).")
@click.option("--proxy-name", default="traefik", show_default=True,
              help="Process name of the entry proxy.")
@click.option("--entry-port", default=ENTRY_PORT, show_default=True,
              type=click.IntRange(1, 65535),
              help="The port the proxy listens on for clients (as `agent run --entry-port`).")
@click.option("--netns", default=None, metavar="NAME",
              help="Report the interfaces of this named network namespace (ip netns list).")
@click.option("--compile-test", is_flag=True, help="Also compile, load and attach a tiny "
              "tracepoint program with bcc, and detach it at once (a few seconds).")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool, proxy_name: str, entry_port: int,
           netns: str | None, compile_test: bool) -> None:
    """What the eBPF agent could use on this node, and why (read-only).

    Exit code 0 when the agent can run (tc and the BPF programs, or else
    AF_PACKET capture: packets only), 1 when it cannot, 77 when not run as
    root.
    """
    sections, code = collect(proxy_name=proxy_name, netns=netns, compile_test=compile_test,
                             entry_port=entry_port)
    if as_json:
        click.echo(json.dumps(to_json(sections), indent=2, default=str))
    else:
        host = platform.node()
        click.echo(f"hopscope doctor: {host}, kernel {platform.release()}, "
                   f"{'root' if os.geteuid() == 0 else f'uid {os.geteuid()} (not root)'}\n")
        click.echo(render_text(sections))
    ctx.exit(code)
