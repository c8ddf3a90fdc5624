"""The training loop: pretraining and context extension share it.

Design choices
- One function, `train(cfg)`, runs on one process or on every rank of a group (Ray Train sets up
  torch.distributed: dsv3/train/launcher.py). It drives a `TrainStep` (step.py) and never asks which
  parallelism it runs: layout.py builds the plain, expert-parallel (§3.2.2) or pipeline-parallel
  (§3.2.1) step from `cfg.parallel`, after which the optimizer and the EMA are built over the
  parameters this rank holds. Checkpoints stay one whole model whatever the layout.
- A `Trainer` holds the run's objects; its methods are the named parts of a run: `restore`
  (state / resume), `optimizer_step`, `log_step`, `evaluate`, `save_checkpoint` / `maybe_roll_back`,
  `finish`. Logging and metrics.jsonl: run_log.py.
- Per step (§4.2): LR, batch size, MTP λ and bias speed γ from `Schedules` (lr_schedule.py);
  forward/backward (gradient accumulation over micro-batches, or the pipeline's chunks); gradient
  sync; clip at 1.0; AdamW; then the aux-loss-free bias update with the expert load summed over all
  ranks (§2.1.2); then the CPU EMA copy (§3.2.3).
- Precision (§3.3): fp32 master weights always; the run's `Precision` (precision.py) converts the
  model (fp8: FP8 Linears, before expert sharding and the pipeline split) and autocasts the forwards.
  MFU is measured against a matmul peak in its compute dtype.
- Failure handling: a non-finite loss/grad norm or a loss spike (> spike_factor × the running mean,
  after 20 good steps) skips the update and is counted (`train/skipped_steps`); `max_bad_steps`
  consecutive ones roll back to the latest checkpoint and continue on fresh data (the data
  position is kept).
- Determinism: seeded model init, data order a pure function of (seed, position), schedules pure
  functions of the step, no dropout. With fixed threads on CPU in fp32 a resumed run reproduces the
  uninterrupted losses bitwise (tests/train/test_resume.py), in every layout.
- Tracking: rank 0 only, through dsv3.tracking; a resumed run continues its MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dsv3.data.tokenizer import check_vocab, load_tokenizer
from dsv3.data.version import data_digest
from dsv3.parallel import collectives
from dsv3.train import checkpoint as ckpt
from dsv3.train import storage
from dsv3.train.stream import PackedStream
from dsv3.train.ema import CpuEMA
from dsv3.train.layout import build_step, check_layout
from dsv3.train.lr_schedule import Schedules
from dsv3.train.optim import make_optimizer, set_lr
from dsv3.train.perf import measure_matmul_peak
from dsv3.train.run_log import RunLog, fmt_eta, log_final
from dsv3.train.step import build_model, evaluate  # noqa: F401  (public here: benchmarks, tests)


@dataclass
class TrainResult:
    run_id: str | None = None
    checkpoint: str | None = None  # latest training checkpoint directory
    model_dir: str | None = None  # final HF-format export
    model_version: str | None = None
    model_uri: str | None = None  # models:/<registered_model>-base/<version> when registered
    final: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


@dataclass
class RunState:
    """What a checkpoint's state.json holds besides the step (the data position, the spike guard, ...)."""

    step: int = 0
    data_pos: int = 0
    tokens: int = 0
    loss_mean: float | None = None
    good: int = 0
    bad: int = 0
    skipped: int = 0
    rollbacks: int = 0
    mlflow_run_id: str | None = None
    load_total: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))

    def to_json(self) -> dict:
        """state.json (without `step`, which checkpoint.save adds)."""
        saved = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "step"}
        return {**saved, "load_total": self.load_total.tolist()}

    def update(self, saved: dict, keep: tuple = ()) -> None:
        """Take a loaded state.json, except the fields in `keep`."""
        shape = self.load_total.shape
        for f in fields(self):
            if f.name in saved and f.name not in keep:
                setattr(self, f.name, saved[f.name])
        if "load_total" in saved and "load_total" not in keep:
            self.load_total = torch.tensor(saved["load_total"], dtype=torch.float64).reshape(shape)


@dataclass
class StepOutcome:
    sums: torch.Tensor  # [loss, main, balance, mtp_1..] (float64)
    lr: float
    grad_norm: float
    batch: int
    mtp_weight: float
    load: torch.Tensor  # expert load of this step, summed over ranks [n_moe, E]
    seconds: float


def shard_dir(cfg) -> str:
    """The shards, local (a storage URI is fetched into this node's cache and verified: storage.py)."""
    return storage.local_shards(cfg.train.shards or str(Path(cfg.data.out_dir) / "shards"))


def tokenizer_dir(cfg) -> str | None:
    path = cfg.train.tokenizer or str(Path(cfg.data.out_dir) / "tokenizer")
    if storage.is_remote(path):
        return storage.local_dir(path)
    return path if Path(path).is_dir() else None


class Trainer:
    """One training run on this rank; see the module docstring."""

    def __init__(self, cfg, stage: str):
        tcfg = self.tcfg = cfg.train
        self.cfg, self.stage = cfg, stage
        self.rank, self.world = collectives.world()
        check_layout(cfg, self.world)  # before any work
        if tcfg.threads:
            torch.set_num_threads(tcfg.threads)
        random.seed(tcfg.seed)
        np.random.seed(tcfg.seed)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.step = build_step(cfg, self.device)  # shards / frees in place: before the optimizer and EMA
        self.model = self.step.model
        self.model.train()
        self.opt = make_optimizer(self.model, tcfg, zero1=cfg.parallel.zero1)
        self.ema = CpuEMA(self.model, tcfg.ema_decay) if tcfg.ema else None
        self.sched = Schedules(tcfg, cfg.model, self.step.data_world)
        self.shards = shard_dir(cfg)
        self.stream = PackedStream(self.shards, "train", tcfg.seq_len, seed=tcfg.seed)
        self.val = PackedStream(self.shards, "val", tcfg.seq_len, shuffle=False)
        check_vocab(self.val.shards, cfg.model, tokenizer_name=f"shards {self.shards}", model_name="(run config)")
        if tokenizer_dir(cfg):  # the tokenizer copied into every checkpoint must fit the model too
            check_vocab(load_tokenizer(tokenizer_dir(cfg)), cfg.model, tokenizer_name=tokenizer_dir(cfg),
                        model_name="(run config)")
        self.out_dir = Path(tcfg.out_dir).resolve()
        self.ckpt_root = self.out_dir / "checkpoints"
        self.ckpts = storage.checkpoints(cfg, self.out_dir, self.rank, self.world)  # local, or shared storage
        self.log = RunLog(self.out_dir, stage, self.rank)
        self.n_moe = len(self.model.moe_layers())
        self.state = RunState(load_total=torch.zeros(self.n_moe, cfg.model.n_routed_experts, dtype=torch.float64))
        self.history: list[dict] = []
        self.val_history: list[dict] = []
        self.injected: set[int] = set()  # debug NaN steps already seen (the data moves on after a rollback)
        self.steps_run, self.last_val, self.last_ckpt_step = 0, {}, 0
        self.resumed_from: str | None = None
        self.flops_per_token = cfg.model.flops_per_token(tcfg.seq_len, training=True, include_mtp=True)
        self.peak, self.started = 1.0, time.perf_counter()  # matmul peak (rank 0: measured in `restore`), start

    # ---------- state / resume ----------
    def restore(self, resume: bool) -> None:
        """Resume from the latest valid checkpoint (when asked and there is one); keep the metrics
        records up to its step; measure the matmul peak MFU is reported against."""
        if resume:
            latest = self.ckpts.latest()
            if latest is not None:
                self.state.update(self.step.load(latest, self.opt, self.ema))
                self.resumed_from = str(latest)
                self.log.say(f"resumed from {latest} (step {self.state.step})")
            else:
                self.log.say(f"--resume: no valid checkpoint under {self.ckpt_root}; starting fresh")
        self.history, self.val_history = self.log.restore(resume, self.state.step)
        self.last_ckpt_step = self.state.step
        if self.rank == 0:
            self.peak = measure_matmul_peak(self.step.precision.compute_dtype, device=self.device)

    def tracking_run(self, track: bool, parent_run_id: str | None, run_name: str | None, tags: dict | None):
        """The MLflow run of this stage (rank 0, when tracking), continued on resume."""
        if self.rank != 0 or not track:
            return contextlib.nullcontext(None)
        from dsv3 import tracking

        all_tags = {"checkpoint_dir": str(self.ckpt_root.resolve()), "parent_checkpoint": self.tcfg.init_from,
                    "resumed_from": self.resumed_from, **(tags or {})}
        return tracking.start_run(self.cfg, self.stage, run_name=run_name or f"{self.cfg.name}-{self.stage}",
                                  parent_run_id=parent_run_id, tags=all_tags, system_metrics=True,
                                  run_id=self.state.mlflow_run_id)

    def log_start(self, run) -> None:
        from dsv3 import tracking

        plan = self.sched.plan
        if run is not None:
            self.state.mlflow_run_id = run.info.run_id
            tracking.log_dataset_input(data_digest(self.shards), name=Path(self.shards).name, source=self.shards)
            tracking.log_params({"derived.total_tokens": plan.total_tokens, "derived.world_size": self.world,
                                 "derived.n_params": self.step.n_params,
                                 "derived.matmul_peak_flops": f"{self.peak:.3e}"})
        self.log.say(f"{self.step.n_params / 1e6:.1f}M params, {self.tcfg.steps} steps, {plan.total_tokens:,} "
                     f"tokens, precision {self.step.precision}, {self.world} rank(s)")
        self.started = time.perf_counter()

    # ---------- one step ----------
    def run_step(self) -> None:
        """One optimizer step, then its logging, the rollback check, evaluation and checkpoint when due."""
        outcome = self.optimizer_step()
        self.log_step(outcome)
        self.maybe_roll_back()
        step, tcfg = self.state.step, self.tcfg
        if step % tcfg.eval_every == 0 or step == tcfg.steps:
            self.last_val = self.evaluate(step)
        if (step % tcfg.ckpt_every == 0 and self.state.bad == 0) or step == tcfg.steps:  # never a bad streak
            self.save_checkpoint(step)
            self.last_ckpt_step = step

    def optimizer_step(self) -> StepOutcome:
        tcfg, state, sched, step = self.tcfg, self.state, self.sched, self.state.step
        start = time.perf_counter()
        lr = sched.lr(step)
        set_lr(self.opt, lr)
        mtp_weight = sched.mtp_weight(step)
        batch = sched.batch(step)
        micro_batch, _ = sched.micro_batches(step)
        x = self.stream.rank_batch(state.data_pos, batch, self.step.data_rank, self.step.data_world).to(self.device)
        poison = (step + 1) in tcfg.debug_nan_steps and (step + 1) not in self.injected
        sums = self.step.sync_grads(self.step.forward_backward(x, micro_batch, mtp_weight, poison))
        loss = float(sums[0])
        grad_norm = self.step.clip_grad_norm(tcfg.grad_clip)
        spike = (not math.isfinite(loss) or not math.isfinite(grad_norm)
                 or (state.loss_mean is not None and state.good >= 20 and loss > tcfg.spike_factor * state.loss_mean))
        load = self._expert_load()
        if not spike:
            self._apply_update(step, loss, load)
        else:
            self._skip_update(step, loss, grad_norm)
        if (step + 1) in tcfg.debug_nan_steps:
            self.injected.add(step + 1)
        self.opt.zero_grad(set_to_none=True)
        state.data_pos += batch
        state.tokens += batch * tcfg.seq_len
        seconds = time.perf_counter() - start
        state.step = step + 1
        self.steps_run += 1
        self._debug_kill()
        return StepOutcome(sums, lr, grad_norm, batch, mtp_weight, load, seconds)

    def _expert_load(self) -> torch.Tensor:
        """This step's routed-token counts per (MoE layer, expert), summed over all ranks (§2.1.2)."""
        if not self.n_moe:
            return torch.zeros(0, self.cfg.model.n_routed_experts)
        load = self.model.expert_load().to(torch.float64).cpu()
        return collectives.all_reduce_sum(load, device=self.device) if self.world > 1 else load

    def _apply_update(self, step: int, loss: float, load: torch.Tensor) -> None:
        state = self.state
        self.opt.step()
        if self.n_moe:
            self.model.update_bias(self.sched.bias_gamma(step), load.float().to(self.device))
            state.load_total += load
        if self.ema is not None:
            self.ema.update(self.model)
        state.bad = 0
        state.good += 1
        state.loss_mean = loss if state.loss_mean is None else 0.9 * state.loss_mean + 0.1 * loss

    def _skip_update(self, step: int, loss: float, grad_norm: float) -> None:
        if self.n_moe:
            self.model.update_bias(0.0)  # drop this step's load counts
        self.state.bad += 1
        self.state.skipped += 1
        self.log.say(f"step {step + 1}: {'non-finite' if not math.isfinite(loss) else 'spike'} "
                     f"loss {loss:.4g} grad_norm {grad_norm:.4g}: update skipped")

    def _debug_kill(self) -> None:
        """train.debug_kill_rank_at_step (tests): the last rank SIGKILLs itself once at that step."""
        step = self.state.step
        if self.tcfg.debug_kill_rank_at_step == step and self.rank == self.world - 1:
            marker = self.out_dir / f".killed_at_{step}"
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)

    # ---------- logging ----------
    def log_step(self, outcome: StepOutcome) -> None:
        tcfg, state, step = self.tcfg, self.state, self.state.step
        log_due = step % tcfg.log_every == 0 or step == tcfg.steps
        layout_metrics = self.step.step_metrics(log_due)  # a collective on every rank
        if self.rank != 0:
            return
        sums, tokens_per_s = outcome.sums, outcome.batch * tcfg.seq_len / outcome.seconds
        rec = {"step": step, "train/loss": float(sums[0]), "train/main_loss": float(sums[1]),
               "train/balance_loss": float(sums[2]), "train/lr": outcome.lr, "train/grad_norm": outcome.grad_norm,
               "train/batch_size": outcome.batch, "train/mtp_weight": outcome.mtp_weight,
               "train/bias_gamma": self.sched.bias_gamma(step - 1), "train/skipped_steps": state.skipped,
               "train/rollbacks": state.rollbacks, "train/tokens": state.tokens,
               "perf/tokens_per_s": tokens_per_s, "perf/step_s": outcome.seconds,
               "perf/mfu": tokens_per_s * self.flops_per_token / (self.peak * self.world)}
        for k in range(len(sums) - 3):
            rec[f"train/mtp_loss_{k + 1}"] = float(sums[3 + k])
        load = outcome.load
        if self.n_moe and load.sum() > 0:
            ratio = load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)
            for i, r in enumerate(ratio.tolist()):
                rec[f"moe/load_max_over_mean/layer_{i}"] = r
            rec["moe/bias_norm"] = float(ckpt.routing_biases(self.model).norm())
        rec.update(layout_metrics)
        self.history.append(rec)
        self.log.append(rec)
        if log_due:
            from dsv3 import tracking

            tracking.log_metrics(rec, step=step)
            eta = (time.perf_counter() - self.started) / self.steps_run * (tcfg.steps - step)
            self.log.say(f"step {step}/{tcfg.steps} loss {rec['train/loss']:.4f} lr {outcome.lr:.2e} "
                         f"gnorm {outcome.grad_norm:.2f} {tokens_per_s:,.0f} tok/s mfu {100 * rec['perf/mfu']:.1f}% "
                         f"eta {fmt_eta(eta)}")

    # ---------- evaluation ----------
    def evaluate(self, step: int) -> dict:
        """Validation loss / bpb of the live weights and of the EMA weights; logged on rank 0."""
        batch = max(1, self.sched.batch(0) // self.step.data_world)
        metrics = {}
        loss, bpb = self.step.evaluate(self.val, self.tcfg.eval_batches, batch)
        metrics["val/loss"] = loss
        if bpb is not None:
            metrics["val/bpb"] = bpb
        if self.ema is not None:
            with self.ema.swap_into(self.model):
                ema_loss, ema_bpb = self.step.evaluate(self.val, self.tcfg.eval_batches, batch)
            metrics["val/ema_loss"] = ema_loss
            if ema_bpb is not None:
                metrics["val/ema_bpb"] = ema_bpb
        if self.rank == 0:
            from dsv3 import tracking

            tracking.log_metrics(metrics, step=step)
            self.val_history.append({"step": step, **metrics})
            self.log.append({"step": step, **metrics})
            self.log.say(f"step {step} val/loss {loss:.4f}" + (f" val/bpb {bpb:.4f}" if bpb else "")
                         + (f" val/ema_loss {metrics['val/ema_loss']:.4f}" if "val/ema_loss" in metrics else ""))
        return metrics

    # ---------- checkpoints / rollback ----------
    def save_checkpoint(self, step: int) -> Path | None:
        """Save one whole-model checkpoint (a collective: the layout gathers its parts to rank 0)."""
        path = None
        if self.ema is not None:
            self.ema.wait()
        model, opt_state, ema_state = self.step.full_state(self.opt, self.ema)
        if self.rank == 0:
            path = ckpt.save(self.ckpt_root, step, model, opt_state, self.state.to_json(), ema=ema_state,
                             tokenizer_dir=tokenizer_dir(self.cfg), keep_last=self.tcfg.keep_last)
            self.ckpts.saved(path, self.log.metrics_path)
        if self.world > 1:
            dist.barrier()
        return path

    def maybe_roll_back(self) -> None:
        """After `max_bad_steps` skipped steps in a row: back to the latest checkpoint's weights, optimizer,
        EMA and schedule position, keeping the data position (fresh data) and the counters."""
        state = self.state
        if state.bad < self.tcfg.max_bad_steps:
            return
        latest = ckpt.latest(self.ckpt_root) if self.rank == 0 or self.world == 1 else None
        latest = self.ckpts.fetch(collectives.broadcast_object(str(latest) if latest else None))
        if latest is None:
            state.bad = 0
            return
        state.update(self.step.load(latest, self.opt, self.ema),
                     keep=("data_pos", "tokens", "skipped", "rollbacks", "mlflow_run_id"))
        state.rollbacks += 1
        state.bad = 0
        self.log.say(f"{self.tcfg.max_bad_steps} bad steps in a row: rolled back to {latest}")

    # ---------- finish ----------
    def finish(self, run) -> TrainResult:
        """The last checkpoint if the loop did not just save one, the `final/` HF export, result.json and the
        run's final logging (rank 0)."""
        result = TrainResult(run_id=run.info.run_id if run is not None else None, history=self.history)
        if self.ema is not None:
            self.ema.wait()
        if self.last_ckpt_step != self.tcfg.steps and self.state.step == self.tcfg.steps:
            self.save_checkpoint(self.tcfg.steps)
        if self.rank != 0:
            return result
        latest = ckpt.latest(self.ckpt_root)
        result.checkpoint = self.ckpts.uri(latest)
        result.final = {k: v for k, v in (self.history[-1] if self.history else {}).items() if k != "step"}
        result.final.update(self.last_val)
        final_dir = self.out_dir / "final"
        if latest is not None:
            tmp = self.out_dir / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(latest / "model", tmp)
            shutil.rmtree(final_dir, ignore_errors=True)
            os.replace(tmp, final_dir)
            result.model_dir = self.ckpts.publish(final_dir)
        if run is not None:
            from dsv3 import tracking

            for path in self.step.artifacts(self.out_dir):
                tracking.log_artifact(path, "plots")
            log_final(self.cfg, self.stage, result, self.history, self.val_history, self.state.load_total,
                      latest, final_dir)
        (self.out_dir / "result.json").write_text(json.dumps(result.to_json(), indent=1))
        self.log.say(f"done: {self.state.step} steps in {fmt_eta(time.perf_counter() - self.started)}; "
                     f"checkpoint {result.checkpoint}")
        return result


def train(cfg, resume: bool = False, parent_run_id: str | None = None, stage: str = "pretrain",
          run_name: str | None = None, tags: dict | None = None, track: bool = True) -> TrainResult:
    """Run (or resume) one training stage described by `cfg` (a RunConfig)."""
    trainer = Trainer(cfg, stage)
    trainer.restore(resume)
    with trainer.tracking_run(track, parent_run_id, run_name, tags) as run:
        trainer.log_start(run)
        while trainer.state.step < cfg.train.steps:
            trainer.run_step()
        return trainer.finish(run)
