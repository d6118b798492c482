"""`hopscope pcap ID`: one request's packets from every node, as one pcapng."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from hopscope.collector.store import SqliteStore

from hopscope.capture import read_all
from hopscope.cli import main
from hopscope.replay import replay

PCAPS = Path(__file__).resolve().parent.parent / "pcaps" / "cross-node-public"
RID = "8ccc9856a34ef348-DFW"
OTHER = "57a3d692ca616780-DFW"
FILES = [str(PCAPS / "node1.pcapng"), str(PCAPS / "node2.pcapng")]


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def test_from_captures_every_node_and_only_this_request(tmp_path: Path) -> None:
    out = tmp_path / "req.pcapng"
    code, text = run("pcap", RID, *FILES, "-o", str(out))
    assert code == 0, text
    pkts, st = read_all(out, "x")
    assert st.warnings == []
    assert {o.ifname.split("/")[0] for o in pkts} == {"node1", "node2"}
    # the request at the NIC and upstream (overlay, underlay, pod), never the other request
    starts = [o for o in pkts if o.payload.startswith(b"POST") or o.payload.startswith(b"GET")]
    assert starts and all(RID.encode() in o.payload for o in starts)
    assert not any(OTHER.encode() in o.payload for o in pkts)
    names = {o.ifname for o in pkts}
    assert {"node1/eth0", "node1/flannel.1", "node2/flannel.1", "node2/cni0"} <= names
    assert any(o.vni >= 0 for o in pkts)  # the VXLAN copies, with their outer headers
    assert f"written to {out}" in text


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_shows_hop_comments_and_decodes_vxlan(tmp_path: Path) -> None:
    out = tmp_path / "req.pcapng"
    assert run("pcap", RID, *FILES, "-o", str(out))[0] == 0
    r = subprocess.run(["tshark", "-r", str(out), "-T", "fields",
                        "-e", "frame.interface_name", "-e", "frame.comment", "-e", "vxlan.vni",
                        "-e", "_ws.expert.severity"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    comments = [row[1] for row in rows]
    assert all(c.endswith(RID) for c in comments)
    assert any(c.startswith("nic: in, · | ingress") for c in comments)
    assert any(c.startswith("overlay: out, ingress | encap") for c in comments)
    assert any(c.startswith("pod: in, app | route") for c in comments)
    assert any(row[0] == "node2/eth0" and row[2] == "1" for row in rows)  # VNI decoded
    sev = [int(v) for row in rows for v in row[3].split(",") if v]
    assert max(sev) < 0x600000  # nothing at warning level


def test_from_the_collectors_store(tmp_path: Path) -> None:
    db = tmp_path / "hs.db"
    store = SqliteStore(db)
    for seq, (node, f) in enumerate((("node1", FILES[0]), ("node2", FILES[1])), start=1):
        obs, _st = read_all(f, node)
        store.put_batch(f"agent-{node}", seq, node, obs)
    env = replay([("node1", Path(FILES[0])), ("node2", Path(FILES[1]))], progress=False).envelope
    store.put_requests(list(env["requests"]))
    store.close()
    out, ref = tmp_path / "db.pcapng", tmp_path / "captures.pcapng"
    code, text = run("pcap", RID, "--db", str(db), "-o", str(out))
    assert code == 0, text
    assert run("pcap", RID, *FILES, "-o", str(ref))[0] == 0
    got, _st = read_all(out, "x")
    want, _st = read_all(ref, "x")
    # the same packets, whichever the source
    assert len(got) > 20
    assert [(o.ts_real_ns, o.ifname, o.seq, o.flags) for o in got] == [
        (o.ts_real_ns, o.ifname, o.seq, o.flags) for o in want]


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    code, text = run("pcap", "nope-DFW", *FILES, "-o", str(tmp_path / "x.pcapng"))
    assert code != 0 and "no packets of request nope-DFW" in text
    code, text = run("pcap", RID, "-o", str(tmp_path / "x.pcapng"))
    assert code != 0 and "give the captures" in text
    code, text = run("pcap", RID, "--db", str(tmp_path / "none.db"), "-o", "x")
    assert code != 0 and "no such file" in text
    assert "Traceback" not in text
