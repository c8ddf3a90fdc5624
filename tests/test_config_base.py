"""dsv3.config_base: the one loader (YAML + `--set` + flags), its error text, `flatten`, `write_params`."""

from pathlib import Path

import pytest
import yaml

from dsv3.config import RunConfig
from dsv3.config_base import flatten, load_config, write_params
from dsv3.data.config import DataConfig
from dsv3.errors import CheckpointError, ConfigError

ROOT = Path(__file__).parents[1]


def _yaml(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_file_then_overrides_then_values(tmp_path):
    p = _yaml(tmp_path, "preset: tiny\ntrain: {steps: 5, seq_len: 32}\neval: {tasks: [mmlu]}\n")
    cfg = load_config(RunConfig, p, ["train.steps=7", "eval.tasks=[drop, humaneval]", "eval.limit=null",
                              "posttrain.init=@weird/path"], values={"train.seq_len": 64, "train.lr": None})
    assert (cfg.train.steps, cfg.train.seq_len) == (7, 64)
    assert cfg.eval.tasks == ["drop", "humaneval"] and cfg.eval.limit is None
    assert cfg.posttrain.init == "@weird/path"  # not YAML: kept as the text given
    assert cfg.model.hidden_size == 64  # the tiny preset
    assert cfg.train.lr == RunConfig().train.lr  # a None flag leaves the key alone


@pytest.mark.parametrize("text,sets,expect", [
    ("train: {stepz: 3}\n", [], "train.stepz: unknown key (did you mean 'train.steps'?)"),
    ("", ["trian.steps=3"], "trian: unknown key (did you mean 'train'?)"),
    ("", ["posttrain.sft.max_stepz=3"], "posttrain.sft.max_stepz: unknown key (did you mean 'posttrain.sft.max_steps'?)"),
    ("", ["train.steps=many"], "train.steps: Input should be a valid integer, unable to parse string as an integer "
                               "(got 'many')"),
    ("", ["preset=huge"], "unknown model preset 'huge'"),
    ("train: [1, 2\n", [], "invalid YAML at line 2"),
    ("- a\n- b\n", [], "top level must be a mapping"),
    ("", ["train.steps"], "override 'train.steps' must look like key.path=value"),
    ("", ["=3"], "no key before '='"),
    ("", ["train..steps=3"], "empty component"),
    ("train: {steps: 3}\n", ["train.steps.x=3"], "'train.steps' is a value, not a section"),
])
def test_errors_name_the_key(tmp_path, text, sets, expect):
    with pytest.raises(ConfigError) as e:
        RunConfig.load(_yaml(tmp_path, text), sets)
    assert expect in str(e.value)


def test_missing_file_and_several_errors_at_once(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        RunConfig.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as e:
        RunConfig.load(None, ["train.stepz=1", "eval.limit=0"])
    assert "train.stepz: unknown key" in str(e.value) and "eval.limit: Input should be greater than or equal to 1" \
        in str(e.value)


def test_section_loading_refuses_keys_outside_the_section(tmp_path):
    p = _yaml(tmp_path, "data: {seq_len: 128}\ntrain: {steps: 1}\n")
    assert load_config(DataConfig, p, ["data.dedup.bands=20"], section="data").dedup.bands == 20
    assert load_config(DataConfig, p, section="data").seq_len == 128
    with pytest.raises(ConfigError, match=r"reads only the 'data' section.*did you mean 'data.dedup.bands'"):
        load_config(DataConfig, p, ["dedup.bands=20"], section="data")
    with pytest.raises(ConfigError, match="data.dedup.bandz: unknown key \\(did you mean 'data.dedup.bands'\\?\\)"):
        load_config(DataConfig, p, ["data.dedup.bandz=20"], section="data")
    with pytest.raises(ConfigError, match="data: must be a mapping of DataConfig fields"):
        load_config(DataConfig, _yaml(tmp_path, "data: 3\n"), section="data")


def test_flatten_is_the_dotted_view():
    cfg = RunConfig.load(None, ["preset=tiny", "eval.num_fewshot={}"])
    flat = flatten(cfg)
    assert flat == cfg.flatten()
    assert flat["train.steps"] == cfg.train.steps and flat["model.hidden_size"] == 64
    assert flat["eval.num_fewshot"] == {}  # an empty mapping stays a key
    assert flatten({"a": {"b": {"c": 1}, "d": [1, 2]}}) == {"a.b.c": 1, "a.d": [1, 2]}
    assert not any(isinstance(v, dict) and v for v in flat.values())


def test_write_params_replaces_sections_in_place(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    before = p.read_text()
    write_params(p, {"data": DataConfig(seq_len=256)})
    after = p.read_text()
    assert yaml.safe_load(after)["data"]["seq_len"] == 256
    assert yaml.safe_load(after)["posttrain"] == yaml.safe_load(before)["posttrain"]
    assert [x for x in after.splitlines() if x.startswith("#")] == [x for x in before.splitlines() if x.startswith("#")]
    write_params(p, {"data": DataConfig.model_validate(yaml.safe_load(before)["data"])})
    assert p.read_text() == before  # the same values: the same file, byte for byte
    RunConfig.load(None, ["preset=tiny"]).write_params(p, ["eval"])
    assert yaml.safe_load(p.read_text())["eval"]["tasks"] == ["mmlu", "drop", "humaneval"]
    bad = _yaml(tmp_path, "data: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        write_params(bad, {"data": DataConfig()})
    assert bad.read_text() == "data: [1\n"


def test_errors_live_in_one_place():
    import dsv3
    import dsv3.config
    import dsv3.model.config
    import dsv3.model.hf

    assert dsv3.ConfigError is dsv3.model.config.ConfigError is dsv3.config.ConfigError is ConfigError
    assert dsv3.model.hf.CheckpointError is CheckpointError and issubclass(ConfigError, ValueError)
