"""`dsv3 pretrain` and `dsv3 extend` (registered into dsv3/cli.py).

    dsv3 pretrain --config configs/pretrain_small.yaml [--set train.steps=50 ...] [--resume] [--ray]
    dsv3 extend   --config configs/pretrain_small.yaml --from runs/small/checkpoints/step_00000100 [--ray]

Both validate the config first (errors name the bad key) and print the MLflow run id
and the checkpoint path at the end. `--ray` runs the loop on Ray Train with
`parallel.dp` × `parallel.pp` workers (default: in-process, same loop). Pipeline parallelism
(`--set parallel.pp=2 [--set parallel.schedule=dualpipe|dualpipev|1f1b]`, §3.2.1) always runs on Ray:
one worker per pipeline rank (a local Ray cluster on a laptop, the cluster's GPUs elsewhere). So does expert
parallelism (`--set parallel.dp=2 --set parallel.ep=2`, §3.2.2): the dp workers shard the routed experts.
"""

from __future__ import annotations

import json


def _load(a):
    from dsv3.config import RunConfig

    return RunConfig.load(a.config, a.set)


def _pretrain(a) -> int:
    cfg = _load(a)
    if a.ray or cfg.parallel.pp > 1 or cfg.parallel.ep > 1:
        from dsv3.train.launcher import run_training

        res = run_training(cfg, num_workers=a.workers, resume=a.resume)  # GPUs per parallel.use_gpu
    else:
        from dsv3.train.loop import train

        res = train(cfg, resume=a.resume).to_json()
    print(json.dumps({k: res.get(k) for k in ("run_id", "checkpoint", "model_dir", "model_version")}, indent=1))
    return 0


def _extend(a) -> int:
    from dsv3.train.extend import extend

    cfg = _load(a)
    res = extend(cfg, a.init_from, use_ray=a.ray, num_workers=a.workers)
    print(json.dumps({k: res.get(k) for k in ("run_id", "checkpoint", "model_dir", "model_version",
                                               "passkey_before", "passkey_after")}, indent=1))
    return 0


def register(subparsers) -> None:
    for name, fn, helptext in (("pretrain", _pretrain, "pretrain (or resume) from a YAML config"),
                               ("extend", _extend, "YaRN context extension from a checkpoint")):
        p = subparsers.add_parser(name, help=helptext)
        p.add_argument("--config", required=True, help="YAML under configs/")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (dotted), repeatable")
        p.add_argument("--ray", action="store_true", help="run on Ray Train (parallel.dp workers)")
        p.add_argument("--workers", type=int, default=None, help="Ray workers (default parallel.dp)")
        if name == "pretrain":
            p.add_argument("--resume", action="store_true", help="continue from the latest valid checkpoint")
        else:
            p.add_argument("--from", dest="init_from", required=True,
                           help="checkpoint dir, HF dir, runs:/ or models:/ URI")
        p.set_defaults(func=fn)
