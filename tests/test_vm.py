"""The VM suite, from the host: tests/vm run inside a VM booted on Debian 12's stock kernel.

This machine's kernel has no kprobes and no IPVS; the nodes hopscope is for do. So
the production probe path is tested in a VM (docs/vm.md): ``vm/build-image`` builds
(or reuses) the image, and one boot per test session runs
``pytest tests/vm --junitxml=...`` inside it through ``vm/run``. Each in-VM test
then appears here as ``test_in_vm[<file>::<test>]`` with its outcome, and
``test_vm_suite`` checks what no single case shows (no result at all, collection
errors, an exit status without a failing test) and prints the timings.

A missing qemu, a failed image build, a VM that does not boot or does not report
are failures, never skips. The in-VM tests are found here by reading
``tests/vm/test_*.py`` (their ``test_*`` functions and ``Test*`` classes' methods);
a parametrized in-VM test passes here when all its cases passed (some skipped is a
failure: the VM's kernel has every feature they ask for).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.privileged, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
VM_TESTS = REPO / "tests" / "vm"
BUILD_TIMEOUT = 1500  # a cold image build takes a few minutes
#: the whole VM run: boot, the in-VM suite, power-off (HOPSCOPE_VM_TIMEOUT overrides); a
#: slow hour's run took 525 s (2026-11-29), so 600 was too close
RUN_TIMEOUT = int(os.environ.get("HOPSCOPE_VM_TIMEOUT", "900"))
GUEST_PYTHON = "/opt/hopscope-venv/bin/python"


@dataclass
class Case:
    """One in-VM test case as junit reported it."""

    name: str
    outcome: str  # passed, failed, error, skipped
    message: str = ""
    detail: str = ""
    seconds: float = 0.0


@dataclass
class VmSuite:
    """The single VM run of this session."""

    problem: str | None = None  # why there are no results (one line, then the console tail)
    rc: int | None = None
    cases: dict[str, list[Case]] = field(default_factory=dict)  # "file::[Class::]func" -> cases
    timings: list[str] = field(default_factory=list)
    out_dir: Path | None = None

    @property
    def reason(self) -> str:
        return (self.problem or "").splitlines()[0] if self.problem else ""


def discover_vm_tests() -> list[str]:
    """``file::func`` and ``file::Class::method`` of every test in tests/vm, read statically."""
    ids = []
    for path in sorted(VM_TESTS.glob("test_*.py")):
        try:
            tree = ast.parse(path.read_text(), str(path))
        except SyntaxError:
            ids.append(f"{path.name}::<syntax error>")
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and \
                    node.name.startswith("test"):
                ids.append(f"{path.name}::{node.name}")
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                ids += [f"{path.name}::{node.name}::{m.name}" for m in node.body
                        if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)
                        and m.name.startswith("test")]
    return ids


def parse_junit(path: Path) -> dict[str, list[Case]]:
    """In-VM cases keyed like :func:`discover_vm_tests` (parameters folded together)."""
    cases: dict[str, list[Case]] = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        classname, name = tc.get("classname", ""), tc.get("name", "")
        # classname is the dotted nodeid: tests.vm.test_file[.Class]
        parts = classname.split(".")
        i = next((i for i, p in enumerate(parts) if p.startswith("test_")), None)
        if not classname:  # a module that failed to collect: name "tests.vm.test_x"
            key = f"{name.rsplit('.', 1)[-1]}.py"
        elif i is None:
            key = f"{classname}::{name}"
        else:
            key = "::".join([f"{parts[i]}.py", *parts[i + 1:], name.split("[", 1)[0]])
        outcome, message, detail = "passed", "", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = "failed" if tag == "failure" else tag
                message, detail = el.get("message", ""), (el.text or "").strip()
                break
        cases.setdefault(key, []).append(
            Case(name, outcome, message, detail, float(tc.get("time") or 0)))
    return cases


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def run_vm_suite(out_dir: Path) -> VmSuite:
    suite = VmSuite(out_dir=out_dir)
    if shutil.which("qemu-system-x86_64") is None:
        suite.problem = ("qemu-system-x86_64 not found: apt-get install qemu-system-x86 "
                         "(./dev.sh setup installs it)")
        return suite
    t0 = time.monotonic()
    try:
        build = subprocess.run([str(REPO / "vm" / "build-image")], capture_output=True,
                               text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        suite.problem = f"vm/build-image timed out after {BUILD_TIMEOUT} s\n{_tail(err)}"
        return suite
    if build.returncode != 0 or not build.stdout.strip():
        suite.problem = (f"vm/build-image failed (exit {build.returncode})\n"
                         f"{_tail(build.stderr)}")
        return suite
    image = build.stdout.strip().splitlines()[-1]
    suite.timings.append(f"image {image}: ready in {time.monotonic() - t0:.0f} s")
    suite.timings += [ln for ln in build.stderr.splitlines() if " done (" in ln]

    argv = [str(REPO / "vm" / "run"), "--quiet", "--image-dir", image, "--out", str(out_dir),
            "--timeout", str(RUN_TIMEOUT), "--",
            GUEST_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/vm",
            "--junitxml=/mnt/out/junit.xml", "-o", "junit_family=xunit2"]
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT + 60)
    except subprocess.TimeoutExpired:
        suite.problem = f"vm/run did not end within {RUN_TIMEOUT + 60} s"
        return suite
    suite.rc = run.returncode
    suite.timings += [ln for ln in run.stderr.splitlines() if "payload exited" in ln]
    console = out_dir / "console.log"
    console_text = console.read_text(errors="replace") if console.is_file() else ""
    if run.returncode in (124, 125):
        suite.problem = run.stderr.strip().removeprefix("vm/run: error: ") or "vm/run failed"
        return suite
    junit = out_dir / "junit.xml"
    if run.returncode not in (0, 1) or not junit.is_file():
        suite.problem = (f"the in-VM pytest exited {run.returncode}"
                         f"{'' if junit.is_file() else ' and wrote no junit.xml'}\n"
                         f"{_tail(console_text.replace(chr(13), ''))}")
        return suite
    try:
        suite.cases = parse_junit(junit)
    except ET.ParseError as exc:
        suite.problem = f"cannot read the in-VM junit report {junit}: {exc}"
    return suite


@pytest.fixture(scope="session")
def vm_suite(tmp_path_factory: pytest.TempPathFactory) -> VmSuite:
    """One VM boot per session running tests/vm; failures are recorded, never raised."""
    return run_vm_suite(tmp_path_factory.mktemp("vm"))


def test_vm_suite(vm_suite: VmSuite) -> None:
    """The VM booted and the in-VM run reported; fails on what no test_in_vm case shows.

    That is: no result at all (qemu missing, build or boot failed, no report), a run
    that failed without a failing test (a collection error), no test run, or a failing
    in-VM test that the static discovery here did not find.
    """
    if vm_suite.problem:
        pytest.fail(vm_suite.problem, pytrace=False)
    print("\n".join(vm_suite.timings))
    counts: dict[str, int] = {}
    for cases in vm_suite.cases.values():
        for c in cases:
            counts[c.outcome] = counts.get(c.outcome, 0) + 1
    print("in-VM results: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    if not vm_suite.cases:
        pytest.fail("the in-VM pytest ran no test", pytrace=False)
    known = set(discover_vm_tests())
    unlisted = [f"{key} [{c.name}]: {c.message}" for key, cases in vm_suite.cases.items()
                if key not in known for c in cases if c.outcome in ("failed", "error")]
    if unlisted:
        pytest.fail("in-VM tests failed: " + "; ".join(unlisted), pytrace=False)
    failing = any(c.outcome in ("failed", "error") for cs in vm_suite.cases.values() for c in cs)
    if vm_suite.rc != 0 and not failing:
        pytest.fail(f"the in-VM pytest exited {vm_suite.rc} with no failing test (a collection "
                    f"error?): see {vm_suite.out_dir}/console.log", pytrace=False)


@pytest.mark.parametrize("test_id", discover_vm_tests() or ["<no tests in tests/vm>"])
def test_in_vm(vm_suite: VmSuite, test_id: str) -> None:
    """One in-VM test's outcome, as reported from inside the VM."""
    if vm_suite.problem:
        pytest.fail(f"no result from the VM: {vm_suite.reason} (details under test_vm_suite)",
                    pytrace=False)
    cases = vm_suite.cases.get(test_id)
    if not cases:
        pytest.fail(f"{test_id} did not run in the VM (a collection error? see test_vm_suite)",
                    pytrace=False)
    bad = [c for c in cases if c.outcome in ("failed", "error")]
    if bad:
        c = bad[0]
        more = f" (and {len(bad) - 1} more cases)" if len(bad) > 1 else ""
        detail = re.sub(r"\n{3,}", "\n\n", c.detail)
        pytest.fail(f"in the VM, {c.name} {c.outcome}{more}: {c.message}\n{detail}",
                    pytrace=False)
    skipped = [c for c in cases if c.outcome == "skipped"]
    if len(skipped) == len(cases):
        pytest.skip(f"skipped in the VM: {cases[0].message}")
    if skipped:  # the VM's kernel has every feature the in-VM tests ask for
        pytest.fail(f"in the VM, {len(skipped)} of {len(cases)} cases of {test_id} skipped: "
                    f"{skipped[0].name}: {skipped[0].message}", pytrace=False)
