"""What this node's kernel offers the eBPF agent: probing functions.

Every function here only *reads*: files under ``/proc``, ``/sys`` and
``/lib/modules``, netlink (pyroute2) and ``ip``/``tc``/``modinfo`` listings,
the process table.
The few that touch the kernel do so without leaving anything behind:

* :func:`bpf_create_ringbuf` and :func:`bpf_load_trivial` create a ring
  buffer map or load a two-instruction program and close the descriptor at
  once (nothing is attached, nothing is pinned);
* :func:`private_tracefs` mounts tracefs in a *private, temporary* mount
  namespace (a helper process made by ``unshare --mount``) when the host has
  none mounted; the host's mount table is not changed and the mount goes
  away with the helper;
* :func:`run_compile_test` (only on request) runs bcc in a child process
  that attaches one tracepoint program and detaches it at once;
* :func:`private_mounts` (called by that child, and by the agent on itself)
  moves the calling process into its own mount namespace before mounting
  tracefs or linking headers there.

Parsers take text and file-readers take paths (with the real ones as
defaults) so the tests can point them at fixtures. The agent reuses
:func:`node_listing`, :func:`process_pids`, :func:`private_mounts` and the
predicates its probe choices rest on (:func:`tcp_probe_has_skb`,
:func:`tc_helper_pid_tgid`); :func:`plan_probes` (``hopscope doctor``) makes the
same choices from the same facts (``tests/test_doctor.py`` runs the agent's
``load_program`` and ``prepare_kernel_env`` against it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gzip
import importlib
import json
import logging
import os
import platform
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hopscope.errors import HopscopeError, UsageError
from hopscope.tcpflow import point_for_ifname

log = logging.getLogger(__name__)

OK = "ok"
MISSING = "missing"
DEGRADED = "degraded"

NETNS_DIR = "/run/netns"
TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
HOPSCOPE_PREFIX = "hopscope"

def bpf_tracepoints_needed(proxy_calls: Iterable[str]) -> tuple[str, ...]:
    """The tracepoints ``bpf/agent.c`` does not load without: ``skb:kfree_skb``,
    ``sock:inet_sock_set_state`` and the enter/exit of the proxy's syscalls it is built
    with (``--proxy-calls``). ``tcp:tcp_probe`` is not among them: it is compiled in only
    where it has the socket and skb fields."""
    return ("skb:kfree_skb", "sock:inet_sock_set_state",
            *(f"syscalls:sys_{edge}_{call}" for call in proxy_calls for edge in ("enter", "exit")))


#: Tracepoints ``bpf/agent.c`` can attach to, as ``category:event``: ``tcp:tcp_probe``
#: and, for every proxy syscall it can trace (``bpfprog.PROXY_CALLS``), what
#: :func:`bpf_tracepoints_needed` names.
AGENT_CORE_TRACEPOINTS = ("tcp:tcp_probe", *bpf_tracepoints_needed(
    ("write", "writev", "sendto", "sendmsg", "connect")))
#: Probed too, to name the plan's fallbacks on kernels without ``tcp:tcp_probe``.
AGENT_TRACEPOINTS = (*AGENT_CORE_TRACEPOINTS, "net:netif_receive_skb", "sock:sk_data_ready")

#: Kernel functions the agent would kprobe where kprobes exist.
KPROBE_TARGETS = (
    "nf_hook_slow",
    "ipt_do_table",
    "nft_do_chain",
    "ip_vs_schedule",
    "ip_vs_conn_new",
    "tcp_v4_connect",
    "vxlan_xmit",
)

#: Kernel options the doctor reports (value "y", "m", "n", or absent).
CONFIG_OPTIONS = (
    "CONFIG_BPF_SYSCALL",
    "CONFIG_BPF_JIT",
    "CONFIG_BPF_EVENTS",
    "CONFIG_DEBUG_INFO_BTF",
    "CONFIG_KPROBES",
    "CONFIG_KPROBE_EVENTS",
    "CONFIG_FPROBE",
    "CONFIG_FUNCTION_TRACER",
    "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS",
    "CONFIG_FTRACE_SYSCALLS",
    "CONFIG_IP_VS",
    "CONFIG_NET_CLS_BPF",
    "CONFIG_NET_SCH_INGRESS",
    "CONFIG_NET_CLS_ACT",
    "CONFIG_PACKET",
    "CONFIG_VXLAN",
    "CONFIG_NF_CONNTRACK",
    "CONFIG_MODULES",
    "CONFIG_IKHEADERS",
)

CAP_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)

#: The capabilities the doctor reports on.
AGENT_CAPS = ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_RESOURCE",
              "CAP_SYS_ADMIN")


@dataclass
class Finding:
    """One section of the doctor's report."""

    status: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "summary": self.summary, "details": self.details,
                "fix": self.fix}


def _read_text(path: str | os.PathLike[str]) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _strerror(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{name}: {exc.strerror}" if name else str(exc)


# -- kernel release and config ---------------------------------------------------------


def kernel_release() -> str:
    return platform.release()


def kernel_version(release: str) -> tuple[int, int, int]:
    """``"6.18.44-fc-v657"`` -> ``(6, 18, 44)``; missing parts are 0."""
    m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", release)
    if not m:
        return (0, 0, 0)
    return (int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0))


def parse_kernel_config(text: str) -> dict[str, str]:
    """A kernel ``.config`` as ``{"CONFIG_X": "y" | "m" | "n" | value}``.

    ``# CONFIG_X is not set`` becomes ``"n"``; quoted strings lose their quotes.
    """
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        m = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
        if m:
            out[m.group(1)] = "n"
            continue
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            out[k] = v[1:-1] if len(v) >= 2 and v[0] == v[-1] == '"' else v
    return out


@dataclass
class KernelConfig:
    source: str | None
    options: dict[str, str]
    error: str | None = None

    def value(self, name: str) -> str | None:
        """"y", "m", "n", a value, or None when there is no config to ask."""
        if self.source is None:
            return None
        return self.options.get(name, "n")

    def enabled(self, name: str) -> bool | None:
        v = self.value(name)
        return None if v is None else v in ("y", "m")


def read_kernel_config(release: str | None = None, proc_config: str = "/proc/config.gz",
                       boot_dir: str = "/boot") -> KernelConfig:
    """The running kernel's config from ``/proc/config.gz``, else ``/boot/config-<release>``."""
    release = release or kernel_release()
    errors = []
    try:
        with gzip.open(proc_config, "rt", errors="replace") as f:
            return KernelConfig(proc_config, parse_kernel_config(f.read()))
    except FileNotFoundError:
        errors.append(f"{proc_config} missing")
    except (OSError, EOFError) as exc:
        errors.append(f"{proc_config}: {exc}")
    boot = os.path.join(boot_dir, f"config-{release}")
    text = _read_text(boot)
    if text is not None:
        return KernelConfig(boot, parse_kernel_config(text))
    errors.append(f"{boot} missing")
    return KernelConfig(None, {}, "; ".join(errors))


# -- /proc/kallsyms, BTF ---------------------------------------------------------------


def kallsyms_find(names: Iterable[str], path: str = "/proc/kallsyms") -> dict[str, bool]:
    """Which of ``names`` are kernel symbols (exact name, module symbols included)."""
    want = set(names)
    found: set[str] = set()
    try:
        with open(path, errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] in want:
                    found.add(parts[2])
    except OSError as exc:
        log.debug("cannot read %s: %s", path, exc)
    return {n: n in found for n in sorted(want)}


BTF_KIND_INT, BTF_KIND_ARRAY, BTF_KIND_STRUCT, BTF_KIND_UNION, BTF_KIND_ENUM = 1, 3, 4, 5, 6
BTF_KIND_TYPEDEF, BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO, BTF_KIND_VAR = 8, 12, 13, 14
BTF_KIND_DATASEC, BTF_KIND_DECL_TAG, BTF_KIND_ENUM64 = 15, 17, 19
_BTF_EXTRA = {BTF_KIND_INT: 4, BTF_KIND_ARRAY: 12, BTF_KIND_VAR: 4, BTF_KIND_DECL_TAG: 4}
_BTF_PER_MEMBER = {BTF_KIND_STRUCT: 12, BTF_KIND_UNION: 12, BTF_KIND_ENUM: 8,
                   BTF_KIND_FUNC_PROTO: 8, BTF_KIND_DATASEC: 12, BTF_KIND_ENUM64: 12}
_BTF_INDEXED = frozenset((BTF_KIND_FUNC, BTF_KIND_TYPEDEF, BTF_KIND_ENUM, BTF_KIND_ENUM64,
                          BTF_KIND_STRUCT, BTF_KIND_UNION))
BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT, BTF_KIND_TYPE_TAG = 9, 10, 11, 18
#: kinds that only qualify another type
_BTF_QUALIFIERS = frozenset((BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST,
                             BTF_KIND_RESTRICT, BTF_KIND_TYPE_TAG))


class BtfError(HopscopeError):
    """A BTF blob could not be parsed."""


class Btf:
    """Just enough of a BTF reader: find functions, typedefs, enums and struct members by name."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("BTF blob shorter than its header")
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            "<HBBIIIII", data, 0)
        if magic != 0xEB9F:
            raise BtfError(f"bad BTF magic 0x{magic:04x} (big-endian or not BTF)")
        self._data = data
        self._strs = hdr_len + str_off
        self._strs_end = self._strs + str_len
        self._by_name: dict[tuple[int, str], int] = {}
        self._enums: dict[int, tuple[int, int, int]] = {}  # id -> (offset, kind, vlen)
        self._offs: list[int] = [0]  # type id -> offset of its record
        offs = self._offs
        off = hdr_len + type_off
        end = off + type_len
        tid = 1
        unpack = struct.unpack_from
        while off < end:
            name_off, info, _size = unpack("<III", data, off)
            offs.append(off)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            if kind in _BTF_INDEXED and name_off:
                self._by_name.setdefault((kind, self._str(name_off)), tid)
                if kind in (BTF_KIND_ENUM, BTF_KIND_ENUM64):
                    self._enums[tid] = (off + 12, kind, vlen)
            off += 12 + _BTF_EXTRA.get(kind, 0) + _BTF_PER_MEMBER.get(kind, 0) * vlen
            tid += 1
        self.type_count = tid - 1

    @classmethod
    def load(cls, path: str = "/sys/kernel/btf/vmlinux") -> Btf:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise BtfError(f"cannot read BTF {path}: {_strerror(exc)}") from exc
        return cls(data)

    def _str(self, off: int) -> str:
        start = self._strs + off
        stop = self._data.index(b"\0", start, self._strs_end)
        return self._data[start:stop].decode("ascii", "replace")

    def find(self, kind: int, name: str) -> int | None:
        return self._by_name.get((kind, name))

    def enum_values(self, name: str) -> dict[str, int]:
        tid = self.find(BTF_KIND_ENUM, name) or self.find(BTF_KIND_ENUM64, name)
        if tid is None:
            return {}
        off, kind, vlen = self._enums[tid]
        out: dict[str, int] = {}
        for i in range(vlen):
            if kind == BTF_KIND_ENUM:
                n, v = struct.unpack_from("<Ii", self._data, off + 8 * i)
            else:
                n, lo, hi = struct.unpack_from("<III", self._data, off + 12 * i)
                v = lo | (hi << 32)
            out[self._str(n)] = v
        return out

    def _members(self, tid: int) -> tuple[int, list[tuple[str, int, int]]]:
        """(kind, [(name, type id, bit offset)]) of a struct or union, through qualifiers."""
        for _ in range(16):
            off = self._offs[tid]
            _n, info, ref = struct.unpack_from("<III", self._data, off)
            kind = (info >> 24) & 0x1F
            if kind in _BTF_QUALIFIERS:
                tid = ref
                continue
            if kind not in (BTF_KIND_STRUCT, BTF_KIND_UNION):
                return kind, []
            bitfield = bool(info >> 31)
            out = []
            for i in range(info & 0xFFFF):
                n, t, o = struct.unpack_from("<III", self._data, off + 12 + 12 * i)
                out.append((self._str(n) if n else "", t, (o & 0xFFFFFF) if bitfield else o))
            return kind, out
        return 0, []

    def member_offset(self, struct_name: str, path: str) -> int:
        """Byte offset of ``path`` (``"a.b.c"``) inside ``struct struct_name``.

        Anonymous unions and structs are searched through, as C does. Raises
        :class:`BtfError` when the struct or a member is not there.
        """
        tid = self.find(BTF_KIND_STRUCT, struct_name) or self.find(BTF_KIND_UNION, struct_name)
        if tid is None:
            raise BtfError(f"no struct {struct_name} in this kernel's BTF")
        total = 0
        for part in path.split("."):
            found = self._find_member(tid, part)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {path} in this kernel's BTF")
            tid, bits = found
            total += bits
        if total % 8:
            raise BtfError(f"{struct_name}.{path} is a bit field")
        return total // 8

    def _find_member(self, tid: int, name: str, depth: int = 0) -> tuple[int, int] | None:
        _kind, members = self._members(tid)
        for n, t, bits in members:
            if n == name:
                return t, bits
        if depth < 4:
            for n, t, bits in members:
                if not n:
                    inner = self._find_member(t, name, depth + 1)
                    if inner is not None:
                        return inner[0], bits + inner[1]
        return None


def drop_reasons_from_btf(btf: Btf) -> dict[int, str]:
    """``enum skb_drop_reason`` as tracefs names it (``SKB_DROP_REASON_`` stripped)."""
    out: dict[int, str] = {}
    for name, value in btf.enum_values("skb_drop_reason").items():
        if not name.startswith("SKB_DROP_REASON_"):
            continue
        short = name[len("SKB_DROP_REASON_"):]
        if short == "MAX" or short.startswith("SUBSYS_"):
            continue
        out[value] = short
    return dict(sorted(out.items()))


# -- tracefs -----------------------------------------------------------------------------


def parse_mounts(text: str) -> list[tuple[str, str, str]]:
    """``/proc/mounts`` as (source, mount point, fs type); octal escapes decoded."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])
            out.append((parts[0], mnt, parts[2]))
    return out


def find_tracefs(mounts_path: str = "/proc/mounts") -> str | None:
    """Where tracefs is mounted (``/sys/kernel/tracing`` preferred), or None."""
    mounts = parse_mounts(_read_text(mounts_path) or "")
    tracefs = [m for _src, m, fs in mounts if fs == "tracefs"]
    for cand in TRACEFS_CANDIDATES:
        if cand in tracefs:
            return cand
    if tracefs:
        return tracefs[0]
    return None


class _PrivateTracefs:
    """A tracefs mount visible only through a helper process's ``/proc/PID/root``."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.root = f"/proc/{proc.pid}/root{TRACEFS_CANDIDATES[0]}"


@contextlib.contextmanager
def private_tracefs(timeout: float = 5.0) -> Iterator[str | None]:
    """Yield a path to a tracefs mounted in a private mount namespace, or None.

    The helper is ``unshare --mount --propagation private``: the mount exists
    only in its own namespace and disappears when it is killed here (it also
    exits by itself after a minute). Needs CAP_SYS_ADMIN and util-linux.
    """
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        yield None
        return
    script = 'mount -t tracefs hopscope-doctor "$1" && echo ready && exec sleep 60'
    try:
        proc = subprocess.Popen(
            [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
             TRACEFS_CANDIDATES[0]],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        log.debug("cannot start unshare: %s", exc)
        yield None
        return
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        # "ready", or "" when the mount failed and sh exited
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            if proc.poll() is None:
                proc.kill()
            err = proc.stderr.read() if proc.stderr else ""
            log.debug("private tracefs mount failed: %s", err.strip() or "no answer")
            yield None
        else:
            yield _PrivateTracefs(proc).root
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
        for s in (proc.stdout, proc.stderr):
            if s is not None:
                s.close()


def tracepoint_dir(tracefs: str, tracepoint: str) -> str:
    cat, _, event = tracepoint.partition(":")
    return os.path.join(tracefs, "events", cat, event)


def tracepoints_present(tracefs: str, names: Iterable[str] = AGENT_TRACEPOINTS
                        ) -> dict[str, bool]:
    return {n: os.path.isdir(tracepoint_dir(tracefs, n)) for n in names}


@dataclass
class TracepointFormat:
    name: str
    id: int | None
    fields: dict[str, tuple[str, int, int]]  # name -> (C type, offset, size)
    print_fmt: str


def parse_tracepoint_format(text: str) -> TracepointFormat:
    """A tracefs ``events/<cat>/<event>/format`` file."""
    name = ""
    tp_id: int | None = None
    fields: dict[str, tuple[str, int, int]] = {}
    print_fmt = ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("name:"):
            name = s[5:].strip()
        elif s.startswith("ID:"):
            with contextlib.suppress(ValueError):
                tp_id = int(s[3:].strip())
        elif s.startswith("field:"):
            m = re.match(r"field:(.+?);\s*offset:(\d+);\s*size:(\d+);", s)
            if m:
                decl = m.group(1).strip()
                fm = re.match(r"(.*?)([A-Za-z_]\w*)\s*(\[[^\]]*\])?$", decl)
                if fm:
                    ctype = (fm.group(1).strip() + (fm.group(3) or "")).strip()
                    fields[fm.group(2)] = (ctype, int(m.group(2)), int(m.group(3)))
        elif s.startswith("print fmt:"):
            print_fmt = s[len("print fmt:"):].strip()
    return TracepointFormat(name, tp_id, fields, print_fmt)


def parse_drop_reasons(format_text: str) -> dict[int, str]:
    """Drop reason number -> name, from ``skb:kfree_skb``'s ``print fmt``.

    The names come from ``__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, ...)``.
    Kernels without the ``reason`` field (before 5.17) give ``{}``.
    """
    fmt = parse_tracepoint_format(format_text).print_fmt
    m = re.search(r"__print_symbolic\(\s*REC->reason\s*,(.*)", fmt, re.S)
    if not m:
        return {}
    out: dict[int, str] = {}
    for num, name in re.findall(r"\{\s*(-?(?:0x[0-9a-fA-F]+|\d+))\s*,\s*\"([^\"]*)\"\s*\}",
                                m.group(1)):
        if name != "MAX":  # the enum's end marker, not a reason
            out[int(num, 0)] = name
    return out


def read_filter_functions(tracefs: str) -> tuple[set[str] | None, str | None]:
    """``available_filter_functions`` as a set of names, or (None, why not)."""
    path = os.path.join(tracefs, "available_filter_functions")
    try:
        with open(path, errors="replace") as f:
            return {line.split(None, 1)[0] for line in f if line.strip()}, None
    except FileNotFoundError:
        return None, "absent (CONFIG_FUNCTION_TRACER not set)"
    except OSError as exc:
        return None, f"exists but unreadable ({_strerror(exc)})"


# -- bpf(2) without a loader -------------------------------------------------------------

_BPF_NR = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351,
           "armv7l": 386}
BPF_MAP_CREATE, BPF_PROG_LOAD = 0, 5
BPF_MAP_TYPE_RINGBUF = 27
BPF_PROG_TYPE_SOCKET_FILTER, BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_TRACEPOINT = 1, 3, 5
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY = 24
_TRIVIAL_PROG = bytes.fromhex("b700000000000000" "9500000000000000")  # r0 = 0; exit


@dataclass
class BpfResult:
    ok: bool
    error: str | None = None
    errno: int = 0
    log: str = ""
    fd: int | None = None  # only with keep_fd=True: the caller closes it


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> tuple[int, int]:
    nr = _BPF_NR.get(platform.machine())
    if nr is None:
        return -1, errno.ENOSYS
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    return int(fd), (ctypes.get_errno() if fd < 0 else 0)


def _result(fd: int, err: int, logbuf: bytes = b"", keep_fd: bool = False) -> BpfResult:
    if fd >= 0:
        if keep_fd:
            return BpfResult(True, fd=fd)
        os.close(fd)
        return BpfResult(True)
    text = logbuf.split(b"\0", 1)[0].decode(errors="replace").strip()
    return BpfResult(False, f"{errno.errorcode.get(err, err)}: {os.strerror(err)}", err, text)


def bpf_create_ringbuf(size: int | None = None) -> BpfResult:
    """Create a BPF_MAP_TYPE_RINGBUF map and close it at once."""
    size = size or os.sysconf("SC_PAGE_SIZE")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIII", attr, 0, BPF_MAP_TYPE_RINGBUF, 0, 0, size)
    fd, err = _bpf(BPF_MAP_CREATE, attr)
    return _result(fd, err)


#: ``call bpf_get_current_pid_tgid; r0 = 0; exit``
_PID_TGID_PROG = struct.pack("<BBhi", 0x85, 0, 0, 14) + _TRIVIAL_PROG


def tc_helper_pid_tgid() -> bool:
    """Can tc programs call ``bpf_get_current_pid_tgid`` (6.10+; not 6.1)? The agent's tc
    egress uses it to tie the proxy's upstream packet to the write that sent it."""
    return bpf_load_trivial(BPF_PROG_TYPE_SCHED_CLS, prog=_PID_TGID_PROG).ok


#: BPF_PROG_LOAD's attributes (union bpf_attr, tests/test_bpfsys.py checks them against
#: <linux/bpf.h>): prog_type, insn_cnt, insns, license, log_level, log_size, log_buf,
#: kern_version, prog_flags; then the name, the expected attach type, the BTF id at offsets
PROG_LOAD_HEAD = struct.Struct("<IIQQIIQII")
PROG_NAME_OFF, EXPECTED_ATTACH_TYPE_OFF, ATTACH_BTF_ID_OFF = 48, 68, 108


def bpf_load_trivial(prog_type: int, expected_attach_type: int = 0,
                     attach_btf_id: int = 0, keep_fd: bool = False,
                     prog: bytes = b"") -> BpfResult:
    """Load ``r0 = 0; exit`` (or ``prog``) as ``prog_type`` and close it at once (nothing
    is attached).

    ``keep_fd`` returns the program's descriptor instead (tests attach it in
    their own namespace); the caller must close it.
    """
    code = prog or _TRIVIAL_PROG
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL")
    logbuf = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(128)
    PROG_LOAD_HEAD.pack_into(attr, 0, prog_type, len(code) // 8, ctypes.addressof(insns),
                             ctypes.addressof(lic), 1, len(logbuf), ctypes.addressof(logbuf),
                             0, 0)
    struct.pack_into("16s", attr, PROG_NAME_OFF, b"hopscope_probe")
    struct.pack_into("<I", attr, EXPECTED_ATTACH_TYPE_OFF, expected_attach_type)
    struct.pack_into("<I", attr, ATTACH_BTF_ID_OFF, attach_btf_id)
    fd, err = _bpf(BPF_PROG_LOAD, attr)
    return _result(fd, err, logbuf.raw, keep_fd)


def af_packet_usable() -> BpfResult:
    """Open and close an AF_PACKET raw socket (needs CAP_NET_RAW)."""
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    except OSError as exc:
        return BpfResult(False, _strerror(exc), exc.errno or 0)
    s.close()
    return BpfResult(True)


# -- capabilities and sysctls --------------------------------------------------------------


def parse_cap_eff(status_text: str) -> int | None:
    """The ``CapEff`` mask of a ``/proc/<pid>/status`` text."""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)\s*$", status_text, re.M)
    return int(m.group(1), 16) if m else None


def decode_caps(mask: int) -> list[str]:
    out = []
    for bit in range(mask.bit_length()):
        if mask >> bit & 1:
            out.append(CAP_NAMES[bit] if bit < len(CAP_NAMES) else f"CAP_{bit}")
    return out


def read_caps(status_path: str = "/proc/self/status") -> set[str] | None:
    mask = parse_cap_eff(_read_text(status_path) or "")
    return None if mask is None else set(decode_caps(mask))


def read_sysctl(name: str, root: str = "/proc/sys") -> str | None:
    text = _read_text(os.path.join(root, name.replace(".", "/")))
    return None if text is None else text.strip()


# -- bcc and kernel headers -------------------------------------------------------------


@dataclass
class BccInfo:
    importable: bool
    is_iovisor: bool = False
    version: str | None = None
    path: str | None = None
    error: str | None = None


def probe_bcc(module: str = "bcc") -> BccInfo:
    """Is iovisor's bcc importable (not PyPI's unrelated ``bcc``)?"""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or libbcc failing to load (OSError)
        return BccInfo(False, error=f"{type(exc).__name__}: {exc}")
    path = getattr(mod, "__file__", None)
    version = getattr(mod, "__version__", None)
    if not hasattr(mod, "BPF"):
        return BccInfo(True, False, version, path,
                       "a module named bcc without bcc.BPF (PyPI's unrelated 'bcc' package?)")
    return BccInfo(True, True, str(version) if version else None, path)


def parse_utsrelease(text: str) -> str | None:
    m = re.search(r'#define\s+UTS_RELEASE\s+"([^"]+)"', text)
    return m.group(1) if m else None


@dataclass
class HeaderTree:
    """One ``/lib/modules/<version>`` with its build (and source) trees."""

    version: str
    build: str
    source: str | None


@dataclass
class HeadersInfo:
    release: str
    build: str
    present: bool
    target: str | None = None
    version: str | None = None
    matches: bool = False
    source: str | None = None
    has_kconfig_h: bool = False
    candidates: list[HeaderTree] = field(default_factory=list)


def headers_version(build_dir: str) -> str | None:
    """The kernel release a header tree was made for (utsrelease.h, else the path)."""
    text = _read_text(os.path.join(build_dir, "include/generated/utsrelease.h"))
    if text:
        v = parse_utsrelease(text)
        if v:
            return v
    m = re.search(r"linux-headers-(\d[^/]*)", os.path.realpath(build_dir))
    return m.group(1) if m else None


def probe_headers(release: str | None = None, modules_dir: str = "/lib/modules") -> HeadersInfo:
    release = release or kernel_release()
    kdir = os.path.join(modules_dir, release)
    build = os.path.join(kdir, "build")
    info = HeadersInfo(release, build, os.path.isdir(build))
    if info.present:
        info.target = os.path.realpath(build)
        info.version = headers_version(build)
        info.matches = info.version == release
        src = os.path.join(kdir, "source")
        info.source = os.path.realpath(src) if os.path.isdir(src) else None
        tree = info.source if info.source else build
        info.has_kconfig_h = os.path.isfile(os.path.join(tree, "include/linux/kconfig.h"))
    try:
        versions = sorted(os.listdir(modules_dir), key=kernel_version, reverse=True)
    except OSError:
        versions = []
    for v in versions:
        b = os.path.join(modules_dir, v, "build")
        if v == release or not os.path.isdir(b):
            continue
        s = os.path.join(modules_dir, v, "source")
        info.candidates.append(HeaderTree(v, os.path.realpath(b),
                                          os.path.realpath(s) if os.path.isdir(s) else None))
    return info


def apt_headers_package(release: str) -> str | None:
    """``linux-headers-<release>`` when apt knows such a package (local cache only)."""
    apt = shutil.which("apt-cache")
    if apt is None:
        return None
    pkg = f"linux-headers-{release}"
    try:
        cp = subprocess.run([apt, "policy", pkg], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Candidate:\s*(\S+)", cp.stdout)
    return pkg if m and m.group(1) != "(none)" else None


def headers_fix(info: HeadersInfo, apt_package: str | None) -> str | None:
    """The one-line fix for missing headers (None when bcc can already compile)."""
    if info.present and info.has_kconfig_h and (info.matches or not apt_package):
        return None  # matching, or the best there is (another version's UAPI headers)
    rel = info.release
    if apt_package:
        return f"apt-get install {apt_package}"
    scope = ("enough only for programs that use UAPI headers and tracepoint formats "
             "(hopscope's design), not kernel struct layouts")
    tree = next((c for c in info.candidates if c.source), None)
    if tree is None:
        return (f"no linux-headers-{rel} package: apt-get install linux-headers-amd64, then "
                f"link its /lib/modules/<ver>/build and source as /lib/modules/{rel}/build "
                f"and source; {scope}")
    return (f"no linux-headers-{rel} package: link Debian's headers ({tree.version}): "
            f"mkdir -p /lib/modules/{rel} && ln -sfn {tree.build} /lib/modules/{rel}/build "
            f"&& ln -sfn {tree.source} /lib/modules/{rel}/source; {scope}")


# -- the compile test (bcc in a child process) ----------------------------------------------

COMPILE_TEST_TRACEPOINT = "sock:inet_sock_set_state"
COMPILE_TEST_PROGRAM = r"""
BPF_ARRAY(hopscope_doctor_hits, u64, 1);
TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    int k = 0;
    u64 *v = hopscope_doctor_hits.lookup(&k);
    if (v) __sync_fetch_and_add(v, 1);
    return 0;
}
"""
_RESULT_MARK = "HOPSCOPE-COMPILE-TEST "


class PrivateMountError(HopscopeError):
    """A private mount (tracefs, staged headers) could not be made."""


_CLONE_NEWNS = 0x00020000
_MS_REC = 1 << 14
_MS_PRIVATE = 1 << 18


def _mount(libc: ctypes.CDLL, src: str, target: str, fstype: str | None, flags: int,
           data: str | None) -> None:
    rc = libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None,
                    ctypes.c_ulong(flags), data.encode() if data else None)
    if rc != 0:
        e = ctypes.get_errno()
        raise PrivateMountError(f"cannot mount {fstype or src} on {target}: {os.strerror(e)}")


def private_mounts(*, tracefs: str | None, stage: HeaderTree | None, release: str) -> None:
    """Give this process a private mount namespace, then mount tracefs at ``tracefs`` and
    link ``stage``'s header trees as ``/lib/modules/<release>/{build,source}`` in it.

    The host's mount table is not changed. Call it before any thread starts
    (``unshare(CLONE_NEWNS)``) and before ``bcc`` is imported (it looks for
    tracefs at import). Needs CAP_SYS_ADMIN.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNS) != 0:
        e = ctypes.get_errno()
        raise PrivateMountError(f"cannot make a private mount namespace: {os.strerror(e)} "
                                "(needs CAP_SYS_ADMIN)")
    _mount(libc, "none", "/", None, _MS_REC | _MS_PRIVATE, None)
    if tracefs:
        _mount(libc, "hopscope", tracefs, "tracefs", 0, None)
    if stage is not None:
        kdir = f"/lib/modules/{release}"
        # over the release's own directory when there is one, else over all of /lib/modules
        # (the staged trees are links into /usr/src)
        _mount(libc, "hopscope", kdir if os.path.isdir(kdir) else "/lib/modules", "tmpfs", 0,
               "size=64k,mode=755")
        os.makedirs(kdir, exist_ok=True)
        os.symlink(stage.build, f"{kdir}/build")
        if stage.source:
            os.symlink(stage.source, f"{kdir}/source")


def compile_test_child() -> None:
    """Run in a child process: compile, load and attach the test program, detach it.

    ``sys.argv[1:]``: tracefs mount point, release, staged build and source
    trees (empty strings: nothing to mount or stage).
    """
    res: dict[str, Any] = {"ok": False}
    t0 = time.monotonic()
    try:
        tracefs, release, build, source = [*sys.argv[1:], "", "", "", ""][:4]
        if tracefs or build:
            stage = HeaderTree("", build, source or None) if build else None
            private_mounts(tracefs=tracefs or None, stage=stage, release=release)
        from bcc import BPF

        b = BPF(text=COMPILE_TEST_PROGRAM)
        res["seconds"] = round(time.monotonic() - t0, 3)
        res["attached"] = int(b.num_open_tracepoints())
        b.cleanup()
        res["detached"] = True
        res["ok"] = res["attached"] > 0
    except BaseException as exc:
        res["seconds"] = round(time.monotonic() - t0, 3)
        res["error"] = f"{type(exc).__name__}: {exc}".strip()
    sys.stdout.flush()
    print(_RESULT_MARK + json.dumps(res), flush=True)


@dataclass
class CompileResult:
    ok: bool
    how: str
    seconds: float | None = None
    error: str | None = None
    output: list[str] = field(default_factory=list)


def run_compile_test(*, mount_tracefs: bool = False, stage: HeaderTree | None = None,
                     release: str | None = None, timeout: float = 60.0) -> CompileResult:
    """Compile, load and attach a tiny tracepoint program with bcc in a child, then detach.

    With ``mount_tracefs`` / ``stage`` the child runs in a private mount
    namespace where tracefs is mounted and/or ``stage``'s header trees are
    linked as ``/lib/modules/<release>/{build,source}``: the fix tried
    without applying it.
    """
    release = release or kernel_release()
    argv = [sys.executable, "-c",
            "from hopscope.agent.features import compile_test_child; compile_test_child()",
            TRACEFS_CANDIDATES[0] if mount_tracefs else "", release,
            stage.build if stage else "", (stage.source or "") if stage else ""]
    how = "as the system is"
    if mount_tracefs or stage is not None:
        parts = []
        if mount_tracefs:
            parts.append("tracefs mounted")
        if stage is not None:
            parts.append(f"headers {stage.version} linked as /lib/modules/{release}/build")
        how = "in a private mount namespace with " + " and ".join(parts)
    t0 = time.monotonic()
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return CompileResult(False, how, round(time.monotonic() - t0, 3),
                             f"no answer within {timeout:.0f} s")
    except OSError as exc:
        return CompileResult(False, how, error=f"cannot start {argv[0]}: {exc}")
    lines = (cp.stdout + "\n" + cp.stderr).splitlines()
    res: dict[str, Any] | None = None
    noise = []
    for ln in lines:
        if ln.startswith(_RESULT_MARK):
            with contextlib.suppress(ValueError):
                res = json.loads(ln[len(_RESULT_MARK):])
        elif ln.strip():
            noise.append(ln.strip())
    if res is None:
        return CompileResult(False, how, round(time.monotonic() - t0, 3),
                             f"child exited {cp.returncode} without a result", noise[-6:])
    err = res.get("error")
    if err and noise:
        # bcc's own explanation (e.g. "Unable to find kernel headers") is on stdout
        first = next((n for n in noise if "kernel headers" in n or "error" in n.lower()),
                     noise[0])
        err = f"{err} ({first})"
    return CompileResult(bool(res.get("ok")), how, res.get("seconds"), err, noise[-6:])


# -- interfaces and tc ------------------------------------------------------------------


def netns_exists(name: str, netns_dir: str = NETNS_DIR) -> bool:
    return os.path.exists(os.path.join(netns_dir, name))


def _json_cmd(argv: Sequence[str], what: str) -> Any:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except FileNotFoundError as exc:
        raise HopscopeError(f"{what}: {argv[0]} not found; install iproute2") from exc
    except subprocess.TimeoutExpired as exc:
        raise HopscopeError(f"{what}: `{' '.join(argv)}` did not answer within 10 s") from exc
    if cp.returncode != 0:
        raise HopscopeError(f"{what}: `{' '.join(argv)}` failed: {cp.stderr.strip()}")
    out = cp.stdout.strip()
    if not out:
        return []
    try:
        return json.loads(out)
    except ValueError as exc:
        raise HopscopeError(f"{what}: `{' '.join(argv)}` printed no JSON ({exc}); "
                            "iproute2 too old for -j?") from exc


def _ns_args(netns: str | None) -> list[str]:
    return ["-n", netns] if netns else []


# :func:`node_listing` of this namespace (the agent's rescans, doctor's by default) reads
# netlink (pyroute2) over one socket with one dump of the links: no process is forked
# from the agent (60 MB and more) every rescan. A named namespace (doctor --netns) is read
# with iproute2's JSON output, `ip -n NAME -j` (the functions below). Both give the same
# dicts, in the shape of `ip -j` (tests/test_features_netlink.py compares them).

#: ARPHRD_* -> the link_type `ip -j` prints (those the classification looks at)
_LINK_TYPES = {1: "ether", 772: "loopback", 65534: "none"}


@contextlib.contextmanager
def _netlink(what: str) -> Iterator[Any]:
    """An rtnetlink socket of this namespace; its errors as HopscopeError naming ``what``."""
    try:
        from pyroute2 import IPRoute
    except ImportError as exc:  # pragma: no cover - a dependency
        raise HopscopeError(f"{what}: pyroute2 is not installed ({exc})") from exc
    try:
        with IPRoute() as ipr:
            yield ipr
    except HopscopeError:
        raise
    except Exception as exc:  # pyroute2's NetlinkError, OSError
        raise HopscopeError(f"{what}: netlink: {exc}") from exc


def _nl_links(ipr: Any) -> list[dict[str, Any]]:
    msgs = list(ipr.get_links())
    names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in msgs}
    out: list[dict[str, Any]] = []
    for m in msgs:
        link: dict[str, Any] = {"ifindex": m["index"], "ifname": m.get_attr("IFLA_IFNAME"),
                                "operstate": m.get_attr("IFLA_OPERSTATE") or "UNKNOWN",
                                "link_type": _LINK_TYPES.get(m["ifi_type"], "none")}
        master = m.get_attr("IFLA_MASTER")
        if master:
            link["master"] = names.get(master, str(master))
        nsid = m.get_attr("IFLA_LINK_NETNSID")
        if nsid is not None:
            link["link_netnsid"] = nsid
        li = m.get_attr("IFLA_LINKINFO")
        kind = li.get_attr("IFLA_INFO_KIND") if li is not None else None
        if kind:
            info: dict[str, Any] = {"info_kind": kind}
            data = li.get_attr("IFLA_INFO_DATA")
            if kind == "vxlan" and data is not None:
                vx: dict[str, Any] = {"id": data.get_attr("IFLA_VXLAN_ID"),
                                      "port": data.get_attr("IFLA_VXLAN_PORT")}
                if data.get_attr("IFLA_VXLAN_LOCAL"):
                    vx["local"] = data.get_attr("IFLA_VXLAN_LOCAL")
                dev = data.get_attr("IFLA_VXLAN_LINK")
                if dev:
                    vx["link"] = names.get(dev, str(dev))
                info["info_data"] = vx
            link["linkinfo"] = info
        out.append(link)
    return out


def _names(links: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    return {int(link["ifindex"]): str(link["ifname"]) for link in links}


def _nl_addrs(ipr: Any, names: Mapping[int, str]) -> list[dict[str, Any]]:
    by_if: dict[int, list[dict[str, Any]]] = {}
    for a in ipr.get_addr():
        local = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
        if local:
            by_if.setdefault(a["index"], []).append({"local": local})
    return [{"ifname": names.get(i, str(i)), "addr_info": ai} for i, ai in by_if.items()]


def _nl_defaults(ipr: Any, names: Mapping[int, str]) -> list[str]:
    devs: list[str] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.route("dump", family=family):
            table = r.get_attr("RTA_TABLE") or r["table"]
            oif = r.get_attr("RTA_OIF")
            if r["dst_len"] == 0 and table == 254 and r["type"] == 1 and oif:
                d = names.get(oif)
                if d and d not in devs:
                    devs.append(d)
    return devs


def _nl_peers(ipr: Any, ifindex: int) -> list[str]:
    return sorted({str(d) for n in ipr.fdb("dump", ifindex=ifindex)
                   if (d := n.get_attr("NDA_DST"))})


def _nl_route_dev(ipr: Any, dst: str, names: Mapping[int, str]) -> str | None:
    for r in ipr.route("get", dst=dst):
        oif = r.get_attr("RTA_OIF")
        if oif:
            return names.get(oif)
    return None


def ip_links(netns: str | None = None) -> list[dict[str, Any]]:
    return list(_json_cmd(["ip", *_ns_args(netns), "-d", "-j", "link", "show"],
                          f"listing interfaces of {netns or 'this namespace'}"))


def ip_addrs(netns: str | None = None) -> list[dict[str, Any]]:
    return list(_json_cmd(["ip", *_ns_args(netns), "-j", "addr", "show"],
                          f"listing addresses of {netns or 'this namespace'}"))


def default_route_devs(netns: str | None = None) -> list[str]:
    devs: list[str] = []
    for fam in ("-4", "-6"):
        routes = _json_cmd(["ip", *_ns_args(netns), fam, "-j", "route", "show", "default"],
                           f"reading default routes of {netns or 'this namespace'}")
        for r in routes:
            d = r.get("dev")
            if d and d not in devs:
                devs.append(d)
    return devs


def vxlan_peers(dev: str, netns: str | None = None) -> list[str]:
    """Remote VTEP addresses in a VXLAN device's FDB (``bridge fdb show dev``)."""
    fdb = _json_cmd(["bridge", *_ns_args(netns), "-j", "fdb", "show", "dev", dev],
                    f"reading the FDB of {dev}")
    return sorted({str(e["dst"]) for e in fdb if e.get("dst")})


def route_dev(dst: str, netns: str | None = None) -> str | None:
    """The device ``ip route get <dst>`` picks."""
    routes = _json_cmd(["ip", *_ns_args(netns), "-j", "route", "get", dst],
                       f"looking up the route to {dst}")
    return str(routes[0]["dev"]) if routes and routes[0].get("dev") else None


def tc_qdiscs(netns: str | None = None) -> list[dict[str, Any]]:
    return list(_json_cmd(["tc", *_ns_args(netns), "-j", "qdisc", "show"],
                          f"listing qdiscs of {netns or 'this namespace'}"))


def tc_filters(dev: str, direction: str, netns: str | None = None) -> list[dict[str, Any]]:
    return list(_json_cmd(["tc", *_ns_args(netns), "-j", "filter", "show", "dev", dev,
                           direction], f"listing tc {direction} filters of {dev}"))


@dataclass
class TcHook:
    """tc on one interface: clsact/ingress qdisc and the filters hanging off it."""

    clsact: bool = False
    ingress_qdisc: bool = False
    filters: list[str] = field(default_factory=list)  # "ingress:bpf:name"
    hopscope_filters: list[str] = field(default_factory=list)


def filter_label(f: Mapping[str, Any]) -> str | None:
    """``kind[:name]`` of a ``tc -j filter show`` entry (None for the chain header)."""
    opts = f.get("options")
    if not isinstance(opts, Mapping):
        return None
    kind = str(f.get("kind", "?"))
    name = opts.get("bpf_name")
    prog = opts.get("prog")
    if not name and isinstance(prog, Mapping):
        name = prog.get("name")
    return f"{kind}:{name}" if name else kind


def tc_hooks(qdiscs: Sequence[Mapping[str, Any]],
             filters_for: Any = None) -> dict[str, TcHook]:
    """Per device: whether clsact exists and which filters hang off it.

    ``filters_for(dev, direction)`` returns ``tc -j filter show`` entries
    (None: do not list filters).
    """
    hooks: dict[str, TcHook] = {}
    for q in qdiscs:
        kind, dev = q.get("kind"), q.get("dev")
        if kind not in ("clsact", "ingress") or not dev:
            continue
        h = hooks.setdefault(str(dev), TcHook())
        if kind == "clsact":
            h.clsact = True
        else:
            h.ingress_qdisc = True
    if filters_for is not None:
        for dev, h in hooks.items():
            dirs = ("ingress", "egress") if h.clsact else ("ingress",)
            for d in dirs:
                for f in filters_for(dev, d):
                    label = filter_label(f)
                    if label is None:
                        continue
                    h.filters.append(f"{d}:{label}")
                    if label.partition(":")[2].startswith(HOPSCOPE_PREFIX):
                        h.hopscope_filters.append(f"{d}:{label}")
    return hooks


@dataclass
class Interface:
    name: str
    kind: str
    role: str
    point: str
    state: str = ""
    master: str | None = None
    vxlan: dict[str, Any] | None = None
    tc: TcHook = field(default_factory=TcHook)


ROLE_PUBLIC_NIC = "public NIC"
ROLE_OVERLAY = "overlay (VXLAN)"
ROLE_UNDERLAY = "underlay"
ROLE_PUBLIC_UNDERLAY = "public NIC + underlay"
ROLE_POD_BRIDGE = "pod bridge"
ROLE_POD_VETH = "pod veth"
ROLE_LOOPBACK = "loopback"
ROLE_OTHER = "other"


#: observation points the agent attaches to (``Interface.point``)
POINTS_ATTACHED = frozenset({"nic", "overlay", "underlay", "pod", "nic+underlay"})


def attached_interfaces(ifaces: Sequence[Interface]) -> list[Interface]:
    """The interfaces the agent watches, of those classified.

    Every point of the hop model that a packet crosses, once: at the ``pod``
    point a packet between the node and a pod crosses both the bridge
    (``cni0``) and the pod's veth, one right after the other in the same
    call; the veth, the one next to the pod, is watched and the bridge only
    when no veth of it is up (a CNI whose pods this does not recognise).
    Watching both doubled the pod point's events and classifier runs for a
    copy no hop uses (a hop starts and ends at the first copy seen at its
    point: the veth's is first from the pod, and towards the pod it differs
    from the bridge's by the bridge's forwarding, a few µs, counted in
    ``deliver`` instead of ``app``).
    """
    up = [i for i in ifaces if i.point in POINTS_ATTACHED and i.state.upper() != "DOWN"]
    with_veths = {i.master for i in up if i.role == ROLE_POD_VETH and i.master}
    return [i for i in up if not (i.role == ROLE_POD_BRIDGE and i.name in with_veths)]


def vxlan_underlays(links: Sequence[Mapping[str, Any]], addrs: Sequence[Mapping[str, Any]],
                    route_devs: Mapping[str, Sequence[str]] | None = None
                    ) -> dict[str, list[str]]:
    """VXLAN device -> the devices its encapsulated packets leave by.

    The VXLAN's bound device (``link``), else the device holding its
    ``local`` address, else where the routes to its FDB peers lead
    (``route_devs``: VXLAN name -> devices of ``ip route get <peer>``).
    """
    by_addr: dict[str, str] = {}
    for a in addrs:
        for ai in a.get("addr_info", []) or []:
            if ai.get("local"):
                by_addr[str(ai["local"])] = str(a.get("ifname"))
    out: dict[str, list[str]] = {}
    for link in links:
        li = link.get("linkinfo") or {}
        if li.get("info_kind") != "vxlan":
            continue
        name = str(link.get("ifname"))
        data = li.get("info_data") or {}
        dev = data.get("link") or by_addr.get(str(data.get("local", "")))
        if dev:
            out[name] = [str(dev)]
        else:
            out[name] = sorted(set((route_devs or {}).get(name, [])))
    return out


def _vxlan_route_devs(links: Sequence[Mapping[str, Any]],
                      peers: Callable[[Mapping[str, Any]], list[str]],
                      route: Callable[[str], str | None]) -> dict[str, list[str]]:
    """For VXLANs without a bound device or local address: where their FDB peers
    (``peers`` of the link) route (``route`` of a peer). A VXLAN whose lookup fails (a
    peer with no route) is left out."""
    route_devs: dict[str, list[str]] = {}
    for link in links:
        li = link.get("linkinfo") or {}
        data = li.get("info_data") or {}
        if li.get("info_kind") == "vxlan" and not (data.get("link") or data.get("local")):
            name = str(link["ifname"])
            try:
                devs = [route(peer) for peer in peers(link)[:16]]
            except HopscopeError as exc:
                log.debug("underlay of %s: %s", name, exc)
                continue
            route_devs[name] = [d for d in devs if d]
    return route_devs


def vxlan_route_devs(links: Sequence[Mapping[str, Any]], netns: str | None = None
                     ) -> dict[str, list[str]]:
    """:func:`_vxlan_route_devs` with ``bridge fdb`` and ``ip route get``."""
    return _vxlan_route_devs(links, lambda link: vxlan_peers(str(link["ifname"]), netns),
                             lambda dst: route_dev(dst, netns))


@dataclass
class Listing:
    """What classifying a namespace's interfaces reads (:func:`classify_interfaces`)."""

    links: list[dict[str, Any]]
    addrs: list[dict[str, Any]]
    defaults: list[str]
    route_devs: dict[str, list[str]]


def node_listing(netns: str | None = None) -> Listing:
    """Links, addresses, default routes and the VXLANs' underlays of a namespace: of this
    one over one netlink socket, the links dumped once; of a named one with iproute2."""
    if netns is not None:
        links = ip_links(netns)
        return Listing(links, ip_addrs(netns), default_route_devs(netns),
                       vxlan_route_devs(links, netns))
    what = "listing interfaces of this namespace"
    with _netlink(what) as ipr:
        links = _nl_links(ipr)
        names = _names(links)

        def route(dst: str) -> str | None:
            try:
                return _nl_route_dev(ipr, dst, names)
            except Exception as exc:  # pyroute2's NetlinkError: no route
                raise HopscopeError(f"looking up the route to {dst}: {exc}") from exc

        route_devs = _vxlan_route_devs(
            links, lambda link: _nl_peers(ipr, int(link["ifindex"])), route)
        return Listing(links, _nl_addrs(ipr, names), _nl_defaults(ipr, names), route_devs)


def pod_peer_nsids(links: Sequence[Mapping[str, Any]]) -> set[int]:
    """The namespace ids (as this namespace numbers them) at the other end of its pod veths."""
    ifaces = classify_interfaces(links, [])
    pods = {i.name for i in ifaces if i.role == ROLE_POD_VETH}
    return {int(link["link_netnsid"]) for link in links
            if link.get("ifname") in pods and link.get("link_netnsid") is not None}


def netns_candidates() -> dict[int, str]:
    """Network namespaces that can be opened: inode -> a path (``/run/netns/*``, then the
    namespaces of processes, ``/proc/PID/ns/net``)."""
    out: dict[int, str] = {}
    paths: list[str] = []
    for d in ("/run/netns", "/var/run/netns"):
        with contextlib.suppress(OSError):
            paths += [os.path.join(d, n) for n in sorted(os.listdir(d))]
    with contextlib.suppress(OSError):
        paths += [f"/proc/{n}/ns/net" for n in os.listdir("/proc") if n.isdigit()]
    for path in paths:
        try:
            out.setdefault(os.stat(path).st_ino, path)
        except OSError:
            continue  # gone, or not a namespace
    return out


def namespaces_with_nsids(nsids: set[int], own_inode: int) -> set[int]:
    """The inodes of the namespaces that this one calls ``nsids`` (RTM_GETNSID on each
    namespace that can be opened): its pods, when ``nsids`` are its veths' peers."""
    if not nsids:
        return set()
    from pyroute2 import IPRoute

    found: set[int] = set()
    with IPRoute() as ipr:
        for ino, path in netns_candidates().items():
            if ino == own_inode:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                r = ipr.get_netnsid(fd=fd)
            except Exception:  # the namespace went away meanwhile
                continue
            finally:
                os.close(fd)
            if r and r.get("nsid") in nsids:
                found.add(ino)
    return found


def classify_interfaces(links: Sequence[Mapping[str, Any]], default_devs: Sequence[str],
                        addrs: Sequence[Mapping[str, Any]] = (),
                        route_devs: Mapping[str, Sequence[str]] | None = None
                        ) -> list[Interface]:
    """Roles of the interfaces of one namespace from ``ip -d -j link``/``addr`` output.

    The public NIC is the default route's device; the underlay is what
    :func:`vxlan_underlays` finds (it may be the public NIC too);
    ``cni0``-like bridges and the veths enslaved to them carry pod traffic.
    ``point`` is the observation point of the role (``-`` for ``other``: not watched,
    whatever its name says; ``--iface NAME=POINT`` names one).
    """
    per_vxlan = vxlan_underlays(links, addrs, route_devs)
    underlays = {d for devs in per_vxlan.values() for d in devs}
    bridges = {str(link["ifname"]) for link in links
               if (link.get("linkinfo") or {}).get("info_kind") == "bridge"}
    out: list[Interface] = []
    for link in links:
        name = str(link.get("ifname", "?"))
        li = link.get("linkinfo") or {}
        kind = str(li.get("info_kind") or link.get("link_type") or "?")
        master = link.get("master")
        vx = None
        if kind == "vxlan":
            data = li.get("info_data") or {}
            vx = {"id": data.get("id"), "port": data.get("port"), "local": data.get("local"),
                  "underlay": per_vxlan.get(name, [])}
            role = ROLE_OVERLAY
        elif name == "lo" or kind == "loopback":
            role = ROLE_LOOPBACK
        elif name in default_devs and name in underlays:
            role = ROLE_PUBLIC_UNDERLAY
        elif name in default_devs:
            role = ROLE_PUBLIC_NIC
        elif name in underlays:
            role = ROLE_UNDERLAY
        elif kind == "bridge" and (name.startswith(("cni", "cbr")) or any(
                (x.get("master") == name) for x in links)):
            role = ROLE_POD_BRIDGE
        elif kind == "veth" and (master in bridges or name.startswith("veth")):
            role = ROLE_POD_VETH
        else:
            role = ROLE_OTHER
        # the point is the role's, whatever the name (a pod veth named ab12 is a pod
        # veth; a bond's slave eth0, a second NIC ens19 are no point of the model)
        point = {ROLE_PUBLIC_NIC: "nic", ROLE_UNDERLAY: "underlay",
                 ROLE_PUBLIC_UNDERLAY: "nic+underlay", ROLE_OVERLAY: "overlay",
                 ROLE_POD_BRIDGE: "pod", ROLE_POD_VETH: "pod",
                 ROLE_LOOPBACK: point_for_ifname("lo")}.get(role, "")
        out.append(Interface(name, kind, role, point or "-", str(link.get("operstate", "")),
                             str(master) if master else None, vx))
    return out


# -- the proxy process ----------------------------------------------------------------


def _hex_addr(h: str) -> str:
    raw = bytes.fromhex(h)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return socket.inet_ntop(socket.AF_INET, words)
    return socket.inet_ntop(socket.AF_INET6, words)


@dataclass
class ListenSocket:
    family: int
    address: str
    port: int
    inode: int

    @property
    def dual_stack_candidate(self) -> bool:
        return self.family == socket.AF_INET6 and self.address == "::"


def parse_proc_net_tcp(text: str, family: int) -> list[ListenSocket]:
    """Listening sockets (state 0A) of a ``/proc/<pid>/net/tcp`` or ``tcp6`` text."""
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10 or parts[3] != "0A":
            continue
        addr, _, port = parts[1].partition(":")
        try:
            out.append(ListenSocket(family, _hex_addr(addr), int(port, 16), int(parts[9])))
        except ValueError:
            continue
    return out


def socket_inodes(pid: int, proc: str = "/proc") -> set[int]:
    out: set[int] = set()
    fd_dir = os.path.join(proc, str(pid), "fd")
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return out
    for fd in fds:
        with contextlib.suppress(OSError):
            t = os.readlink(os.path.join(fd_dir, fd))
            if t.startswith("socket:["):
                out.add(int(t[8:-1]))
    return out


def proxy_listeners(pid: int, port: int = 80, proc: str = "/proc") -> list[ListenSocket]:
    """The process's listening TCP sockets on ``port``, read in *its* network namespace."""
    own = socket_inodes(pid, proc)
    out = []
    for name, fam in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        text = _read_text(os.path.join(proc, str(pid), "net", name)) or ""
        out += [s for s in parse_proc_net_tcp(text, fam)
                if s.port == port and (not own or s.inode in own)]
    return out


def netns_inode_of_pid(pid: int, proc: str = "/proc") -> int | None:
    try:
        return os.stat(os.path.join(proc, str(pid), "ns", "net")).st_ino
    except OSError:
        return None


def netns_inode_of_name(name: str | None, netns_dir: str = NETNS_DIR) -> int | None:
    if name is None:
        return netns_inode_of_pid(os.getpid())
    try:
        return os.stat(os.path.join(netns_dir, name)).st_ino
    except OSError:
        return None


@dataclass
class ProxyProcess:
    pid: int
    name: str
    cmdline: str
    netns_inode: int | None
    listeners: list[ListenSocket]


def find_processes(name: str, port: int = 80) -> list[ProxyProcess]:
    """Processes named ``name`` (matched as :func:`process_pids` matches them, the agent's
    rule), with their name, command line and listeners on ``port`` (the entry port; psutil
    reads the first two)."""
    import psutil

    out = []
    for pid in process_pids(name):
        try:
            p = psutil.Process(pid)
            pname, cmd = p.name(), p.cmdline()
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
        out.append(ProxyProcess(pid, pname, " ".join(cmd)[:200], netns_inode_of_pid(pid),
                                proxy_listeners(pid, port)))
    return out


def process_pids(name: str, netns: int | None = None, proc: str = "/proc") -> list[int]:
    """Pids of the processes named ``name`` (their comm, or argv[0]'s basename), only those
    in network namespace ``netns`` when given; sorted, this process left out.

    What the live agent runs at every rescan: two small reads per process (its ``comm``,
    and its ``cmdline`` when the comm differs), no psutil objects and none of the socket
    tables :func:`find_processes` reads for ``hopscope doctor`` (on a busy node the proxy's
    ``/proc/<pid>/net/tcp`` lists every connection: a rescan took tens of milliseconds).
    """
    out = []
    me = os.getpid()
    want = name.encode()
    try:
        entries = os.listdir(proc)
    except OSError:
        return []
    for ent in entries:
        if not ent.isdigit() or int(ent) == me:
            continue
        base = os.path.join(proc, ent)
        try:
            with open(os.path.join(base, "comm"), "rb") as f:
                comm = f.read().rstrip(b"\n")
            if comm != want:
                with open(os.path.join(base, "cmdline"), "rb") as f:
                    argv0 = f.read(4096).split(b"\0", 1)[0]
                if not argv0 or os.path.basename(argv0) != want:
                    continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if netns is not None and netns_inode_of_pid(int(ent), proc) != netns:
            continue
        out.append(int(ent))
    return sorted(out)


# -- the probe plan -----------------------------------------------------------------------

#: tcp:tcp_probe's fields without which bpf/agent.c does not take the kernel point from it
#: (6.1's has neither): ``bpfprog.Settings.tp_probe_skb`` as ``run.load_program`` sets it
TCP_PROBE_SKB_FIELDS = frozenset({"skaddr", "skbaddr"})
#: the agent's packet sources (``agent run --source auto`` picks one of the first two)
PACKETS_TC, PACKETS_CAPTURE, PACKETS_NONE = "tc", "capture", "none"


def tcp_probe_has_skb(fields: Iterable[str]) -> bool:
    """Does tcp:tcp_probe carry the socket and the skb? Then ``bpf/agent.c`` takes the
    kernel point (the end of ``kernel_in``) from it; else from a kprobe on
    tcp_rcv_established (``bpf/kprobes.c``), or nowhere without kprobes."""
    return set(fields) >= TCP_PROBE_SKB_FIELDS


def headers_usable(info: HeadersInfo) -> bool:
    """This kernel's own header tree is there and complete (``kconfig.h``, what bcc checks):
    ``bpfprog.prepare_kernel_env`` links nothing."""
    return info.present and info.has_kconfig_h


def headers_stage(info: HeadersInfo) -> HeaderTree | None:
    """Another version's header tree that ``bpfprog.prepare_kernel_env`` links as this
    kernel's in the agent's private mount namespace (one with a ``source`` tree first, as
    Debian splits them); None when this kernel's own are usable, or when there is none."""
    if headers_usable(info):
        return None
    return next((c for c in info.candidates if c.source), None) or (
        info.candidates[0] if info.candidates else None)


@dataclass
class PlanInputs:
    """What :func:`plan_probes` needs to know about the node: the facts the agent's start-up
    (``run.run_agent``, ``bpfprog.prepare_kernel_env``, ``run.load_program``) decides on,
    read the way it reads them."""

    #: kprobes the agent would use (``run.kprobes_available``; ``agent run --no-kprobes``: False)
    kprobes: bool
    kprobe_symbols: Mapping[str, bool]  # kallsyms: the kprobe targets, tcp_rcv_established
    fentry: bool
    ipvs_config: bool
    ipvs_active: bool
    tc_clsact: bool
    af_packet: bool
    tracepoints: Mapping[str, bool]
    drop_reasons: bool
    ringbuf: bool
    #: iovisor's bcc importable (not PyPI's unrelated ``bcc``)
    bcc: bool
    #: ``probe_headers``: this kernel's headers, else the candidates to link
    headers: HeadersInfo
    tracefs_mounted: bool
    #: CAP_SYS_ADMIN: the agent can make its private mount namespace (tracefs, headers)
    sys_admin: bool
    #: tracepoint programs load (the trivial one of ``hopscope doctor``)
    tracepoint_progs: bool
    #: the field names of tcp:tcp_probe's format file (empty: absent or unreadable)
    tcp_probe_fields: frozenset[str]
    #: tc programs may call bpf_get_current_pid_tgid (``tc_helper_pid_tgid``, 6.10+)
    tc_pid_tgid: bool
    #: the proxy's syscalls the programs trace (``agent run --proxy-calls``)
    proxy_calls: tuple[str, ...]


@dataclass
class PlanItem:
    hop: str
    source: str
    reason: str
    usable: bool = True
    #: a way this could be measured that the agent does NOT have (named, never built or
    #: used): said so that nobody takes it for a fallback
    not_built: str = ""


def packet_source(f: PlanInputs) -> tuple[str, dict[str, str]]:
    """The packet source ``agent run --source auto`` ends up with (PACKETS_*), and why the
    BPF programs cannot be used here, by what it is about (``hopscope doctor``'s section
    names; empty when they can): ``run.run_agent`` falls back to AF_PACKET capture when
    ``bpfprog.prepare_kernel_env`` or loading the programs fails."""
    why: dict[str, str] = {}
    if not f.bcc:
        why["bcc"] = "bcc not importable"
    if not headers_usable(f.headers):
        stage = headers_stage(f.headers)
        if stage is None:
            why["kernel_headers"] = (f"no kernel headers for {f.headers.release} and none of "
                                     "another version")
        elif not f.sys_admin:
            why["kernel_headers"] = (f"linking {stage.version}'s headers needs a private mount "
                                     "namespace (CAP_SYS_ADMIN)")
    if not f.tracefs_mounted and not f.sys_admin:
        why["tracefs"] = "mounting tracefs needs a private mount namespace (CAP_SYS_ADMIN)"
    if not f.tc_clsact:
        why["tc_clsact"] = "no tc clsact/cls_bpf"
    if not f.ringbuf:
        why["ringbuf"] = "no BPF ring buffer (kernel < 5.8?)"
    missing = [n for n in bpf_tracepoints_needed(f.proxy_calls) if not f.tracepoints.get(n)]
    if missing or not f.tracepoint_progs:
        why["tracepoints"] = "; ".join(
            ([f"tracepoints absent: {', '.join(missing)}"] if missing else [])
            + ([] if f.tracepoint_progs else ["tracepoint programs do not load"]))
    if not why:
        return PACKETS_TC, {}
    return (PACKETS_CAPTURE if f.af_packet else PACKETS_NONE), why


def plan_probes(f: PlanInputs) -> list[PlanItem]:
    """Which source the agent uses for each measurement on this kernel, and why: the choices
    of ``run.run_agent`` (tc or AF_PACKET capture) and ``run.load_program`` (the kernel
    point, the proxy point, kprobes), from the same facts."""
    tp = f.tracepoints
    src, blocked = packet_source(f)
    blockers = "; ".join(blocked.values())
    items: list[PlanItem] = []
    if src == PACKETS_TC:
        pkt = "tc clsact (BPF sched_cls, ingress+egress)"
        why = ("the BPF programs load here (bcc, headers, tracefs, tc clsact/cls_bpf, the BPF "
               "ring buffer, the tracepoints they need); sees every packet with its ifindex, "
               "before/after the stack, one clock with the tracepoints")
        stage = headers_stage(f.headers)
        if stage is not None:
            why += (f"; no headers for {f.headers.release}: bcc compiles against "
                    f"{stage.version}'s, linked in the agent's private mount namespace (root; "
                    "under the hopscope-agent unit, `hopscope install agent`'s headers drop-in "
                    "does it)")
        if not f.tracefs_mounted:
            why += "; tracefs mounted in the agent's private mount namespace"
    elif src == PACKETS_CAPTURE:
        pkt = "AF_PACKET capture (TPACKET_V3, socket filter)"
        why = (f"the BPF programs cannot be used here ({blockers}): --source auto falls back "
               "to capture (--source tc fails)")
    else:
        pkt = "none"
        why = f"the BPF programs cannot be used here ({blockers}) and AF_PACKET is refused"
    for hop in ("nic", "pod", "overlay", "underlay"):
        items.append(PlanItem(f"{hop} packets", pkt, why, src != PACKETS_NONE))

    sys_tps = [f"syscalls:sys_{edge}_{call}" for call in f.proxy_calls
               for edge in ("enter", "exit")]
    if src != PACKETS_TC:
        none_why = ("no BPF programs (" + ("AF_PACKET capture" if src == PACKETS_CAPTURE
                                           else "no packet source")
                    + "): no kernel or proxy point, so no sub-hops of ingress")
        items.append(PlanItem("kernel_in", "none", none_why, False,
                              "net:netif_receive_skb + sock:sk_data_ready"))
        items.append(PlanItem(
            "proxy", "none", none_why, False,
            "raw_syscalls:sys_enter filtered by syscall number"
            if not all(tp.get(n) for n in sys_tps) else ""))
        items.append(PlanItem("service_nat", "none", none_why, False))
        items.append(PlanItem("drops", "none", "no BPF programs: no skb:kfree_skb, no kernel "
                              "drop reasons", False))
        items.append(PlanItem("transport", "AF_PACKET TPACKET_V3 ring" if src == PACKETS_CAPTURE
                              else "none", "no BPF ring buffer in use", src == PACKETS_CAPTURE,
                              "" if f.ringbuf else "perf buffer"))
        return items

    nf = f.kprobes and f.kprobe_symbols.get("nf_hook_slow")
    nf_why = ("; kprobe+kretprobe on nf_hook_slow split out netfilter's INPUT hook (UFW's own "
              "time) and its verdict, as a child of kernel_in" if nf else "")
    no_kprobes = "no kprobes" if not f.kprobes else "tcp_rcv_established not in kallsyms"
    if tcp_probe_has_skb(f.tcp_probe_fields):
        items.append(PlanItem(
            "kernel_in", "tc ingress (nic) -> tracepoint tcp:tcp_probe",
            "tcp:tcp_probe has the socket and skb (skaddr, skbaddr): tc ingress at the nic to "
            "the segment reaching the entry-port socket, UFW and the stack in between" + nf_why))
    else:
        lacks = ("tcp:tcp_probe has no socket/skb fields (skaddr, skbaddr) here"
                 if f.tcp_probe_fields else "tcp:tcp_probe is absent")
        if f.kprobes and f.kprobe_symbols.get("tcp_rcv_established"):
            items.append(PlanItem(
                "kernel_in", "tc ingress (nic) -> kprobe tcp_rcv_established",
                f"{lacks}: the kernel point comes from a kprobe on tcp_rcv_established, on "
                "entry-port sockets (with `agent run --no-kprobes`: no kernel_in)" + nf_why))
        else:
            alt = "net:netif_receive_skb + sock:sk_data_ready"
            if f.fentry:
                alt += "; fentry/fexit (BPF trampoline) on tcp_rcv_established"
            items.append(PlanItem(
                "kernel_in", "none", f"{lacks} and {no_kprobes}: no kernel point, so kernel_in "
                "and proxy come merged (kernel_in+proxy)" + nf_why, False, alt))

    calls = ",".join(f.proxy_calls)
    if f.tc_pid_tgid:
        items.append(PlanItem(
            "proxy", f"syscalls:sys_enter_{{{calls}}} of the proxy + tc egress in its thread",
            "tc programs may call bpf_get_current_pid_tgid here (6.10+): the upstream packet, "
            "sent inside the proxy's write, carries that write's start (sys_enter: it left "
            "user space; exits come after the peer already has the packet)"))
    else:
        items.append(PlanItem(
            "proxy", "none: tc cannot tell the thread here (proxy+service_nat merged)",
            "tc programs cannot call bpf_get_current_pid_tgid on this kernel (before 6.10): "
            "the proxy's write is not tied to its upstream packet, so proxy and service_nat "
            "come merged (proxy+service_nat)", False))

    merged = "" if f.tc_pid_tgid else " (inside proxy+service_nat: no proxy point here)"
    ipvs_syms = f.kprobe_symbols.get("ip_vs_schedule") and f.kprobe_symbols.get("ip_vs_conn_new")
    if f.ipvs_config and f.kprobes and (ipvs_syms or not f.ipvs_active):
        items.append(PlanItem("service_nat", "kprobes ip_vs_schedule + ip_vs_conn_new" + merged,
                              "IPVS and kprobes present: the real server IPVS chose for each "
                              "upstream connection (matched by its SYN's sequence number) is "
                              "named on service_nat; attached once ip_vs is loaded"
                              + ("" if ipvs_syms else " (not loaded yet)")))
    else:
        reasons = []
        if not f.ipvs_config:
            reasons.append("no IPVS in this kernel (kube-proxy must use iptables)")
        elif not f.kprobes:
            reasons.append("IPVS present but no kprobes")
        if f.ipvs_active and not f.kprobes:
            reasons.append("IPVS in use: its time is inside the same interval")
        source = ("iptables DNAT: the proxy's write -> its first upstream byte at tc egress on "
                  "flannel.1 or the pod's veth (pod IP, after DNAT and masquerade)"
                  if f.tc_pid_tgid else
                  "iptables DNAT: the endpoint from the upstream packets at tc egress on "
                  "flannel.1 or the pod's veth (pod IP, after DNAT and masquerade)" + merged)
        items.append(PlanItem("service_nat", source, "; ".join(reasons) or "no IPVS symbols"))

    # skb:kfree_skb is there: the programs do not load without it (packet_source)
    items.append(PlanItem("drops", "skb:kfree_skb with reasons" if f.drop_reasons
                          else "skb:kfree_skb (location only)",
                          "reason names read from the tracepoint's format at run time"
                          if f.drop_reasons else "no reason field on this kernel"))
    items.append(PlanItem("transport", "BPF ring buffer", "BPF_MAP_TYPE_RINGBUF available "
                          "(without it the programs do not load: AF_PACKET capture)"))
    return items


def plan_to_dicts(items: Sequence[PlanItem]) -> list[dict[str, Any]]:
    return [asdict(i) for i in items]


def check_netns(name: str | None) -> None:
    """Raise UsageError when a named network namespace does not exist (or ``name`` is no
    namespace's name: empty, a path)."""
    if name is not None and (not name or "/" in name or name in (".", "..")):
        raise UsageError(f"--netns {name!r}: give a namespace's name as `ip netns list` "
                         "shows it (no path)")
    if name is not None and not netns_exists(name):
        raise UsageError(
            f"network namespace {name!r} not found in {NETNS_DIR}: "
            f"list them with `ip netns list` (k3s pods' namespaces are under /run/netns too)")
