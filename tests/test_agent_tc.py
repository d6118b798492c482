"""The tc classifiers on crafted frames, run inside the kernel (BPF_PROG_TEST_RUN): every
frame passes unchanged (TC_ACT_OK), and what each one sends to the ring buffer is what the
stitcher needs: a message's start with its first bytes (at most HS_PAYLOAD_MAX - 1, up to
a blank line among them: the head, not the body after it) and the whole TCP payload
length, nothing for a pure ACK or a segment of a body."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hopscope.agent import events as ev

pytestmark = pytest.mark.privileged

#: a child's start: the agent's programs loaded, the test run's device (lo) a nic
NIC_PROLOGUE = r"""
import json, sys
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from hopscope.agent import bpfprog, bpfsys, events as ev
from hopscope.agent.ringbuf import RingReader
bpfprog.prepare_kernel_env()
prog = bpfprog.AgentProgram(bpfprog.Settings(ringbuf_pages=64))
tc_in, tc_out = prog._tc_fds()
roles = prog._maps["ifroles"]
lo = 1  # the test run's skb device
roles.set(lo, bpfprog.ROLE_CODES["nic"])
ring = RingReader(prog.ring_fd(), prog.ring_size)
"""


CHILD = NIC_PROLOGUE + r"""
head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 490\r\n"
        b"X-Served-By: api-3@node3\r\n\r\n")
cases = {
    "response": ("out", "PA", head + b"[" + b"1," * 244 + b"1]"),
    "request": ("in", "PA", b"POST /api/tasks/ HTTP/1.1\r\nHost: api.example.com\r\n"
                b"Content-Length: 30\r\n\r\n" + b"{" * 30),
    "open_head": ("out", "PA", head[:-4] + b"\r\nX-Trace: " + b"t" * 300),
    "long": ("in", "PA", b"GET /" + b"p" * 1800 + b" HTTP/1.1\r\n"),
    "longer": ("in", "PA", b"GET /" + b"p" * 3000 + b" HTTP/1.1\r\n"),
    "pure_ack": ("in", "A", b""),
    "body": ("in", "PA", b"{" * 1400),
    # the node's other connections at the NIC (the agent's own to its collector: its
    # batches hold request heads), both ways, and their handshakes: nothing
    "other_port_in": ("in", "PA", b"GET /api/tasks/ HTTP/1.1\r\nHost: x\r\n\r\n", 7000),
    "other_port_out": ("out", "PA", b"POST /api/tasks/ HTTP/1.1\r\nHost: x\r\n\r\n", 7000),
    "other_port_syn": ("out", "S", b"", 7000),
    "entry_port_syn": ("out", "S", b""),
}
out = {}
for name, (d, flags, payload, *port) in cases.items():
    frame = bytes(Ether() / IP(src="162.158.1.2", dst="178.104.247.152")
                  / TCP(sport=40000 + len(out), dport=port[0] if port else 80, flags=flags,
                        seq=1000, ack=5)
                  / payload)
    rv, _ns = bpfsys.prog_test_run(tc_in if d == "in" else tc_out, frame)
    got = []
    def keep(buf, recs):
        for at, n in recs:
            f = ev.EVENT.unpack_from(buf, at)
            e = dict(zip((k for k, _ in ev.FIELDS), f))
            got.append({"plen": e["plen"], "caplen": e["caplen"], "why": e["why"],
                        "payload": bytes(buf[at + ev.HDR_SIZE:at + n]).hex()})
    ring.drain(keep)
    out[name] = {"verdict": rv, "events": got, "sent": payload.hex()}
roles.set(lo, 0)
prog.close()
print("RESULT " + json.dumps({"cases": out, "head": head.hex()}))
"""


def _run_child(code: str, arg: str = "") -> Any:
    """Run ``code`` in a fresh interpreter (the programs loaded there are gone with it),
    ``arg`` on its stdin; what it printed after ``RESULT``, as JSON."""
    cp = subprocess.run([sys.executable, "-c", code], input=arg, capture_output=True,
                        text=True, timeout=300)
    line = next((ln for ln in cp.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, cp.stderr[-2000:]
    return json.loads(line[7:])


def test_classifiers_pass_frames_and_send_heads() -> None:
    r = _run_child(CHILD)
    cases, head = r["cases"], bytes.fromhex(r["head"])
    assert all(c["verdict"] == 0 for c in cases.values())  # TC_ACT_OK, every frame
    assert cases["pure_ack"]["events"] == []

    def one(name: str) -> tuple[bytes, bytes, dict[str, int]]:
        evs = cases[name]["events"]
        assert len(evs) == 1, (name, evs)
        return bytes.fromhex(evs[0]["payload"]), bytes.fromhex(cases[name]["sent"]), evs[0]

    # a response: its head, not the body that shares the segment; the whole length
    got, sent, e = one("response")
    assert got == head and len(sent) > len(head) and e["plen"] == len(sent)
    got, sent, e = one("request")
    assert got == sent[:sent.index(b"\r\n\r\n") + 4] and e["plen"] == len(sent)
    got, sent, _e = one("open_head")
    assert got == sent
    # a start whose head runs on past the first look (1,023 bytes): all of it; past what an
    # event holds: its first HS_PAYLOAD_MAX - 1 bytes, its whole length
    got, sent, e = one("long")
    assert got == sent and e["plen"] == len(sent) == 1816
    got, sent, e = one("longer")
    assert got == sent[:ev.PAYLOAD_MAX - 1] and e["plen"] == len(sent) == 3016
    # a body segment of a flow no start was seen on: nothing
    assert cases["body"]["events"] == []
    # at the NIC, nothing of another port's connections; the entry port's SYN is sent
    for name in ("other_port_in", "other_port_out", "other_port_syn"):
        assert cases[name]["events"] == [], name
    assert len(cases["entry_port_syn"]["events"]) == 1


CUT_CHILD = NIC_PROLOGUE + r"""
out = []
for i, p in enumerate(json.loads(sys.stdin.read())):
    frame = bytes(Ether() / IP(src="162.158.1.2", dst="178.104.247.152")
                  / TCP(sport=42000 + i % 20000, dport=80, flags="PA", seq=1, ack=1)
                  / bytes.fromhex(p))
    rv, _ns = bpfsys.prog_test_run(tc_in, frame)
    got = []
    ring.drain(lambda buf, recs: got.extend(bytes(buf[at + ev.HDR_SIZE:at + n]).hex()
                                            for at, n in recs))
    out.append([rv, got])
prog.close()
print("RESULT " + json.dumps(out))
"""


def _cut_reference(payload: bytes) -> bytes:
    """What a start segment should carry: the cut of its first 1,023 bytes (the first
    look), or when no blank line is among them and the payload is longer, the cut of its
    first HS_PAYLOAD_MAX - 1 bytes."""
    got, done = _cut(payload, FIRST_LOOK)
    if done or len(payload) < FIRST_LOOK:
        return got
    return _cut(payload, ev.PAYLOAD_MAX)[0]


FIRST_LOOK = 1024  # == HS_PAYLOAD_FIRST (bpf/tc.c)


def _cut(payload: bytes, size: int) -> tuple[bytes, bool]:
    """``hs_head_len`` on the first ``size - 1`` bytes, and whether a blank line is among
    them: all of them when they end in ``\\r\\n\\r\\n`` or hold none; else up to and
    including the one that the two-ended scan meets first: 16-byte blocks taken
    alternately from the front (the first pattern starting in the block) and from the back
    (the last)."""
    cap = payload[:size - 1]
    n = len(cap)
    starts = [p for p in range(n - 3) if cap[p:p + 4] == b"\r\n\r\n"]
    if not starts or n < 8 or cap.endswith(b"\r\n\r\n"):
        return (cap if not starts else cap[:starts[-1] + 4]), bool(starts)
    front, back = 0, (n - 1) // 16
    while front <= back:  # every block is looked at, from one end or the other
        found = [p for p in starts if p // 16 == front]
        if found:
            return cap[:found[0] + 4], True
        found = [p for p in starts if p // 16 == back]
        if found:
            return cap[:found[-1] + 4], True
        front, back = front + 1, back - 1
    raise AssertionError("a blank line no block holds")


def test_start_segments_carry_the_head_up_to_a_blank_line() -> None:
    """The in-kernel cut (``hs_head_len`` in bpf/tc.c, a scan from both ends 16 bytes at a
    time; a second, longer look when the first 1,023 bytes hold no blank line) against a
    Python reference, on starts made to hit its edges: the pattern at every offset of a
    16-byte block and across blocks, at the very end, past the first look's 1,023 bytes or
    cut in two by them, absent, several in a body (met from the front or from the back), the
    end of a chunked body, "\\r?\\r" that is no blank line; tiny and long payloads;
    and a start shorter than the one before it, whose stale bytes in the per-CPU scratch
    event would complete a pattern across the end of the payload if they were looked at."""
    import random

    rnd = random.Random(7)
    alphabet = [b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"a", b"bc", b"x" * 13, b"\r\r\n"]
    payloads = [
        b"GET / HTTP/1.1\r\n\r\n",  # bodiless: the pattern at the end
        b"GET /\r\n\r\n",  # 11 bytes: one 16-byte block
        b"GET /a\r\n\r",  # a pattern the payload's end cuts short
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /u HTTP/1.1\r\n\r\n--b\r\n\r\ndata\r\n\r\nmore",  # several: the last
        b"GET /" + b"p" * 1100 + b" HTTP/1.1\r\n\r\n",  # the pattern past the first look
        b"GET /" + b"p" * 1013 + b"\r\n\r\n" + b"q" * 40,  # cut at 1022, the body past it
        b"GET /" + b"p" * 1014 + b"\r\n\r\n",  # 1023 bytes: the pattern in the look's last 4
        b"GET /" + b"p" * 1016 + b"\r\n\r\n",  # the first look (1023) cuts the pattern in two
        b"GET /" + b"p" * 1016 + b"\r\n\r\n" + b"q" * 900,  # ... with a body after it
        b"GET /" + b"p" * 2000 + b"\r\n\r\n" + b"q" * 1500,  # a 2 KB head, then a body
        b"POST /" + b"h" * 3000 + b"\r\n\r\n" + b"{}\r\n\r\n" * 50,  # 3 KB, blank lines after
        b"GET /" + b"a" * 3590,  # 3.6 KB without one: what an event holds
        b"GET /" + b"a" * 95 + b"\r\n\r\n" + b"b" * 100,  # then ...
        b"GET /" + b"a" * 95 + b"\r\n",  # ... this: its scratch bytes 102.. hold "\r\n"
        # a short head, a long body with blank lines: the front's pattern, the first
        b"HTTP/1.1 200 OK\r\n\r\n" + b"[" * 500 + b"\r\n\r\n" + b"]" * 300,
        # a long head, a short body with one: the back's, the last
        b"POST /" + b"h" * 600 + b"\r\n\r\n" + b"{}\r\n\r\n{}",
        b"GET /\r\rx\rx\r\r\n\rA\r\n\r\n" + b"b" * 200,  # "\r?\r" before the blank line
    ]
    for pad in range(40):  # the pattern at every offset of two blocks, then a body
        payloads.append(b"GET " + b"h" * pad + b"\r\n\r\n" + b"{" * rnd.randrange(0, 60))
    for _ in range(150):
        body = b"".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 160)))
        payloads.append(b"HTTP/1.1 200 OK\r\n" + body[:rnd.randrange(0, 1500)])
    for _ in range(60):  # sparse patterns anywhere in up to 1,100 bytes
        buf = bytearray(b"x" * rnd.randrange(8, 1100))
        for _ in range(rnd.randrange(0, 4)):
            at = rnd.randrange(0, len(buf))
            buf[at:at + 4] = rnd.choice([b"\r\n\r\n", b"\r\n", b"\rx\r", b"\r\r\n"])
        payloads.append(b"GET " + bytes(buf))
    for _ in range(30):  # and in up to 3,600 bytes, past the first look and the cap
        buf = bytearray(b"y" * rnd.randrange(1000, 3600))
        for _ in range(rnd.randrange(0, 3)):
            at = rnd.randrange(0, len(buf))
            buf[at:at + 4] = rnd.choice([b"\r\n\r\n", b"\r\n", b"\r\r\n"])
        payloads.append(b"GET " + bytes(buf))
    got = _run_child(CUT_CHILD, json.dumps([p.hex() for p in payloads]))
    assert len(got) == len(payloads)
    for p, (rv, evs) in zip(payloads, got, strict=True):
        assert rv == 0 and len(evs) == 1, (p, evs)
        assert bytes.fromhex(evs[0]) == _cut_reference(p), p


#: the mechanism with a count of 2 (the default, 8, in bpfprog.Settings)
FOLLOW_CHILD = NIC_PROLOGUE.replace("Settings(ringbuf_pages=64)",
                                    "Settings(ringbuf_pages=64, follow=2)") + r"""
segs = {
    "open": ("PA", b"GET /a HTTP/1.1\r\nHost: api.example.com\r\nX-Long: " + b"x" * 200),
    "closed": ("PA", b"GET /b HTTP/1.1\r\nHost: api.example.com\r\n\r\n"),
    "more": ("PA", b"y" * 300),
    "ends": ("PA", b"z" * 50 + b"\r\n\r\n" + b"{" * 80),  # the rest of a head, a body
    "crlf": ("PA", b"\r\n\r\n"),  # a head's last four bytes alone
    "response": ("PA", b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n" + b"[" * 200),
    "fin": ("FA", b""),
}
follow, follow_open = prog.bpf["follow"], prog.bpf["follow_open"]
out = []
for step in json.loads(sys.stdin.read()):
    flow, what = step.split(":")
    flags, payload = segs[what]
    frame = bytes(Ether() / IP(src="162.158.1.2", dst="178.104.247.152")
                  / TCP(sport=41000 + int(flow), dport=80, flags=flags, seq=1, ack=1)
                  / payload)
    rv, _ns = bpfsys.prog_test_run(tc_in, frame)
    got = []
    ring.drain(lambda buf, recs: got.extend(
        ev.EVENT.unpack_from(buf, at)[[k for k, _ in ev.FIELDS].index("why")]
        for at, _n in recs))
    out.append([rv, got, len(list(follow.keys())), follow_open[0].value])
prog.close()
print("RESULT " + json.dumps(out))
"""


def test_segments_after_an_open_head_follow_it() -> None:
    """A start whose head does not end in its segment (no blank line in it) sends the next
    HS_FOLLOW (here 2) segments of its half-connection too, or fewer: up to one that ends the
    head; a later start sets the count again (in place, the entry already there), a start
    whose head ends in it stops it, and so does a FIN; other flows are not affected. A
    start with its whole head and part of a body opens nothing (the body is not sent). The
    count of open entries (``follow_open``, which lets body segments pass without a lookup
    while it is 0) is the map's, after every segment."""
    steps = ["1:open", "1:more", "2:more", "1:open", "1:more", "1:more", "1:more",
             "1:open", "1:closed", "1:more", "2:closed", "2:more",
             "2:response", "2:more", "1:open", "2:open", "1:ends", "1:more", "2:crlf",
             "2:more", "1:open", "1:fin", "1:more"]
    got = _run_child(FOLLOW_CHILD, json.dumps(steps))
    assert all(rv == 0 for rv, *_ in got)  # TC_ACT_OK, every frame
    start, follow, control = ev.WHY_START, ev.WHY_FOLLOW, ev.WHY_CONTROL
    assert [(whys, entries) for _, whys, entries, _n in got] == [
        ([start], 1), ([follow], 1),  # flow 1: an open head, then a segment that continues it
        ([], 1),  # flow 2: a body segment, no start seen
        ([start], 1), ([follow], 1), ([follow], 0), ([], 0),  # set again: two more, none
        ([start], 1), ([start], 0), ([], 0),  # an open head, closed by the next start
        ([start], 0), ([], 0),  # flow 2: a closed head: nothing follows
        ([start], 0), ([], 0),  # a response, its head whole, a body after it: nothing
        ([start], 1), ([start], 2),  # open heads on both flows
        ([follow], 1), ([], 1),  # flow 1: the segment that ends the head, and no more
        ([follow], 0), ([], 0),  # flow 2: ended by a segment of four bytes
        ([start], 1), ([control], 0), ([], 0),  # an open head, then the connection's FIN
    ]
    assert all(entries == n for _, _, entries, n in got)  # the count is the map's


CALLS_CHILD = r"""
import json, sys
from hopscope.agent import bpfprog
bpfprog.prepare_kernel_env()
out = {}
for calls in json.loads(sys.stdin.read()):
    prog = bpfprog.AgentProgram(bpfprog.Settings(ringbuf_pages=64, proxy_calls=tuple(calls)))
    out[",".join(calls)] = sorted(tp.decode() for tp in prog.bpf.tracepoint_fds
                                  if tp.startswith(b"syscalls:"))
    prog.close()
print("RESULT " + json.dumps(out))
"""


def test_only_the_proxy_calls_asked_for_are_traced() -> None:
    """``--proxy-calls`` compiles in the syscall tracepoints of those calls only (each one
    runs for every such call of the machine): Traefik's by default, others when asked."""
    from hopscope.agent import bpfprog

    cases = [list(bpfprog.PROXY_CALLS_DEFAULT), ["write", "sendto"], list(bpfprog.PROXY_CALLS)]
    got = _run_child(CALLS_CHILD, json.dumps(cases))
    for calls in cases:
        want = sorted(f"syscalls:sys_{edge}_{c}" for c in calls for edge in ("enter", "exit"))
        assert got[",".join(calls)] == want
    assert bpfprog.PROXY_CALLS_DEFAULT == ("write", "writev", "connect")
    with pytest.raises(bpfprog.AgentError, match="sendfile: not traceable"):
        bpfprog.cflags(bpfprog.Settings(proxy_calls=("write", "sendfile")), {})
    # the command line's default is the programs', and a bad list is one line
    from hopscope.collector.cli import run_cmd

    opt = next(p for p in run_cmd.params if p.name == "proxy_calls")
    assert isinstance(opt.default, str)
    assert tuple(opt.default.split(",")) == bpfprog.PROXY_CALLS_DEFAULT
    bad = subprocess.run([sys.executable, "-m", "hopscope", "agent", "run", "--local",
                          "--proxy-calls", "write,sendfile"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and bad.stdout == ""
    assert bad.stderr.splitlines() == ["hopscope: --proxy-calls 'write,sendfile': expected a "
                                       "comma-separated list of write, writev, sendto, "
                                       "sendmsg, connect"]
