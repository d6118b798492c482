"""``hopscope install`` / ``uninstall``, and the BPF sources in a real (non-editable) install.

This machine is not changed: the full install runs with ``--root`` into a
staging directory (a venv under ``DIR/opt/hopscope`` made from the system
Python, hopscope built from this checkout as a wheel, units, configuration,
tokens), with ``apt-get`` and ``systemctl`` replaced on ``PATH`` by scripts
that record being called (they must not be). The systemctl/apt logic of a
real install is checked with a recording runner.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import click
import pytest
from hopscope.agent import events as ev
from hopscope.agent import features as ft

import hopscope
from hopscope import install as hi
from hopscope.cli import main
from hopscope.config import load_config

REPO = Path(__file__).resolve().parent.parent


# -- pieces ---------------------------------------------------------------------------------


def test_bpf_dir_is_found_in_both_layouts(tmp_path: Path) -> None:
    # the source checkout (editable install): bpf/ beside agent/
    assert ev.BPF_DIR == REPO / "bpf" and ev.HEADER.is_file()
    # a wheel: hopscope/agent/bpf/
    pkg = tmp_path / "site/hopscope/agent"
    (pkg / "bpf").mkdir(parents=True)
    (pkg / "bpf/hopscope.h").write_text("/* */")
    assert ev.find_bpf_dir(pkg) == pkg / "bpf"
    # neither: the wheel's place, so that the error names it
    assert ev.find_bpf_dir(tmp_path / "x/agent") == tmp_path / "x/agent/bpf"


def test_the_wheel_carries_bpf_sources_and_units(tmp_path: Path) -> None:
    """pyproject's package data: what `pip wheel` of this checkout contains."""
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for part in hi.SOURCE_PARTS:
        p = REPO / part
        if p.is_dir():
            shutil.copytree(p, src / part, ignore=hi._IGNORE)
        else:
            shutil.copy2(p, src / part)
    # pyproject's build requirements: this venv's own setuptools when it meets them (no
    # download), else pip's isolated build, as `hopscope install` builds
    from importlib.metadata import version

    need = re.search(r'"setuptools>=(\d+)"', (REPO / "pyproject.toml").read_text())
    assert need, "pyproject.toml: setuptools>=N in build-system.requires"
    have = int(version("setuptools").split(".")[0])
    isolation = ["--no-build-isolation"] if have >= int(need.group(1)) else []
    cp = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                         "-w", str(tmp_path / "w"), str(src)],
                        capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr
    (whl,) = (tmp_path / "w").glob("hopscope-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for f in (REPO / "bpf").iterdir():
        if f.suffix in (".c", ".h"):
            assert f"hopscope/agent/bpf/{f.name}" in names
    for f in ("hopscope-agent.service", "hopscope-collector.service", "agent.toml.example",
              "collector.toml.example"):
        assert f"hopscope/systemd/{f}" in names
    # the replay hot path: compiled where this machine can (as it can in CI), and the
    # record of what was compiled matches the sources the wheel carries
    stamp: dict[str, object] = {}
    exec(zipfile.ZipFile(whl).read("hopscope/_compiled.py"), stamp)
    sources = stamp["SOURCES"]
    assert isinstance(sources, dict)
    if shutil.which("gcc") and Path(sysconfig.get_paths()["include"], "Python.h").exists():
        assert set(sources) == hopscope.NATIVE
        for mod, digest in sources.items():
            name = mod.rpartition(".")[2]
            assert any(n.startswith(f"hopscope/{name}.") and n.endswith(".so") for n in names), mod
            body = zipfile.ZipFile(whl).read(f"hopscope/{name}.py")
            assert hopscope.source_digest(body) == digest, mod


def test_render_config_sets_keys_and_keeps_the_rest() -> None:
    ex = "# a comment\n#node = \"node1\"\n#spool = \"/x\"\n\n#entry-port = 80\n"
    out = hi.render_config(ex, {"spool": "/var/lib/a b\"c", "entry-port": 81,
                                "iface": ["eth0=nic"], "local": True})
    assert out.splitlines() == ["# a comment", '#node = "node1"', 'spool = "/var/lib/a b\\"c"',
                                "", "entry-port = 81", 'iface = ["eth0=nic"]', "local = true"]
    import tomllib

    assert tomllib.loads(out)["spool"] == '/var/lib/a b"c'


def test_headers_dropin() -> None:
    d = hi.headers_dropin("6.18.1", "/usr/src/linux-headers-6.1.0-56-amd64",
                          "/usr/src/linux-headers-6.1.0-56-common")
    lines = [ln for ln in d.splitlines() if not ln.startswith("#")]
    assert lines == ["[Service]", "TemporaryFileSystem=/lib/modules:ro",
                     "BindReadOnlyPaths=/usr/src/linux-headers-6.1.0-56-amd64:/lib/modules/%v/"
                     "build",
                     "BindReadOnlyPaths=/usr/src/linux-headers-6.1.0-56-common:/lib/modules/%v/"
                     "source"]


def _fake_source(tmp: Path) -> Path:
    src = tmp / "src"
    (src / "hopscope").mkdir(parents=True)
    (src / "pyproject.toml").write_text('[project]\nname = "hopscope"\n')
    (src / "hopscope/__init__.py").write_text("")
    return src


def test_fingerprint_follows_the_source(tmp_path: Path) -> None:
    src = _fake_source(tmp_path)
    a = hi.fingerprint(src)
    (src / "hopscope/__pycache__").mkdir()
    (src / "hopscope/__pycache__/x.pyc").write_bytes(b"junk")
    (src / "hopscope/y.egg-info").mkdir()
    (src / "hopscope/y.egg-info/PKG-INFO").write_text("x")
    assert hi.fingerprint(src) == a
    (src / "hopscope/__init__.py").write_text("# changed\n")
    assert hi.fingerprint(src) != a
    assert hi.source_checkout(src) == src and hi.source_checkout(tmp_path) is None
    assert hi.source_checkout() == REPO
    assert hi.data_dir() == REPO / "systemd"


class Recorder:
    """A runner for the installer: records commands, answers systemctl and dpkg-query."""

    def __init__(self, installed: Sequence[str] = (), enabled: bool = False,
                 active: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.installed = set(installed)
        self.enabled = enabled
        self.active = active

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append(argv)
        out, rc = "", 0
        if argv[0] == "dpkg-query":
            out = "install ok installed" if argv[-1] in self.installed else ""
            rc = 0 if argv[-1] in self.installed else 1
        elif argv[0] == "dpkg":
            out = "amd64\n"
        elif argv[:2] == ["systemctl", "is-enabled"]:
            out = "enabled\n" if self.enabled else "disabled\n"
        elif argv[:2] == ["systemctl", "is-active"]:
            out = "active\n" if self.active else "inactive\n"
        elif argv[:2] == ["systemctl", "enable"]:
            self.enabled = True
        elif argv[:2] in (["systemctl", "start"], ["systemctl", "restart"]):
            self.active = True
        elif argv[0] == "apt-get" and argv[1] == "install":
            self.installed.update(a for a in argv[2:] if not a.startswith("-"))
        elif argv[-1].startswith("import sys"):
            out = "3 11\n"
        return subprocess.CompletedProcess(argv, rc, out, "")

    def commands(self, prog: str) -> list[list[str]]:
        return [c for c in self.calls if c[0] == prog]


def _fake_venv(root: Path, src: Path) -> None:
    """A venv the installer takes as up to date (so that no pip runs)."""
    venv = root / "opt/hopscope/venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").symlink_to("/usr/bin/python3")
    (venv / "pyvenv.cfg").write_text("include-system-site-packages = true\n")
    (venv / hi.STAMP).write_text(json.dumps({"source": str(src),
                                             "fingerprint": hi.fingerprint(src)}))


def test_systemctl_calls_of_a_real_install_and_a_second_run(tmp_path: Path) -> None:
    src = _fake_source(tmp_path)
    root = tmp_path / "root"
    _fake_venv(root, src)
    rec = Recorder()
    opts = hi.Options(role="collector", root=root, source=src, systemd=True)
    first = hi.Installer(opts, run=rec)
    first.install()
    assert rec.commands("systemctl") == [
        ["systemctl", "daemon-reload"], ["systemctl", "is-enabled", "hopscope-collector.service"],
        ["systemctl", "enable", "hopscope-collector.service"],
        ["systemctl", "is-active", "hopscope-collector.service"],
        ["systemctl", "start", "hopscope-collector.service"]]
    assert first.changed and not rec.commands("apt-get")
    rec.calls.clear()
    again = hi.Installer(hi.Options(role="collector", root=root, source=src, systemd=True),
                         run=rec)
    again.install()
    assert not again.changed, again.steps
    assert rec.commands("systemctl") == [
        ["systemctl", "is-enabled", "hopscope-collector.service"],
        ["systemctl", "is-active", "hopscope-collector.service"]]
    # what it runs changed: restarted
    unit = root / "etc/systemd/system/hopscope-collector.service"
    unit.write_text(unit.read_text() + "# edited\n")
    rec.calls.clear()
    hi.Installer(hi.Options(role="collector", root=root, source=src, systemd=True),
                 run=rec).install()
    assert ["systemctl", "daemon-reload"] in rec.calls
    assert ["systemctl", "restart", "hopscope-collector.service"] in rec.calls
    # --no-start: enabled, not started
    rec2 = Recorder(enabled=True)
    hi.Installer(hi.Options(role="collector", root=root, source=src, systemd=True,
                            start=False), run=rec2).install()
    assert not [c for c in rec2.calls if c[:2] in (["systemctl", "start"],
                                                   ["systemctl", "restart"])]
    # uninstall: stopped and disabled, reloaded
    rec3 = Recorder(enabled=True, active=True)
    hi.Installer(hi.Options(role="collector", root=root, systemd=True), run=rec3).uninstall()
    assert rec3.commands("systemctl") == [
        ["systemctl", "disable", "--now", "hopscope-collector.service"],
        ["systemctl", "daemon-reload"]]
    assert not unit.exists() and not (root / "opt/hopscope").exists()


def test_apt_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ft, "kernel_release", lambda: "6.1.0-99-amd64")
    monkeypatch.setattr(ft, "apt_headers_package", lambda r: f"linux-headers-{r}")
    rec = Recorder()
    inst = hi.Installer(hi.Options(role="agent", root=tmp_path), run=rec)
    inst.apt(None)
    (install,) = [c for c in rec.calls if c[:2] == ["apt-get", "install"]]
    assert install[-4:] == ["python3-venv", "python3-bpfcc", "bpfcc-tools",
                            "linux-headers-6.1.0-99-amd64"]
    assert "bcc" not in install  # PyPI's bcc is another thing; bcc comes from the distro
    assert inst.steps[-1].status == "installed"
    rec.calls.clear()
    inst.apt(None)
    assert not rec.commands("apt-get") and inst.steps[-1].status == "unchanged"
    # a kernel without a headers package: the distribution's generic headers, explained
    monkeypatch.setattr(ft, "apt_headers_package", lambda r: None)
    rec = Recorder(installed=["python3-venv", "python3-bpfcc", "bpfcc-tools"])
    inst = hi.Installer(hi.Options(role="agent", root=tmp_path), run=rec)
    inst.apt(None)
    (install,) = [c for c in rec.calls if c[:2] == ["apt-get", "install"]]
    assert install[-1] in ("linux-headers-amd64", "linux-headers-generic")
    assert "no linux-headers-6.1.0-99-amd64 package" in inst.steps[-1].detail
    # the collector needs no bcc
    rec = Recorder()
    hi.Installer(hi.Options(role="collector", root=tmp_path), run=rec).apt(None)
    (install,) = [c for c in rec.calls if c[:2] == ["apt-get", "install"]]
    assert install[-1] == "python3-venv"


def test_agent_install_needs_a_collector_first(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "hopscope", "install", "agent", "--root",
                          str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "--collector HOST:PORT --token-file FILE" in res.stderr
    assert not (tmp_path / "r").exists()  # refused before changing anything


def test_outside_a_checkout_from_is_needed_before_any_change(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setattr(hi, "source_checkout", lambda start=None: None)
    rec = Recorder()
    inst = hi.Installer(hi.Options(role="collector", root=tmp_path / "r"), run=rec)
    with pytest.raises(hi.UsageError, match="give --from"):
        inst.install()
    assert not (tmp_path / "r").exists() and not rec.calls


# -- the full install into a staging root ------------------------------------------------------


FAKE = """#!/bin/sh
echo "$0 $*" >> "$HOPSCOPE_TEST_CALLS"
exit 1
"""


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    """path -> (mode, content hash or link target) of everything under root but the venv's
    site-packages (too big; the stamp stands for it)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if "/site-packages/" in rel or "__pycache__" in rel:
            continue
        st = p.lstat()
        if p.is_symlink():
            what = "-> " + os.readlink(p)
        elif p.is_file():
            what = hashlib.sha256(p.read_bytes()).hexdigest() + f" {st.st_mtime_ns}"
        else:
            what = "dir"
        out[rel] = (st.st_mode, what)
    return out


class Staged:
    def __init__(self, root: Path, work: Path) -> None:
        self.root = root
        self.calls = work / "calls"
        self.first: dict[str, subprocess.CompletedProcess[str]] = {}
        self.bin = work / "bin"
        self.bin.mkdir()
        for prog in ("systemctl", "apt-get", "apt", "dpkg"):
            (self.bin / prog).write_text(FAKE)
            (self.bin / prog).chmod(0o755)

    def hopscope(self, *args: str, ok: bool = True, umask: int | None = None
                 ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}",
               "HOPSCOPE_TEST_CALLS": str(self.calls)}
        cp = subprocess.run([sys.executable, "-m", "hopscope", *args], capture_output=True,
                            text=True, timeout=900, env=env,
                            preexec_fn=None if umask is None else lambda: os.umask(umask))
        if ok:
            assert cp.returncode == 0, cp.stdout + cp.stderr
        assert not self.calls.exists(), "called: " + self.calls.read_text()
        return cp

    @property
    def venv(self) -> Path:
        return self.root / "opt/hopscope/venv"

    def vpy(self, code: str) -> str:
        cp = subprocess.run([str(self.venv / "bin/python"), "-c", code], capture_output=True,
                            text=True, timeout=120, cwd="/")
        assert cp.returncode == 0, cp.stderr
        return cp.stdout


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Staged]:
    """Both roles installed into one staging root (the collector first: its token is the
    agent's), the collector under the strict umask of a hardened host's root shell."""
    work = tmp_path_factory.mktemp("install")
    s = Staged(work / "root", work)
    s.first["collector"] = s.hopscope("install", "collector", "--root", str(s.root),
                                      "--listen", "0.0.0.0:7000", umask=0o077)
    token = s.root / "etc/hopscope/collector.token"
    s.first["agent"] = s.hopscope("install", "agent", "--root", str(s.root),
                                  "--collector", "10.0.0.1:7000", "--token-file", str(token))
    yield s


def _closed(root: Path) -> list[str]:
    """What the collector's dynamic user could not read (or search) of the venv and
    /etc/hopscope, but the tokens."""
    out = []
    paths = [root / "etc/hopscope", root / "opt/hopscope", *(root / "opt/hopscope").rglob("*")]
    paths += [p for p in (root / "etc/hopscope").iterdir() if p.suffix != ".token"]
    for p in paths:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        want = 0o005 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o100 else 0o004
        if st.st_mode & want != want:
            out.append(f"{p.relative_to(root)} {stat.S_IMODE(st.st_mode):04o}")
    return out


def _cmd(group: str, name: str) -> click.Command:
    g = main.get_command(click.Context(main), group)
    assert isinstance(g, click.Group)
    return g.commands[name]


def _statuses(out: str) -> dict[str, str]:
    st = {}
    for ln in out.splitlines():
        parts = ln.split()
        if len(parts) >= 2 and not ln.startswith("hopscope "):
            st[parts[0]] = parts[1]
    return st


@pytest.mark.slow
def test_staged_install_lays_out_the_node(staged: Staged) -> None:
    r = staged.root
    out_c = staged.first["collector"].stdout
    out_a = staged.first["agent"].stdout
    assert out_c.strip().endswith(f"hopscope collector: installed in {r}")
    assert _statuses(out_c)["venv"] == "created" and _statuses(out_a)["venv"] == "unchanged"
    assert _statuses(out_c)["apt"] == "skipped"
    units = r / "etc/systemd/system"
    for role in ("agent", "collector"):
        unit = units / f"hopscope-{role}.service"
        assert unit.read_text() == (REPO / "systemd" / unit.name).read_text()
        link = units / "multi-user.target.wants" / unit.name
        assert os.readlink(link) == f"/etc/systemd/system/{unit.name}"
        tok = r / f"etc/hopscope/{role}.token"
        assert stat.S_IMODE(tok.stat().st_mode) == 0o600
    # installed under umask 077: the collector's dynamic user reads the venv and its config
    assert _closed(r) == []
    assert stat.S_IMODE((r / "etc/hopscope").stat().st_mode) == 0o755
    assert (r / "etc/hopscope/agent.token").read_bytes() == \
        (r / "etc/hopscope/collector.token").read_bytes()
    # the headers drop-in exactly when this kernel has no headers
    info = ft.probe_headers()
    dropin = units / "hopscope-agent.service.d" / hi.HEADERS_DROPIN
    assert dropin.exists() == (not (info.present and info.has_kconfig_h))
    # the configurations load as the commands' options
    agent_cfg = load_config(click.Context(_cmd("agent", "run")), str(r / "etc/hopscope/agent.toml"))
    assert agent_cfg["collector_addr"] == "10.0.0.1:7000"
    assert agent_cfg["token_file"] == "/etc/hopscope/agent.token"
    assert agent_cfg["spool_dir"] == "/var/lib/hopscope-agent/spool"
    col = load_config(click.Context(_cmd("collector", "serve")),
                      str(r / "etc/hopscope/collector.toml"))
    assert col["listen"] == "0.0.0.0:7000" and col["db"].startswith("/var/lib/hopscope-collector/")
    assert callable(col["token_file"])  # ${CREDENTIALS_DIRECTORY}/token, expanded when used


@pytest.mark.slow
def test_staged_venv_is_a_real_install_with_the_bpf_sources(staged: Staged) -> None:
    site = staged.venv / "lib"
    assert not list(site.rglob("__editable__*")), "not an editable install"
    (direct,) = site.rglob("hopscope-*.dist-info/direct_url.json")
    assert "editable" not in json.loads(direct.read_text()).get("dir_info", {})
    out = json.loads(staged.vpy(
        "import json; from hopscope.agent import events; from hopscope import install;"
        "print(json.dumps([str(events.BPF_DIR), sorted(p.name for p in events.BPF_DIR.iterdir()),"
        " str(install.data_dir())]))"))
    bpf_dir, files, data = out
    assert bpf_dir.startswith(str(staged.venv)) and bpf_dir.endswith("hopscope/agent/bpf")
    assert {"hopscope.h", "maps.h", "agent.c", "tc.c"} <= set(files)
    assert data.startswith(str(staged.venv)) and data.endswith("hopscope/systemd")
    # --system-site-packages: the distribution's bcc, never PyPI's
    cfg = (staged.venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg
    if Path("/usr/lib/python3/dist-packages/bcc").is_dir():
        where = staged.vpy("import bcc; print(bcc.__file__, hasattr(bcc, 'BPF'))").split()
        assert where == ["/usr/lib/python3/dist-packages/bcc/__init__.py", "True"]
    assert not list(site.rglob("bcc-*.dist-info"))
    # the installed CLI has what the units run
    cp = subprocess.run([str(staged.venv / "bin/python"), "-m", "hopscope", "agent", "run",
                         "--help"], capture_output=True, text=True, timeout=120, cwd="/")
    assert "--config FILE" in cp.stdout
    cp = subprocess.run([str(staged.venv / "bin/python"), "-m", "hopscope", "agent", "cleanup",
                         "--help"], capture_output=True, text=True, timeout=120, cwd="/")
    assert cp.returncode == 0


@pytest.mark.slow
@pytest.mark.privileged
def test_systemd_analyze_verify_on_the_staged_units(staged: Staged) -> None:
    """The units as installed, against the venv as installed (bound at /opt/hopscope/venv
    in a private mount namespace)."""
    from test_systemd import analyze_verify

    units = staged.root / "etc/systemd/system"
    cp = analyze_verify([units / "hopscope-agent.service", units / "hopscope-collector.service"],
                        venv=staged.venv)
    assert cp.returncode == 0 and not cp.stdout.strip() and not cp.stderr.strip(), cp


@pytest.mark.slow
def test_second_install_changes_nothing_and_says_so(staged: Staged) -> None:
    before = _tree(staged.root)
    for args in (["collector", "--listen", "0.0.0.0:7000"], ["agent"]):
        cp = staged.hopscope("install", *args, "--root", str(staged.root))
        assert cp.stdout.strip().splitlines()[-1] == \
            f"hopscope {args[0]}: nothing changed, already installed in {staged.root}"
        st = _statuses(cp.stdout)
        assert not set(st.values()) & hi.CHANGED, cp.stdout
        assert st["config"] == "kept"
        assert "not applied" not in cp.stdout  # --listen as the file has it
    cp = staged.hopscope("install", "collector", "--listen", "0.0.0.0:7002", "--root",
                         str(staged.root))
    assert "exists; not applied: --listen (edit the file)" in cp.stdout
    assert _tree(staged.root) == before


@pytest.mark.slow
def test_install_repairs_what_a_strict_umask_closed(staged: Staged) -> None:
    r = staged.root
    site = next(staged.venv.glob("lib/python3*/site-packages"))
    closed = [r / "etc/hopscope", r / "opt/hopscope", staged.venv, site / "hopscope",
              site / "hopscope/cli.py", staged.venv / "pyvenv.cfg"]
    for p in closed:
        p.chmod(0o700 if p.is_dir() else 0o600)
    assert len(_closed(r)) == len(closed)
    cp = staged.hopscope("install", "collector", "--root", str(r))
    assert _statuses(cp.stdout)["modes"] == "fixed", cp.stdout
    assert "/opt/hopscope/venv (4 files and directories)" in cp.stdout
    assert _closed(r) == []
    assert stat.S_IMODE((r / "etc/hopscope/collector.token").stat().st_mode) == 0o600


@pytest.mark.slow
def test_install_refuses_before_any_change(staged: Staged) -> None:
    r = staged.root
    before = _tree(r)
    for args, want in ((["agent", "--collector", "nohost"], "bad --collector 'nohost'"),
                       (["collector", "--listen", "garbage"], "bad --listen 'garbage'"),
                       (["collector", "--http", "x:y"], "bad --http 'x:y'")):
        cp = staged.hopscope("install", *args, "--root", str(r), ok=False)
        assert cp.returncode == 2 and want in cp.stderr and cp.stdout == "", cp.stderr
    assert _tree(r) == before
    tok = r / "etc/hopscope/agent.token"
    kept = tok.read_bytes()
    tok.unlink()
    try:
        before = _tree(r)
        # the kept agent.toml reads a token that is gone: the agent could not start
        cp = staged.hopscope("install", "agent", "--root", str(r), ok=False)
        assert cp.returncode == 2 and cp.stdout == "", cp.stdout
        assert cp.stderr.strip() == "hopscope: hopscope install agent: /etc/hopscope/" \
            "agent.token is missing (the token /etc/hopscope/agent.toml names): give " \
            "--token-file (the collector's token)"
        assert _tree(r) == before
    finally:
        tok.write_bytes(kept)
        tok.chmod(0o600)


@pytest.mark.slow
def test_a_file_that_cannot_be_written_is_one_line(staged: Staged) -> None:
    unit = staged.root / "etc/systemd/system/hopscope-agent.service"
    good = unit.read_text()
    unit.write_text(good + "# edited\n")
    blocker = unit.with_name(unit.name + ".hopscope-tmp")
    blocker.mkdir()
    try:
        cp = staged.hopscope("install", "agent", "--root", str(staged.root), ok=False)
        assert cp.returncode == 1 and "Traceback" not in cp.stderr
        assert cp.stderr.strip() == f"hopscope: hopscope install agent: {blocker}: Is a " \
            "directory; the steps above are done, the rest not (run it again once fixed)"
    finally:
        blocker.rmdir()
    cp = staged.hopscope("install", "agent", "--root", str(staged.root))
    assert _statuses(cp.stdout)["unit"] == "updated" and unit.read_text() == good


@pytest.mark.slow
def test_existing_config_is_kept_and_token_mode_fixed(staged: Staged) -> None:
    cfg = staged.root / "etc/hopscope/agent.toml"
    mine = cfg.read_text() + "\n# mine\nproxy = \"traefik2\"\n"
    cfg.write_text(mine)
    tok = staged.root / "etc/hopscope/agent.token"
    os.chmod(tok, 0o644)
    os.chown(tok, 1000, 1000)  # the agent, root without CAP_DAC_OVERRIDE, could not read it
    cp = staged.hopscope("install", "agent", "--root", str(staged.root))
    st = _statuses(cp.stdout)
    assert st["config"] == "kept" and st["token"] == "fixed", cp.stdout
    assert "agent.token: owner 1000:1000 -> 0:0, mode 0644 -> 0600" in cp.stdout
    assert cfg.read_text() == mine and stat.S_IMODE(tok.stat().st_mode) == 0o600
    assert (tok.stat().st_uid, tok.stat().st_gid) == (0, 0)
    assert cp.stdout.strip().endswith(f"hopscope agent: installed in {staged.root}")


@pytest.mark.slow
def test_uninstall_then_purge(staged: Staged) -> None:
    r = staged.root
    units = r / "etc/systemd/system"
    cp = staged.hopscope("uninstall", "agent", "--root", str(r))
    assert not (units / "hopscope-agent.service").exists()
    assert not (units / "hopscope-agent.service.d").exists()
    assert not (units / "multi-user.target.wants/hopscope-agent.service").exists()
    assert (units / "hopscope-collector.service").exists()
    assert staged.venv.exists(), "the collector still uses the venv"
    assert "hopscope-collector.service uses it" in cp.stdout
    assert (r / "etc/hopscope/agent.toml").exists(), "configuration stays without --purge"
    assert "--purge removes them" in cp.stdout
    cp = staged.hopscope("uninstall", "agent", "--root", str(r))
    assert cp.stdout.strip().endswith(f"hopscope agent: nothing to remove from {r}")
    (r / "var/lib/private/hopscope-collector").mkdir(parents=True)
    (r / "var/lib/hopscope-collector").symlink_to("private/hopscope-collector")
    notes = r / "opt/hopscope/NOTES"  # the operator's, beside the venv
    notes.write_text("the next upgrade's wheel goes here\n")
    cp = staged.hopscope("uninstall", "collector", "--root", str(r), "--purge")
    assert not staged.venv.exists() and notes.exists()
    assert "/opt/hopscope: holds files hopscope did not put there" in cp.stdout
    notes.unlink()
    (r / "opt/hopscope").rmdir()
    assert not (units / "hopscope-collector.service").exists()
    for p in ("etc/hopscope/collector.toml", "etc/hopscope/collector.token",
              "var/lib/private/hopscope-collector", "var/lib/hopscope-collector"):
        assert not (r / p).exists() and not (r / p).is_symlink(), p
    staged.hopscope("uninstall", "agent", "--root", str(r), "--purge")
    assert not (r / "etc/hopscope").exists()
    cp = staged.hopscope("uninstall", "collector", "--root", str(r), "--purge")
    assert cp.stdout.strip().endswith(f"hopscope collector: nothing to remove from {r}")
    left = sorted(str(p.relative_to(r)) for p in r.rglob("*"))
    assert all(not p.startswith(("opt/hopscope", "etc/hopscope")) for p in left), left


def test_install_needs_root_or_a_staging_root(tmp_path: Path) -> None:
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("setpriv missing")
    argv = [sys.executable, "-m", "hopscope", "install", "collector", "--no-apt"]
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *argv]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 77 and "give --root DIR" in res.stderr, res.stderr
