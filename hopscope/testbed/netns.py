"""Helpers to run things in network namespaces.

Everything here works on named namespaces (``/run/netns/<name>``, as made
by ``ip netns add``). Three ways in:

* :func:`ip` / :func:`ip_batch` -- ``ip -n NS ...`` (no mount namespace, fast);
* :func:`run` / :func:`spawn` -- a command under ``ip netns exec NS``;
* :func:`call_in_netns` -- a Python callable in a fresh *thread* that has
  ``setns(2)``-ed into the namespace. Sockets it creates live in that
  namespace; ``/proc/sys/net`` opened from it shows that namespace. The
  rest of the process is not affected.

:func:`ufw` runs UFW confined to a node (its own copies of ``/etc/ufw``,
``/etc/default/ufw``, ``/lib/ufw`` and ``/run`` bind-mounted in a private
mount namespace), as ``up`` configured it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from hopscope.errors import PrivilegeError, TestbedError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def require_root(what: str) -> None:
    """Raise PrivilegeError unless running as root."""
    if os.geteuid() != 0:
        raise PrivilegeError(
            f"{what} needs root (network namespaces, netfilter): run it with sudo"
        )


def _fmt(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def run(
    argv: Sequence[str],
    *,
    ns: str | None = None,
    check: bool = True,
    timeout: float = 30.0,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (in namespace ``ns`` when given) and return the result.

    Raises TestbedError with the command and its stderr when ``check`` and
    it fails or times out.
    """
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    log.debug("run %s", _fmt(full))
    try:
        cp = subprocess.run(
            full, capture_output=True, text=True, timeout=timeout, input=input,
            env=dict(env) if env is not None else None, check=False,
        )
    except subprocess.TimeoutExpired:
        raise TestbedError(
            f"command timed out after {timeout:.0f} s: {_fmt(full)}"
        ) from None
    except FileNotFoundError:
        raise TestbedError(
            f"command not found: {full[0]}: install it (./dev.sh setup installs the "
            "testbed's system packages)"
        ) from None
    if check and cp.returncode != 0:
        err = (cp.stderr or cp.stdout).strip().replace("\n", " | ")
        raise TestbedError(f"command failed (exit {cp.returncode}): {_fmt(full)}: {err}")
    return cp


def ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip -n NS ARGS...``"""
    return run(["ip", "-n", ns, *args], check=check)


def ip_batch(ns: str | None, lines: Iterable[str], *, tool: str = "ip") -> None:
    """Run many ``ip`` (or ``bridge``) commands in one process: ``ip -n NS -batch -``.

    Lines are ip arguments without the leading ``ip``. On failure the
    error names the failing line.
    """
    body = "\n".join(lines) + "\n"
    argv = [tool, *(["-n", ns] if ns else []), "-batch", "-"]
    run(argv, input=body)


def exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def list_namespaces(prefix: str = "") -> list[str]:
    """Named namespaces (``ip netns list``), optionally only those starting with prefix."""
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []
    return [n for n in names if n.startswith(prefix)]


def add(ns: str) -> None:
    run(["ip", "netns", "add", ns])
    ip(ns, "link", "set", "lo", "up")


def delete(ns: str) -> None:
    """Delete a named namespace (its interfaces go with it). Missing is fine."""
    if exists(ns):
        run(["ip", "netns", "delete", ns], check=False)
    if exists(ns):  # a stale mount point whose namespace is gone
        try:
            os.unlink(NETNS_DIR / ns)
        except OSError as exc:
            raise TestbedError(
                f"cannot remove namespace {ns}: {exc}; check `ip netns pids {ns}` and "
                f"remove it with `ip netns delete {ns}`"
            ) from exc


def ns_inode(ns: str) -> int | None:
    try:
        return os.stat(NETNS_DIR / ns).st_ino
    except OSError:
        return None


def pids_in_netns(ns: str) -> list[int]:
    """Pids of processes whose network namespace is ``ns`` (like ``ip netns pids``)."""
    ino = ns_inode(ns)
    if ino is None:
        return []
    want = f"net:[{ino}]"
    own = os.getpid()
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == own:
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") == want:
                out.append(pid)
        except OSError:
            continue
    return out


def setns_current_thread(ns: str) -> None:
    """Move the calling thread into network namespace ``ns``."""
    fd = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise TestbedError(f"setns into namespace {ns} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def wait_tcp(ns: str, host: str, port: int, timeout: float,
             alive: Callable[[], bool] | None = None) -> bool:
    """Whether ``host:port`` accepts a connection from namespace ``ns`` within ``timeout``
    seconds (giving up early when ``alive()`` turns False)."""

    def probe() -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                return False
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    return call_in_netns(ns, probe)


def call_in_netns(ns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in a new thread inside namespace ``ns``; return its result.

    Exceptions raised by ``fn`` are re-raised here.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            setns_current_thread(ns)
            result.append(fn(*args, **kwargs))
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def sysctl(ns: str, settings: Mapping[str, str | int]) -> None:
    """Write ``net.*`` sysctls inside ``ns`` (keys with dots: ``net.ipv4.ip_forward``)."""

    def body() -> None:
        for key, value in settings.items():
            path = "/proc/sys/" + key.replace(".", "/")
            with open(path, "w") as f:
                f.write(str(value))

    try:
        call_in_netns(ns, body)
    except OSError as exc:
        raise TestbedError(f"cannot set sysctls in namespace {ns}: {exc}") from exc


def sysctl_all_ifaces(ns: str, leaf: str, value: str | int) -> None:
    """Set ``net.ipv4.conf.<every interface, all, default>.<leaf>`` inside ``ns``."""

    def body() -> None:
        base = "/proc/sys/net/ipv4/conf"
        for name in os.listdir(base):
            with open(f"{base}/{name}/{leaf}", "w") as f:
                f.write(str(value))

    call_in_netns(ns, body)


def spawn(
    ns: str,
    argv: Sequence[str],
    log_path: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in namespace ``ns`` in its own session, output appended to log_path.

    ``ip netns exec`` execs the command, so the returned pid is the command's.
    """
    full = ["ip", "netns", "exec", ns, *argv]
    log.debug("spawn %s", _fmt(full))
    logf: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True, env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd else None, close_fds=True,
        )
    except OSError as exc:
        raise TestbedError(f"cannot start {_fmt(argv)} in namespace {ns}: {exc}") from exc
    finally:
        logf.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def kill_pids(pids: Iterable[int], timeout: float = 3.0) -> list[int]:
    """SIGTERM each pid, wait up to ``timeout``, then SIGKILL. Returns pids still alive."""
    pids = [p for p in set(pids) if p > 1 and p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    alive = _wait_gone(pids, timeout)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return _wait_gone(alive, 2.0)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Reap and poll ``pids`` for up to ``timeout`` seconds; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        for pid in alive:
            _reap(pid)
        alive = [p for p in alive if pid_alive(p)]
        if alive:
            time.sleep(0.05)
    return alive


# -- UFW confined to one node ------------------------------------------------------

def ufw_script(ufw_dir: str | Path, commands: Sequence[Sequence[str]]) -> str:
    """Shell script that confines UFW to ``ufw_dir``'s copies and runs ``ufw`` commands.

    ``ufw_dir`` holds ``etc-ufw/``, ``default-ufw``, ``lib-ufw/`` and ``run/``
    (made by the builder). Run it as ``ip netns exec NODE unshare -m sh -c``.
    """
    d = shlex.quote(str(ufw_dir))
    lines = [
        "set -e",
        "mount --make-rprivate / 2>/dev/null || true",
        f"mount --bind {d}/etc-ufw /etc/ufw",
        f"mount --bind {d}/default-ufw /etc/default/ufw",
        f"mount --bind {d}/lib-ufw /lib/ufw",
        f"mount --bind {d}/run /run",
    ]
    lines += ["ufw " + " ".join(shlex.quote(a) for a in cmd) for cmd in commands]
    return "\n".join(lines) + "\n"


def ufw(ns: str, ufw_dir: str | Path, *commands: Sequence[str],
        timeout: float = 60.0) -> str:
    """Run ``ufw`` commands confined to node namespace ``ns``; return their output.

    Example: ``ufw("hs-node1", inst.extra["ufw_dirs"]["node1"], ["status", "verbose"])``.
    The root namespace's firewall and ``/etc/ufw`` are not touched.
    """
    script = ufw_script(ufw_dir, commands)
    cp = run(["unshare", "-m", "sh", "-c", script], ns=ns, timeout=timeout)
    return cp.stdout
