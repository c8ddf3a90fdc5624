"""infra/ checked without a cluster or a docker daemon: every file parses, the image installs the
project line for line as `make install` does, the manifests name commands / configs / paths that
exist (parsed by the project's own CLI parser and config loader, Ray's cluster-config schema,
Prefect's work-pool validator), and the stack's process helpers behave (real processes)."""

from __future__ import annotations

import copy
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
sys.path.insert(0, str(INFRA))
import stack  # noqa: E402
import stack_core  # noqa: E402

IMAGE = "dsv3:latest"


def _yaml(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def _make_vars() -> dict[str, str]:
    """The Makefile's simple assignments (`X ?= v`, `X := v`), with $(Y) expanded."""
    raw = dict(re.findall(r"^([A-Z_]+)\s*[?:]?=\s*(.*?)\s*$", (REPO / "Makefile").read_text(), re.M))
    expand = lambda v: re.sub(r"\$\((\w+)\)", lambda m: expand(raw.get(m.group(1), "")), v)  # noqa: E731
    return {k: expand(v) for k, v in raw.items()}


def test_every_yaml_and_json_file_parses():
    files = [p for p in INFRA.rglob("*") if p.suffix in (".yml", ".yaml", ".json")]
    assert len(files) >= 4
    for p in files:
        docs = [json.loads(p.read_text())] if p.suffix == ".json" else list(yaml.safe_load_all(p.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), p


def test_dockerfile_installs_exactly_as_make_install():
    mk = (REPO / "Makefile").read_text()
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", mk, re.M).group(1)
    make_lines = [ln.strip() for ln in recipe.splitlines() if not ln.strip().startswith("touch")]
    docker = (INFRA / "Dockerfile").read_text()
    run_lines = re.findall(r"^RUN (.*)$", docker, re.M)
    as_docker = [re.sub(r"\$\((\w+)\)", r"$\1", ln) for ln in make_lines]  # $(BIN) -> $BIN
    assert as_docker and all(ln in run_lines for ln in as_docker), (as_docker, run_lines)
    idx = [run_lines.index(ln) for ln in as_docker]
    assert idx == sorted(idx) and idx == list(range(idx[0], idx[0] + len(idx)))  # same order, consecutive
    # the ARG defaults are the Makefile's values (the same CPU torch pin unless overridden)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", docker, re.M))
    mv = _make_vars()
    for var in set(re.findall(r"\$(\w+)", " ".join(as_docker))):
        assert args.get(var) == mv[var], (var, args.get(var), mv[var])
    # the package files the editable install needs are copied before it runs
    install_at = docker.index("-e '.[dev]'")
    for src in ("pyproject.toml", "dsv3"):
        assert (REPO / src).exists() and docker.index(f"COPY {src}" if src == "dsv3" else src) < install_at
    assert "ENV PATH=/opt/dsv3/.venv/bin:$PATH" in docker and "WORKDIR /opt/dsv3" in docker
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".stack" in ignore  # the host's venv must not replace the image's


def _workdir() -> str:
    return re.search(r"^WORKDIR (\S+)$", (INFRA / "Dockerfile").read_text(), re.M).group(1)


def test_compose_waits_on_health_and_creates_the_buckets():
    c = _yaml("docker-compose.mlflow.yml")
    svc = c["services"]
    for name, s in svc.items():
        if name != "create-buckets":  # a one-shot job: its completion is the condition
            assert "test" in s["healthcheck"], name
        for dep, cond in (s.get("depends_on") or {}).items():
            want = "service_completed_successfully" if dep == "create-buckets" else "service_healthy"
            assert dep in svc and cond == {"condition": want}, (name, dep)
        for port in s.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    mb = " ".join(svc["create-buckets"]["command"])
    assert all(f"local/{b}" in mb for b in stack_core.BUCKETS.values()) and "--ignore-existing" in mb
    ml = svc["mlflow"]
    assert ml["image"] == IMAGE and ml["build"] == {"context": "..", "dockerfile": "infra/Dockerfile"}
    assert (INFRA / ml["build"]["context"] / ml["build"]["dockerfile"]).resolve() == INFRA / "Dockerfile"
    assert set(ml["depends_on"]) == {"db", "create-buckets"}
    # the same `mlflow server` options as the stack runs here (values differ: addresses, secrets)
    cmd = ml["command"]
    fake = {"ports": {"postgres": 1, "mlflow": 2}, "secrets": {"pg_user": "u", "pg_password": "p"}}
    ours = stack.mlflow_cmd(stack.StackConfig(), fake)
    assert Path(ours[0]).name == cmd[0] == "mlflow" and ours[1] == cmd[1] == "server"
    assert [a for a in cmd if a.startswith("--")] == [a for a in ours if a.startswith("--")]
    opt = lambda argv, k: argv[argv.index(k) + 1]  # noqa: E731
    assert opt(cmd, "--artifacts-destination") == opt(ours, "--artifacts-destination")
    assert opt(cmd, "--backend-store-uri") == "postgresql://mlflow@db:5432/mlflow"  # password from PGPASSWORD
    assert ml["environment"]["PGPASSWORD"] == svc["db"]["environment"]["POSTGRES_PASSWORD"]
    assert "mlflow:5000" in opt(cmd, "--allowed-hosts")
    assert "5000/health" in " ".join(ml["healthcheck"]["test"])


def test_rayjob_runs_dsv3_pretrain_from_the_image():
    from dsv3.cli import build_parser
    from dsv3.config import RunConfig

    job = _yaml("k8s/rayjob-pretrain.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["dsv3", "pretrain"]
    assert "dsv3 = \"dsv3.cli:main\"" in (REPO / "pyproject.toml").read_text()  # the console script
    args = build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown flag
    assert args.ray and (REPO / args.config).exists()
    cfg = RunConfig.load(REPO / args.config, args.set)  # every --set key is a real config key
    assert cfg.parallel.dp == 2 and cfg.parallel.use_gpu is True
    spec = job["spec"]["rayClusterSpec"]
    import ray

    assert spec["rayVersion"] == ray.__version__
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for ctr in pod["spec"]["containers"]:
            assert ctr["image"] == IMAGE and ctr["workingDir"] == _workdir()
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            for g in spec["workerGroupSpecs"]]
    assert sum(int(g) * grp["replicas"] for g, grp in zip(gpus, spec["workerGroupSpecs"])) >= cfg.parallel.dp


def test_prefect_k8s_work_pool_template_validates_and_renders():
    from prefect._internal.schemas.validators import validate_values_conform_to_schema
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import apply_values

    t = json.loads((INFRA / "k8s" / "prefect-k8s-work-pool.json").read_text())
    validate_base_job_template(t)  # Prefect's own check: every placeholder is a declared variable
    props = t["variables"]["properties"]
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    validate_values_conform_to_schema(defaults, t["variables"], ignore_required=True)
    values = {**defaults, "name": "flow-run-1", "command": "prefect flow-run execute", "env": {"A": "1"}}
    job = apply_values(copy.deepcopy(t["job_configuration"]), values)
    m = job["job_manifest"]
    assert (m["apiVersion"], m["kind"]) == ("batch/v1", "Job")
    ctr = m["spec"]["template"]["spec"]["containers"][0]
    assert ctr["name"] == "prefect-job" and ctr["image"] == IMAGE and ctr["workingDir"] == _workdir()
    assert ctr["envFrom"] == [{"secretRef": {"name": "dsv3-stack"}}] and ctr["args"] == "prefect flow-run execute"
    assert "{{" not in json.dumps(m)  # nothing left unrendered


def test_ray_cluster_config_uses_the_image_and_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    c = _yaml("ray-cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(c)))  # what `ray up` checks before it calls the cloud
    assert c["docker"]["image"] == IMAGE
    assert c["file_mounts"] == {} and not any(c.get(k) for k in ("setup_commands", "head_setup_commands",
                                                                  "worker_setup_commands"))
    text = (INFRA / "ray-cluster.yaml").read_text()
    assert "/home/ray" not in text  # a path only Ray's own image has
    for cmd in c["head_start_ray_commands"] + c["worker_start_ray_commands"]:
        assert cmd.split()[0] == "ray"
    assert f"--workdir {_workdir()}" in " ".join(c["docker"]["run_options"])


def test_commands_in_infra_docs_exist():
    """`make X`, `python -m X`, `dsv3 X`, and repo paths named in infra/*.md are real."""
    from importlib.util import find_spec

    from dsv3.cli import build_parser

    targets = set(re.findall(r"^([a-zA-Z_-]+):", (REPO / "Makefile").read_text(), re.M))
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    for md in INFRA.glob("*.md"):
        code = "\n".join(re.findall(r"```(?:bash)?\n(.*?)```", md.read_text(), re.S)) + md.read_text()
        for t in re.findall(r"\bmake ([a-z][a-z-]+)", code):
            assert t in targets, (md.name, t)
        for mod in re.findall(r"python -m ([\w.]+)", code):
            assert find_spec(mod) is not None, (md.name, mod)
        for sub in re.findall(r"(?m)(?:^\s*|-- |\$ )dsv3 ([a-z][a-z-]*)", code):
            assert sub in subcommands, (md.name, sub)
        paths = re.findall(r"(?<![\w/.-])((?:infra|configs|flows|dsv3|tests)/[\w./-]+"
                           r"\.(?:py|ya?ml|json|sh|md|txt))", code)
        for path in paths:
            assert (REPO / path).exists(), (md.name, path)


# ------------------------------------------------------------------------ stack helpers (fast)
def test_wait_healthy_names_the_part_and_its_log_when_it_dies(tmp_path):
    cfg = stack.StackConfig(state=tmp_path, timeout=30)
    st = stack_core.load_state(cfg)
    stack_core.assign_ports(st)
    stack_core.launch(cfg, st, "doomed", [sys.executable, "-c", "print('port in use: boom'); raise SystemExit(3)"],
                      stack_core.proc_env(cfg, st), tmp_path / "w")
    with pytest.raises(stack.StackError) as e:
        stack_core.wait_healthy(cfg, st, "doomed", lambda: False, "never healthy")
    msg = str(e.value)
    assert "doomed exited" in msg and str(tmp_path / "logs" / "doomed.log") in msg and "boom" in msg


def test_marker_finds_exactly_the_stacks_processes_and_stop_ends_them(tmp_path):
    cfg = stack.StackConfig(state=tmp_path)
    st = stack_core.load_state(cfg)
    stack_core.assign_ports(st)
    # a part whose child detaches into its own session (as Ray's workers do)
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
            " start_new_session=True); time.sleep(60)")
    stack_core.launch(cfg, st, "part", [sys.executable, "-c", code], stack_core.proc_env(cfg, st), tmp_path / "w")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # not the stack's
    try:
        deadline = time.monotonic() + 20
        while len(stack_core.marked_processes(st["id"])) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = {p.pid for p in stack_core.marked_processes(st["id"])}
        assert len(pids) == 2 and st["procs"]["part"]["pid"] in pids and other.pid not in pids
        stack_core.stop_part(st["procs"]["part"], signal.SIGTERM, 10)
        left = stack_core.marked_processes(st["id"])
        assert len(left) == 1  # the detached child outlived its group: only the marker finds it
        for p in left:
            p.kill()
            p.wait(10)
        assert stack_core.marked_processes(st["id"]) == [] and other.poll() is None
    finally:
        other.kill()


def test_ports_and_env(tmp_path):
    cfg = stack.StackConfig(state=tmp_path / ("x" * 60))  # long path: Ray's temp dir moves to /tmp
    st = stack_core.load_state(cfg)
    stack_core.assign_ports(st)
    ports = st["ports"]
    assert set(ports) == set(stack_core.PORTS) and len(set(ports.values())) == len(ports)
    env = stack_core.user_env(cfg, st)
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
    assert env["PREFECT_API_URL"].endswith(f":{ports['prefect']}/api")
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{ports['head_gcs']}"
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] and env["DSV3_DVC_REMOTE"].startswith("s3://")
    tmp = stack_core.ray_tmp(cfg, "head")
    assert len(str(tmp)) <= 40 and (cfg.state / "ray" / "head-tmp").resolve() == tmp.resolve()
    tmp.rmdir()


def test_status_and_env_without_a_stack(tmp_path):
    assert stack.main(["status", "--state", str(tmp_path)]) == 3
    assert stack.main(["env", "--state", str(tmp_path)]) == 1
    assert stack.main(["down", "--state", str(tmp_path)]) == 0
