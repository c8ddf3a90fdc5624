"""Sandboxed execution of model-written code (HumanEval pass@k, DeepSeek-V3 §4.4 / §5.3; GRPO code
rewards §5.2.1). Containment comes from the kernel, through bubblewrap (`bwrap`), never from Python.

`run_code(program, timeout_s=10.0, memory_mb=512) -> SandboxResult(ok, returncode, stdout, stderr,
reason)`. Each program runs in a fresh bubblewrap sandbox:
- its own network namespace (only its own loopback: no route out, the host's 127.0.0.1 is not
  reachable), PID namespace (bwrap is PID 1, so every process the program leaves behind, `setsid`
  daemons included, dies when it exits or is killed), IPC, UTS and cgroup namespaces;
- its own mount namespace built from an allow-list, all read-only: /usr (and the /bin, /lib, ...
  links or dirs), a few /etc files the dynamic loader needs, and the interpreter's stdlib prefix
  (bound on its own when it sits elsewhere, e.g. /root/.pyenv). Nothing else exists in it: no
  /home, /root, $HOME, project dir, /run, /var, /sys, host /tmp; those of them that lie under a bound
  path are covered by an empty tmpfs. Writable: a private /work (the cwd), /tmp and /dev/shm, each a
  size-capped tmpfs (`TMPFS_MB`); /dev is bwrap's minimal one and the skeleton bwrap builds (/, /etc,
  ...) are remounted read-only; /proc is the sandbox's own;
- an empty environment (PATH, LANG, HOME=/work, PYTHONHASHSEED=0); `python -I -S -B` of the
  interpreter's base install (no site-packages), started by `_sandbox_child.py`, which sets
  RLIMIT_CPU (timeout + 1 s), RLIMIT_AS (memory_mb), RLIMIT_NPROC (16), RLIMIT_FSIZE (16 MB: stdout
  and stderr are files, so a print loop is bounded), RLIMIT_NOFILE (64), no core;
- the wall-clock timeout SIGKILLs bwrap's process group; its PID 1 has PDEATHSIG, so the namespace
  and all it holds go with it.
Two modes. As a normal user: bwrap makes a user namespace (no capabilities inside, nested user
namespaces disabled where bwrap ≥ 0.8). As root (our containers, CI): bwrap runs privileged with
every capability dropped but SETUID/SETGID, and the child switches to a throw-away uid/gid per run
(200000+) before the program starts (capabilities gone: it checks CapEff == 0 or refuses to run), so
it owns nothing outside and the fork limit applies.

No mechanism (bwrap missing, namespaces not permitted, or `$DSV3_SANDBOX_MECHANISMS` set to `none`):
`run_code` raises `SandboxUnavailable`, naming what is missing and the override. With the override
(`run_code(..., unsafe=True)`, `allow_unsafe()`, the eval flag `--unsafe-no-sandbox`) and no
mechanism, a program runs UNCONTAINED: rlimits, a scrubbed environment, a temp cwd, the group kill,
and as root the uid drop only; with a mechanism the override changes nothing. `reason` is "" on
success, else "timeout", "memory", "cpu", "fsize", "signal:N", "exit:N", or "sandbox" (bwrap itself
failed). Stdlib-only, so it runs as a script with any python3 (tests run it as an unprivileged
user): `python3 sandbox.py [--probe] [--timeout S] [--memory-mb M] < programs.json`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

_CHILD = str(Path(__file__).resolve().with_name("_sandbox_child.py"))
MECHANISMS = ("bwrap",)
ENV_MECHANISMS = "DSV3_SANDBOX_MECHANISMS"  # comma list to consider; "none" disables all
UNSAFE_FLAG = "--unsafe-no-sandbox"
MAX_OUTPUT = 64 * 1024
TMPFS_MB = 64
FSIZE_MB = 16
_UID_BASE = 200_000
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": "/work", "TMPDIR": "/tmp"}
_counter = itertools.count()
_lock = threading.Lock()
_state = {"unsafe": False}
_probed: dict[tuple, tuple[str | None, str]] = {}


class SandboxUnavailable(RuntimeError):
    """No isolation mechanism on this machine; model-written code is refused."""


@dataclass
class SandboxResult:
    ok: bool
    returncode: int | None
    stdout: str
    stderr: str
    reason: str = ""


@contextlib.contextmanager
def allow_unsafe(enabled: bool = True):
    """Within the block, run_code runs programs uncontained when no mechanism is available."""
    prev, _state["unsafe"] = _state["unsafe"], bool(enabled)
    try:
        yield
    finally:
        _state["unsafe"] = prev


def _interpreter() -> tuple[str, str]:
    """(base interpreter, its stdlib prefix): no venv, so nothing of site-packages is needed."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return exe, os.path.realpath(sys.base_prefix)


def _inside(path: str, root: str) -> bool:
    return path != root and path.startswith(root.rstrip("/") + "/")


def _hidden() -> list[str]:
    """Private paths that must not show through a bound directory (/usr/src/app, a home under /usr)."""
    here = Path(__file__).resolve()
    project = [str(here.parents[2])] if here.parent.name == "evals" and here.parents[1].name == "dsv3" else []
    cand = ["/home", "/root", os.environ.get("HOME", ""), *project]
    return sorted({os.path.realpath(p) for p in cand if p and os.path.isdir(p)})


def _bwrap_features(bwrap: str) -> str:
    key = ("help", bwrap)
    if key not in _probed:
        r = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10)
        _probed[key] = (None, r.stdout + r.stderr)
    return _probed[key][1]


def _bwrap_argv(bwrap: str, root: bool, program: str) -> list[str]:
    help_text = _bwrap_features(bwrap)
    a = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
         "--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv"]
    for k, v in _ENV.items():
        a += ["--setenv", k, v]
    if root:  # privileged bwrap, no user namespace; the child drops to a throw-away uid
        a += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        a += ["--unshare-user"] + (["--disable-userns"] if "--disable-userns" in help_text else [])
    exe, prefix = _interpreter()
    binds = ["/usr"] + [p for p in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
                                    "/etc/alternatives") if os.path.exists(p)]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = "/" + name
        if os.path.islink(p):
            a += ["--symlink", os.readlink(p), p]
        elif os.path.isdir(p):
            binds.append(p)
    extra = [d for d in (prefix, os.path.dirname(exe)) if not any(d == b or _inside(d, b) for b in binds)]
    extra = [d for i, d in enumerate(extra) if not any(d == e or _inside(d, e) for e in extra[:i])]
    for b in binds:
        a += (["--dir", os.path.dirname(b)] if os.path.dirname(b) != "/" else []) + ["--ro-bind", b, b]
    hide = [h for h in _hidden() if any(_inside(h, b) for b in binds + extra)]
    for h in hide:
        a += ["--tmpfs", h]
    a += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    size = ["--size", str(TMPFS_MB << 20)] if "--size" in help_text else []
    for d in ("/dev/shm", "/tmp", "/work"):
        a += size + ["--tmpfs", d, "--chmod", "1777", d]
    for d in extra:  # the interpreter's own prefix, after every tmpfs that could cover it
        a += ["--dir", os.path.dirname(d), "--ro-bind", d, d]  # --dir: parents 0755 (bwrap's own are 0700)
    return a + ["--dir", "/sbx", "--ro-bind", _CHILD, "/sbx/child.py", "--ro-bind", program, "/sbx/main.py",
                "--remount-ro", "/", "--chdir", "/work"]  # the skeleton bwrap built (/etc, /sbx, ...) too


def _enabled() -> list[str]:
    raw = os.environ.get(ENV_MECHANISMS)
    if raw is None:
        return list(MECHANISMS)
    return [m.strip() for m in raw.split(",") if m.strip() in MECHANISMS]


def _which_bwrap() -> str | None:
    return shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")


def probe_mechanism() -> tuple[str | None, str]:
    """(mechanism, detail) or (None, why none works); a real sandboxed run, cached per process."""
    key = (os.geteuid(), os.environ.get(ENV_MECHANISMS), os.environ.get("PATH"))
    if key in _probed:
        return _probed[key]
    if "bwrap" not in _enabled():
        res = (None, f"bubblewrap (bwrap): disabled by ${ENV_MECHANISMS}={os.environ.get(ENV_MECHANISMS)!r}")
    elif not (bwrap := _which_bwrap()):
        res = (None, "bubblewrap (bwrap): not found on PATH (Debian/Ubuntu package `bubblewrap`, `make sysdeps`)")
    else:
        r = _execute("import sys; sys.exit(0)", 10.0, 256, 16, "bwrap", bwrap)
        mode = "root: privileged, throw-away uid" if os.geteuid() == 0 else "user namespace"
        lacks = [f for f in ("--size", "--disable-userns") if f not in _bwrap_features(bwrap)]
        mode += f"; this bwrap lacks {', '.join(lacks)}" if lacks else ""
        res = ("bwrap", f"bubblewrap at {bwrap} ({mode})") if r.ok else (None, (
            f"bubblewrap (bwrap): cannot create the sandbox here: {(r.stderr.strip() or r.reason)[:400]} "
            "(user namespaces disabled? see sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces, "
            "kernel.apparmor_restrict_unprivileged_userns; containers need CAP_SYS_ADMIN or user namespaces)"))
    _probed[key] = res
    return res


def unavailable_message(why: str) -> str:
    return (f"no sandbox for model-written code on this machine: {why}. Install bubblewrap and allow "
            f"namespaces, or pass {UNSAFE_FLAG} (eval.unsafe_no_sandbox=true) to run it UNCONTAINED "
            "with your user's rights")


def gate(unsafe: bool = False) -> str:
    """For an entry point about to run model-written code: the mechanism in force; with none, "none"
    plus a loud warning if the user overrode (`--unsafe-no-sandbox`), else SandboxUnavailable."""
    mech, why = probe_mechanism()
    if mech is not None:
        return mech
    if not unsafe:
        raise SandboxUnavailable(unavailable_message(why))
    msg = (f"{UNSAFE_FLAG}: model-written code will run UNCONTAINED, with this user's rights, files and "
           f"network (no sandbox: {why})")
    logging.getLogger("dsv3.evals.sandbox").warning("WARNING: %s", msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return "none"


def describe() -> dict:
    """{"mechanism": "bwrap" | None, "detail": ..., "root": bool} for logs and run tags."""
    mech, detail = probe_mechanism()
    return {"mechanism": mech, "detail": detail, "root": os.geteuid() == 0}


def _next_uid() -> int:
    with _lock:
        return _UID_BASE + (os.getpid() % 1_000_000) * 1000 + next(_counter) % 1000  # < 2**31, per process


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid` (uncontained mode: stragglers that left the group)."""
    for _ in range(3):
        found = False
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/status") as f:
                    uids = next((ln.split() for ln in f if ln.startswith("Uid:")), None)
                if uids and int(uids[1]) == uid:
                    os.kill(int(d), signal.SIGKILL)
                    found = True
            except (OSError, ValueError):
                continue
        if not found:
            return
        time.sleep(0.05)


def _read(path: Path) -> str:
    with open(path, "rb") as f:
        return f.read(MAX_OUTPUT).decode("utf-8", "replace")


def run_code(program: str, timeout_s: float = 10.0, memory_mb: int = 512, nproc: int = 16,
             unsafe: bool | None = None) -> SandboxResult:
    """Run `program` (Python source) in the sandbox; ok iff it exits 0 within the limits."""
    mech, why = probe_mechanism()
    if mech is None and not (_state["unsafe"] if unsafe is None else unsafe):
        raise SandboxUnavailable(unavailable_message(why))
    return _execute(program, timeout_s, memory_mb, nproc, mech, _which_bwrap() if mech else None)


def _execute(program: str, timeout_s: float, memory_mb: int, nproc: int, mech: str | None,
             bwrap: str | None) -> SandboxResult:
    root = os.geteuid() == 0
    uid = _next_uid() if root else 0
    exe, _ = _interpreter()
    host = Path(tempfile.mkdtemp(prefix="dsv3-sbx-"))
    work = host / "work"
    try:
        (host / "main.py").write_text(program)
        os.chmod(host / "main.py", 0o644)
        limits = [str(uid), str(int(timeout_s) + 1), str(memory_mb), str(nproc), str(FSIZE_MB)]
        if mech == "bwrap":
            cmd = _bwrap_argv(bwrap, root, str(host / "main.py")) + [
                exe, "-I", "-S", "-B", "/sbx/child.py", *limits, "0", "/sbx/main.py"]
            cwd, env = str(host), {"PATH": "/usr/bin:/bin"}
        else:  # uncontained: a temp cwd; as root still a throw-away uid (stdlib preloaded before the drop)
            work.mkdir()
            shutil.copy(host / "main.py", work / "main.py")
            if root:
                os.chmod(host, 0o711)
                os.chown(work, uid, uid)
            cmd = [exe, "-I", "-S", "-B", _CHILD, *limits, "1" if root else "0", "main.py"]
            cwd, env = str(work), {**_ENV, "HOME": str(work), "TMPDIR": str(work)}
        with open(host / "out", "wb") as out, open(host / "err", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out, rc = True, None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if root:
                _kill_uid(uid)
            if rc is None:
                proc.wait()
        stdout, stderr = _read(host / "out"), _read(host / "err")
        if mech == "bwrap" and rc is not None and 128 < rc < 128 + 65:
            rc = -(rc - 128)  # bwrap's PID 1 reports a signal death as 128 + N
        reason = _reason(timed_out, rc, stderr, mech == "bwrap")
        return SandboxResult(ok=reason == "", returncode=rc, stdout=stdout, stderr=stderr, reason=reason)
    finally:
        shutil.rmtree(host, ignore_errors=True)


def _reason(timed_out: bool, rc: int | None, stderr: str, bwrap: bool) -> str:
    if timed_out:
        return "timeout"
    if rc == 0:
        return ""
    if rc is not None and rc < 0:
        sig = -rc
        return {signal.SIGXCPU: "cpu", signal.SIGXFSZ: "fsize"}.get(sig, f"signal:{sig}")
    if bwrap and rc == 1 and stderr.startswith("bwrap: "):
        return "sandbox"
    if "[Errno 27] File too large" in stderr:  # Python ignores SIGXFSZ: the write fails with EFBIG
        return "fsize"
    if "MemoryError" in stderr:
        return "memory"
    return f"exit:{rc}"


def check_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The HumanEval program: prompt + completion + tests + `check(entry_point)`."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def run_many(programs: list[str], workers: int = 2, timeout_s: float = 10.0,
             memory_mb: int = 512) -> list[SandboxResult]:
    """Run programs concurrently (threads only wait on child processes)."""
    unsafe = _state["unsafe"]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        return list(ex.map(lambda p: run_code(p, timeout_s=timeout_s, memory_mb=memory_mb, unsafe=unsafe),
                           programs))


def main(argv: list[str] | None = None) -> int:
    """Script entry: a JSON list of programs on stdin -> a JSON list of SandboxResult on stdout."""
    import argparse

    p = argparse.ArgumentParser(description="run Python programs in the dsv3 sandbox")
    p.add_argument("--probe", action="store_true", help="print the mechanism (or why none) and exit")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--memory-mb", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(UNSAFE_FLAG, dest="unsafe", action="store_true", help="run uncontained if no mechanism")
    a = p.parse_args(argv)
    if a.probe:
        print(json.dumps(describe()))
        return 0
    programs = json.load(sys.stdin)
    try:
        with allow_unsafe(a.unsafe):
            res = run_many(programs, workers=a.workers, timeout_s=a.timeout, memory_mb=a.memory_mb)
    except SandboxUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(json.dumps([asdict(r) for r in res]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
