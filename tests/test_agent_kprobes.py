"""The agent's kprobe programs on this kernel, which has no kprobes.

Here they must compile and pass the verifier (they load as kprobe programs
whatever the kernel's kprobe support), and attaching must fail, be logged,
and leave the agent running on tracepoints. That they attach and measure is
tested in the VM (tests/vm/, a kernel with kprobes and IPVS).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hopscope.agent import bpfprog
from hopscope.agent.run import kprobes_available

pytestmark = pytest.mark.privileged

CHILD = r"""
import json, logging, sys
logging.basicConfig(level=logging.WARNING)
from hopscope.agent import bpfprog
bpfprog.prepare_kernel_env()
old = sys.argv[1] == "6.1"  # as on Debian 12's kernel: tcp_probe without skb, no rx_sk
prog = bpfprog.AgentProgram(bpfprog.Settings(kprobes=True, tp_probe_skb=not old,
                                             tp_kfree_rx_sk=not old))
loaded = {}
for fn, _event, _ret in bpfprog.KPROBES:
    if fn == "hs_tcp_rcv" and not old:  # built only where tcp:tcp_probe has no skb
        continue
    try:
        loaded[fn] = prog.bpf.load_func(fn, prog.bpf.KPROBE).fd > 0
    except Exception as exc:
        loaded[fn] = str(exc)
attached = prog.attach_kprobes({event: True for _fn, event, _r in bpfprog.KPROBES})
prog.close()
print("RESULT " + json.dumps({"loaded": loaded, "attached": attached}))
"""


@pytest.mark.parametrize("tracepoints", ["here", "6.1"])
def test_kprobe_programs_verify_here_and_attach_only_where_kprobes_exist(tracepoints: str
                                                                           ) -> None:
    cp = subprocess.run([sys.executable, "-c", CHILD, tracepoints], capture_output=True,
                        text=True, timeout=180)
    line = next((ln for ln in cp.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, cp.stderr[-3000:]
    r = json.loads(line[7:])
    assert r["loaded"] == {fn: True for fn, _e, _r in bpfprog.KPROBES
                           if fn != "hs_tcp_rcv" or tracepoints == "6.1"}, r
    if kprobes_available("/sys/kernel/tracing") or os.path.isdir(
            "/sys/bus/event_source/devices/kprobe"):
        assert r["attached"], r  # a kernel with kprobes: they attach
    else:
        assert r["attached"] == [], r
        assert "cannot attach hs_nf_enter to nf_hook_slow" in cp.stderr
