"""The systemd units, their TOML configuration, and the agent under the unit's privileges.

* ``systemd-analyze verify`` on both units (and the headers drop-in the
  installer writes), in a private mount namespace where ``/opt/hopscope/venv``
  exists (the units name it; the host's /opt is not touched).
* The units say what issue 6 asks (and the agent unit justifies each
  capability); the example configurations document every option with its
  default; ``--config`` maps keys to options, lets flags win, refuses unknown
  keys in one line and reads ``$CREDENTIALS_DIRECTORY``.
* In the replica: the agent run with exactly the unit's capability set
  (``setpriv``: bounding, inheritable and ambient sets, no-new-privs) in a
  sandbox like the unit's (tracefs as systemd mounts it, the headers drop-in
  applied, everything read-only but the state directory, private /tmp, no
  /home and /root) attaches, sees the proxy, stitches sub-hops and detaches on
  SIGTERM; after a SIGKILL the unit's ExecStopPost (`hopscope agent cleanup`,
  same privileges) removes the filters it left; and without each capability,
  what breaks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from hopscope.cli import main
from hopscope.config import config_option, load_config, option_keys
from hopscope.errors import PrivilegeError, UsageError
from hopscope.install import HEADERS_DROPIN, Installer, Options, data_dir, render_config
from hopscope.testbed.agents import remove_stale_in
from hopscope.testbed.topology import Instance

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
AGENT_UNIT = UNITS / "hopscope-agent.service"
COLLECTOR_UNIT = UNITS / "hopscope-collector.service"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """key -> values (in order) of a unit file's [Service]/[Unit] lines (comments skipped)."""
    out: dict[str, list[str]] = {}
    for ln in path.read_text().splitlines():
        ln = ln.strip()
        if not ln or ln.startswith(("#", ";", "[")):
            continue
        k, _, v = ln.partition("=")
        out.setdefault(k.strip(), []).append(v.strip())
    return out


def one(settings: dict[str, list[str]], key: str) -> str:
    vals = settings.get(key)
    assert vals, f"{key}= missing"
    return vals[-1]


def unit_caps(path: Path = AGENT_UNIT) -> list[str]:
    """CapabilityBoundingSet= as setpriv names (``bpf``, ``net_admin``)."""
    caps = one(unit_settings(path), "CapabilityBoundingSet").split()
    return [c.lower().removeprefix("cap_") for c in caps]


def command(settings: dict[str, list[str]], key: str, python: str, config: str | None = None
            ) -> list[str]:
    """The unit's ExecStart=/ExecStopPost= with the venv's python (and config) replaced."""
    argv = shlex.split(one(settings, key))
    argv = [python if a == "/opt/hopscope/venv/bin/python" else a for a in argv]
    if config is not None:
        argv = [config if a.startswith("/etc/hopscope/") and a.endswith(".toml") else a
                for a in argv]
    return argv


# -- the units -------------------------------------------------------------------------------

#: exit statuses a restart would not cure: a usage or config error, missing privileges
NO_RETRY = [str(UsageError.exit_code), str(PrivilegeError.exit_code)]


def test_agent_unit_has_what_issue_6_asks() -> None:
    s = unit_settings(AGENT_UNIT)
    caps = one(s, "CapabilityBoundingSet").split()
    assert set(caps) == {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_NET_RAW",
                         "CAP_SYS_PTRACE"}
    assert one(s, "AmbientCapabilities").split() == caps
    assert "CAP_SYS_ADMIN" not in caps
    text = AGENT_UNIT.read_text()
    for cap in [*caps, "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"]:
        # every capability, granted or not, is justified in a comment
        assert re.search(rf"^#\s+{cap}\s+\S", text, re.M), cap
    assert one(s, "NoNewPrivileges") == "yes"
    assert one(s, "ProtectSystem") == "strict"
    assert one(s, "StateDirectory") == "hopscope-agent"
    assert "ReadWritePaths" not in s  # the state directory is the only writable path
    assert one(s, "ProtectHome") == "yes" and one(s, "PrivateTmp") == "yes"
    assert one(s, "Restart") == "on-failure"
    assert one(s, "RestartPreventExitStatus").split() == NO_RETRY
    assert one(s, "KillSignal") == "SIGTERM" and one(s, "TimeoutStopSec")
    assert shlex.split(one(s, "ExecStopPost"))[-2:] == ["agent", "cleanup"]
    assert "sys-kernel-tracing.mount" in one(s, "After")
    start = shlex.split(one(s, "ExecStart"))
    assert start[:3] == ["/opt/hopscope/venv/bin/python", "-m", "hopscope"]
    assert start[-4:] == ["agent", "run", "--config", "/etc/hopscope/agent.toml"]


def test_collector_unit_is_unprivileged() -> None:
    s = unit_settings(COLLECTOR_UNIT)
    assert one(s, "DynamicUser") == "yes"
    assert one(s, "StateDirectory") == "hopscope-collector"
    assert s["CapabilityBoundingSet"] == [""] and s["AmbientCapabilities"] == [""]
    assert one(s, "LoadCredential") == "token:/etc/hopscope/collector.token"
    assert one(s, "NoNewPrivileges") == "yes" and one(s, "ProtectSystem") == "strict"
    assert one(s, "Restart") == "on-failure"
    assert one(s, "RestartPreventExitStatus").split() == NO_RETRY
    start = shlex.split(one(s, "ExecStart"))
    assert start[-3:] == ["serve", "--config", "/etc/hopscope/collector.toml"]
    assert "User" not in s


@contextlib.contextmanager
def opt_venv(venv: Path | None = None) -> Iterator[list[str]]:
    """A shell prefix for commands that must see /opt/hopscope/venv (a private mount
    namespace: tmpfs over /opt, then the venv, or a stand-in python)."""
    if venv is None:
        setup = ("mkdir -p /opt/hopscope/venv/bin && "
                 "ln -s /usr/bin/python3 /opt/hopscope/venv/bin/python")
    else:
        setup = f"mkdir -p /opt/hopscope/venv && mount --bind {shlex.quote(str(venv))} " \
                "/opt/hopscope/venv"
    yield ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f"mount -t tmpfs -o mode=755 hopscope-test /opt && {setup} && exec \"$@\"", "sh"]


def analyze_verify(files: list[Path], venv: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert shutil.which("systemd-analyze"), "systemd-analyze is part of systemd (Debian 12)"
    with opt_venv(venv) as prefix:
        return subprocess.run([*prefix, "systemd-analyze", "verify", *map(str, files)],
                              capture_output=True, text=True, timeout=120)


@pytest.mark.privileged
def test_systemd_analyze_verify_passes_on_both_units(tmp_path: Path) -> None:
    # the units as in the repository, and with the headers drop-in the installer writes
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    for u in (AGENT_UNIT, COLLECTOR_UNIT):
        shutil.copy(u, units / u.name)
    cp = analyze_verify([units / AGENT_UNIT.name, units / COLLECTOR_UNIT.name])
    assert cp.returncode == 0 and not cp.stdout.strip() and not cp.stderr.strip(), cp
    inst = Installer(Options(role="agent", root=tmp_path))
    inst.headers()
    dropin = units / f"{AGENT_UNIT.name}.d" / HEADERS_DROPIN
    if not dropin.exists():  # headers match this kernel: one as on a kernel without
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text("[Service]\nTemporaryFileSystem=/lib/modules:ro\n"
                          "BindReadOnlyPaths=/usr/src:/lib/modules/%v/build\n")
    cp = analyze_verify([units / AGENT_UNIT.name])
    assert cp.returncode == 0 and not cp.stdout.strip() and not cp.stderr.strip(), cp
    # a wrong key in the drop-in would be reported: it is read
    with dropin.open("a") as f:
        f.write("NoSuchSetting=1\n")
    cp = analyze_verify([units / AGENT_UNIT.name])
    assert "NoSuchSetting" in cp.stdout + cp.stderr


# -- the configuration ---------------------------------------------------------------------


def _command(path: list[str]) -> click.Command:
    cmd: Any = main
    for p in path:
        cmd = cmd.get_command(click.Context(cmd), p)
    assert isinstance(cmd, click.Command)
    return cmd


ROLES_CMDS = {"agent": ["agent", "run"], "collector": ["collector", "serve"]}


def _documented(example: str) -> dict[str, Any]:
    """key -> value of the example's commented ``#key = value`` lines."""
    out: dict[str, Any] = {}
    for ln in example.splitlines():
        m = re.match(r"^#([a-z][a-z0-9-]*) = (.*)$", ln)
        if m:
            out[m.group(1)] = tomllib.loads(f"v = {m.group(2)}")["v"]
    return out


def _default(opt: click.Option) -> Any:
    d = opt.default
    if d is None or type(d).__name__ == "Sentinel" or callable(d):
        return False if opt.is_flag else ([] if opt.multiple else None)
    return list(d) if opt.multiple else d


@pytest.mark.parametrize("role", ["agent", "collector"])
def test_example_config_documents_every_option_with_its_default(role: str, tmp_path: Path
                                                                ) -> None:
    cmd = _command(ROLES_CMDS[role])
    example = (UNITS / f"{role}.toml.example").read_text()
    doc = _documented(example)
    keys = option_keys(cmd)
    assert sorted(doc) == sorted(keys), "document every option of " + " ".join(ROLES_CMDS[role])
    for key, opt in keys.items():
        d = _default(opt)
        if d is not None:
            assert doc[key] == d, (key, doc[key], d)
    # the example with every line uncommented is a valid configuration
    p = tmp_path / f"{role}.toml"
    p.write_text(render_config(example, doc))
    dm = load_config(click.Context(cmd), str(p))
    assert set(dm) == {opt.name for opt in keys.values()}
    assert (data_dir() / f"{role}.toml.example").read_text() == example


@click.command()
@config_option
@click.option("--token-file", type=click.Path(dir_okay=False), required=True)
@click.option("--listen", default="127.0.0.1:7000")
@click.option("--entry-port", "entry_ports", multiple=True, type=int, default=(80,))
@click.option("--iface", "ifaces", multiple=True)
@click.option("--local", is_flag=True)
@click.option("--max-db-bytes", type=int, default=1)
def _probe(**kw: Any) -> None:
    click.echo(json.dumps(kw, sort_keys=True))


def _probe_run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    res = CliRunner().invoke(_probe, args, env=env)
    if res.exception and not isinstance(res.exception, SystemExit):
        return 1, f"{type(res.exception).__name__}: {res.exception}"
    return res.exit_code, res.output


def test_config_keys_map_to_options_and_flags_win(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('token-file = "/etc/t"\nlisten = "0.0.0.0:7000"\nentry_port = [80, 8080]\n'
                   'iface = { eth0 = "nic", "flannel.1" = "overlay" }\nlocal = true\n')
    rc, out = _probe_run(["--config", str(cfg)])
    assert rc == 0, out
    got = json.loads(out)
    assert got == {"token_file": "/etc/t", "listen": "0.0.0.0:7000", "entry_ports": [80, 8080],
                   "ifaces": ["eth0=nic", "flannel.1=overlay"], "local": True,
                   "max_db_bytes": 1}
    rc, out = _probe_run(["--config", str(cfg), "--listen", "127.0.0.1:9", "--entry-port", "81"])
    got = json.loads(out)
    assert got["listen"] == "127.0.0.1:9" and got["entry_ports"] == [81]


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    serve = ["collector", "serve"]
    cases = [
        (serve, 'tokenfile = "x"\n', "unknown key 'tokenfile' (did you mean 'token-file'?)"),
        (serve, 'listen = ["a", "b"]\n', "listen: takes one value, not an array"),
        (serve, 'max-db-bytes = "lots"\n', "max-db-bytes = 'lots'"),
        (serve, 'listen = \n', "not valid TOML"),
        (serve, '[listen]\nx = 1\n', "listen: a table is not a value of --listen"),
        (["agent", "run"], 'local = "yes"\n', "local: expected true or false"),
        (["agent", "run"], 'source = "ebpf"\n', "source = 'ebpf'"),
        # click would take true as 1 and cut 70000.9 to 70000
        (["agent", "run"], 'entry-port = true\n', "entry-port: expected an integer, not true"),
        (serve, 'entry-port = [80, true]\n', "entry-port: expected an integer, not true"),
        (["agent", "run"], 'spool-max = 70000.9\n',
         "spool-max: expected an integer, not 70000.9"),
        (serve, 'listen = false\n', "listen: expected a string, not false"),
        (serve, 'token_file = "/x"\ntoken-file = "/y"\n',
         "'token_file' and 'token-file' are the same key"),
    ]
    for i, (cmd, text, want) in enumerate(cases):
        cfg = tmp_path / f"c{i}.toml"
        cfg.write_text(text)
        res = subprocess.run([sys.executable, "-m", "hopscope", *cmd, "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, (text, res.stderr)
        assert lines[0].startswith(f"hopscope: {cfg}: ") and want in lines[0], (want, lines)
    res = subprocess.run([sys.executable, "-m", "hopscope", "agent", "run", "--config",
                          str(tmp_path / "missing.toml")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "missing.toml: No such file" in res.stderr


def test_credentials_directory_in_path_values(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('token-file = "${CREDENTIALS_DIRECTORY}/token"\n')
    rc, out = _probe_run(["--config", str(cfg)], env={"CREDENTIALS_DIRECTORY": "/run/cred/x"})
    assert rc == 0 and json.loads(out)["token_file"] == "/run/cred/x/token"
    # unset: one clear line, unless a flag replaces the value
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    res = subprocess.run([sys.executable, "-m", "hopscope", "collector", "serve", "--config",
                          str(cfg), "--db", str(tmp_path / "db")], capture_output=True,
                         text=True, timeout=60, env=env)
    assert res.returncode == 2
    assert "$CREDENTIALS_DIRECTORY is not set (systemd sets it for a unit with " \
        "LoadCredential=" in res.stderr
    rc, out = _probe_run(["--config", str(cfg), "--token-file", "/etc/t"],
                         env={"CREDENTIALS_DIRECTORY": ""})
    assert rc == 0 and json.loads(out)["token_file"] == "/etc/t"


def test_collector_serve_reads_the_credential(tmp_path: Path) -> None:
    """The installed collector.toml under LoadCredential=: the token from the credential
    directory (mode 0400, as systemd makes it), flags and file combined."""
    cred = tmp_path / "cred"
    cred.mkdir()
    (cred / "token").write_text("0123456789abcdef" * 4 + "\n")
    os.chmod(cred / "token", 0o400)
    example = (UNITS / "collector.toml.example").read_text()
    cfg = tmp_path / "collector.toml"
    cfg.write_text(render_config(example, {"token-file": "${CREDENTIALS_DIRECTORY}/token",
                                           "db": str(tmp_path / "c.db"),
                                           "listen": "127.0.0.1:0"}))
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(cred)}
    proc = subprocess.Popen([sys.executable, "-m", "hopscope", "collector", "serve", "--config",
                             str(cfg)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "event=listen" in line or not line:
                break
        assert "event=listen what=agents" in line and str(tmp_path / "c.db") in line, line
        time.sleep(1.0)  # its SIGTERM handler is installed just after it listens
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0


# -- the agent under the unit's privileges, in the replica --------------------------------


@dataclass
class Sandboxed:
    proc: subprocess.Popen[bytes]
    state: Path
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def dropin_mounts(dropin: Path | None) -> str:
    """Shell commands doing what the headers drop-in asks of systemd."""
    if dropin is None or not dropin.exists():
        return ""
    s = unit_settings(dropin)
    rel = os.uname().release
    cmds = []
    for t in s.get("TemporaryFileSystem", []):
        path = t.split(":")[0]
        cmds.append(f"mount -t tmpfs -o mode=755 hopscope-unit {shlex.quote(path)}")
    for b in s.get("BindReadOnlyPaths", []):
        src, dst = b.split(":")[:2]
        dst = dst.replace("%v", rel)
        cmds.append(f"mkdir -p {shlex.quote(dst)} && mount --bind {shlex.quote(src)} "
                    f"{shlex.quote(dst)}")
    return " && ".join(cmds)


REPO_ROOT = Path(__file__).resolve().parent.parent

SANDBOX = r"""
set -e
# sys-kernel-tracing.mount (ip netns exec mounted a new /sys)
mount -t tracefs tracefs /sys/kernel/tracing
# the headers drop-in (TemporaryFileSystem=, BindReadOnlyPaths=)
%(dropin)s
# the checkout under test (its .venv runs the agent) stands in for /opt/hopscope: when it
# lies where PrivateTmp=/ProtectHome= put a fresh tmpfs (a CI clone in /tmp), keep it
case "$REPO" in
  /tmp/*|/var/tmp/*|/home/*|/root/*) mkdir -p /run/hopscope-repo
                                     mount --bind "$REPO" /run/hopscope-repo ;;
esac
# ProtectSystem=strict with StateDirectory=: read-only but /dev, /proc, /sys and the state
mount --bind "$STATE" "$STATE"
for m in $(awk '{print $2}' /proc/self/mounts | sort -u); do
  case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|"$STATE") continue;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
# PrivateTmp=, ProtectHome=
mount -t tmpfs -o mode=1777 hopscope-tmp /tmp
mount -t tmpfs -o mode=1777 hopscope-tmp /var/tmp
mount -t tmpfs -o ro,mode=755 hopscope-home /home
mount -t tmpfs -o ro,mode=700 hopscope-home /root
if mountpoint -q /run/hopscope-repo; then
  for t in /tmp /var/tmp /home /root; do  # the tmpfs holding $REPO's path, made writable
    case "$REPO" in "$t"/*) mount -o remount,rw "$t"; mkdir -p "$REPO"
                            mount --bind /run/hopscope-repo "$REPO"
                            mount -o remount,ro,bind "$REPO" ;; esac
  done
fi
exec setpriv --bounding-set=-all%(caps)s --inh-caps=-all%(caps)s --ambient-caps=-all%(caps)s \
    --no-new-privs -- "$@"
"""


def sandboxed(ns: str, argv: list[str], state: Path, log: Path, caps: list[str],
              dropin: Path | None, tracefs: bool = True) -> subprocess.Popen[bytes]:
    script = SANDBOX % {"dropin": dropin_mounts(dropin) or ":",
                        "caps": "".join(f",+{c}" for c in caps)}
    if not tracefs:
        script = script.replace("mount -t tracefs tracefs /sys/kernel/tracing", ":")
    env = {**os.environ, "STATE": str(state), "REPO": str(REPO_ROOT)}
    with open(log, "ab") as lf:
        return subprocess.Popen(["ip", "netns", "exec", ns, "sh", "-c", script, "sh", *argv],
                                stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, env=env)


def hopscope_filters(ns: str) -> list[str]:
    """``dev/direction`` of every hopscope tc filter in the namespace."""
    links = json.loads(subprocess.run(["ip", "netns", "exec", ns, "ip", "-j", "link"],
                                      capture_output=True, text=True, check=True).stdout)
    out = []
    for link in links:
        for d in ("ingress", "egress"):
            cp = subprocess.run(["ip", "netns", "exec", ns, "tc", "filter", "show", "dev",
                                 link["ifname"], d], capture_output=True, text=True)
            out += [f"{link['ifname']}/{d}" for ln in cp.stdout.splitlines()
                    if "hopscope" in ln]
    return out


@pytest.fixture(scope="module")
def unit_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """What the installer would give the agent: the headers drop-in (when this kernel has
    no headers) and the unit's capability set."""
    root = tmp_path_factory.mktemp("unitroot")
    Installer(Options(role="agent", root=root)).headers()
    dropin = root / "etc/systemd/system/hopscope-agent.service.d" / HEADERS_DROPIN
    yield {"dropin": dropin if dropin.exists() else None, "caps": unit_caps()}


@contextlib.contextmanager
def state_dir() -> Iterator[Path]:
    """The state directory, outside /tmp (PrivateTmp= hides /tmp) and off the root file
    system's writable places: a directory in /run, removed after."""
    d = Path(tempfile.mkdtemp(prefix="hopscope-unit-test-", dir="/run"))
    os.chmod(d, 0o700)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def start_unit_agent(inst: Instance, node: str, state: Path, caps: list[str],
                     dropin: Path | None, extra: dict[str, Any] | None = None,
                     tracefs: bool = True, wait_ready: bool = True) -> Sandboxed:
    """The unit's ExecStart (its python swapped for this one, its config for ours) under the
    unit's privileges in ``node``'s namespace."""
    example = (UNITS / "agent.toml.example").read_text()
    values = {"node": node, "source": "tc", "out": str(state / "out.json"),
              "record": str(state / "obs.msgpack"), "spool": str(state / "spool"),
              **(extra or {})}
    cfg = state / "agent.toml"
    cfg.write_text(render_config(example, values))
    argv = [*command(unit_settings(AGENT_UNIT), "ExecStart", sys.executable, str(cfg)),
            "--ready-file", str(state / "ready")]
    log = state / "agent.log"
    proc = sandboxed(inst.ns(node), argv, state, log, caps, dropin, tracefs)
    a = Sandboxed(proc, state, log)
    if wait_ready:
        deadline = time.monotonic() + 90
        while not (state / "ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(a)
                pytest.fail("agent under the unit's privileges did not start:\n" + a.text())
            time.sleep(0.1)
    return a


def stop(a: Sandboxed, sig: int = signal.SIGTERM) -> int:
    if a.proc.poll() is None:
        # the sandbox shell exec'd setpriv, which exec'd python: the same pid
        os.kill(a.proc.pid, sig)
        try:
            a.proc.wait(60)
        except subprocess.TimeoutExpired:
            a.proc.kill()
            a.proc.wait()
    return a.proc.returncode


def run_stop_post(inst: Instance, node: str, caps: list[str], dropin: Path | None,
                  state: Path) -> str:
    argv = command(unit_settings(AGENT_UNIT), "ExecStopPost", sys.executable)
    log = state / "stoppost.log"
    p = sandboxed(inst.ns(node), argv, state, log, caps, dropin)
    assert p.wait(120) == 0, log.read_text()
    return log.read_text()


@pytest.mark.privileged
def test_agent_runs_with_only_the_units_capabilities(testbed: Instance,
                                                     unit_env: dict[str, Any]) -> None:
    from hopscope.testbed.traffic import TrafficConfig, run_traffic

    node = "node1"
    with state_dir() as state:
        a = start_unit_agent(testbed, node, state, unit_env["caps"], unit_env["dropin"])
        try:
            # what the unit would see of the process: exactly its capabilities
            status = Path(f"/proc/{a.proc.pid}/status").read_text()
            eff = int(re.search(r"CapEff:\s*(\w+)", status).group(1), 16)  # type: ignore[union-attr]
            names = {"bpf": 39, "perfmon": 38, "net_admin": 12, "net_raw": 13, "sys_ptrace": 19}
            assert eff == sum(1 << names[c] for c in unit_env["caps"]), hex(eff)
            assert re.search(r"NoNewPrivs:\s*1", status)
            attached = hopscope_filters(testbed.ns(node))
            assert any(x.startswith("eth0/") for x in attached), attached
            recs = run_traffic(testbed.topology, TrafficConfig(
                count=20, concurrency=2, nodes=[node], seed=61), keep=True).records
            assert len(recs) == 20 and all(r["status"] in (200, 201) for r in recs)
            time.sleep(1.5)
        finally:
            rc = stop(a)
        log = a.text()
        assert rc == 0, log
        assert "no traefik process" not in log  # the proxy's namespace was readable
        assert "private mount" not in log and "Traceback" not in log, log
        env = json.loads((state / "out.json").read_text())
        agent = env["agent"]
        assert agent["sources"]["packets"].startswith("tc clsact"), agent["sources"]
        assert agent["events"]["tc_sent"] > 0 and agent["events"]["kernel_sent"] > 0
        assert agent["events"]["tc_proxy_writes"] > 0
        ours = [r for r in env["requests"] if r["request_id"] in {x["cf_ray"] for x in recs}]
        assert len(ours) == 20
        for r in ours:
            ing = next(h for h in r["hops"] if h["name"] == "ingress")
            assert [c["name"] for c in ing["children"]] == ["kernel_in", "proxy",
                                                            "service_nat"], r["request_id"]
        # detached on SIGTERM: no filter left behind
        assert hopscope_filters(testbed.ns(node)) == []


@pytest.mark.privileged
def test_stop_post_removes_what_a_killed_agent_left(testbed: Instance,
                                                    unit_env: dict[str, Any]) -> None:
    node = "node2"
    with state_dir() as state:
        a = start_unit_agent(testbed, node, state, unit_env["caps"], unit_env["dropin"])
        try:
            assert stop(a, signal.SIGKILL) == -signal.SIGKILL
            left = hopscope_filters(testbed.ns(node))
            assert left, "a killed agent leaves its tc filters (the programs stay attached)"
            out = run_stop_post(testbed, node, unit_env["caps"], unit_env["dropin"], state)
            assert f"removed {len(left)} hopscope tc filter(s)" in out, out
            assert hopscope_filters(testbed.ns(node)) == []
            # and again: nothing left, says so
            assert "no hopscope tc filters left" in run_stop_post(
                testbed, node, unit_env["caps"], unit_env["dropin"], state)
        finally:  # a failure above leaves no filter to the module's other tests
            remove_stale_in(testbed.ns(node))


#: capability taken away -> (agent options, what the agent says)
WITHOUT = {
    "bpf": ({}, "could not open bpf map"),
    "perfmon": ({}, "cannot compile/load agent.c"),
    "net_admin": ({}, "Need super-user privileges to run"),
    "net_raw": ({"source": "capture"}, "cannot open an AF_PACKET socket"),
    "sys_ptrace": ({}, "no traefik process in this network namespace"),
}


@pytest.mark.privileged
@pytest.mark.parametrize("cap", sorted(WITHOUT))
def test_each_capability_is_needed(testbed: Instance, unit_env: dict[str, Any],
                                   cap: str) -> None:
    caps = [c for c in unit_env["caps"] if c != cap]
    assert len(caps) == len(unit_env["caps"]) - 1
    extra, want = WITHOUT[cap]
    with state_dir() as state:
        a = start_unit_agent(testbed, "node3", state, caps, unit_env["dropin"],
                             extra={**extra, "duration": "3s"}, wait_ready=False)
        try:
            a.proc.wait(90)
        finally:
            rc = stop(a)
        log = a.text()
        assert want in log, (cap, log)
        if cap == "sys_ptrace":
            assert rc == 0  # it runs, without the proxy sub-hop
        else:
            assert rc != 0, log
    assert hopscope_filters(testbed.ns("node3")) == []


@pytest.mark.privileged
def test_without_systemds_mounts_the_agent_would_need_cap_sys_admin(
        testbed: Instance, unit_env: dict[str, Any]) -> None:
    """Why the unit wants sys-kernel-tracing.mount: the agent cannot mount tracefs itself."""
    with state_dir() as state:
        a = start_unit_agent(testbed, "node3", state, unit_env["caps"], unit_env["dropin"],
                             extra={"duration": "2s"}, tracefs=False, wait_ready=False)
        try:
            a.proc.wait(90)
        finally:
            stop(a)
        log = a.text()
    assert a.proc.returncode != 0
    assert "cannot make a private mount namespace" in log and "CAP_SYS_ADMIN" in log, log
