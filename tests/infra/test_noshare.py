"""No shared filesystem, for real: pretraining, context extension and SFT against the server-mode stack
(infra/stack.py: PostgreSQL-backed MLflow server with proxied S3 artifacts, moto S3, two Ray nodes with
their own working and temp dirs) brought up in a temp dir.

Every driver is a fresh Python process with only the stack's exports (`source .stack/env`: the storage
URI comes from $DSV3_CHECKPOINT_URI) in its own EMPTY working directory; inputs (shards, tokenizer) were
uploaded to S3 beforehand from a directory the drivers never see, and models are handed on by MLflow
registry URIs. Afterwards each driver's working dir must still be empty: nothing a worker needed (or
wrote) was there. The two-node run places one worker per node (one logical CPU each, SPREAD), kills
one mid-run (Ray Train restarts the group: resume from S3), and is also killed for good and
restarted as a new job with resume=True (resume from S3 again, in another working dir).

Last, the whole tiny lifecycle (`python -m flows.lifecycle`) on the stack, in a checkout of its own:
the MLflow server's registry gets dsv3-base/-long/-chat with lineage, aliases and linked evals, the
Prefect server the flow runs, both Ray nodes a pretraining and an extension worker each, S3 the
checkpoints; the checkout only its data stage's files and the report card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.infra.stack_helpers import REPO

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "pretrain_tiny.yaml")


def _driver(code: str, stack: dict, cwd: Path, cache: Path, timeout: float = 420) -> tuple[dict, str]:
    """Run `code` (which prints one JSON line last) as a driver process in `cwd`; (that JSON, its stdout)."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **stack["env"], "PYTHONPATH": str(REPO), "DSV3_CACHE_DIR": str(cache),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stdout


def _empty(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture(scope="module")
def inputs(stack, tmp_path_factory):
    """Shards and a chat tokenizer built in a private dir, uploaded to the stack's S3 (then deleted), the
    local copies kept only for the single-process reference run."""
    src = tmp_path_factory.mktemp("datasrc")
    out, _ = _driver(f"""
        import json, os
        from dsv3.data.chat import build_chat_tokenizer, load_tokenizer
        from dsv3.posttrain.config import DataGenConfig
        from dsv3.posttrain.sft_data import build_sft_dataset
        from dsv3.train import storage
        from tests.train.conftest import make_shards

        recs = build_sft_dataset(DataGenConfig(n_arithmetic=300, n_algebra=60, n_code=20, seed=1))
        build_chat_tokenizer([r["prompt"] + "\\n" + r["response"] for r in recs], vocab_size=512, out_dir="tok")
        tok = load_tokenizer("tok")
        shards = make_shards("shards", vocab=512, n_docs=200)
        base = os.environ["DSV3_CHECKPOINT_URI"]  # the stack's bucket
        print(json.dumps({{"shards": storage.push_shards(shards, base),
                          "tokenizer": storage.push_dir("tok", base + "/inputs/test-tokenizer"),
                          "ids": [len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]}}))
    """, stack, src, tmp_path_factory.mktemp("upcache"))
    n, bos, eos, pad = out["ids"]
    assert n <= 512
    model = [f"model.bos_token_id={bos}", f"model.eos_token_id={eos}", f"model.pad_token_id={pad}"]
    return {**out, "local_shards": str(src / "shards"), "local_tok": str(src / "tok"), "model": model}


def _overrides(inputs: dict, *extra: str) -> list[str]:
    return [f"train.shards={inputs['shards']}", f"train.tokenizer={inputs['tokenizer']}", "train.out_dir=runs/noshare",
            "train.ckpt_every=2", "train.keep_last=2", "train.plots=false", "train.log_checkpoints=false",
            "train.warmup_frac=0.2", "train.threads=1", "parallel.dp=2", *inputs["model"], *extra]


def _s3(stack):
    sys.path.insert(0, str(REPO / "infra"))
    import stack as stack_mod

    return stack_mod.s3_client(stack["env"])


def _losses(text: str) -> list[float]:
    got = {r["step"]: r["train/loss"] for r in map(json.loads, text.splitlines()) if "train/loss" in r}
    return [got[k] for k in sorted(got)]


RUN = """
    import json
    from dsv3.config import RunConfig
    from dsv3.train.launcher import run_training
    cfg = RunConfig.load({config!r}, {overrides!r})
    try:
        res = run_training(cfg, resume={resume}, placement_strategy="SPREAD")
    except Exception as e:  # a job that ran out of restarts
        res = {{"error": type(e).__name__ + ": " + str(e)[:500]}}
    print(json.dumps(res))
"""


def test_two_node_pretraining_resumes_from_s3_after_a_killed_worker_and_a_job_restart(stack, inputs, tmp_path):
    from dsv3.config import RunConfig
    from dsv3.train.loop import train

    # the reference: one process, local files, no storage
    ref_dir = tmp_path / "ref"
    ref_cfg = RunConfig.load(CONFIG, _overrides(inputs, f"train.out_dir={ref_dir}", f"train.shards={inputs['local_shards']}",
                                                f"train.tokenizer={inputs['local_tok']}", "parallel.dp=1"))
    train(ref_cfg, track=False)
    reference = _losses((ref_dir / "metrics.jsonl").read_text())
    assert len(reference) == 6

    # job 1: rank 1 is SIGKILLed at step 3 and no restart is allowed: the job fails, step 2 is in S3
    d1, d2, cache = tmp_path / "driver1", tmp_path / "driver2", tmp_path / "driver-cache"
    ov1 = _overrides(inputs, "train.debug_kill_rank_at_step=3", "train.max_failures=0")
    out1, _ = _driver(RUN.format(config=CONFIG, overrides=ov1, resume=False), stack, d1, cache)
    assert "error" in out1, out1
    s3 = _s3(stack)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="dsv3-checkpoints", Prefix="runs/noshare/")["Contents"]]
    assert "runs/noshare/checkpoints/step_00000002/manifest.json" in keys
    assert "runs/noshare/launch.json" in keys and "runs/noshare/metrics.jsonl" in keys

    # job 2: a new job in another empty dir resumes from S3 (step 2); rank 1 is killed at step 5, Ray Train
    # restarts the group, which resumes from S3 again (step 4) and finishes
    ov2 = _overrides(inputs, "train.debug_kill_rank_at_step=5", "train.max_failures=1", "train.register_model=true")
    res, stdout = _driver(RUN.format(config=CONFIG, overrides=ov2, resume=True), stack, d2, cache)
    assert "error" not in res, res
    assert "resumed from" in stdout and "step 2)" in stdout, stdout[-3000:]
    assert "worker group restarted (attempt 2)" in stdout and "(step 4)" in stdout, stdout[-3000:]
    assert res["attempt"] == 2
    assert res["checkpoint"] == "s3://dsv3-checkpoints/runs/noshare/checkpoints/step_00000006"
    assert res["model_dir"] == "s3://dsv3-checkpoints/runs/noshare/final" and res["model_version"] == "1"
    # one worker per node, each in its own node's Ray working dir, none in the driver's
    nodes = {w["node_id"] for w in res["workers"]}
    assert len(nodes) == 2, res["workers"]
    ray_dir = (stack["state"] / "ray").resolve()
    tops = {Path(w["cwd"]).resolve().relative_to(ray_dir).parts[0] for w in res["workers"]}
    assert tops == {"head-tmp", "node2-tmp"}, res["workers"]
    # the run in S3: keep_last=2 checkpoints, the whole metrics history equal to one process
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="dsv3-checkpoints", Prefix="runs/noshare/")["Contents"]]
    steps = sorted({k.split("/")[3] for k in keys if k.startswith("runs/noshare/checkpoints/")})
    assert steps == ["step_00000004", "step_00000006"]
    metrics = s3.get_object(Bucket="dsv3-checkpoints", Key="runs/noshare/metrics.jsonl")["Body"].read().decode()
    assert _losses(metrics) == pytest.approx(reference, rel=1e-4)  # DP grads = mean of half-batch grads
    # the drivers' working dirs: nothing there, before or after
    assert _empty(d1) == [] and _empty(d2) == []


def test_extension_stage_from_the_registry_on_two_nodes(stack, inputs, tmp_path):
    d = tmp_path / "driver"
    ov = _overrides(inputs, "train.out_dir=runs/noshare-ext", "train.register_model=true")
    res, stdout = _driver(f"""
        import json
        from dsv3.config import RunConfig
        from dsv3.train.extend import extend
        cfg = RunConfig.load({CONFIG!r}, {ov!r})
        out = extend(cfg, "models:/dsv3-base/1", use_ray=True, num_workers=2)
        print(json.dumps({{k: out[k] for k in ("stages", "model_dir", "model_version", "passkey_after")}}))
    """, stack, d, tmp_path / "driver-cache")
    assert [s["model_dir"] for s in res["stages"]] == [
        "s3://dsv3-checkpoints/runs/noshare-ext/extend_1/final", "s3://dsv3-checkpoints/runs/noshare-ext/extend_2/final"]
    assert all(len({w["node_id"] for w in s["workers"]}) == 2 for s in res["stages"])
    assert res["model_version"] == "1"  # dsv3-long/1, its parent the pretraining test's dsv3-base/1
    assert _empty(d) == []


def test_sft_reads_and_writes_models_through_the_registry(stack, inputs, tmp_path):
    """Post-training runs in its driver: its input is the extended model from the registry server, its
    output a new registered version readable from another empty directory once the scratch is gone."""
    d, scratch = tmp_path / "driver", tmp_path / "scratch"
    pt = ["posttrain.sft.max_steps=3", "posttrain.sft.batch_size=4", f"posttrain.out_dir={scratch}/posttrain",
          f"posttrain.data.out_dir={scratch}/sft-data", *inputs["model"]]
    res, _ = _driver(f"""
        import json
        from dsv3 import tracking
        from dsv3.config import RunConfig
        from dsv3.posttrain import stages
        cfg = RunConfig.load({str(REPO / "configs" / "posttrain_tiny.yaml")!r}, {pt!r})
        data = stages.stage_data(cfg)
        sft = stages.stage_sft(cfg, "models:/dsv3-long/1", data, {str(scratch / "sft")!r})
        with tracking.start_run(cfg, "sft-register"):
            sm = tracking.register_stage_model(sft["ckpt"], "dsv3-sft", parent_model="models:/dsv3-long/1")
        print(json.dumps({{"version": sm.version, "parent": sm.tags.get("parent_model"), "steps": sft["steps"]}}))
    """, stack, d, tmp_path / "driver-cache")
    assert res["parent"] == "models:/dsv3-long/1" and res["steps"] == 3
    import shutil

    shutil.rmtree(scratch)
    d2 = tmp_path / "reader"
    back, _ = _driver(f"""
        import json
        from pathlib import Path
        from dsv3 import tracking
        p = Path(tracking.resolve_model_uri("models:/dsv3-sft/{res['version']}", dst={str(tmp_path / "back")!r}))
        print(json.dumps({{"files": sorted(x.name for x in p.iterdir())}}))
    """, stack, d2, tmp_path / "reader-cache")
    assert "config.json" in back["files"] and "tokenizer.json" in back["files"]
    assert _empty(d) == [] and _empty(d2) == []


# ---------------------------------------------------------------------------------------------------
# The whole lifecycle against the whole stack
LIFECYCLE_SETS = ["lifecycle.use_ray=true", "parallel.dp=2", "train.threads=1", "lifecycle.heldout.n=8",
                  "eval.bpb_max_tokens=1000", "posttrain.sft.max_steps=2", "posttrain.grpo.steps=1"]
MODEL_FILES = (".safetensors", ".pt", ".pth", ".ckpt", "pytorch_model.bin")  # (shards are .bin too)


def _prefect_runs(api: str) -> dict[str, list[dict]]:
    """{flow name: [its flow runs]} on the stack's Prefect server (its REST API)."""
    import urllib.request

    def post(path: str, body: dict) -> list[dict]:
        req = urllib.request.Request(f"{api}/{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    names = {f["id"]: f["name"] for f in post("flows/filter", {"limit": 200})}
    out: dict[str, list[dict]] = {}
    for fr in post("flow_runs/filter", {"limit": 200}):
        out.setdefault(names[fr["flow_id"]], []).append(fr)
    out["artifacts"] = post("artifacts/filter", {"limit": 200})
    return out


def _workers(run) -> list[dict]:
    from dsv3.train.launcher import PLACEMENT_TAG

    return json.loads(run.data.tags[PLACEMENT_TAG])


@pytest.mark.timeout(1200)
def test_lifecycle_on_the_whole_stack(stack, tmp_path):
    """`python -m flows.lifecycle --config configs/lifecycle_tiny.yaml` with only the stack's exports, in a
    checkout of its own (the data stage is DVC's): MLflow server (PostgreSQL + S3 artifacts), Prefect
    server, Ray (two nodes, dp=2: one worker per node, pretraining and extension), checkpoints through
    the S3 storage URI. Afterwards the checkout holds its data and the report card, no checkpoint or
    model: those are in S3 (the run prefixes) and the MLflow artifact store."""
    import time

    from mlflow.tracking import MlflowClient

    from tests.lifecycle.conftest import make_repo

    drv = make_repo(tmp_path / "checkout")
    before = set(_empty(drv))
    env = {**os.environ, **stack["env"], "PYTHONPATH": str(REPO), "DSV3_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    sets = [x for s in LIFECYCLE_SETS for x in ("--set", s)]
    t0 = time.time()
    # -P: the project's code comes from its install (PYTHONPATH here), not from the driver's checkout
    r = subprocess.run([sys.executable, "-P", "-m", "flows.lifecycle", "--config", "configs/lifecycle_tiny.yaml", *sets],
                       cwd=drv, env=env, capture_output=True, text=True, timeout=1200)
    wall = time.time() - t0
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-8000:]}"
    print(f"lifecycle on the stack: {wall:.0f} s")

    # ---- MLflow server: every stage ran; three models with lineage and aliases; evals linked ---------
    client = MlflowClient(stack["env"]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("dsv3").experiment_id
    life = client.search_runs([exp], "tags.stage = 'lifecycle'")
    assert len(life) == 1 and life[0].info.status == "FINISHED", [x.info for x in life]
    tags = life[0].data.tags
    print("stage wall times (s):", {k.rsplit("/", 1)[1]: round(v) for k, v in life[0].data.metrics.items()
                                     if k.startswith("lifecycle/wall_s/")})
    for s in ("data", "pretrain", "extend", "posttrain"):
        assert json.loads(tags[f"lifecycle.stage.{s}"])["status"] == "ran", (s, tags[f"lifecycle.stage.{s}"])
    uris = {m: json.loads(tags[f"lifecycle.stage.{s}"])["model_uri"]
            for s, m in (("pretrain", "base"), ("extend", "long"), ("posttrain", "chat"))}
    # the newest version of each (the tests above registered dsv3-base/1 and dsv3-long/1 on this stack)
    newest = {m: max(int(v.version) for v in client.search_model_versions(f"name='dsv3-{m}'")) for m in uris}
    assert uris == {m: f"models:/dsv3-{m}/{newest[m]}" for m in uris}
    mv = {m: client.get_model_version(f"dsv3-{m}", str(newest[m])) for m in uris}
    assert all(set(v.aliases) == {"candidate", "champion"} for v in mv.values()), {m: v.aliases for m, v in mv.items()}
    assert "parent_model" not in mv["base"].tags
    assert mv["long"].tags["parent_model"] == uris["base"] and mv["chat"].tags["parent_model"] == uris["long"]
    for m, v in mv.items():
        assert all(v.tags.get(k) for k in ("git_commit", "config_digest", "dvc_data_digest", "prefect_flow_run_id",
                                           "mlflow_run_id")), (m, v.tags)
        ev = client.search_runs([exp], f"tags.stage = 'eval' and tags.model_name = 'dsv3-{m}' "
                                       f"and tags.model_version = '{v.version}'")  # not the serve run
        assert len(ev) == 1 and {"eval/bpb", "eval/arith/acc"} <= set(ev[0].data.metrics), (m, ev)
    assert {a.path for a in client.list_artifacts(life[0].info.run_id, "report")} == {"report/report.md",
                                                                                    "report/report.png"}

    # ---- Prefect server: the lifecycle and its subflows, all completed ------------------------------
    runs = _prefect_runs(stack["env"]["PREFECT_API_URL"])
    arts = {a["key"]: a["data"] for a in runs.pop("artifacts") if a.get("key")}
    assert arts["pretrain-progress"] == 100 and arts["grpo-progress"] == 100, arts  # through Ray's queue too
    assert {n: len(v) for n, v in runs.items()} == {"lifecycle": 1, "data": 1, "pretrain": 1, "extend": 1,
                                                      "posttrain": 1, "evaluate": 3, "serve": 1}, runs.keys()
    assert {fr["state_type"] for v in runs.values() for fr in v} == {"COMPLETED"}
    assert mv["base"].tags["prefect_flow_run_id"] in {runs[f][0]["id"] for f in ("lifecycle", "pretrain")}

    # ---- Ray: pretraining and extension each on both nodes, one worker per node, in the node's own dir ---
    ray_dir = (stack["state"] / "ray").resolve()
    trained = [client.get_run(mv["base"].run_id), *client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{mv['long'].run_id}' and tags.stage = 'extend_1'")]
    assert [x.data.tags["stage"] for x in trained] == ["pretrain", "extend_1"]
    for run in trained:
        ws = _workers(run)
        assert len({w["node_id"] for w in ws}) == 2, ws
        assert {Path(w["cwd"]).resolve().relative_to(ray_dir).parts[0] for w in ws} == {"head-tmp", "node2-tmp"}, ws

    # ---- S3: checkpoints, final models, inputs, post-training outputs; MLflow's artifact store --------
    s3 = _s3(stack)
    keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket="dsv3-checkpoints",
                                                                          Prefix="runs/lifecycle-tiny/")
            for o in p.get("Contents", [])]
    for k in ("checkpoints/step_00000006/manifest.json", "final/model.safetensors",
              "extend_1/checkpoints/step_00000002/manifest.json", "extend_1/final/model.safetensors"):
        assert f"runs/lifecycle-tiny/{k}" in keys, (k, sorted(keys))
    pkeys = [o["Key"] for o in s3.list_objects_v2(Bucket="dsv3-checkpoints", Prefix="checkpoints/lifecycle-tiny/")
             .get("Contents", [])]
    assert {k.split("/")[2] for k in pkeys} == {"sft", "reward", "grpo"}, pkeys
    assert client.get_run(mv["chat"].run_id).data.tags["checkpoint_uri"] == \
        "s3://dsv3-checkpoints/checkpoints/lifecycle-tiny/grpo"
    art = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket="dsv3-mlflow")
           for o in p.get("Contents", [])]
    assert sum(k.endswith(".safetensors") for k in art) >= 3, art  # the three stage models (pyfunc hf/)

    # ---- the driver's checkout: its data stage and report card, no checkpoint, no model -------------
    new = sorted(p for p in set(_empty(drv)) - before if (drv / p).is_file())
    print("driver checkout, new:", sorted({"/".join(p.split("/")[:2]) for p in new}))
    assert not [p for p in new if p.endswith(MODEL_FILES) or "final" in Path(p).parts
                or ("checkpoints" in Path(p).parts and not p.startswith("gx/"))], new  # gx/checkpoints: GX's own
    assert {p.split("/")[0] for p in new} <= {"data", "runs", "dvc.lock", "params.yaml", ".dvc", "gx"}, new
    # under runs/: the report card, and the serve step's server log (that server runs beside the driver)
    assert all(p.startswith("runs/lifecycle-tiny/reports") or (p.startswith("runs/serve/") and p.endswith(".log"))
               for p in new if p.startswith("runs/")), new
    assert not (drv / "checkpoints").exists()
