"""Registry hand-off: stage models chained by `parent_model`, lineage tags (never "None"),
`candidate` / `champion` aliases, resolution by alias, clear errors, eval metrics on the
logged model and the eval run, the experiment marked as model training."""

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from dsv3 import tracking

from .conftest import FLOW_RUN_ID


def _versions(client):
    return [v for rm in client.search_registered_models() for v in client.search_model_versions(f"name='{rm.name}'")]


def test_stage_versions_chain_by_parent_model_with_lineage_tags(chain):
    client = MlflowClient()
    runs, sections = chain["runs"], chain["sections"]
    mv = {s: client.get_model_version(f"dsv3-{s}", chain["models"][s].version) for s in ("base", "long", "chat")}
    assert "parent_model" not in mv["base"].tags
    assert mv["long"].tags["parent_model"] == f"models:/dsv3-base/{mv['base'].version}"
    assert mv["chat"].tags["parent_model"] == f"models:/dsv3-long/{mv['long'].version}"
    for s, v in mv.items():
        t = v.tags
        assert set(tracking.LINEAGE_TAGS) - {"parent_model"} <= set(t), (s, t)
        assert t["mlflow_run_id"] == runs[s] == v.run_id
        assert t["prefect_flow_run_id"] == FLOW_RUN_ID
        assert t["config_digest"] == tracking.config_digest(sections[s])
        assert len(t["git_commit"]) == 40 and t["stage"] == s
        # the logged model behind the version carries the same lineage
        lm = client.get_logged_model(chain["models"][s].model_id)
        assert lm.source_run_id == runs[s] and v.source == f"models:/{lm.model_id}"
        assert {k: lm.tags[k] for k in t} == dict(t)
    # the data digest was tagged on the lifecycle run and found from the stage runs; chat's was given
    assert mv["base"].tags["dvc_data_digest"] == mv["long"].tags["dvc_data_digest"] == "a3f9c2d1e5b7a3f9c2d1e5b7a3f9c2d1"
    assert mv["chat"].tags["dvc_data_digest"] == "5ft-sha256-of-sft-data"
    assert len({v.tags["config_digest"] for v in mv.values()}) == 3


def test_no_tag_reads_none(chain):
    client = MlflowClient()
    exp = client.get_experiment_by_name("dsv3")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) >= 4
    tagged = [("run " + r.info.run_id, r.data.tags) for r in runs]
    tagged += [(f"version {v.name}/{v.version}", v.tags) for v in _versions(client)]
    tagged += [("logged model " + m.model_id, m.tags) for m in client.search_logged_models([exp.experiment_id])]
    tagged += [("experiment", exp.tags)]
    bad = [(who, k) for who, tags in tagged for k, v in tags.items() if v in ("None", "", None)]
    assert not bad, bad


def test_resolve_by_alias_gives_the_registered_hf_directory(chain):
    import torch

    from dsv3 import DeepSeekV3

    long_ = chain["models"]["long"]
    assert tracking.resolve_stage_model("dsv3-long") == long_.uri  # no champion: the candidate
    assert tracking.concrete_model_uri("models:/dsv3-long@candidate") == long_.uri
    assert tracking.concrete_model_uri("models:/dsv3-long/latest") == long_.uri
    d = tracking.resolve_model_uri("models:/dsv3-long@candidate")
    assert d != str(chain["dirs"]["long"])  # read back from the store, not the source folder
    a, b = DeepSeekV3.from_pretrained(d).state_dict(), DeepSeekV3.from_pretrained(chain["dirs"]["long"]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open(os.path.join(d, "tokenizer.json")).read() == (chain["dirs"]["long"] / "tokenizer.json").read_text()
    # the logged model id works as a URI too, and a copy can be requested
    assert tracking.resolve_model_uri(f"models:/{long_.model_id}") == d
    copy = tracking.resolve_model_uri(long_.uri, dst=chain["root"] / "copy")
    assert copy.startswith(str(chain["root"] / "copy")) and os.path.isfile(os.path.join(copy, "config.json"))


def test_eval_metrics_on_the_run_and_the_logged_model(chain):
    client = MlflowClient()
    chat = chain["models"]["chat"]
    metrics = {"eval/bpb": 2.25, "eval/exact_answer/acc": 0.375}
    with tracking.start_run({"eval.limit": 4}, stage="eval", parent_run_id=chain["runs"]["chat"]) as run:
        tags = tracking.log_eval_metrics(metrics, "models:/dsv3-chat@candidate")
    r = client.get_run(run.info.run_id)
    assert r.data.tags["model_name"] == "dsv3-chat" and r.data.tags["model_version"] == chat.version
    assert r.data.tags["model_uri"] == chat.uri == tags["model_uri"]  # the concrete version, not the alias
    assert r.data.metrics == pytest.approx(metrics)
    assert [m.model_id for m in r.inputs.model_inputs] == [chat.model_id]
    lm = client.get_logged_model(chat.model_id)
    on_model = {m.key: (m.value, m.run_id) for m in lm.metrics}
    assert {k: on_model[k] for k in metrics} == {k: (v, run.info.run_id) for k, v in metrics.items()}
    # the other stages' models did not get them
    assert not {m.key for m in client.get_logged_model(chain["models"]["long"].model_id).metrics or []} & set(metrics)


def test_experiment_is_marked_model_training(store):
    client = MlflowClient()
    eid = tracking.setup()
    assert client.get_experiment(eid).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING
    # a kind the user chose in the UI is kept
    other = client.create_experiment("genai-notes")
    client.set_experiment_tag(other, tracking.EXPERIMENT_KIND_TAG, "genai_development")
    tracking.setup(experiment="genai-notes")
    assert client.get_experiment(other).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"
    url = tracking.experiment_url("http://127.0.0.1:5000/", eid)
    assert url == f"http://127.0.0.1:5000/#/experiments/{eid}/runs?workflowType=machine_learning"


def test_aliases_move_to_the_newest_and_promotion(store, hf_model):
    from .conftest import next_stage

    with tracking.start_run({"x": 1}, stage="base"):
        v1 = tracking.register_stage_model(hf_model, "dsv3-base")
    uri, why = tracking.furthest_stage_model()
    assert uri == v1.uri and "dsv3-base@candidate" in why
    with tracking.start_run({"x": 2}, stage="base"):
        d2 = next_stage(v1.uri, store / "v2", noise=0.02)
        v2 = tracking.register_stage_model(d2, "dsv3-base", parent_model=v1.uri)
    assert (v1.version, v2.version) == ("1", "2")
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("dsv3-base", "candidate").version) == "2"
    assert tracking.resolve_stage_model("dsv3-base") == "models:/dsv3-base/2"
    assert tracking.promote("dsv3-base", 1) == "models:/dsv3-base/1"
    assert tracking.resolve_stage_model("dsv3-base") == "models:/dsv3-base/1"  # champion first
    assert tracking.resolve_stage_model("dsv3-base", prefer=("candidate",)) == "models:/dsv3-base/2"
    assert tracking.resolve_stage_model("dsv3-long") is None
    # a chat model: the furthest stage wins; its champion wins over every candidate
    with tracking.start_run({"x": 3}, stage="chat"):
        c1 = tracking.register_stage_model(d2, "dsv3-chat", parent_model="models:/dsv3-base@champion")
    assert client.get_model_version("dsv3-chat", c1.version).tags["parent_model"] == "models:/dsv3-base/1"
    assert tracking.furthest_stage_model()[0] == c1.uri
    tracking.promote("dsv3-chat", c1.version)
    uri, why = tracking.furthest_stage_model()
    assert uri == c1.uri and why == "dsv3-chat@champion"


def test_clear_errors_and_nothing_half_registered(store, hf_model, tmp_path):
    import shutil

    with pytest.raises(tracking.ModelNotFound, match=r"no version of dsv3-long has alias champion or candidate"
                       r".*run `make pretrain` or pass --init"):
        tracking.require_stage_model("dsv3-long", hint="run `make pretrain` or pass --init")
    with pytest.raises(tracking.ModelNotFound, match="no registered stage model"):
        tracking.furthest_stage_model()
    with pytest.raises(tracking.ModelNotFound, match="dsv3-base@champion"):
        tracking.concrete_model_uri("models:/dsv3-base@champion")
    with pytest.raises(ValueError, match="not a registry URI"):
        tracking.concrete_model_uri("runs:/abc/model")
    with pytest.raises(RuntimeError, match="needs an active MLflow run"):
        tracking.register_stage_model(hf_model, "dsv3-base")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(hf_model, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with tracking.start_run({"x": 1}, stage="base"):
        with pytest.raises(FileNotFoundError, match="missing tokenizer.json"):
            tracking.register_stage_model(no_tok, "dsv3-base")
    assert MlflowClient().search_registered_models() == []
    with pytest.raises(tracking.ModelNotFound, match="cannot promote dsv3-base version 7"):
        tracking.promote("dsv3-base", 7)


def test_config_digest_is_stable_and_content_addressed():
    from dsv3.config import RunConfig

    a = RunConfig.load(overrides=["train.lr=0.001"])
    b = RunConfig.load(overrides=["train.lr=0.001"])
    c = RunConfig.load(overrides=["train.lr=0.002"])
    assert tracking.config_digest(a.train) == tracking.config_digest(b.train) != tracking.config_digest(c.train)
    assert tracking.config_digest(a.data) == tracking.config_digest(c.data)  # other sections unaffected
    d = a.train.model_dump(mode="json")
    shuffled = json.loads(json.dumps(dict(reversed(list(d.items())))))
    assert tracking.config_digest(shuffled) == tracking.config_digest(a.train)
    assert len(tracking.config_digest(a.train)) == 64 and int(tracking.config_digest(a.train), 16) >= 0


def test_register_model_keeps_its_signature_and_meaning(store, hf_model, tmp_path):
    import shutil
    import warnings

    with tracking.start_run({"x": 1}, stage="pretrain") as run:
        v = tracking.register_model(hf_model, "dsv3")  # the pre-registry entry point
        bare = tmp_path / "bare"
        shutil.copytree(hf_model, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            v2 = tracking.register_model(bare, "dsv3")
    assert (v, v2) == ("1", "2") and "plain folder" in str(w[-1].message)
    sm = tracking.model_version("models:/dsv3/1")
    assert sm.model_id and sm.run_id == run.info.run_id and sm.aliases == ["candidate"]
    assert MlflowClient().get_model_version("dsv3", "2").source.endswith("/artifacts/model")
    for uri, src in (("models:/dsv3/1", hf_model), ("models:/dsv3/latest", bare)):
        d = tracking.resolve_model_uri(uri)
        assert sorted(os.listdir(d)) == sorted(os.listdir(src)), uri
