"""What an operator sees when a command's input is wrong: one line on stderr, no traceback,
a non-zero exit, nothing half-written on stdout. Through the real entry point
(``python -m hopscope``), as a shell runs it."""

from __future__ import annotations

import http.server
import json
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

PCAPS = Path(__file__).resolve().parent.parent / "pcaps"
PUBLIC = PCAPS / "cross-node-public"
FILES = [str(PUBLIC / "node1.pcapng"), str(PUBLIC / "node2.pcapng")]
RID = "8ccc9856a34ef348-DFW"


def hs(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hopscope", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def one_line(cp: subprocess.CompletedProcess[str], *want: str) -> str:
    """The failure's one line on stderr (checked: no traceback, non-zero, says ``want``)."""
    assert cp.returncode != 0, cp
    assert "Traceback" not in cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hopscope: "), cp.stderr
    for w in want:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def not_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dbs")
    (d / "empty.db").write_bytes(b"")
    (d / "garbage.db").write_bytes(bytes(range(256)) * 12)
    con = sqlite3.connect(d / "other.db")
    con.execute("CREATE TABLE x (a)")
    con.commit()
    con.close()
    return {p.stem: p for p in d.iterdir()}


@pytest.mark.parametrize("kind", ["empty", "garbage", "other"])
def test_a_file_that_is_not_the_collectors_store(not_stores: dict[str, Path], kind: str,
                                                 tmp_path: Path) -> None:
    db = str(not_stores[kind])
    want = "file is not a database" if kind == "garbage" else "not a hopscope collector store"
    for args in (["requests"], ["stats", "--json"], ["drops"], ["trace", RID],
                 ["pcap", RID, "-o", str(tmp_path / "x.pcapng")]):
        one_line(hs(*args, "--db", db), db, want)


class _Answers(http.server.BaseHTTPRequestHandler):
    """An HTTP server that is not a hopscope collector (or one of another version)."""

    bodies = {"/requests": b"[]", "/drops": b'{"drops": 3}', "/trace/x": b'{"requests": [{}]}',
              "/stats": b'{"hops": [{"name": "ingress"}]}'}

    def do_GET(self) -> None:
        body = self.bodies.get(self.path.split("?")[0], b"{}")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def not_a_collector() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_an_http_server_that_is_not_the_collector(not_a_collector: str) -> None:
    url = not_a_collector
    one_line(hs("requests", "--collector", url), "holds no 'requests' list")
    one_line(hs("drops", "--collector", url), "holds no 'drops' list")
    one_line(hs("trace", "x", "--collector", url), "cannot read (KeyError")
    one_line(hs("stats", "--collector", url), "cannot read (KeyError")


@pytest.fixture
def not_http() -> Iterator[int]:
    """A port that answers like the agents' port does to an HTTP request: not HTTP."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                c.recv(4096)
                c.sendall(b"\x00\x00\x01\x00HS\r\nnot http\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        srv.close()


def test_the_agents_port_given_as_the_collectors_api(not_http: int) -> None:
    line = one_line(hs("requests", "--collector", f"127.0.0.1:{not_http}"),
                    "not the collector's HTTP API", "--http address")
    assert line.isprintable(), line  # the other protocol's bytes, quoted: none reach the tty
    one_line(hs("requests", "--collector", "ftp://127.0.0.1:1"), "the collector's API is HTTP")


def test_config_not_utf8_and_bad_values_name_the_file_and_key(tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text("x" * 32)
    tok.chmod(0o600)
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b'listen = "\xff\xfe"\n')
    one_line(hs("collector", "serve", "--config", str(bad), "--token-file", str(tok), "--db",
                str(tmp_path / "c.db")), "bin.toml: not valid TOML: not UTF-8")
    dur = tmp_path / "dur.toml"
    dur.write_text('retention = "forever"\n')
    one_line(hs("collector", "serve", "--config", str(dur), "--token-file", str(tok), "--db",
                str(tmp_path / "c.db")), "dur.toml: retention = 'forever': bad duration")
    one_line(hs("collector", "serve", "--max-db-bytes", "-1", "--token-file", str(tok), "--db",
                str(tmp_path / "c.db")), "--max-db-bytes")
    assert not (tmp_path / "c.db").exists()  # refused before anything was made
    one_line(hs("replay", "--entry-port", "0", *FILES), "--entry-port")
    one_line(hs("requests", "--since", "1x", "--db", str(tmp_path / "none.db")), "--since",
             "bad duration")
    one_line(hs("trace", " ", "--db", str(tmp_path / "none.db")), "empty request id")


def test_pcap_output_and_json(tmp_path: Path) -> None:
    one_line(hs("pcap", RID, *FILES, "-o", str(tmp_path / "no" / "x.pcapng")), "no directory")
    one_line(hs("pcap", RID, *FILES, "-o", "-"), "give a file name")
    one_line(hs("pcap", RID, "-o", str(tmp_path / "x.pcapng")), "where are the packets?")
    cp = hs("pcap", RID, *FILES, "-o", str(tmp_path / "x.pcapng"), "--json")
    assert cp.returncode == 0, cp.stderr
    got = json.loads(cp.stdout)
    assert got["request_id"] == RID and got["nodes"] == ["node1", "node2"] and got["stitched"]
    assert got["packets"] > 10 and (tmp_path / "x.pcapng").stat().st_size > 1000


def test_replay_json_prints_nothing_when_a_capture_cannot_be_read(tmp_path: Path) -> None:
    empty = tmp_path / "node3.pcap"
    empty.write_bytes(b"")
    for bad in (str(empty), str(tmp_path / "node4.pcap")):
        cp = hs("replay", "--json", *FILES, bad)
        one_line(cp, bad)
        assert cp.stdout == ""
    nothing = tmp_path / "node5.pcap"  # a capture of no packets: an envelope of none
    nothing.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    cp = hs("replay", "--json", str(nothing))
    assert cp.returncode == 0 and json.loads(cp.stdout)["requests"] == []


def test_a_reader_that_stops_reading_is_no_error() -> None:
    """`hopscope replay --json ... | head`: exit 0, nothing on stderr."""
    p = subprocess.Popen([sys.executable, "-m", "hopscope", "replay", "--json", *FILES],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # before it writes: its first write finds no reader
    err = p.stderr.read()
    assert p.wait(60) == 0 and err == b""


def test_a_group_without_its_command_prints_its_help() -> None:
    cp = hs("agent")
    assert cp.returncode == 2 and cp.stderr == ""
    assert cp.stdout.startswith("Usage: hopscope agent") and "ship" in cp.stdout


def test_corrupt_record_warned_once_at_its_byte_with_shards(tmp_path: Path) -> None:
    src = PCAPS / "formats" / "pcap-us-ether"
    cap = next(p for p in src.iterdir() if p.suffix == ".pcap")
    data = cap.read_bytes()
    bad = tmp_path / "node1.pcap"
    bad.write_bytes(data + b"\x01\x00\x00\x00" * 2 + b"\xff" * 8)  # a record 4 GB long
    # as the CLI runs it (logging to stderr), with this small file split among workers
    code = f"""
import logging
import hopscope.replay as rp
logging.basicConfig(level=logging.WARNING)
rp.PARALLEL_MIN_BYTES = 0
rp.replay([("node1", {str(bad)!r})], jobs=2, progress=False, warn=print)
"""
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, check=True)
    assert cp.stdout.count("corrupt packet record") == 1
    assert f"corrupt packet record at byte {len(data)} " in cp.stdout
    assert "corrupt packet record" not in cp.stderr  # not from the workers too


@pytest.mark.privileged
def test_agent_run_refuses_an_output_it_cannot_write_before_loading(tmp_path: Path) -> None:
    """Checked at the start (it had run for --duration, then lost the envelope to a
    traceback at the stop)."""
    for opt in ("--out", "--record"):
        cp = hs("agent", "run", "--local", opt, str(tmp_path / "no" / "x"), "--duration", "1s")
        one_line(cp, opt, "cannot write in", str(tmp_path / "no"))
    assert list(tmp_path.iterdir()) == []  # and nothing made on the way


def test_options_of_doctor_and_the_testbed_checked_first(tmp_path: Path) -> None:
    for bad in ("", "../../etc"):
        one_line(hs("doctor", "--netns", bad), "--netns", "no path")
    one_line(hs("testbed", "agents", "--prefix", "zz", "--out", str(tmp_path / "a"),
                "--count", "-5"), "--count")
    one_line(hs("testbed", "capture", "--prefix", "zz", "--out", str(tmp_path / "c"),
                "--duration", "nan"), "--duration nan")
    one_line(hs("testbed", "traffic", "--prefix", "zz", "--count", "5", "--duration", "1"),
             "--count or --duration, not both")
    for ms in ("-5", "nan"):
        one_line(hs("testbed", "up", "--prefix", "zz", "--service-ms", ms), "--service-ms")
    one_line(hs("agent", "run", "--local", "--slower-than", "fast"), "--slower-than",
             "bad duration 'fast'")
    assert list(tmp_path.iterdir()) == []


def test_collector_serve_refusals_before_serving(tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text("x" * 32)
    tok.chmod(0o600)
    base = ["collector", "serve", "--token-file", str(tok), "--db", str(tmp_path / "c.db")]
    # mutual TLS asked for without TLS: it would have listened in plain TCP
    cp = hs(*base, "--listen", "127.0.0.1:0", "--tls-client-ca", str(tok))
    one_line(cp, "--tls-client-ca needs --tls-cert and --tls-key")
    assert cp.returncode == 2
    # ports taken, a name that does not resolve: one line each, nothing left running
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        one_line(hs(*base, "--listen", f"127.0.0.1:{port}"),
                 f"--listen 127.0.0.1:{port}: cannot listen: address already in use")
        one_line(hs(*base, "--listen", "127.0.0.1:0", "--http", f"127.0.0.1:{port}"),
                 f"--http 127.0.0.1:{port}: cannot listen")
    one_line(hs(*base, "--listen", "256.1.1.1:7000"), "--listen 256.1.1.1:7000: cannot listen")


def test_agent_ship_names_the_wire_would_refuse(tmp_path: Path) -> None:
    """Checked on the command line: the collector's refusal of the hello would be retried
    until --wait ran out (300 s)."""
    tok = tmp_path / "token"
    tok.write_text("x" * 32)
    tok.chmod(0o600)
    base = ["agent", "ship", "--from-pcap", FILES[0], "--collector", "127.0.0.1:9",
            "--token-file", str(tok)]
    for extra, want in ((["--node", ""], "--node '': must be 1 to 255 printable"),
                        (["--node", "n\tx"], "--node 'n\\tx': must be"),
                        (["--node", "a" * 250], "--node (in the agent id)"),
                        (["--node", "n", "--agent-id", "x" * 256], "--agent-id")):
        cp = hs(*base, *extra)
        one_line(cp, want)
        assert cp.returncode == 2


def _store(path: Path) -> Path:
    """A collector store with three requests, 1, 2 and 3 ms long, 1 s apart."""
    from hopscope.collector.store import SqliteStore

    st = SqliteStore(path)
    try:
        st.put_requests([{"request_id": f"r{i}", "start_ns": 1_764_000_000_000_000_000 + i * 10**9,
                          "total_ns": i * 1_000_000, "status": 200, "path": "/",
                          "ingress_node": "node1", "pod_node": "node1", "hops": [], "flags": []}
                         for i in (1, 2, 3)])
    finally:
        st.close()
    return path


@pytest.fixture
def api(tmp_path: Path) -> Iterator[str]:
    """The collector's HTTP API answers (``api_get``) on a store, over HTTP."""
    from hopscope.collector.server import api_get
    from hopscope.collector.store import SqliteStore

    from hopscope.errors import HopscopeError

    db = _store(tmp_path / "api.db")

    class Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            st = SqliteStore(db, readonly=True)
            try:
                status, body = api_get(st, self.path)
            except HopscopeError as exc:  # as the collector's handler answers
                status, body = 400, {"error": str(exc)}
            finally:
                st.close()
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_query_exit_codes_the_same_from_the_store_and_the_api(tmp_path: Path, api: str,
                                                              not_http: int) -> None:
    """Bad usage exits 2, a request not found 1, whichever way the query reads."""
    db = str(_store(tmp_path / "c.db"))
    for where in (["--db", db], ["--collector", api]):
        cp = hs("requests", "--status", "9zz", *where)
        one_line(cp, "bad status '9zz'")
        assert cp.returncode == 2, (where, cp.stderr)
        cp = hs("trace", "nope", *where)
        one_line(cp, "nope")
        assert cp.returncode == 1, (where, cp.stderr)
        cp = hs("requests", "--json", "--since", "1h", "--anchor", "newest", *where)
        assert cp.returncode == 0 and len(json.loads(cp.stdout)["requests"]) == 3, cp.stderr
    cp = hs("requests", "--collector", f"127.0.0.1:{not_http}")
    one_line(cp, "not the collector's HTTP API")
    assert cp.returncode == 2  # the wrong address, as a --db that is not a store
    cp = hs("pcap", "nope", "--db", db, "-o", str(tmp_path / "x.pcapng"))
    one_line(cp, "no packets of request nope")
    assert cp.returncode == 1 and not (tmp_path / "x.pcapng").exists()


def test_query_durations_bare_seconds_and_an_absolute_since(tmp_path: Path, api: str) -> None:
    """On the command line a bare number is seconds (`--slower-than 0.0015` is 1.5 ms), and
    `--since` of more than 12 digits is a wall-clock time in ns, as the API's `since`."""
    db = str(_store(tmp_path / "c.db"))
    for where in (["--db", db], ["--collector", api]):
        def ids(*args: str, where: list[str] = where) -> list[str]:
            cp = hs("requests", "--json", *args, *where)
            assert cp.returncode == 0, cp.stderr
            return sorted(r["request_id"] for r in json.loads(cp.stdout)["requests"])

        assert ids("--since", "1h", "--anchor", "newest", "--slower-than", "0.0015") == ["r2", "r3"]
        assert ids("--since", "1h", "--anchor", "newest", "--slower-than", "2ms") == ["r3"]
        assert ids("--since", str(1_764_000_000_000_000_000 + 2 * 10**9)) == ["r2", "r3"]
        assert ids("--since", "1.5", "--anchor", "newest") == ["r2", "r3"]
    cp = hs("requests", "--db", db, "--slower-than", "99999999999")
    one_line(cp, "longer than 292 years", "a number without a unit is in s")
    assert cp.returncode == 2
