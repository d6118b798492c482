"""Boot the test VM and run one command in it: the implementation of ``vm/run``.

``vm/run [OPTIONS] -- CMD [ARG...]`` boots Debian 12's stock kernel (the image of
``vm/build-image``, built first when not cached) under qemu with software emulation,
shares the repository read-only into the guest (``/mnt/hopscope``) and a results
directory read-write (``/mnt/out``, the ``--out`` directory), runs ``CMD`` there as root
from the repository root through ``vm/init``, and exits with its status. The guest's
console goes to ``OUT/console.log`` (and to stderr unless ``--quiet``).

Exit status: the command's, else 124 when the VM timed out before the command
reported, else 125 when the VM could not be started or did not report (with the last
lines of the console on stderr). See docs/vm.md.

Standard library only: it runs with the host's ``/usr/bin/python3``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_IMAGE = REPO / "vm" / "build-image"

EXIT_TIMEOUT = 124
EXIT_VM_FAILED = 125

#: Markers printed on the console by the stub (baked in the image) and vm/init.
STUB_RE = re.compile(r"HOPSCOPE-VM-STUB uptime=([\d.]+)")
INIT_RE = re.compile(r"HOPSCOPE-VM-INIT uptime=([\d.]+)(?: kernel=(\S+))?")
PAYLOAD_RE = re.compile(r"HOPSCOPE-VM-PAYLOAD uptime=([\d.]+)")
END_RE = re.compile(r"HOPSCOPE-VM-END uptime=([\d.]+)")
RC_RE = re.compile(r"HOPSCOPE-VM-RC=(\d+)")
ERROR_RE = re.compile(r"HOPSCOPE-VM-ERROR: ([^\r\n]*)")

GUEST_REPO = "/mnt/hopscope"
GUEST_OUT = "/mnt/out"


class VmError(Exception):
    """The VM could not be started or did not report; ``code`` is vm/run's exit status."""

    def __init__(self, message: str, code: int = EXIT_VM_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Image:
    """A built image: the directory of ``vm/build-image``."""

    dir: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    release: str

    @classmethod
    def at(cls, d: Path) -> Image:
        d = Path(d)
        if not (d / "complete").is_file():
            raise VmError(f"{d} is not a complete image (no 'complete' marker): run vm/build-image")
        parts = {n: d / n for n in ("vmlinuz", "initrd.img", "rootfs.ext4", "kernel-release")}
        missing = [n for n, p in parts.items() if not p.is_file()]
        if missing:
            raise VmError(f"image {d} lacks {', '.join(missing)}: rebuild with "
                          "vm/build-image --force")
        # the uncompressed kernel boots through PVH, ~5 s sooner than vmlinuz
        kernel = d / "vmlinux" if (d / "vmlinux").is_file() else parts["vmlinuz"]
        return cls(d, kernel, parts["initrd.img"], parts["rootfs.ext4"],
                   parts["kernel-release"].read_text().strip())


@dataclass
class Console:
    """What the guest printed, with its markers parsed."""

    text: str
    stub_uptime: float | None = None
    init_uptime: float | None = None
    payload_uptime: float | None = None
    end_uptime: float | None = None
    kernel: str | None = None
    rc: int | None = None
    errors: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Console:
        c = cls(text)

        def last(rx: re.Pattern[str]) -> re.Match[str] | None:
            found = list(rx.finditer(text))
            return found[-1] if found else None

        if m := last(STUB_RE):
            c.stub_uptime = float(m.group(1))
        if m := last(INIT_RE):
            c.init_uptime = float(m.group(1))
            c.kernel = m.group(2)
        if m := last(PAYLOAD_RE):
            c.payload_uptime = float(m.group(1))
        if m := last(END_RE):
            c.end_uptime = float(m.group(1))
        if m := last(RC_RE):
            c.rc = int(m.group(1))
        c.errors = [m.group(1).strip() for m in ERROR_RE.finditer(text)]
        return c

    def tail(self, n: int = 40) -> str:
        lines = self.text.replace("\r", "").rstrip("\n").splitlines()
        return "\n".join(lines[-n:]) if lines else "(the console is empty)"


@dataclass
class Result:
    """One VM run."""

    rc: int
    console: Console
    out_dir: Path
    log: Path
    wall_s: float
    boot_wall_s: float | None  # host seconds from qemu's start to vm/init's first line


def build_image(quiet: bool = False) -> Image:
    """The cached image, built first when absent (its progress goes to stderr)."""
    try:
        cp = subprocess.run([str(BUILD_IMAGE)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL if quiet else None, text=True)
    except OSError as exc:
        raise VmError(f"cannot run {BUILD_IMAGE}: {exc}") from exc
    lines = cp.stdout.strip().splitlines()
    if cp.returncode != 0 or not lines:
        raise VmError(f"vm/build-image failed (exit {cp.returncode}); see its messages above")
    return Image.at(Path(lines[-1]))


def find_qemu() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VmError("qemu-system-x86_64 not found: apt-get install qemu-system-x86 "
                      "(./dev.sh setup installs it)")
    return qemu


def qemu_argv(image: Image, out_dir: Path, log: Path, *, cpus: int, mem_mb: int,
              append: str = "", extra: tuple[str, ...] = ()) -> list[str]:
    """The qemu command line (software emulation: KVM does not work on these machines)."""
    qemu = find_qemu()
    cmdline = " ".join(filter(None, [
        "console=ttyS0", "root=/dev/vda", "rw", "rootfstype=ext4", "fastboot",
        "init=/usr/local/sbin/hopscope-vm-stub", "panic=-1", "loglevel=4",
        "mitigations=off", "random.trust_cpu=on", "net.ifnames=0", append,
    ]))
    return [
        qemu, "-accel", "tcg,thread=multi", "-cpu", "max",
        "-smp", str(cpus), "-m", str(mem_mb),
        "-no-reboot", "-display", "none", "-monitor", "none", "-nic", "none",
        "-chardev", f"file,id=console,path={log}", "-serial", "chardev:console",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
        # snapshot=on: the guest's writes go to a throwaway overlay, the cache never changes
        "-drive", f"file={image.rootfs},format=raw,if=virtio,snapshot=on",
        "-virtfs", f"local,path={REPO},mount_tag=hopscope,security_model=none,readonly=on",
        "-virtfs", f"local,path={out_dir},mount_tag=hsout,security_model=none",
        "-device", "virtio-rng-pci",
        *extra,
    ]


def write_payload(out_dir: Path, argv: list[str], timeout_s: int) -> None:
    """``OUT/payload.sh``: what vm/init runs, from the repository root, as root."""
    script = (
        "#!/bin/bash\n"
        "# written by vm/run; run by vm/init in the guest from the repository root\n"
        f"cd {GUEST_REPO}\n"
        f"exec timeout --kill-after=10 {timeout_s} {shlex.join(argv)}\n"
    )
    (out_dir / "payload.sh").write_text(script)


def run(argv: list[str], *, image: Image, out_dir: Path, timeout_s: int = 900, cpus: int = 2,
        mem_mb: int = 2560, append: str = "", qemu_extra: tuple[str, ...] = (),
        stream: bool = True) -> Result:
    """Boot the VM, run ``argv`` in it, return the result (raise VmError when it fails)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("rc", "console.log", "qemu.log"):
        (out_dir / stale).unlink(missing_ok=True)
    log = out_dir / "console.log"
    log.touch()
    qemu_log = out_dir / "qemu.log"
    # the payload's own limit leaves the VM time to report and power off
    write_payload(out_dir, argv, max(10, timeout_s - 60))
    cmd = ["timeout", "--kill-after=10", str(timeout_s),
           *qemu_argv(image, out_dir, log, cpus=cpus, mem_mb=mem_mb, append=append,
                     extra=qemu_extra)]
    start = time.monotonic()
    boot_wall: float | None = None
    seen = ""
    with qemu_log.open("wb") as qlog:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog,
                                    start_new_session=True)
        except OSError as exc:
            raise VmError(f"cannot start qemu: {exc}") from exc
        try:
            with log.open("rb") as con:
                while True:
                    done = proc.poll() is not None
                    chunk = con.read().decode(errors="replace")
                    if chunk:
                        seen += chunk
                        if stream:
                            sys.stderr.write(chunk.replace("\r", ""))
                            sys.stderr.flush()
                        if boot_wall is None and INIT_RE.search(seen):
                            boot_wall = time.monotonic() - start
                    if done:
                        break
                    time.sleep(0.2)
        except BaseException:
            _kill(proc)
            raise
    wall = time.monotonic() - start
    console = Console.parse(seen)
    rc = console.rc
    rc_file = out_dir / "rc"
    if rc_file.is_file():
        with contextlib.suppress(ValueError):
            rc = int(rc_file.read_text().strip())
    if rc is not None and not (console.errors and rc == EXIT_VM_FAILED):
        return Result(rc, console, out_dir, log, wall, boot_wall)
    raise VmError(_diagnose(console, proc.returncode, timeout_s, qemu_log, wall),
                  EXIT_TIMEOUT if proc.returncode == 124 else EXIT_VM_FAILED)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _diagnose(console: Console, qemu_rc: int | None, timeout_s: int, qemu_log: Path,
              wall: float) -> str:
    """One line saying how far the VM got, then the console's and qemu's last lines."""
    if console.errors:
        what = f"vm/init failed: {console.errors[-1]}"
    elif qemu_rc == 124:
        stage = ("the payload was still running" if console.payload_uptime is not None else
                 "vm/init had started" if console.init_uptime is not None else
                 "the stub had started (the repository share?)" if console.stub_uptime is not None
                 else "the guest had not reached init")
        what = f"the VM timed out after {timeout_s} s: {stage}"
    elif console.init_uptime is None and console.stub_uptime is None:
        what = (f"the VM did not boot (qemu exited {qemu_rc} after {wall:.0f} s "
                "without reaching init)")
    else:
        what = f"the VM stopped without reporting the payload's status (qemu exited {qemu_rc})"
    qemu_text = qemu_log.read_text(errors="replace").strip() if qemu_log.is_file() else ""
    parts = [what, "--- console (last lines) ---", console.tail()]
    if qemu_text:
        parts += ["--- qemu ---", "\n".join(qemu_text.splitlines()[-15:])]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vm/run", description="Boot the test VM (Debian 12's stock kernel under qemu) "
        "and run CMD in it as root, from the repository root (read-only, /mnt/hopscope).",
        epilog="Exit status: CMD's; 124 when the VM timed out; 125 when it could not run "
        "or did not report. See docs/vm.md.")
    p.add_argument("--image-dir", type=Path, help="a built image (default: vm/build-image's, "
                   "built first when not cached)")
    p.add_argument("--out", type=Path, help="results directory, shared writable as /mnt/out "
                   "(default: a temporary one, removed after a run that passed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary --out directory")
    p.add_argument("--timeout", type=int, default=900, help="seconds for the whole VM run "
                   "(default: %(default)s)")
    p.add_argument("--cpus", type=int, default=2, help="vCPUs (default: %(default)s)")
    p.add_argument("--mem", type=int, default=2560, help="MiB of guest memory "
                   "(default: %(default)s)")
    p.add_argument("--append", default="", help="extra kernel command line arguments")
    p.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                   help="one more qemu argument (repeatable)")
    p.add_argument("--quiet", "-q", action="store_true", help="do not copy the console to "
                   "stderr (it is still in OUT/console.log)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("no command: vm/run [OPTIONS] -- CMD [ARG...]")
    temp = a.out is None
    out_dir = Path(tempfile.mkdtemp(prefix="hopscope-vm.")) if temp else a.out.resolve()
    try:
        find_qemu()
        image = Image.at(a.image_dir) if a.image_dir else build_image()
        res = run(cmd, image=image, out_dir=out_dir, timeout_s=a.timeout, cpus=a.cpus,
                  mem_mb=a.mem, append=a.append, qemu_extra=tuple(a.qemu_arg),
                  stream=not a.quiet)
    except VmError as exc:
        print(f"vm/run: error: {exc}", file=sys.stderr)
        if (out_dir / "console.log").exists():
            print(f"vm/run: console log and qemu log in {out_dir}", file=sys.stderr)
        elif temp:
            shutil.rmtree(out_dir, ignore_errors=True)
        return exc.code
    except KeyboardInterrupt:
        print("vm/run: interrupted", file=sys.stderr)
        return 130
    c = res.console
    boot = f"{res.boot_wall_s:.1f} s" if res.boot_wall_s is not None else "?"
    guest = (f", guest uptime at init {c.init_uptime:.1f} s" if c.init_uptime is not None
             else "")
    setup = (f", init to payload {c.payload_uptime - c.init_uptime:.1f} s"
             if c.payload_uptime is not None and c.init_uptime is not None else "")
    payload = (f", payload {c.end_uptime - c.payload_uptime:.1f} s"
               if c.end_uptime is not None and c.payload_uptime is not None else "")
    print(f"vm/run: kernel {c.kernel or image.release}: payload exited {res.rc} "
          f"(boot to init {boot}{guest}{setup}{payload}, whole VM {res.wall_s:.1f} s)",
          file=sys.stderr)
    if temp and res.rc == 0 and not a.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    else:
        print(f"vm/run: results in {out_dir}", file=sys.stderr)
    return res.rc


if __name__ == "__main__":
    sys.exit(main())
