"""Context extension with YaRN in stages (DeepSeek-V3 §4.3), on the same training loop.

The paper extends 4K -> 32K -> 128K in two stages of 1000 steps each, with YaRN
(s = 40, α = 1, β = 32, scaling √t = 0.1 ln s + 1) applied to the decoupled RoPE key
only, at the final pretraining LR 7.3e-6. Scaled down here: `train.extend.stages`
(e.g. factor 4 at 4× the pretraining length, then 16 at 16×). Each stage:
- rewrites `model.rope_scaling` = {"type": "yarn", "factor": s,
  "original_max_position_embeddings": L0, "beta_fast": 32, "beta_slow": 1,
  "mscale": 1.0, "mscale_all_dim": 1.0} and max_position_embeddings = s·L0,
- runs `loop.train` (or the Ray launcher) from the previous stage's checkpoint at the
  stage's sequence length, on the stage's own shards when `stages[i].shards` is set (else
  `train.shards`, the pretraining data), with a constant LR (no warmup/decay; one
  validation batch at the end, no EMA: these stages are short), MTP λ at its late value
  and the routing bias frozen (γ at its late value, 0), as at the end of §4.2,
- is a child MLflow run of one `extend` run, which logs the passkey heatmaps (lengths ×
  depths) of the base model before and of the final model after, the validation loss at
  each probe length before/after (`longctx/...`), and registers the final model as a version of
  `<tracking.registered_model>-long` whose `parent_model` is `init_from` when that is a registry
  URI (`models:/dsv3-base/3`; run_log.register_stage).
Precision: `train.precision` (precision.py, §3.3) holds for the stages (they are `train` runs of the
same config) and for the probes (the model converted, the forwards autocast) alike.

`benchmarks/bench_extend.py` runs this on a small model that can retrieve a passkey at its
pretraining length, against a plain-RoPE control with the same extra training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _tokenizer(cfg):
    from dsv3.train.loop import tokenizer_dir

    path = tokenizer_dir(cfg)
    if path is None:
        return None
    from dsv3.data.tokenizer import check_vocab, load_tokenizer

    tok = load_tokenizer(path)
    check_vocab(tok, cfg.model, tokenizer_name=path, model_name="(run config)")  # a mismatch is an error, not a fallback
    return tok


def stage_config(cfg, i: int, init_from: str, L0: int):
    ex = cfg.train.extend
    stage = ex.stages[i]
    rope_scaling = {"type": "yarn", "factor": float(stage.factor), "original_max_position_embeddings": int(L0),
                    "beta_fast": ex.beta_fast, "beta_slow": ex.beta_slow, "mscale": ex.mscale,
                    "mscale_all_dim": ex.mscale_all_dim}
    mcfg = cfg.model.replace(rope_scaling=rope_scaling,
                             max_position_embeddings=max(int(L0 * stage.factor), stage.seq_len),
                             mtp_loss_weight=cfg.train.mtp_loss_weight_late,
                             bias_update_speed=cfg.train.bias_update_speed_late)
    tcfg = cfg.train.model_copy(update=dict(
        seq_len=stage.seq_len, batch_size=stage.batch_size, shards=stage.shards or cfg.train.shards, steps=stage.steps,
        lr=ex.lr, warmup_frac=0.0,
        constant_until=1.0, decay_until=1.0, tail_switch=1.0, batch_ramp_start=None, micro_batch_size=None,
        init_from=str(init_from), out_dir=str(Path(cfg.train.out_dir) / f"extend_{i + 1}"),
        eval_every=stage.steps, ckpt_every=stage.steps, eval_batches=1, ema=False, register_model=False,
        debug_nan_steps=[],
        debug_kill_rank_at_step=None))
    return cfg.model_copy(update={"model": mcfg, "train": tcfg, "name": f"{cfg.name}-extend{i + 1}"})


def passkey_probe(cfg, cfg_model, model_dir: str, tok=None) -> tuple[np.ndarray, dict]:
    """Passkey grid, and validation loss at each probe length (one window each): the
    long-context perplexity that YaRN is meant to keep flat beyond the trained length.
    In `train.precision` (the model converted, the forwards autocast)."""
    from dsv3.model.transformer import DeepSeekV3
    from dsv3.train.checkpoint import load_model_weights
    from dsv3.train.stream import PackedStream
    from dsv3.train.loop import shard_dir
    from dsv3.train.passkey import passkey_grid
    from dsv3.train.precision import Precision
    from dsv3.train.step import evaluate

    ex, precision = cfg.train.extend, Precision.of(cfg.train.precision)
    model = DeepSeekV3(cfg_model)
    load_model_weights(model, model_dir)
    precision.prepare(model)
    losses = {}
    for length in ex.passkey_lengths:
        try:
            val = PackedStream(shard_dir(cfg), "val", length, shuffle=False)
        except ValueError:  # the split is shorter than the probe length
            continue
        losses[length] = evaluate(model, val, 1, 1, precision)[0]
    grid = passkey_grid(model, ex.passkey_lengths, ex.passkey_depths, ex.passkey_trials, tok, precision=precision)
    return grid, losses


def extend(cfg, init_from: str, parent_run_id: str | None = None, use_ray: bool = False,
           num_workers: int | None = None) -> dict:
    """Run all extension stages from `init_from` (checkpoint dir, HF dir or MLflow URI)."""
    from dsv3 import tracking
    from dsv3.train import plots, storage
    from dsv3.train.loop import train

    ex = cfg.train.extend
    L0 = ex.original_max_position_embeddings or cfg.train.seq_len
    remote = storage.is_remote(str(init_from))  # a checkpoint / model in shared storage (storage.py)
    src = Path(storage.local_dir(str(init_from)) if remote else tracking.resolve_model_uri(init_from))
    base_dir = src / "model" if (src / "model" / "config.json").is_file() else src
    tok = _tokenizer(cfg)
    out: dict = {"stages": []}
    with tracking.start_run(cfg, "extend", run_name=f"{cfg.name}-extend", parent_run_id=parent_run_id,
                            tags={"parent_checkpoint": str(init_from)}) as run:
        out["run_id"] = run.info.run_id
        before, loss_before = passkey_probe(cfg, cfg.model, str(base_dir), tok)
        prev = str(init_from) if remote else str(base_dir)  # the workers fetch a storage URI themselves
        for i in range(len(ex.stages)):
            scfg = stage_config(cfg, i, prev, L0)
            print(f"[extend] stage {i + 1}/{len(ex.stages)}: YaRN factor {ex.stages[i].factor:g}, "
                  f"seq_len {ex.stages[i].seq_len}, {ex.stages[i].steps} steps", flush=True)
            if use_ray:
                from dsv3.train.launcher import run_training

                res = run_training(scfg, num_workers=num_workers, parent_run_id=run.info.run_id,
                                   stage=f"extend_{i + 1}")
            else:
                res = train(scfg, parent_run_id=run.info.run_id, stage=f"extend_{i + 1}").to_json()
            out["stages"].append(res)
            prev = res["model_dir"]
        after, loss_after = passkey_probe(cfg, scfg.model, storage.local_dir(prev), tok)
        for name, grid in (("before", before), ("after", after)):
            fig = plots.heatmap(grid, ex.passkey_lengths, ex.passkey_depths,
                                f"passkey token accuracy ({name} extension)", "needle depth", "context length")
            tracking.log_figure(fig, f"plots/passkey_{name}.png")
            plots.close(fig)
        tracking.log_metrics({"passkey/before_mean": float(before.mean()), "passkey/after_mean": float(after.mean()),
                              **{f"passkey/after/len_{L}": float(after[k].mean())
                                 for k, L in enumerate(ex.passkey_lengths)},
                              **{f"passkey/before/len_{L}": float(before[k].mean())
                                 for k, L in enumerate(ex.passkey_lengths)},
                              **{f"longctx/before/val_loss_len_{L}": v for L, v in loss_before.items()},
                              **{f"longctx/after/val_loss_len_{L}": v for L, v in loss_after.items()}}, step=0)
        tracking.set_tags({"checkpoint_uri": out["stages"][-1]["checkpoint"], "model_dir": prev})
        if cfg.train.register_model:  # dsv3-long, its parent the model the extension started from
            from dsv3.data.version import data_digest
            from dsv3.train.loop import shard_dir
            from dsv3.train.run_log import register_stage

            out["model_uri"] = register_stage(cfg, storage.local_dir(prev), "long", "extend", parent=str(init_from),
                                              data_digest=data_digest(shard_dir(cfg)),
                                              step=sum(s.steps for s in ex.stages))
            out["model_version"] = out["model_uri"].rsplit("/", 1)[1]
    out.update(model_dir=prev, checkpoint=out["stages"][-1]["checkpoint"],
               passkey_before=np.round(before, 3).tolist(), passkey_after=np.round(after, 3).tolist(),
               val_loss_by_length_before={L: round(v, 4) for L, v in loss_before.items()},
               val_loss_by_length_after={L: round(v, 4) for L, v in loss_after.items()})
    return out
