"""`dsv3 sft-data | sft | reward | grpo | distill`: each post-training stage on its own (DeepSeek-V3 §5).

Every command takes the run config (`--config` YAML + `--set key=value`), an input
checkpoint URI (path, runs:/, models:/) and an output directory, and is one MLflow run
(`dsv3.posttrain.stages`). `dsv3 sft` generates the SFT data first unless `--data`
points at an existing `sft_train.jsonl` (its `sft_val.jsonl` sibling is the validation set).

`dsv3 sft-data --out DIR` only writes the SFT data (no MLflow run): the programmatic
records, or rejection-sampled ones with `--teacher` / `posttrain.data.teacher`, plus a
deterministic counts file (`--stats`, default `DIR_stats.json`). It is the DVC stage
`sft_data` (dvc.yaml), which reads `posttrain.data.*` from params.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path


def _cfg(a):
    from dsv3.config import RunConfig

    return RunConfig.load(a.config, a.set)


def _data(cfg, path: str | None) -> dict:
    from dsv3.posttrain import stages

    if path:
        p = Path(path)
        return {"train": str(p), "val": str(p.with_name("sft_val.jsonl"))}
    return stages.stage_data(cfg)


def _print(res: dict) -> int:
    print(json.dumps({k: v for k, v in res.items() if k not in ("history", "records")}, indent=2, default=str))
    return 0


def _sft_data(a) -> int:
    from dsv3.posttrain import stages

    res = stages.generate_sft_data(_cfg(a), a.out, teacher_uri=a.teacher)
    out = Path(a.out)
    stats = Path(a.stats) if a.stats else out.with_name(out.name + "_stats.json")
    keep = ("n_train", "n_val", "kinds_train", "kinds_val", "sha256", "rejection")
    stats.write_text(json.dumps({k: res[k] for k in keep if k in res}, indent=2, sort_keys=True) + "\n")
    return _print(res)


def _sft(a) -> int:
    from dsv3.posttrain import stages

    cfg = _cfg(a)
    init = a.init or cfg.posttrain.init or stages.fresh_init(cfg, Path(a.out) / "init")
    return _print(stages.stage_sft(cfg, init, _data(cfg, a.data), a.out))


def _reward(a) -> int:
    from dsv3.posttrain import stages

    cfg = _cfg(a)
    return _print(stages.stage_reward(cfg, a.init, _data(cfg, a.data), a.out))


def _grpo(a) -> int:
    from dsv3.posttrain import stages

    res = stages.stage_grpo(_cfg(a), a.init, a.out, rm_uri=a.reward_model)
    for i, h in enumerate(res["history"], 1):
        print(f"step {i:4d} reward {h['grpo/reward_mean']:.3f} kl {h['grpo/kl']:.4f} "
              f"clip {h['grpo/clip_frac']:.3f} len {h['grpo/resp_len']:.1f} entropy {h['grpo/entropy']:.3f}")
    return _print(res)


def _distill(a) -> int:
    from dsv3.posttrain import stages

    cfg = _cfg(a)
    if a.mode:
        cfg.posttrain.distill.mode = a.mode
    return _print(stages.stage_distill(cfg, a.init, a.teacher, _data(cfg, a.data), a.out))


def register(sub) -> None:
    def common(p, init_required=True):
        p.add_argument("--config", default=None, help="RunConfig YAML")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--init", required=init_required, help="input checkpoint (path / runs:/ / models:/)")
        p.add_argument("--out", required=True, help="output checkpoint directory")

    p = sub.add_parser("sft-data", help="generate the SFT data: JSONL + provenance + counts (§5.1; DVC stage)")
    p.add_argument("--config", default=None, help="RunConfig YAML (params.yaml works: posttrain.data.*)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="output folder (sft_train/sft_val .jsonl + .meta.json)")
    p.add_argument("--stats", default=None, help="counts JSON (default: <out>_stats.json, a DVC metric)")
    p.add_argument("--teacher", default=None, help="rejection-sample from this checkpoint (default: none)")
    p.set_defaults(func=_sft_data)

    p = sub.add_parser("sft", help="supervised fine-tuning on generated chat data (§5.1)")
    common(p, init_required=False)
    p.add_argument("--data", default=None, help="existing sft_train.jsonl (default: generate)")
    p.set_defaults(func=_sft)

    p = sub.add_parser("reward", help="train a Bradley-Terry reward model on preference pairs (§5.2.1)")
    common(p)
    p.add_argument("--data", default=None)
    p.set_defaults(func=_reward)

    p = sub.add_parser("grpo", help="GRPO on the built-in arithmetic task (§5.2.2)")
    common(p)
    p.add_argument("--reward-model", default=None, help="reward model dir (used if reward.model_weight > 0)")
    p.set_defaults(func=_grpo)

    p = sub.add_parser("distill", help="sequence- / token-level distillation from a teacher (§5.4.1)")
    common(p)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (dsv3 or HF causal LM, same tokenizer)")
    p.add_argument("--mode", choices=["sequence", "token", "both"], default=None)
    p.add_argument("--data", default=None)
    p.set_defaults(func=_distill)
