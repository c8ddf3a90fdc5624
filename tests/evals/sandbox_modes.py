"""The sandbox's two modes, for tests: "root" (this process, when it is root, as in CI) and "user" (an
unprivileged uid). As root, "user" copies the stdlib-only `sandbox.py` + `_sandbox_child.py` to a
world-readable dir and runs them as uid `UID` with a python3 that uid can reach (the project's
interpreter may sit under a private /root); as a normal user, "user" is this process itself.
Each mode has a home of the invoking identity (0700) with a 0600 secret and a victim file, and a
world-writable dir outside with another victim, to be checked from outside after a hostile run."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from dsv3.evals import sandbox
from dsv3.evals.sandbox import SandboxResult, SandboxUnavailable

ROOT = os.geteuid() == 0
UID = 61000 + os.getpid() % 1000  # the unprivileged uid "user" mode drops to when the tests run as root
KEEP = "keep me\n"


@contextlib.contextmanager
def environ(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: v for k, v in kv.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@functools.lru_cache(maxsize=None)
def user_python(uid: int) -> str | None:
    """A python3 (>= 3.9) with its stdlib that `uid` can run, or None."""
    cands = ["/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or "", sandbox._interpreter()[0]]
    for c in dict.fromkeys(c for c in cands if c):
        r = subprocess.run([c, "-I", "-c", "import sys, json, concurrent.futures, subprocess; "
                                            "assert sys.version_info >= (3, 9)"],
                           user=uid, group=uid, extra_groups=[], capture_output=True, cwd="/")
        if r.returncode == 0:
            return c
    return None


class Mode:
    def __init__(self, name: str, base: Path):
        self.name, self.base = name, base
        self.drop = name == "user" and ROOT  # run as UID through the copied script
        self.uid, self.gid = (UID, UID) if self.drop else (os.getuid(), os.getgid())
        self.token = secrets.token_hex(8)
        self.home = base / "home"
        self.outside = base / "outside"
        self.home.mkdir(mode=0o700)
        self.outside.mkdir()
        os.chmod(self.outside, 0o777)
        self.secret = self.home / "secret.txt"
        self.secret.write_text(f"SECRET-{self.token}\n")
        os.chmod(self.secret, 0o600)
        self.victims = [self.home / "victim.txt", self.outside / "victim.txt"]
        for v in self.victims:
            v.write_text(KEEP)
            os.chmod(v, 0o666)
        for p in (self.home, self.outside, self.secret, *self.victims):
            os.chown(p, self.uid, self.gid)
        if self.drop:
            self.python = user_python(UID)
            if self.python is None:
                pytest.skip(f"no python3 that uid {UID} can run (needed for the unprivileged mode)")
            self.code = base / "code"
            self.code.mkdir()
            for f in ("sandbox.py", "_sandbox_child.py"):
                shutil.copy(Path(sandbox.__file__).with_name(f), self.code / f)
                os.chmod(self.code / f, 0o644)

    def intact(self) -> bool:
        """Nothing outside changed: victims as they were, no new files."""
        return (all(v.exists() and v.read_text() == KEEP for v in self.victims)
                and sorted(os.listdir(self.home)) == ["secret.txt", "victim.txt"]
                and os.listdir(self.outside) == ["victim.txt"])

    def popen_as_invoker(self, argv: list[str]) -> subprocess.Popen:
        """A process of the invoking identity (to be signalled by a hostile program)."""
        kw = {"user": self.uid, "group": self.uid, "extra_groups": []} if self.drop else {}
        return subprocess.Popen(argv, cwd="/", **kw)

    def run(self, programs: list[str], timeout_s: float = 10.0, memory_mb: int = 512, unsafe: bool = False,
            mechanisms: str | None = None) -> list[SandboxResult]:
        """Run programs in this mode; `mechanisms="none"` disables every isolation mechanism."""
        if not self.drop:
            with environ(**{sandbox.ENV_MECHANISMS: mechanisms}), sandbox.allow_unsafe(unsafe):
                return sandbox.run_many(programs, workers=2, timeout_s=timeout_s, memory_mb=memory_mb)
        cmd = [self.python, str(self.code / "sandbox.py"), "--timeout", str(timeout_s), "--memory-mb",
               str(memory_mb), "--workers", "2"] + ([sandbox.UNSAFE_FLAG] if unsafe else [])
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8"}
        if mechanisms is not None:
            env[sandbox.ENV_MECHANISMS] = mechanisms
        p = subprocess.run(cmd, input=json.dumps(programs), capture_output=True, text=True, user=UID, group=UID,
                           extra_groups=[], cwd=self.home, env=env, timeout=60 + timeout_s * len(programs))
        if p.returncode == 3:
            raise SandboxUnavailable(p.stderr)
        assert p.returncode == 0, p.stderr
        return [SandboxResult(**r) for r in json.loads(p.stdout)]

    def run1(self, program: str, **kw) -> SandboxResult:
        return self.run([program], **kw)[0]


@pytest.fixture(params=["root", "user"])
def mode(request):
    if request.param == "root" and not ROOT:
        pytest.skip("root mode needs root (CI runs as root)")
    base = Path(tempfile.mkdtemp(prefix="dsv3-sbx-test-"))
    os.chmod(base, 0o755)
    try:
        yield Mode(request.param, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def processes_with(needle: bytes) -> list[int]:
    """Pids whose command line contains `needle` (NUL-separated argv)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{d}/cmdline").read_bytes():
                    out.append(int(d))
    return out
