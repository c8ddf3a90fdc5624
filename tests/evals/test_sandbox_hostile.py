"""Hostile model-written programs, in both modes (root: CI; user: an unprivileged uid), each checked
from OUTSIDE the sandbox: the victim files still there and unchanged, nothing written outside, no
connection accepted by a loopback listener of the test, the secret not in the output, no
straggler process left. The controls at the end run the same attacks with every mechanism
disabled (`--unsafe-no-sandbox`) and see them land, so these checks can fail."""

import contextlib
import os
import random
import socket
import time
from pathlib import Path

import pytest

from dsv3.evals.sandbox import MAX_OUTPUT, TMPFS_MB
from tests.evals.sandbox_modes import mode, processes_with  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
REPO_LINE = 'dsv3 = "dsv3.cli:main"'  # a line of pyproject.toml: the project dir must not be visible


def _sleep_token() -> str:
    return f"{random.randrange(10**6, 10**7)}.{random.randrange(10**3)}"


def _gone(token: str, within_s: float = 3.0) -> bool:
    needle = b"sleep\0" + token.encode()
    deadline = time.time() + within_s
    while processes_with(needle):
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture()
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.setblocking(False)
    yield srv
    srv.close()


def _accepted(srv) -> int:
    n = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            srv.accept()[0].close()
            n += 1
    return n


def test_subprocess_rm_and_write_outside(mode):
    v1, v2 = mode.victims
    prog = ("import subprocess\n"
            f"subprocess.run(['sh', '-c', 'rm -f {v1} {v2}; echo pwned > {mode.outside}/new.txt; "
            f"echo pwned >> {v1}; echo pwned > {mode.home}/new.txt'])\nprint('ran')\n")
    r = mode.run1(prog)
    assert "ran" in r.stdout, r.stderr  # the attack was attempted ...
    assert mode.intact()  # ... and nothing outside changed


def test_os_system_into_tmp_and_var_tmp(mode):
    marks = [f"/tmp/dsv3-pwned-{mode.token}", f"/var/tmp/dsv3-pwned-{mode.token}", f"/dev/shm/dsv3-pwned-{mode.token}"]
    prog = "import os\n" + "".join(f"os.system('echo pwned > {m}')\n" for m in marks) + "print('ran')\n"
    r = mode.run1(prog)
    assert "ran" in r.stdout, r.stderr
    assert [m for m in marks if os.path.exists(m)] == []


def test_posix_unlink(mode):
    prog = ("import posix\n" + "".join(f"try:\n    posix.unlink({str(v)!r})\nexcept OSError as e:\n    print(e)\n"
                                       for v in mode.victims) + "print('ran')\n")
    assert "ran" in mode.run1(prog).stdout
    assert mode.intact()


def test_ctypes_unlink_and_create(mode):
    prog = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            + "".join(f"print(libc.unlink({str(v).encode()!r}), ctypes.get_errno())\n" for v in mode.victims)
            + f"print(libc.open({str(mode.outside / 'new.txt').encode()!r}, 0o101, 0o666), ctypes.get_errno())\n")
    r = mode.run1(prog)
    assert r.stdout.count("\n") == 3, r.stderr
    assert mode.intact()


def test_read_users_private_file_and_project(mode):
    paths = [str(mode.secret), str(REPO / "pyproject.toml")]
    prog = ("import subprocess\n" + "".join(f"try:\n    print(open({p!r}).read())\nexcept OSError as e:\n    print(e)\n"
                                           for p in paths)
            + f"subprocess.run(['cat', {paths[0]!r}, {paths[1]!r}])\nprint('ran')\n")
    r = mode.run1(prog)
    assert "ran" in r.stdout
    out = r.stdout + r.stderr
    assert mode.token not in out and REPO_LINE not in out


def test_no_connection_to_loopback_listener(mode, listener):
    port = listener.getsockname()[1]
    prog = ("import ctypes, socket, struct\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('CONNECTED')\n"
            "except OSError as e:\n    print('refused', e)\n"
            "libc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n"
            f"addr = struct.pack('=H', 2) + struct.pack('!H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)\n"
            "print('CONNECTED' if libc.connect(fd, addr, 16) == 0 else 'refused')\n")
    r = mode.run1(prog)
    assert "CONNECTED" not in r.stdout and r.stdout.count("refused") >= 2, (r.stdout, r.stderr)
    assert _accepted(listener) == 0


def test_fork_bomb(mode):
    tok = _sleep_token()
    prog = ("import os\nwhile True:\n    try:\n"
            f"        if os.fork() == 0 and os.getpid() % 2:\n            os.execvp('sleep', ['sleep', '{tok}'])\n"
            "    except OSError:\n        pass\n")
    t = time.time()
    r = mode.run1(prog, timeout_s=3)
    assert not r.ok and r.reason == "timeout"
    assert time.time() - t < 15
    assert _gone(tok)


def test_ten_gb_allocation(mode):
    r = mode.run1("x = bytearray(10 * 1024 ** 3)\nprint('allocated')\n")
    assert not r.ok and r.reason == "memory" and "allocated" not in r.stdout


def test_private_tmp_is_size_capped(mode):
    prog = ("n = 0\ntry:\n    for i in range(1000):\n        with open(f'/tmp/f{i}', 'wb') as f:\n"
            "            for _ in range(8):\n                f.write(bytes(1 << 20))\n                n += 1\n"
            "except OSError as e:\n    print('stopped', n, e.errno)\n")
    r = mode.run1(prog)
    stopped, n, errno = r.stdout.split()
    assert stopped == "stopped" and int(errno) == 28 and int(n) <= TMPFS_MB  # ENOSPC at the cap


def test_infinite_print_loop_is_bounded(mode):
    t = time.time()
    r = mode.run1("while True:\n    print('x' * 1000)\n", timeout_s=5)
    assert not r.ok and r.reason in ("fsize", "timeout")
    assert len(r.stdout) <= MAX_OUTPUT and time.time() - t < 15


def test_setsid_stragglers_die(mode):
    tok = _sleep_token()
    prog = ("import os, subprocess\n"
            f"subprocess.Popen(['setsid', 'sleep', '{tok}'])\n"
            f"subprocess.Popen(['sleep', '{tok}'], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execvp('sleep', ['sleep', '{tok}'])\n    os._exit(0)\n"
            "import time\ntime.sleep(0.3)\nprint('spawned')\n")
    r = mode.run1(prog)
    assert r.ok and "spawned" in r.stdout, r.stderr
    assert _gone(tok)


def test_cannot_signal_processes_outside(mode):
    victim = mode.popen_as_invoker(["sleep", _sleep_token()])
    try:
        prog = f"import os, signal\ntry:\n    os.kill({victim.pid}, 9)\nexcept OSError as e:\n    print(e)\nos.kill(-1, 9)\n"
        mode.run1(prog)
        time.sleep(0.2)
        assert victim.poll() is None  # still running
    finally:
        victim.kill()
        victim.wait()


def test_nested_namespace_cannot_remount_or_unmount(mode):
    # a new user + mount namespace inside (where permitted) gives capabilities over the copies of the
    # mounts only: the read-only flags and the mounts over hidden paths are locked
    mark = f"/usr/dsv3-pwned-{mode.token}"
    prog = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print('unshare', libc.unshare(0x10000000 | 0x00020000), ctypes.get_errno())\n"
            "print('remount', libc.mount(None, b'/usr', None, 32 | 4096, None), ctypes.get_errno())\n"
            "print('umount', libc.umount2(b'/tmp', 2), libc.umount2(b'/usr', 2), ctypes.get_errno())\n"
            f"try:\n    open({mark!r}, 'w').write('x')\nexcept OSError as e:\n    print(e)\nprint('ran')\n")
    r = mode.run1(prog)
    assert "ran" in r.stdout, r.stderr
    assert "remount -1" in r.stdout and not os.path.exists(mark)


# ---- controls: with no mechanism and the override, the same attacks land (the checks have teeth)

def test_controls_without_sandbox_attacks_land(mode, listener):
    mark = f"/tmp/dsv3-pwned-{mode.token}"
    port = listener.getsockname()[1]
    tok = _sleep_token()
    progs = [f"import os\nos.system('echo pwned > {mark}')\n",
             f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
             f"print(open({str(mode.secret)!r}).read())\n",
             f"import subprocess\nsubprocess.Popen(['setsid', 'sleep', '{tok}'])\n"]
    try:
        res = mode.run(progs, unsafe=True, mechanisms="none")
        assert os.path.exists(mark)  # host /tmp written
        assert _accepted(listener) == 1  # the listener got the connection
        if mode.name == "user":  # the user's own 0600 file is readable, its stragglers outlive the run
            assert mode.token in res[2].stdout
            assert processes_with(b"sleep\0" + tok.encode())
        else:  # root without a mechanism still drops to a throw-away uid and kills its processes
            assert not res[2].ok and mode.token not in res[2].stdout + res[2].stderr
            assert _gone(tok)
    finally:
        with contextlib.suppress(OSError):
            os.remove(mark)
        for pid in processes_with(b"sleep\0" + tok.encode()):
            os.kill(pid, 9)
