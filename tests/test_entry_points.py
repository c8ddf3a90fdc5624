"""Every entry point loads its config through dsv3.config_base: the same `--set` semantics and the
same error text naming the key, exit status 2, nothing started. Called in-process through each
command's own main()."""

import importlib
from pathlib import Path

import pytest

# section -> (a misspelt key, its suggestion, an integer field)
KEYS = {"train": ("train.stepz", "train.steps", "train.steps"),
        "data": ("data.seq_lne", "data.seq_len", "data.seq_len"),
        "eval": ("eval.limt", "eval.limit", "eval.limit"),
        "posttrain": ("posttrain.sft.max_stepz", "posttrain.sft.max_steps", "posttrain.sft.max_steps")}


def _dsv3(*head):
    def run(cfg: Path, sets: list[str], tmp: Path) -> int:
        from dsv3.cli import main

        argv = [str(x).replace("{cfg}", str(cfg)).replace("{tmp}", str(tmp)) for x in head]
        return main([*argv, *sets])
    return run


def _flow(name, *head):
    def run(cfg: Path, sets: list[str], tmp: Path) -> int:
        main = importlib.import_module(f"flows.{name}").main
        argv = [str(x).replace("{cfg}", str(cfg)).replace("{tmp}", str(tmp)) for x in head]
        return main([*argv, *sets])
    return run


def _data_module(cfg: Path, sets: list[str], tmp: Path) -> int:
    from dsv3.data.cli import main

    return main(["stage", "curate", "--params", str(cfg), "--out", str(tmp / "out"), *sets])


def _data_flow(cfg: Path, sets: list[str], tmp: Path) -> int:
    from flows.data import main

    (tmp / "params.yaml").write_text(cfg.read_text())  # the flow reads the repo's params.yaml
    return main(["--repo", str(tmp), "--no-validate", *sets])


ENTRY_POINTS = {
    "dsv3 pretrain": ("train", _dsv3("pretrain", "--config", "{cfg}")),
    "dsv3 extend": ("train", _dsv3("extend", "--config", "{cfg}", "--from", "{tmp}/ckpt")),
    "dsv3 data curate": ("data", _dsv3("data", "curate", "--out", "{tmp}/out", "--params", "{cfg}")),
    "dsv3 data stage": ("data", _dsv3("data", "stage", "curate", "--params", "{cfg}", "--out", "{tmp}/out")),
    "python -m dsv3.data.cli": ("data", _data_module),
    "dsv3 eval run": ("eval", _dsv3("eval", "run", "--config", "{cfg}", "--no-track")),
    "dsv3 sft-data": ("posttrain", _dsv3("sft-data", "--config", "{cfg}", "--out", "{tmp}/out")),
    "dsv3 sft": ("posttrain", _dsv3("sft", "--config", "{cfg}", "--out", "{tmp}/out")),
    "dsv3 reward": ("posttrain", _dsv3("reward", "--config", "{cfg}", "--init", "{tmp}/i", "--out", "{tmp}/o")),
    "dsv3 grpo": ("posttrain", _dsv3("grpo", "--config", "{cfg}", "--init", "{tmp}/i", "--out", "{tmp}/o")),
    "dsv3 distill": ("posttrain", _dsv3("distill", "--config", "{cfg}", "--init", "{tmp}/i", "--out", "{tmp}/o",
                                        "--teacher", "{tmp}/t")),
    "flows.data": ("data", _data_flow),
    "flows.pretrain": ("train", _flow("pretrain", "--config", "{cfg}", "--no-data", "--no-ray")),
    "flows.posttrain": ("posttrain", _flow("posttrain", "--config", "{cfg}")),
    "flows.evaluate": ("eval", _flow("evaluate", "--config", "{cfg}", "--no-track")),
    "flows.lifecycle": ("posttrain", _flow("lifecycle", "--config", "{cfg}")),
}

CASES = ["unknown key in --set", "unknown key in the file", "wrong type", "malformed YAML", "bad override"]


def _case(case: str, section: str) -> tuple[str, list[str], str]:
    """(config file text, --set arguments, what stderr must say)"""
    typo, field, int_key = KEYS[section]
    nest = lambda key, v: "".join(f"{p}: {{" for p in key.split(".")[:-1]) + f"{key.split('.')[-1]}: {v}" + \
        "}" * key.count(".")  # noqa: E731  ("a.b.c", 3) -> "a: {b: {c: 3}"}
    unknown = f"{typo}: unknown key (did you mean '{field}'?)"
    if case == "unknown key in --set":
        return "name: t\n", ["--set", f"{typo}=3"], unknown
    if case == "unknown key in the file":
        return nest(typo, 3) + "\n", [], unknown
    if case == "wrong type":
        return "name: t\n", ["--set", f"{int_key}=many"], f"{int_key}: Input should be a valid integer"
    if case == "malformed YAML":
        return f"{section}: [1, 2\nname: t\n", [], "invalid YAML at line"
    return "name: t\n", ["--set", int_key], f"override '{int_key}' must look like key.path=value"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_config_errors_are_the_same_everywhere(entry, case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    section, run = ENTRY_POINTS[entry]
    text, sets, expect = _case(case, section)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    rc = run(cfg, sets, tmp_path)
    err = capsys.readouterr().err
    assert rc == 2, (entry, case, err)
    assert "config error: " in err and expect in err, (entry, case, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()  # nothing started


@pytest.mark.parametrize("entry", ["dsv3 data curate", "dsv3 eval run", "flows.evaluate", "flows.data"])
def test_one_section_commands_refuse_keys_of_other_sections(entry, tmp_path, capsys):
    section, run = ENTRY_POINTS[entry]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("name: t\n")
    short = KEYS[section][1].split(".", 1)[1]  # `seq_len`, `limit`: the key without its section
    assert run(cfg, ["--set", f"{short}=3"], tmp_path) == 2
    err = capsys.readouterr().err
    assert f"reads only the '{section}' section" in err and f"did you mean '{section}.{short}'" in err
