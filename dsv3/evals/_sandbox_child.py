"""Sandbox launcher: `python -I -S -B _sandbox_child.py UID CPU_S MEM_MB NPROC FSIZE_MB PRELOAD PROGRAM`.

Runs inside the sandbox (see sandbox.py), before any untrusted code: (1) with PRELOAD=1 (the
uncontained root mode, where the interpreter's stdlib may sit under an unreadable /root) imports
the common stdlib modules while still privileged, (2) sets the resource limits, (3) as root with
UID > 0: drops supplementary groups, gid and uid to the throw-away UID and checks that no
capability is left (refuses to run otherwise), (4) runs PROGRAM as `__main__` with runpy.
Stdlib-only and free of dsv3 imports so that `-I -S` startup stays ~20 ms.
"""

import os
import resource
import runpy
import sys

PRELOAD = ("pkgutil typing math cmath random copy string collections re hashlib itertools functools "
           "heapq bisect operator statistics fractions decimal numbers json datetime time textwrap "
           "unicodedata array dataclasses enum abc io struct sys os socket shutil pathlib glob encodings.idna "
           "subprocess").split()


def _limits(cpu_s: int, mem_mb: int, nproc: int, fsize_mb: int) -> None:
    mb = 1024 * 1024
    for res, val in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, mem_mb * mb),
                     (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_FSIZE, fsize_mb * mb),
                     (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (val, val))


def _drop(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    with open("/proc/self/status") as f:
        caps = {k: v.strip() for k, _, v in (ln.partition(":") for ln in f) if k in ("CapEff", "CapPrm")}
    if os.getuid() != uid or any(int(v, 16) for v in caps.values()):
        sys.exit(f"sandbox: uid drop failed (uid {os.getuid()}, {caps}); refusing to run")


def main() -> None:
    uid, cpu_s, mem_mb, nproc, fsize_mb, preload = (int(x) for x in sys.argv[1:7])
    program = sys.argv[7]
    root = os.geteuid() == 0 and uid > 0
    if root and preload:
        for name in PRELOAD:
            __import__(name)
    _limits(cpu_s, mem_mb, nproc, fsize_mb)
    if root:
        _drop(uid)
    sys.argv = [program]
    sys.path.insert(0, os.getcwd())
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main()
