"""Tests that run INSIDE the test VM (Debian 12's stock kernel: kprobes, IPVS).

vm/init sets ``HOPSCOPE_IN_VM=1``; everywhere else this directory collects nothing,
so the host's test run never sees these tests. On the host, ``tests/test_vm.py``
boots the VM once per session, runs ``pytest tests/vm`` in it and reports each
test's outcome (see docs/vm.md).

Inside the VM the tests run as root with the repository read-only at
``/mnt/hopscope`` (the working directory), the hopscope package importable, and a
writable results directory at ``$HOPSCOPE_VM_OUT`` (the host's ``vm/run --out``).
Write scratch files under ``/tmp`` (tmpfs) or the ``vm_out`` fixture's directory,
never into the repository.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_VM = os.environ.get("HOPSCOPE_IN_VM") == "1"

if not IN_VM:
    collect_ignore_glob = ["*"]


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh named network namespace with loopback up, deleted afterwards."""
    name = f"hsvm{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=20)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                       capture_output=True, timeout=20)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=20)


@pytest.fixture
def vm_out(request: pytest.FixtureRequest) -> Path:
    """A directory of this test's under the results share (the host keeps it)."""
    base = Path(os.environ.get("HOPSCOPE_VM_OUT", "/tmp"))
    d = base / "tests" / request.node.name.replace("/", "_")
    d.mkdir(parents=True, exist_ok=True)
    return d
