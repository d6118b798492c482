"""The mypyc build of the replay hot path (``setup.py``) against the Python sources.

The compiled modules and their sources must give the same output byte for
byte; an edited source must never be shadowed by a stale build; and where a
C compiler, the Python headers and mypyc are present (as ``./dev.sh`` and CI
install them), the build must have compiled.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import hopscope

ROOT = Path(__file__).resolve().parent.parent
PCAPS = ROOT / "pcaps"
COMPILED_MODULES = tuple(sorted(hopscope.NATIVE))

_PROBE = ("import json, importlib, hopscope; "
          "print(json.dumps({'compiled': hopscope.COMPILED, 'stale': hopscope.STALE, "
          "'reason': hopscope.PURE_REASON, 'files': {m: importlib.import_module(m).__file__ "
          "for m in " + repr(COMPILED_MODULES) + "}}))")


def _probe(env: dict[str, str] | None = None, pythonpath: Path | None = None) -> dict[str, object]:
    e = {k: v for k, v in os.environ.items() if k != "HOPSCOPE_PURE"}
    e.update(env or {})
    if pythonpath is not None:
        e["PYTHONPATH"] = str(pythonpath)
    got = subprocess.run([sys.executable, "-c", _PROBE], env=e, capture_output=True, text=True,
                         timeout=60, cwd=pythonpath or ROOT)
    assert got.returncode == 0, got.stderr
    out: dict[str, object] = json.loads(got.stdout)
    return out


def _can_compile() -> str:
    """Why this machine cannot build the extensions ("" when it can)."""
    if shutil.which(sysconfig.get_config_var("CC").split()[0] if sysconfig.get_config_var("CC")
                    else "cc") is None:
        return "no C compiler"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python headers (python3-dev)"
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc (mypy) is not installed"
    return ""


needs_build = pytest.mark.skipif(not hopscope.COMPILED and bool(_can_compile()),
                                 reason=f"cannot compile here: {_can_compile()}")


@needs_build
def test_the_build_compiled() -> None:
    """With a compiler, headers and mypyc at hand the hot path runs compiled (else 1.4-2.4x slower)."""
    got = _probe()
    assert got["compiled"] is True, f"running the Python sources: {got['reason']}"
    files = got["files"]
    assert isinstance(files, dict)
    for mod, path in files.items():
        assert str(path).endswith(".so"), f"{mod} loaded from {path}"


@needs_build
def test_pure_switch_loads_every_source() -> None:
    got = _probe({"HOPSCOPE_PURE": "1"})
    assert got["compiled"] is False and got["reason"] == "HOPSCOPE_PURE is set"
    files = got["files"]
    assert isinstance(files, dict)
    assert all(str(p).endswith(".py") for p in files.values()), files


@needs_build
def test_an_edited_source_is_never_shadowed_by_the_build(tmp_path: Path) -> None:
    """Edit one compiled module's source: all of them load from source (they call each other in C)."""
    pkg = Path(hopscope.__file__).resolve().parent
    shutil.copytree(pkg, tmp_path / "hopscope", ignore=shutil.ignore_patterns("__pycache__"))
    src = tmp_path / "hopscope" / "tcpflow.py"
    src.write_text(src.read_text() + "\n# edited\n")
    got = _probe(pythonpath=tmp_path)
    assert got["compiled"] is False and got["stale"] is True
    assert "tcpflow.py changed since it was compiled" in str(got["reason"])
    files = got["files"]
    assert isinstance(files, dict)
    for mod, path in files.items():
        assert str(path).startswith(str(tmp_path)) and str(path).endswith(".py"), (mod, path)


def _cases() -> list[Path]:
    return sorted(p.parent for p in PCAPS.rglob("expected.json") if "bad" not in p.parts)


@needs_build
@pytest.mark.parametrize("case", _cases(), ids=lambda p: str(p.relative_to(PCAPS)))
def test_compiled_and_pure_print_the_same_bytes(case: Path) -> None:
    files = json.loads((case / "expected.json").read_text())["files"]
    outs = []
    for pure in ("0", "1"):
        env = {**os.environ, "HOPSCOPE_PURE": pure}
        got = subprocess.run([sys.executable, "-m", "hopscope", "replay", "--json", "--jobs", "2",
                              *files], cwd=case, env=env, capture_output=True, timeout=120)
        assert got.returncode == 0, got.stderr.decode(errors="replace")
        outs.append(got.stdout)
    assert json.loads(outs[0])["requests"], "a case without requests compares nothing"
    assert outs[0] == outs[1]


def test_doctor_says_which_runs() -> None:
    from hopscope.agent.doctor import build_section
    from hopscope.agent.features import DEGRADED, OK

    f = build_section()
    assert f.details["compiled"] is hopscope.COMPILED
    if hopscope.COMPILED:
        assert f.status == OK and "compiled" in f.summary
    else:
        assert f.status == DEGRADED and hopscope.PURE_REASON in f.summary


def test_a_sighting_pickles_whole() -> None:
    """Replay's workers hand sightings over pickled: every attribute must survive (compiled or not)."""
    import pickle

    from hopscope.tcpflow import Sighting

    s = Sighting("node1", "eth0", "nic", (b"\x01\x02\x03\x04", 40000, b"\x05\x06\x07\x08", 80), 7, 11)
    names = [n for n in dir(s) if not n.startswith("_") and not callable(getattr(s, n))]
    assert len(names) >= 27, names
    for i, n in enumerate(sorted(names)):  # a distinct value of the attribute's own type for each
        v = getattr(s, n)
        setattr(s, n, {f"f{i}"} if n == "flags" else not v if isinstance(v, bool) else
                (v + 1000 + i if isinstance(v, int) else f"v{i}" if isinstance(v, str) else v))
    t = pickle.loads(pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL))
    assert type(t) is Sighting
    assert {n: getattr(t, n) for n in names} == {n: getattr(s, n) for n in names}


def test_the_build_and_the_package_digest_alike() -> None:
    """setup.py cannot import the package it builds: its copy of the digest must stay the same."""
    spec = importlib.util.spec_from_file_location("_hopscope_setup_digest", ROOT / "setup.py")
    assert spec is not None
    text = (ROOT / "setup.py").read_text()
    start = text.index("def _digest(")
    ns: dict[str, object] = {}
    exec(compile("import zlib\n" + text[start:text.index("\n\n\n", start)], "setup.py", "exec"), ns)
    for blob in (b"", b"x", (ROOT / "hopscope" / "tcpflow.py").read_bytes()):
        assert ns["_digest"](blob) == hopscope.source_digest(blob)  # type: ignore[operator]


def test_the_package_knows_what_the_build_compiles() -> None:
    text = (ROOT / "setup.py").read_text()
    listed = text[text.index("COMPILED = [") : text.index("]", text.index("COMPILED = ["))]
    paths = [p.strip().strip('"') for p in listed.removeprefix("COMPILED = [").split(",") if p.strip()]
    assert {p[:-3].replace("/", ".") for p in paths} == hopscope.NATIVE == set(COMPILED_MODULES)


@needs_build
def test_a_stamp_without_its_extensions_claims_nothing(tmp_path: Path) -> None:
    pkg = Path(hopscope.__file__).resolve().parent
    shutil.copytree(pkg, tmp_path / "hopscope", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    got = _probe(pythonpath=tmp_path)
    assert got["compiled"] is False and got["reason"] == "the build's extensions are missing"
    files = got["files"]
    assert isinstance(files, dict)
    assert all(str(p).endswith(".py") for p in files.values()), files
