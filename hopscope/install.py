"""``hopscope install agent|collector`` and ``hopscope uninstall agent|collector``.

Install, on a Debian 12 / Ubuntu 22.04+ node, as root:

1. ``apt``: the distribution's packages (``python3-venv``; for the agent
   ``python3-bpfcc bpfcc-tools`` and ``linux-headers-$(uname -r)``, or, where
   the kernel has no headers package, the distribution's generic headers).
2. ``headers`` (agent): when no headers match the kernel, a drop-in
   ``hopscope-agent.service.d/headers.conf`` links another version's headers
   where bcc looks, in the service's own mount namespace (the programs read
   kernel structs only at BTF offsets, so UAPI headers are enough).
3. ``venv``: ``/opt/hopscope/venv``, made from the system Python with
   ``--system-site-packages`` (so that the distribution's ``bcc`` is visible;
   PyPI's ``bcc`` is an unrelated package and never installed), with hopscope
   installed into it, not editable: from a wheel or a source directory
   (``--from``; default: the source checkout this hopscope runs from).
4. ``config``, ``token``: ``/etc/hopscope/ROLE.toml`` from the example in
   ``systemd/`` (an existing one is kept), the token (mode 0600, root's).
5. ``unit``: ``/etc/systemd/system/hopscope-ROLE.service``.
6. ``systemd``: daemon-reload (when a unit changed), enable, start (unless
   ``--no-start``; restarted when something it runs changed).

Every step compares before it writes: a second run changes nothing and says
so. ``--root DIR`` installs into a staging root (``DIR/opt/hopscope``,
``DIR/etc/...``) without apt and without systemctl (``enable`` is the
``multi-user.target.wants`` link). ``uninstall`` stops and disables the unit,
removes it and the venv (when no other hopscope unit uses it) and, with
``--purge``, the configuration, the token and the state directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from hopscope.errors import HopscopeError, PrivilegeError, UsageError

ROLES = ("agent", "collector")
PREFIX = Path("/opt/hopscope")
VENV = PREFIX / "venv"
ETC = Path("/etc/hopscope")
UNIT_DIR = Path("/etc/systemd/system")
WANTS = "multi-user.target.wants"
STAMP = ".hopscope-install.json"
#: state directories (StateDirectory=); the collector's DynamicUser= keeps its own under
#: /var/lib/private with a link in /var/lib
STATE = {
    "agent": [Path("/var/lib/hopscope-agent")],
    "collector": [Path("/var/lib/private/hopscope-collector"), Path("/var/lib/hopscope-collector")],
}
#: what a hopscope wheel is built from, in a source checkout
SOURCE_PARTS = ("pyproject.toml", "setup.py", "README.md", "hopscope", "agent", "collector", "bpf",
                "systemd")
#: never copied from a checkout: caches, and its own mypyc build (the wheel compiles anew)
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*", "*.so",
                                 "_compiled.py")
HEADERS_DROPIN = "headers.conf"
MIN_PYTHON = (3, 11)

#: step statuses that mean something on the machine changed
CHANGED = frozenset({"created", "written", "updated", "installed", "removed", "fixed",
                     "enabled", "started", "restarted", "disabled", "reloaded"})

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _open_mode(path: Path) -> bool:
    """Let group and others read ``path`` (and search or run it, for a directory or an
    executable), as a 022 umask would have made it; not through a symlink. Whether it
    changed."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        return False
    mode = stat.S_IMODE(st.st_mode)
    want = 0o055 if stat.S_ISDIR(st.st_mode) or mode & 0o100 else 0o044
    if mode & want == want:
        return False
    os.chmod(path, mode | want)
    return True


def run_cmd(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(list(argv), capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, check=False)


def unit_name(role: str) -> str:
    return f"hopscope-{role}.service"


def data_dir() -> Path:
    """The units and example configurations: ``hopscope/systemd/`` in an installed wheel,
    the repository's ``systemd/`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "systemd", here.parent / "systemd"):
        if (cand / unit_name("agent")).is_file():
            return cand
    raise HopscopeError(f"the systemd units are not in this hopscope ({here}): reinstall it "
                        "from a wheel or a source checkout")


def source_checkout(start: Path | None = None) -> Path | None:
    """The source checkout this hopscope runs from (editable install), or None."""
    root = (start or Path(__file__).resolve().parent.parent)
    pp = root / "pyproject.toml"
    try:
        text = pp.read_text()
    except OSError:
        return None
    return root if re.search(r'^name\s*=\s*"hopscope"', text, re.M) else None


def _source_files(src: Path) -> Iterator[Path]:
    for part in SOURCE_PARTS:
        p = src / part
        if p.is_file():
            yield p
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(src).parts
                if f.is_file() and not any(x == "__pycache__" or x.endswith(".egg-info")
                                           or x.startswith(".") for x in rel) \
                        and f.suffix not in (".pyc", ".so") and f.name != "_compiled.py":
                    yield f


def fingerprint(src: Path) -> str:
    """A hash of what would be installed from ``src`` (a wheel, or a source directory)."""
    h = hashlib.sha256()
    if src.is_file():
        h.update(src.read_bytes())
        return "wheel:" + h.hexdigest()[:32]
    for f in _source_files(src):
        h.update(str(f.relative_to(src)).encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return "source:" + h.hexdigest()[:32]


def toml_value(v: Any) -> str:
    """A TOML literal for a str, bool, int or list of those (JSON strings are TOML strings)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def render_config(example: str, values: dict[str, Any]) -> str:
    """The example configuration with ``values`` set: each key's commented ``#key = ...``
    line becomes ``key = VALUE`` (keys the example lacks are appended)."""
    lines = example.splitlines()
    for key, v in values.items():
        pat = re.compile(rf"^#\s*{re.escape(key)}\s*=")
        for i, ln in enumerate(lines):
            if pat.match(ln):
                lines[i] = f"{key} = {toml_value(v)}"
                break
        else:
            lines.append(f"{key} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


def headers_dropin(release: str, build: str, source: str | None) -> str:
    """The unit drop-in that links another version's headers as this kernel's, in the
    service's own mount namespace (``%v`` is the running kernel's release)."""
    binds = [f"BindReadOnlyPaths={build}:/lib/modules/%v/build"]
    if source:
        binds.append(f"BindReadOnlyPaths={source}:/lib/modules/%v/source")
    return (
        "# Written by `hopscope install agent`: no headers match this kernel\n"
        f"# ({release}), so bcc compiles against another version's, linked where it looks\n"
        "# (/lib/modules/RELEASE/build and source) in this service's mount namespace only; the\n"
        "# host's /lib/modules is not changed. Enough for hopscope's programs, which use UAPI\n"
        "# headers and tracepoint formats and read kernel structs only at BTF offsets.\n"
        "# `hopscope install agent` removes this file once matching headers are installed.\n"
        "[Service]\n"
        "TemporaryFileSystem=/lib/modules:ro\n" + "\n".join(binds) + "\n")


def python_version(python: str, run: Runner) -> tuple[int, int] | None:
    try:
        cp = run([python, "-c", "import sys; print(*sys.version_info[:2])"])
    except OSError:
        return None
    try:
        major, minor = (int(x) for x in cp.stdout.split())
    except ValueError:
        return None
    return major, minor


def choose_python(run: Runner, candidates: Sequence[str] = (
        "/usr/bin/python3", "/usr/bin/python3.13", "/usr/bin/python3.12", "/usr/bin/python3.11")
                  ) -> str | None:
    """The first system Python >= 3.11 (Ubuntu 22.04's python3 is 3.10: python3.11)."""
    for c in candidates:
        if os.access(c, os.X_OK):
            v = python_version(c, run)
            if v is not None and v >= MIN_PYTHON:
                return c
    return None


def os_release(path: str = "/etc/os-release") -> dict[str, str]:
    out = {}
    with contextlib.suppress(OSError):
        for ln in Path(path).read_text().splitlines():
            k, sep, v = ln.partition("=")
            if sep:
                out[k.strip()] = v.strip().strip('"')
    return out


@dataclass
class Step:
    what: str
    status: str
    detail: str = ""

    @property
    def changed(self) -> bool:
        return self.status in CHANGED


@dataclass
class Options:
    role: str
    root: Path | None = None  # a staging root: no apt, no systemctl
    apt: bool = True
    start: bool = True
    source: Path | None = None  # a wheel or a source directory
    collector: str | None = None  # agent: written into a new config
    token_file: Path | None = None  # copied to /etc/hopscope/ROLE.token
    listen: str | None = None  # collector: written into a new config
    http: str | None = None  # collector: written into a new config
    python: str | None = None
    purge: bool = False  # uninstall: config, token and state too
    systemd: bool | None = None  # call systemctl (default: unless root is given)


@dataclass
class Installer:
    opts: Options
    run: Runner = run_cmd
    say: Callable[[Step], None] | None = None
    steps: list[Step] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.opts.role not in ROLES:
            raise UsageError(f"unknown role {self.opts.role!r}: agent or collector")
        if self.opts.systemd is None:
            self.opts.systemd = self.opts.root is None

    # -- paths ---------------------------------------------------------------------------
    def p(self, path: Path) -> Path:
        """``path`` on the target: under the staging root when there is one."""
        return self.opts.root / path.relative_to("/") if self.opts.root else path

    @property
    def role(self) -> str:
        return self.opts.role

    @property
    def unit(self) -> str:
        return unit_name(self.role)

    def config_path(self) -> Path:
        return ETC / f"{self.role}.toml"

    def token_path(self) -> Path:
        return ETC / f"{self.role}.token"

    def dropin_dir(self) -> Path:
        return UNIT_DIR / f"{self.unit}.d"

    def step(self, what: str, status: str, detail: str = "") -> Step:
        s = Step(what, status, detail)
        self.steps.append(s)
        if self.say is not None:
            self.say(s)
        return s

    @property
    def changed(self) -> bool:
        return any(s.changed for s in self.steps)

    def _check(self, argv: Sequence[str], what: str) -> subprocess.CompletedProcess[str]:
        try:
            cp = self.run(argv)
        except OSError as exc:
            raise HopscopeError(f"{what}: cannot run {argv[0]}: {exc.strerror or exc}") from None
        if cp.returncode != 0:
            tail = " | ".join((cp.stderr or cp.stdout).strip().splitlines()[-3:])
            raise HopscopeError(f"{what}: `{' '.join(argv)}` failed ({cp.returncode}): {tail}")
        return cp

    # -- files ---------------------------------------------------------------------------
    def write_file(self, what: str, path: Path, text: str, mode: int = 0o644) -> bool:
        """Write ``text`` unless the file already holds it (and has ``mode``)."""
        real = self.p(path)
        old = None
        with contextlib.suppress(OSError):
            old = real.read_text()
        if old == text and stat.S_IMODE(real.stat().st_mode) == mode:
            self.step(what, "unchanged", str(path))
            return False
        real.parent.mkdir(parents=True, exist_ok=True)
        tmp = real.with_name(real.name + ".hopscope-tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        os.replace(tmp, real)
        self.step(what, "written" if old is None else "updated", str(path))
        return True

    def remove(self, what: str, path: Path) -> bool:
        real = self.p(path)
        if real.is_symlink() or real.is_file():
            real.unlink()
        elif real.is_dir():
            shutil.rmtree(real)
        else:
            return False
        self.step(what, "removed", str(path))
        return True

    # -- install -------------------------------------------------------------------------
    def install(self) -> list[Step]:
        # what it makes must be readable by the collector's dynamic user, whatever umask
        # root's shell has (077 and 027 on hardened hosts); secrets are written 0600 anyway
        umask = os.umask(0o022)
        try:
            return self._install()
        finally:
            os.umask(umask)

    def _install(self) -> list[Step]:
        o = self.opts
        if self.role == "agent" and not self.p(self.config_path()).exists():
            if not o.collector:
                raise UsageError(f"hopscope install agent: say where the agent ships: "
                                 f"--collector HOST:PORT --token-file FILE (or write "
                                 f"{self.config_path()} first, see agent.toml.example)")
            if o.token_file is None and not self.p(self.token_path()).exists():
                raise UsageError("hopscope install agent: --collector needs --token-file (the "
                                 f"collector's token; copied to {self.token_path()}, mode 0600)")
        if self.role == "agent" and o.token_file is None and \
                not self.p(self.token_path()).exists() and self._config_names_token():
            raise UsageError(f"hopscope install agent: {self.token_path()} is missing (the "
                             f"token {self.config_path()} names): give --token-file (the "
                             "collector's token)")
        if o.token_file is not None:
            self._read_token(o.token_file)  # refuse a bad one before changing anything
        self._check_addresses()
        src = self._source()
        if src is None and not self.p(VENV / STAMP).exists():
            raise UsageError("this hopscope is not a source checkout: give --from (a hopscope "
                             "wheel or source directory)")
        python = o.python or None
        if o.root is None and o.apt:
            self.apt(python)
        elif o.apt:
            self.step("apt", "skipped", "staging root: no packages installed")
        else:
            self.step("apt", "skipped", "--no-apt")
        if self.role == "agent":
            self.headers()
        self.venv(python, src)
        self.readable()
        self.config()
        self.token()
        units_changed = self.units()
        self.systemd_on(units_changed)
        return self.steps

    def apt(self, python: str | None) -> None:
        from hopscope.agent import features as ft

        osr = os_release()
        pkgs = []
        if python is None and choose_python(self.run, ("/usr/bin/python3",)) is None:
            # Ubuntu 22.04: python3 is 3.10; hopscope needs 3.11 (its bcc module is pure
            # Python in /usr/lib/python3/dist-packages, which 3.11 sees too)
            pkgs += ["python3.11", "python3.11-venv"]
        else:
            pkgs.append("python3-venv")
        headers_note = ""
        if self.role == "agent":
            pkgs += ["python3-bpfcc", "bpfcc-tools"]
            release = ft.kernel_release()
            hdr = ft.apt_headers_package(release)
            if hdr is None and not self._missing([f"linux-headers-{release}"]):
                hdr = f"linux-headers-{release}"
            if hdr is None:
                arch = self.run(["dpkg", "--print-architecture"]).stdout.strip() or "amd64"
                hdr = "linux-headers-generic" if osr.get("ID") == "ubuntu" else \
                    f"linux-headers-{arch}"
                headers_note = (f"; no linux-headers-{release} package for this kernel: "
                                f"{hdr} instead (see the headers step)")
            pkgs.append(hdr)
        missing = self._missing(pkgs)
        if not missing:
            self.step("apt", "unchanged", " ".join(pkgs) + " already installed" + headers_note)
        else:
            self._check(["apt-get", "update", "-qq"], "apt")
            self._check(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                        "apt")
            self.step("apt", "installed", " ".join(missing) + headers_note)

    def _missing(self, pkgs: Sequence[str]) -> list[str]:
        out = []
        for p in pkgs:
            try:
                cp = self.run(["dpkg-query", "-W", "-f=${Status}", p])
            except OSError:
                out.append(p)
                continue
            if "ok installed" not in cp.stdout:
                out.append(p)
        return out

    def headers(self, modules_dir: str = "/lib/modules") -> None:
        """The drop-in with another version's headers, when none match this kernel."""
        from hopscope.agent import features as ft

        release = ft.kernel_release()
        info = ft.probe_headers(release, modules_dir)
        path = self.dropin_dir() / HEADERS_DROPIN
        if info.present and info.has_kconfig_h:
            note = ("match the kernel" if info.matches
                    else f"are {info.version}'s, linked by hand, for kernel {release}")
            if self.remove("headers", path):
                self.steps[-1].detail += f" (the headers in /lib/modules/{release}/build {note})"
                self._rmdir_empty(self.dropin_dir())
            else:
                self.step("headers", "unchanged", f"/lib/modules/{release}/build: headers {note}")
            return
        tree = next((c for c in info.candidates if c.source), None) or (
            info.candidates[0] if info.candidates else None)
        if tree is None:
            fix = ft.headers_fix(info, None)
            self.step("headers", "warning", f"no kernel headers for {release} and none of "
                      f"another version: the agent falls back to AF_PACKET capture (no "
                      f"kernel_in/proxy sub-hops, no drop reasons). Fix: {fix}")
            return
        self.write_file("headers", path, headers_dropin(release, tree.build, tree.source))
        self.steps[-1].detail += (f" (no headers for {release}: {tree.version}'s, in the "
                                  "service's mount namespace only)")

    def _config_values(self) -> dict[str, Any]:
        """The existing configuration's keys (dashes), or {} when it cannot be read."""
        try:
            data = tomllib.loads(self.p(self.config_path()).read_text())
        except (OSError, ValueError):
            return {}
        return {k.replace("_", "-"): v for k, v in data.items()}

    def _config_names_token(self) -> bool:
        """Does the agent's configuration (when there is one) read the token this installs?"""
        if not self.p(self.config_path()).exists():
            return False
        return self._config_values().get("token-file", str(self.token_path())) == \
            str(self.token_path())

    def _check_addresses(self) -> None:
        """HOST:PORT options, checked as the commands will check them, before any change."""
        from hopscope.collector.server import parse_hostport

        for opt, value in (("--collector", self.opts.collector), ("--listen", self.opts.listen),
                           ("--http", self.opts.http)):
            if value:
                parse_hostport(value, opt)

    def readable(self) -> None:
        """/etc/hopscope and the venv open to other users (the collector runs as a dynamic
        user): repairs what an install under a strict umask left (the tokens are not
        touched: root's, 0600)."""
        fixed: list[str] = []
        for top in (ETC, PREFIX):
            if _open_mode(self.p(top)):
                fixed.append(str(top))
        n = 0
        for dirpath, _dirs, filenames in os.walk(self.p(VENV)):
            n += _open_mode(Path(dirpath))
            for name in filenames:
                n += _open_mode(Path(dirpath) / name)
        if n:
            fixed.append(f"{VENV} ({n} files and directories)")
        if fixed:
            self.step("modes", "fixed", f"{', '.join(fixed)}: readable by the services' users "
                      "again (an earlier install ran under a strict umask)")

    def _rmdir_empty(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            self.p(path).rmdir()

    def _read_token(self, path: Path) -> bytes:
        from hopscope.collector import wire

        return wire.read_token(path)

    def _source(self) -> Path | None:
        src = self.opts.source or source_checkout()
        if src is None:
            return None
        src = src.resolve()
        if src.is_file() and src.suffix != ".whl":
            raise UsageError(f"--from {src}: not a wheel (.whl) or a source directory")
        if src.is_dir() and source_checkout(src) is None:
            raise UsageError(f"--from {src}: no hopscope pyproject.toml there")
        if not src.exists():
            raise UsageError(f"--from {src}: no such file or directory")
        return src

    def venv(self, python: str | None, src: Path | None) -> None:
        venv = self.p(VENV)
        vpy = venv / "bin" / "python"
        stamp_path = venv / STAMP
        created = False
        cfg = venv / "pyvenv.cfg"
        cfg_text = cfg.read_text() if cfg.is_file() else ""
        if not vpy.exists() or "include-system-site-packages = true" not in cfg_text:
            python = python or choose_python(self.run)
            if python is None:
                raise HopscopeError("no Python >= 3.11 in /usr/bin: install python3.11 and "
                                    "python3.11-venv (Ubuntu 22.04), or give --python")
            if venv.exists():
                shutil.rmtree(venv)
            venv.parent.mkdir(parents=True, exist_ok=True)
            # --system-site-packages: the distribution's bcc (python3-bpfcc) is visible;
            # PyPI's `bcc` is an unrelated package and is never installed
            self._check([python, "-m", "venv", "--system-site-packages", str(venv)], "venv")
            created = True
        try:
            stamp = json.loads(stamp_path.read_text())
        except (OSError, ValueError):
            stamp = {}
        if src is None:
            if stamp:
                self.step("venv", "unchanged", f"{VENV}: hopscope from {stamp.get('source')} "
                          "(give --from to install another)")
                return
            raise UsageError("this hopscope is not a source checkout: give --from (a hopscope "
                             "wheel or source directory)")
        fp = fingerprint(src)
        if not created and stamp.get("fingerprint") == fp:
            self.step("venv", "unchanged", f"{VENV}: hopscope from {src} is up to date")
            return
        self._pip_install(vpy, src)
        stamp_path.write_text(json.dumps({"source": str(src), "fingerprint": fp}) + "\n")
        self.step("venv", "created" if created else "updated",
                  f"{VENV}: hopscope from {src}")

    def _pip_install(self, vpy: Path, src: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="hopscope-install-") as tmp:
            wheel = src
            if src.is_dir():
                # build from a copy: the checkout gets no build/ or egg-info
                tree = Path(tmp) / "src"
                tree.mkdir()
                for part in SOURCE_PARTS:
                    p = src / part
                    if p.is_dir():
                        shutil.copytree(p, tree / part, ignore=_IGNORE)
                    elif p.is_file():
                        shutil.copy2(p, tree / part)
                out = Path(tmp) / "wheels"
                self._check([str(vpy), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                             str(tree)], "venv: building the hopscope wheel")
                wheels = sorted(out.glob("hopscope-*.whl"))
                if not wheels:
                    raise HopscopeError(f"venv: no wheel built from {src}")
                wheel = wheels[0]
            pip = [str(vpy), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            self._check([*pip, "--force-reinstall", "--no-deps", str(wheel)],
                        "venv: installing hopscope")
            self._check([*pip, str(wheel)], "venv: installing hopscope's dependencies")

    def config(self) -> None:
        path = self.config_path()
        real = self.p(path)
        asked = {k: v for k, v in (("--collector", self.opts.collector),
                                   ("--listen", self.opts.listen),
                                   ("--http", self.opts.http)) if v}
        if real.exists():
            have = self._config_values()
            differ = [k for k, v in asked.items() if have.get(k[2:]) != v]
            note = (f"; not applied: {', '.join(differ)} (edit the file)") if differ else ""
            self.step("config", "kept", f"{path} exists{note}")
            return
        example = (data_dir() / f"{self.role}.toml.example").read_text()
        values: dict[str, Any]
        if self.role == "agent":
            values = {"collector": self.opts.collector, "token-file": str(self.token_path()),
                      "spool": str(STATE["agent"][0] / "spool")}
        else:
            values = {"token-file": "${CREDENTIALS_DIRECTORY}/token",
                      "db": str(STATE["collector"][1] / "collector.db"),
                      "http": self.opts.http or "127.0.0.1:7001"}
            if self.opts.listen:
                values["listen"] = self.opts.listen
        self.p(ETC).mkdir(parents=True, exist_ok=True)
        self.write_file("config", path, render_config(example, values))

    def token(self) -> None:
        path = self.token_path()
        real = self.p(path)
        given = self.opts.token_file
        if given is not None:
            data = Path(given).read_bytes()
            existed = real.exists()
            if existed and real.read_bytes() == data:
                self._token_mode(path)
                return
            self._write_secret(real, data)
            self.step("token", "updated" if existed else "written",
                      f"{path} (from {given}, mode 0600)")
            return
        if real.exists():
            self._token_mode(path)
            return
        if self.role == "collector":
            self._write_secret(real, (secrets.token_hex(32) + "\n").encode())
            self.step("token", "created", f"{path} (random, mode 0600): give it to the "
                      f"agents, `hopscope install agent --token-file {path} ...`")

    def _token_mode(self, path: Path) -> None:
        """Root's, 0600: the agent runs as root without CAP_DAC_OVERRIDE, the collector
        gets it as a credential from systemd (which reads it as root)."""
        real = self.p(path)
        st = real.stat()
        mode = stat.S_IMODE(st.st_mode)
        fixes = []
        if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
            os.chown(real, 0, 0)
            fixes.append(f"owner {st.st_uid}:{st.st_gid} -> 0:0")
        if mode & 0o077:
            os.chmod(real, 0o600)
            fixes.append(f"mode {mode:04o} -> 0600")
        if fixes:
            self.step("token", "fixed", f"{path}: {', '.join(fixes)}")
        else:
            self.step("token", "unchanged", f"{path} (mode {mode:04o})")

    def _write_secret(self, real: Path, data: bytes) -> None:
        real.parent.mkdir(parents=True, exist_ok=True)
        tmp = real.with_name(real.name + ".hopscope-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, real)

    def units(self) -> bool:
        changed = self.write_file("unit", UNIT_DIR / self.unit,
                                  (data_dir() / self.unit).read_text())
        return changed or any(s.what == "headers" and s.changed for s in self.steps)

    def systemd_on(self, units_changed: bool) -> None:
        if not self.opts.systemd:
            link = UNIT_DIR / WANTS / self.unit
            real = self.p(link)
            target = str(UNIT_DIR / self.unit)
            if real.is_symlink() and os.readlink(real) == target:
                self.step("enable", "unchanged", f"{link} (staging root: no systemctl)")
            else:
                real.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    real.unlink()
                os.symlink(target, real)
                self.step("enable", "enabled", f"{link} -> {target} (staging root: no "
                          "systemctl)")
            return
        sc = "systemctl"
        if units_changed:
            self._check([sc, "daemon-reload"], "systemd")
            self.step("systemd", "reloaded", "daemon-reload")
        enabled = self.run([sc, "is-enabled", self.unit]).stdout.strip()
        if enabled == "enabled":
            self.step("enable", "unchanged", f"{self.unit} is enabled")
        else:
            self._check([sc, "enable", self.unit], "systemd")
            self.step("enable", "enabled", self.unit)
        if not self.opts.start:
            self.step("start", "skipped", "--no-start")
            return
        active = self.run([sc, "is-active", self.unit]).stdout.strip()
        if active != "active":
            self._check([sc, "start", self.unit], "systemd")
            self.step("start", "started", f"{self.unit} (`journalctl -u {self.unit}`)")
        elif self.changed:
            self._check([sc, "restart", self.unit], "systemd")
            self.step("start", "restarted", f"{self.unit}: what it runs changed")
        else:
            self.step("start", "unchanged", f"{self.unit} is running")

    # -- uninstall -----------------------------------------------------------------------
    def uninstall(self) -> list[Step]:
        o = self.opts
        unit_file = UNIT_DIR / self.unit
        present = self.p(unit_file).exists()
        if o.systemd and present:
            self._check(["systemctl", "disable", "--now", self.unit], "systemd")
            self.step("stop", "disabled", f"{self.unit} stopped and disabled")
        gone = [self.remove("unit", unit_file),
                self.remove("headers", self.dropin_dir() / HEADERS_DROPIN)]
        self._rmdir_empty(self.dropin_dir())
        if not o.systemd:
            gone.append(self.remove("enable", UNIT_DIR / WANTS / self.unit))
            self._rmdir_empty(UNIT_DIR / WANTS)
        if o.systemd and any(gone):
            self._check(["systemctl", "daemon-reload"], "systemd")
            self.step("systemd", "reloaded", "daemon-reload")
        others = [unit_name(r) for r in ROLES
                  if r != self.role and self.p(UNIT_DIR / unit_name(r)).exists()]
        if others:
            self.step("venv", "kept", f"{VENV}: {', '.join(others)} uses it")
        else:
            if not self.remove("venv", VENV):
                self.step("venv", "unchanged", f"{VENV}: not there")
            self._rmdir_empty(PREFIX)
            if self.p(PREFIX).exists():
                self.step("venv", "kept", f"{PREFIX}: holds files hopscope did not put there")
        secrets_and_state = [self.config_path(), self.token_path(), *STATE[self.role]]
        if o.purge:
            for path in secrets_and_state:
                self.remove("purge", path)
            self._rmdir_empty(ETC)
        else:
            kept = [str(p) for p in secrets_and_state if self.p(p).exists()]
            if kept:
                self.step("config", "kept", f"{', '.join(kept)} (--purge removes them)")
        self.step("apt", "kept", "the distribution's packages stay (remove them with apt-get "
                  "if nothing else needs them)")
        return self.steps


# -- the commands ---------------------------------------------------------------------------


def _say(s: Step) -> None:
    click.echo(f"{s.what:<8} {s.status:<10} {s.detail}".rstrip())


def _steps(run: Callable[[], list[Step]], what: str) -> None:
    """Run the steps; a file that cannot be written or removed is one error line."""
    try:
        run()
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise HopscopeError(f"hopscope {what}: {where}{exc.strerror or exc}; the steps above "
                            "are done, the rest not (run it again once fixed)") from None


def _need_root(root: Path | None) -> None:
    if root is None and os.geteuid() != 0:
        raise PrivilegeError("needs root (packages, /opt, /etc, systemctl): run it with sudo, "
                             "or give --root DIR to stage the files under DIR")


@click.command("install")
@click.argument("role", type=click.Choice(ROLES))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Install into this staging root (DIR/opt/hopscope, DIR/etc/...): no apt, "
                   "no systemctl.")
@click.option("--no-apt", is_flag=True, help="Do not install the distribution's packages.")
@click.option("--no-start", is_flag=True, help="Enable the service but do not start it.")
@click.option("--from", "source", type=click.Path(exists=True, path_type=Path), default=None,
              help="Install hopscope from this wheel or source directory (default: the source "
                   "checkout this hopscope runs from).")
@click.option("--collector", default=None, metavar="HOST:PORT",
              help="agent: the collector to ship to (written into a new agent.toml).")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="The shared token to install as /etc/hopscope/ROLE.token "
              "(collector: default a new random one).")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="collector: where agents connect (written into a new collector.toml; "
                   "default 127.0.0.1:7000).")
@click.option("--http", default=None, metavar="HOST:PORT",
              help="collector: the JSON API (written into a new collector.toml; default "
                   "127.0.0.1:7001).")
@click.option("--python", default=None, help="The system Python for the venv (default: the "
              "first >= 3.11 of /usr/bin/python3, python3.13, 3.12, 3.11).")
def install(role: str, root: Path | None, no_apt: bool, no_start: bool, source: Path | None,
            collector: str | None, token_file: Path | None, listen: str | None,
            http: str | None, python: str | None) -> None:
    """Install the agent or the collector as a systemd service on this node (root).

    Packages (bcc, kernel headers), a venv in /opt/hopscope, /etc/hopscope/ROLE.toml (kept
    when it exists), the token, the unit; then enable and start it. Running it again
    changes nothing when nothing changed. See docs/install.md.

    \b
        hopscope install collector --listen 0.0.0.0:7000
        hopscope install agent --collector 10.0.0.1:7000 --token-file collector.token
    """
    _need_root(root)
    if role == "collector" and collector:
        raise UsageError("--collector is the agent's option")
    if role == "agent" and (listen or http):
        raise UsageError("--listen and --http are the collector's options")
    inst = Installer(Options(role=role, root=root.resolve() if root else None, apt=not no_apt,
                             start=not no_start, source=source, collector=collector,
                             token_file=token_file, listen=listen, http=http, python=python),
                     say=_say)
    _steps(inst.install, f"install {role}")
    where = f" in {root}" if root else ""
    if inst.changed:
        click.echo(f"hopscope {role}: installed{where}")
    else:
        click.echo(f"hopscope {role}: nothing changed, already installed{where}")


@click.command("uninstall")
@click.argument("role", type=click.Choice(ROLES))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Uninstall from this staging root (no systemctl).")
@click.option("--purge", is_flag=True,
              help="Also remove /etc/hopscope/ROLE.toml, the token and the state directory.")
def uninstall(role: str, root: Path | None, purge: bool) -> None:
    """Stop, disable and remove the agent's or the collector's service (root).

    The venv goes when no other hopscope service uses it; configuration, token and state
    stay unless --purge. The distribution's packages stay.
    """
    _need_root(root)
    inst = Installer(Options(role=role, root=root.resolve() if root else None, purge=purge),
                     say=_say)
    _steps(inst.uninstall, f"uninstall {role}")
    where = f" from {root}" if root else ""
    if inst.changed:
        click.echo(f"hopscope {role}: uninstalled{where}")
    else:
        click.echo(f"hopscope {role}: nothing to remove{where}")
