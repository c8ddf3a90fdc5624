"""Malformed run configs at every `--config` entry point: `dsv3 pretrain`,
`dsv3 eval run`, `dsv3 sft-data`. Each exits 2 before doing any work, with a message naming the
file (and line, for YAML syntax) or the key at fault. The field-level cases (unknown keys,
wrong types, through `--set` and the config classes) are covered where the configs live: see
the list in this suite's report (tests/model/test_config.py, tests/train/test_cli.py, ...)."""

from __future__ import annotations

import pytest

from dsv3.cli import main

FILES = {
    "syntax": ("model:\n  hidden_size: 64\n  vocab_size: [1, 2\ntrain:\n  steps: 3\n", "invalid YAML", "line 3"),
    "not_mapping": ("- train\n- steps\n", "top level must be a mapping", ""),
    "unknown_key": ("trian:\n  steps: 3\n", "trian: unknown key (did you mean 'train'?)", ""),
    "wrong_type": ("train:\n  steps: many\n", "train.steps: Input should be a valid integer", ""),
    "unknown_nested": ("eval:\n  limt: 3\n", "eval.limt", ""),
}
COMMANDS = {
    "pretrain": lambda cfg, out: ["pretrain", "--config", cfg, "--set", f"train.out_dir={out}"],
    "eval": lambda cfg, out: ["eval", "run", "--config", cfg, "--no-track", "--ckpt", str(out)],
    "sft-data": lambda cfg, out: ["sft-data", "--config", cfg, "--out", str(out)],
}


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(FILES))
def test_bad_config_file_exits_2_naming_the_fault(tmp_path, capsys, cmd, case):
    text, msg, where = FILES[case]
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(COMMANDS[cmd](str(cfg), out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3: config error: ") and msg in err and where in err, err
    if case in ("syntax", "not_mapping"):
        assert str(cfg) in err
    assert not out.exists()  # nothing started, nothing half-written


def test_missing_config_file(tmp_path, capsys):
    assert main(["pretrain", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in capsys.readouterr().err
