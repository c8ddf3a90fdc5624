"""`dsv3 pretrain` / `dsv3 extend`: registered, and config errors name the bad key."""

from dsv3.cli import build_parser, main


def test_commands_registered_and_bad_key(capsys):
    sub = build_parser()._subparsers._group_actions[0].choices
    assert {"pretrain", "extend"} <= set(sub)
    assert main(["pretrain", "--config", "configs/pretrain_tiny.yaml", "--set", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and "train.steps" in err
    assert main(["pretrain", "--config", "configs/pretrain_small.yaml", "--set", "train.precision=fp16"]) == 2
    assert "train.precision" in capsys.readouterr().err
