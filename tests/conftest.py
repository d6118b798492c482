"""Shared fixtures.

* Markers ``privileged`` and ``requires_root_netns``: a test carrying either
  runs only as root where ``ip netns add`` works; elsewhere it is skipped
  with the reason. Once those hold, a replica that does not come up is a
  failure, never a skip.
* ``testbed`` (module scope): a running replica with a unique prefix
  (``t<pid><random>-``), torn down after the module whatever happens.
* :func:`c_output` / :func:`c_values` (with the ``needs_gcc`` mark): a small C program
  compiled and run, how a Python mirror of a C layout is held against its header.
* ``root_snapshot`` (session scope): the root namespace's interfaces,
  routes, firewall, a few sysctls and a hash of UFW's files, taken before
  any replica is built; compare with :func:`take_root_snapshot`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from hopscope.testbed.topology import Instance

GATED_MARKERS = ("privileged", "requires_root_netns")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires_root_netns: needs root and working `ip netns` (skipped otherwise)",
    )


@functools.cache
def root_netns_problem() -> str | None:
    """Why root network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    name = f"hsprobe{os.getpid()}"
    try:
        # no timeout caught: a machine too loaded to add a namespace in a minute fails the
        # tests, it does not skip them
        add = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                             timeout=60)
    except OSError as exc:
        return f"`ip netns add` unusable: {exc}"
    try:
        if add.returncode != 0:
            return f"`ip netns add` fails here: {add.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=60)
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if any(item.get_closest_marker(m) for m in GATED_MARKERS):
        problem = root_netns_problem()
        if problem:
            pytest.skip(problem)


needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler")


def c_output(tmp_path: Path, headers: Sequence[str], body: str,
             cflags: Sequence[str] = ()) -> str:
    """Compile a program including ``<stddef.h>``, ``<stdio.h>`` and ``headers`` (each as
    written after ``#include``) whose ``main`` runs ``body``; run it: what it printed."""
    name = f"prog{secrets.token_hex(3)}"
    src = tmp_path / f"{name}.c"
    includes = "\n".join(f"#include {h}" for h in ("<stddef.h>", "<stdio.h>", *headers))
    src.write_text(f"{includes}\nint main(void) {{\n{body}\n    return 0;\n}}\n")
    exe = tmp_path / name
    subprocess.run(["gcc", *cflags, "-o", str(exe), str(src)], check=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


def c_values(tmp_path: Path, headers: Sequence[str], exprs: Mapping[str, str],
             cflags: Sequence[str] = ()) -> dict[str, int]:
    """The value of each C expression of ``exprs`` (key -> expression) as the compiler has
    it (``offsetof(...)``, ``sizeof(...)``, a constant), by key."""
    body = "\n".join(f'    printf("%ld\\n", (long)({e}));' for e in exprs.values())
    got = c_output(tmp_path, headers, body, cflags).split()
    return dict(zip(exprs, map(int, got), strict=True))


def unique_prefix(tag: str = "t") -> str:
    """A testbed prefix nobody else uses: ``t<pid mod 1e5><4 hex>-``."""
    return f"{tag[:1]}{os.getpid() % 100000}{secrets.token_hex(2)}-"


def _cmd(argv: list[str]) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        return f"<{argv[0]} missing>"
    return cp.stdout + (f"\n<exit {cp.returncode}: {cp.stderr.strip()}>" if cp.returncode else "")


def _normalize_fw(text: str) -> str:
    lines = []
    for ln in text.splitlines():
        if ln.startswith("#"):
            continue  # iptables-save's timestamps
        ln = re.sub(r"\[\d+:\d+\]", "[0:0]", ln)
        ln = re.sub(r"packets \d+ bytes \d+", "packets 0 bytes 0", ln)
        lines.append(ln)
    return "\n".join(lines)


def _hash_tree(*roots: str) -> str:
    h = hashlib.sha256()
    for root in roots:
        p = Path(root)
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*"))
        for f in files:
            st = f.lstat()
            h.update(f"{f}\0{st.st_mode}\0".encode())
            if f.is_file() and not f.is_symlink():
                h.update(f.read_bytes())
    return h.hexdigest()


def take_root_snapshot() -> dict[str, str]:
    """What must not change in the root namespace while replicas come and go."""
    sysctls = {}
    for key in ("net/ipv4/ip_forward", "net/ipv4/conf/all/rp_filter",
                "net/ipv4/conf/default/rp_filter", "net/ipv6/conf/all/disable_ipv6"):
        try:
            sysctls[key] = Path("/proc/sys", key).read_text().strip()
        except OSError:
            sysctls[key] = "?"
    return {
        "ip link": re.sub(r"\s+", " ", _cmd(["ip", "-o", "link", "show"])),
        "ip addr": re.sub(r"valid_lft \S+ preferred_lft \S+", "",
                          _cmd(["ip", "-o", "addr", "show"])),
        "ip route": _cmd(["ip", "route", "show", "table", "all"]),
        "ip rule": _cmd(["ip", "rule", "show"]),
        "iptables-save": _normalize_fw(_cmd(["iptables-save"])),
        "ip6tables-save": _normalize_fw(_cmd(["ip6tables-save"])),
        "nft": _normalize_fw(_cmd(["nft", "list", "ruleset"])),
        "ufw files": _hash_tree("/etc/ufw", "/etc/default/ufw", "/lib/ufw"),
        "sysctl": repr(sorted(sysctls.items())),
    }


def snapshot_diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Names of the snapshot parts that differ."""
    return [k for k in before if before[k] != after.get(k)]


@pytest.fixture(scope="session")
def root_snapshot() -> dict[str, str]:
    if root_netns_problem():
        pytest.skip(root_netns_problem() or "")
    return take_root_snapshot()


@pytest.fixture(scope="module")
def testbed(root_snapshot: dict[str, str]) -> Iterator[Instance]:
    """A running replica (an :class:`~hopscope.testbed.topology.Instance`), torn down after."""
    problem = root_netns_problem()
    if problem:
        pytest.skip(problem)
    from hopscope.testbed.build import replica

    with replica(unique_prefix()) as inst:
        yield inst
