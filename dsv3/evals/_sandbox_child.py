"""Sandbox launcher, run as `python -I -S -B _sandbox_child.py UID CPU_S MEM_MB NPROC PROGRAM`.

Runs inside the child process, before any untrusted code: (1) a private, empty network
namespace (`unshare(CLONE_NEWNET)`, needs root; skipped with a note on stderr when not
permitted), (2) resource limits, (3) drop to a throw-away uid/gid (root only), so that
RLIMIT_NPROC is enforced (root ignores it) and nothing outside the working directory is
writable, (4) an audit hook that refuses sockets and destructive file operations outside
the working directory, then (5) runs PROGRAM as `__main__` with runpy.
Kept stdlib-only and free of dsv3 imports so that `-I -S` startup stays ~20 ms.
"""

import ctypes
import os
import resource
import runpy
import sys

CLONE_NEWNET = 0x40000000
# Imported while still privileged: after the uid drop the interpreter's stdlib (under /root)
# is unreadable, so untrusted code can import exactly these (and what they pull in).
PRELOAD = ("pkgutil typing math cmath random copy string collections re hashlib itertools functools "
           "heapq bisect operator statistics fractions decimal numbers json datetime time textwrap "
           "unicodedata array dataclasses enum abc io struct sys os socket shutil pathlib glob").split()


def _limits(cpu_s: int, mem_mb: int, nproc: int) -> None:
    mb = 1024 * 1024
    for res, val in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, mem_mb * mb),
                     (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_FSIZE, 16 * mb),
                     (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (val, val))


def _guard(root: str):
    root = os.path.realpath(root)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path) -> bool:
        try:
            p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "/proc/self/fd")
        except Exception:
            return False
        return p == root or p.startswith(root + os.sep) or p == os.devnull

    def hook(event: str, args) -> None:
        if event.startswith("socket."):
            raise PermissionError(f"sandbox: network access denied ({event})")
        if event in ("os.remove", "os.rmdir", "os.rename", "os.chmod", "os.chown", "os.truncate",
                     "shutil.rmtree", "os.link", "os.symlink", "os.mkdir"):
            if not args or isinstance(args[0], int) or not inside(args[0]):
                raise PermissionError(f"sandbox: {event} outside the working directory denied")
        elif event == "open" and len(args) >= 3 and isinstance(args[0], (str, bytes)):
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writing and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory denied")

    return hook


def main() -> None:
    uid, cpu_s, mem_mb, nproc, program = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \
        int(sys.argv[4]), sys.argv[5]
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            print("sandbox: warning: unshare(CLONE_NEWNET) failed; audit hook only", file=sys.stderr)
    if os.geteuid() == 0 and uid > 0:
        for name in PRELOAD:
            __import__(name)
    _limits(cpu_s, mem_mb, nproc)
    if os.geteuid() == 0 and uid > 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    sys.addaudithook(_guard(os.getcwd()))
    sys.argv = [program]
    sys.path.insert(0, os.getcwd())
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main()
