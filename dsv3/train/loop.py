"""The training loop: pretraining and context extension share it (issue 4 points 1, 3-5).

Design choices
- One function, `train(cfg)`, runs on one process or on every rank of a data-parallel
  group (Ray Train sets up torch.distributed; see dsv3/launch.py). Ranks build the same
  model from the same seed, read disjoint slices of each global batch (data.py), and
  average gradients with one flat all-reduce per optimizer step. We do this instead of
  wrapping in DDP because MoE leaves different experts unused on different ranks and
  micro-batches (DDP would need find_unused_parameters and per-step graph scans); the
  arithmetic is DDP's (sum/world), without the backward overlap.
- Per step (§4.2): LR, batch size, MTP λ and bias speed γ from `Schedules`; gradient
  accumulation over micro-batches; clip at 1.0; AdamW; then the aux-loss-free bias
  update with the expert load all-reduced over ranks (§2.1.2); then the CPU EMA copy.
- Precision (§3.3): fp32 master weights always; `bf16` autocasts the GEMMs; `fp8` swaps
  the Linear layers for `dsv3.fp8` FP8 Linears (embedding, head, gate, norms and the
  attention core stay in higher precision) and autocasts the rest to bf16. The swap is done in
  `build_model`, before expert sharding and the pipeline split; in a zero-bubble pipeline each FP8
  Linear defers its own FP8 Wgrad to the W ops (dsv3/fp8/linear.py).
- Failure handling: a non-finite loss/grad norm or a loss spike (> spike_factor × the
  running mean, after 20 good steps) skips the update and is counted
  (`train/skipped_steps`); `max_bad_steps` consecutive ones roll back to the latest
  checkpoint and continue on fresh data (the data position is kept).
- Determinism: seeded model init, data order a pure function of (seed, position),
  schedules pure functions of the step, no dropout. With fixed threads on CPU in fp32 a
  resumed run reproduces the uninterrupted losses bitwise (tests/train/test_resume.py).
- Tracking: rank 0 only, through dsv3.tracking; a resumed run continues its MLflow run.
  `metrics.jsonl` in the run folder mirrors the per-step losses (truncated on resume).
- Pipeline parallelism (§3.2.1, `parallel.pp > 1`): the ranks are pipeline ranks; the plain
  forward/backward of a step is replaced by `PipelineStep.forward_backward` (DualPipe / DualPipeV /
  1F1B over the model's stages, dsv3/train/pipeline_step.py). After the model is built each rank keeps
  only its stages' parameters (the others are freed, before the optimizer and EMA); hooks replace the
  clipping norm, validation (through the stages), checkpoint save (whole model gathered to rank 0) and
  load (each rank keeps its part), as for expert parallelism.
  Bubble fractions (measured per rank, analytic) are logged as `pipeline/*` and a Gantt chart as
  `plots/pipeline_gantt.png`.
- Expert parallelism (§3.2.2, `parallel.ep > 1`): after the model is built, `ExpertStep` shards its routed
  experts over EP groups of the data-parallel ranks (dsv3/train/expert_step.py); its hooks replace the
  gradient all-reduce, the clipping norm, checkpoint save (whole model gathered to rank 0) and load
  (each rank keeps its slice); validation pads the ranks to the same number of forwards. With pp > 1 too,
  the EP groups are formed inside each stage position's data-parallel group and the pipeline's hooks
  (given the ExpertStep) do the syncing, clipping, checkpoints and validation for both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dsv3.train import checkpoint as ckpt
from dsv3.train.data import PackedStream, bits_per_byte
from dsv3.train.ema import CpuEMA
from dsv3.train.optim import make_optimizer, set_lr
from dsv3.train.perf import compute_dtype, measure_matmul_peak
from dsv3.train.recompute import apply_recompute
from dsv3.train.lr_schedule import Schedules

log = logging.getLogger("dsv3.train")


@dataclass
class TrainResult:
    run_id: str | None = None
    checkpoint: str | None = None  # latest training checkpoint directory
    model_dir: str | None = None  # final HF-format export
    model_version: str | None = None
    final: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_LOG_FILE: Path | None = None  # rank 0 mirrors progress lines here (the Ray driver tails it)


def _say(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(msg, flush=True)
        if _LOG_FILE is not None:
            with open(_LOG_FILE, "a") as f:
                f.write(msg + "\n")


def shard_dir(cfg) -> str:
    return cfg.train.shards or str(Path(cfg.data.out_dir) / "shards")


def tokenizer_dir(cfg) -> str | None:
    d = cfg.train.tokenizer or str(Path(cfg.data.out_dir) / "tokenizer")
    return d if Path(d).is_dir() else None


def dataset_digest(shards: str) -> str:
    """The DVC md5 of the shards output when it is DVC-tracked, else the md5 of index.json."""
    import hashlib

    import yaml

    sp = Path(shards).resolve()
    for base in [Path.cwd(), *sp.parents]:
        lock = base / "dvc.lock"
        if lock.is_file():
            try:
                stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
            except yaml.YAMLError:
                break
            for st in stages.values():
                for o in st.get("outs", []) or []:
                    if (base / o.get("path", "")).resolve() == sp and o.get("md5"):
                        return str(o["md5"])
            break
    return hashlib.md5((sp / "index.json").read_bytes()).hexdigest()


def autocast_ctx(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def build_model(cfg, device: torch.device):
    from dsv3.model.transformer import DeepSeekV3

    t = cfg.train
    torch.manual_seed(t.seed)
    model = DeepSeekV3(cfg.model).to(device)
    if t.init_from:
        from dsv3.tracking import resolve_model_uri

        src = Path(resolve_model_uri(t.init_from))
        ckpt.load_model_weights(model, src / "model" if (src / "model" / "config.json").is_file() else src)
    apply_recompute(model, t.recompute)
    if t.precision == "fp8":
        from dsv3.fp8 import convert_to_fp8

        convert_to_fp8(model)
    return model


def allreduce_grads(params: list[torch.Tensor], world: int) -> None:
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for g, s in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(s)


@torch.no_grad()
def evaluate(model, stream: PackedStream, batches: int, batch: int, precision: str,
             rank: int = 0, world: int = 1, ep=None) -> tuple[float, float | None]:
    """Mean next-token loss (nats) on fixed validation windows, and bits per byte.
    `ep` (an ExpertStep): every rank runs the same number of forwards (an EP forward is a collective)."""
    was = model.training
    model.eval()
    tot = torch.zeros(2, dtype=torch.float64)
    xs = list(stream.eval_batches(batches, batch, rank, world))
    for x, counted in (ep.pad_batches(xs, stream.seq_len) if ep is not None else [(x, True) for x in xs]):
        x = x.to(model.device)
        with autocast_ctx(precision, model.device):
            out = model(x, labels=x, return_mtp=False)
        n = x.shape[0] * (x.shape[1] - 1) if counted else 0
        tot += torch.tensor([out.main_loss.double().item() * n, n], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(tot)
    model.train(was)
    loss = float(tot[0] / tot[1].clamp(min=1))
    return loss, bits_per_byte(loss, stream.bytes_per_token)


def _fmt_eta(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def train(cfg, resume: bool = False, parent_run_id: str | None = None, stage: str = "pretrain",
          run_name: str | None = None, tags: dict | None = None, track: bool = True) -> TrainResult:
    """Run (or resume) one training stage described by `cfg` (a RunConfig)."""
    from dsv3 import tracking

    t = cfg.train
    rank, world = _dist()
    if cfg.parallel.pp > 1:
        from dsv3.train.pipeline_step import check_config

        check_config(cfg, world)  # before any work: a pipeline needs dp × pp ranks
    if cfg.parallel.ep > 1:
        from dsv3.train.expert_step import check_config as check_ep

        check_ep(cfg, world)  # before any work: ep groups of the dp ranks
    if t.threads:
        torch.set_num_threads(t.threads)
    random.seed(t.seed)
    np.random.seed(t.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(cfg, device)
    ep = None
    if cfg.parallel.ep > 1:
        from dsv3.train.expert_step import ExpertStep

        ep = ExpertStep(model, cfg)  # shards the routed experts in place: before the optimizer and EMA
    pipe = None
    if cfg.parallel.pp > 1:
        from dsv3.train.pipeline_step import PipelineStep

        pipe = PipelineStep(model, cfg, ep=ep)  # frees the other ranks' stages in place: before the optimizer and EMA
    def load_ckpt(c, model, opt, ema):  # each rank keeps its part of the whole checkpoint
        return ckpt.load(c, model, opt, ema, part=pipe or ep)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = (pipe or ep).n_params if ep or pipe else sum(p.numel() for p in params)  # the whole model's
    opt = make_optimizer(model, t)
    ema = CpuEMA(model, t.ema_decay) if t.ema else None
    # the ranks of one pipeline share its batch; pipelines (dp > 1) read their own shards
    data_rank, data_world = (pipe.dp_rank, pipe.dp) if pipe is not None else (rank, world)
    sched = Schedules(t, cfg.model, data_world)
    shards = shard_dir(cfg)
    stream = PackedStream(shards, "train", t.seq_len, seed=t.seed)
    val = PackedStream(shards, "val", t.seq_len, shuffle=False)
    if val.shards.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"shards vocab {val.shards.vocab_size} > model.vocab_size {cfg.model.vocab_size}")
    out_dir = Path(t.out_dir).resolve()
    ck_root = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    global _LOG_FILE
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        _LOG_FILE = out_dir / "train.log"
    n_moe = len(model.moe_layers())
    E = cfg.model.n_routed_experts
    state: dict[str, Any] = dict(step=0, data_pos=0, tokens=0, loss_mean=None, good=0, bad=0, skipped=0,
                                 rollbacks=0, mlflow_run_id=None, load_total=[[0.0] * E] * n_moe)
    history: list[dict] = []
    val_hist: list[dict] = []
    resumed_from = None
    if resume:
        c = ckpt.latest(ck_root)
        if c is not None:
            state.update(load_ckpt(c, model, opt, ema))
            resumed_from = str(c)
            _say(f"[{stage}] resumed from {c} (step {state['step']})", rank)
        else:
            _say(f"[{stage}] --resume: no valid checkpoint under {ck_root}; starting fresh", rank)
    if rank == 0:
        if metrics_path.exists():
            keep = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            keep = [h for h in keep if resume and h["step"] <= state["step"]]
            history = [h for h in keep if "train/loss" in h]
            val_hist = [h for h in keep if "val/loss" in h]
            metrics_path.write_text("".join(json.dumps(h) + "\n" for h in keep))
        elif not resume:
            metrics_path.write_text("")
    fpt = cfg.model.flops_per_token(t.seq_len, training=True, include_mtp=True)
    peak = measure_matmul_peak(compute_dtype(t.precision), device=device) if rank == 0 else 1.0
    load_total = torch.tensor(state["load_total"], dtype=torch.float64).reshape(n_moe, E)

    run_ctx = contextlib.nullcontext(None)
    if rank == 0 and track:
        all_tags = {"checkpoint_dir": str(ck_root.resolve()), "parent_checkpoint": t.init_from,
                    "resumed_from": resumed_from, **(tags or {})}
        run_ctx = tracking.start_run(cfg, stage, run_name=run_name or f"{cfg.name}-{stage}",
                                     parent_run_id=parent_run_id, tags=all_tags, system_metrics=True,
                                     run_id=state.get("mlflow_run_id"))
    result = TrainResult()
    with run_ctx as run:
        if run is not None:
            state["mlflow_run_id"] = run.info.run_id
            result.run_id = run.info.run_id
            tracking.log_dataset_input(dataset_digest(shards), name=Path(shards).name, source=shards)
            tracking.log_params({"derived.total_tokens": sched.plan.total_tokens, "derived.world_size": world,
                                 "derived.n_params": n_params,
                                 "derived.matmul_peak_flops": f"{peak:.3e}"})
        _say(f"[{stage}] {n_params / 1e6:.1f}M params, {t.steps} steps, "
             f"{sched.plan.total_tokens:,} tokens, precision {t.precision}, {world} rank(s)", rank)

        def save_ckpt(step: int) -> Path | None:
            path = None
            if ema is not None:
                ema.wait()
            whole, opt_state, ema_state = model, opt, ema
            if ep is not None or pipe is not None:  # a collective: the slices / stages gathered to rank 0
                whole, opt_state, ema_state = (pipe or ep).full_state(opt, ema)
            if rank == 0:
                state["load_total"] = load_total.tolist()
                path = ckpt.save(ck_root, step, whole, opt_state, {k: v for k, v in state.items() if k != "step"},
                                 ema=ema_state, tokenizer_dir=tokenizer_dir(cfg), keep_last=t.keep_last)
            if world > 1:
                dist.barrier()
            return path

        def run_eval():
            if pipe is not None:  # through the stages; the pipelines' data ranks split the windows
                return pipe.evaluate(val, t.eval_batches, max(1, sched.batch(0) // data_world), t.precision)
            return evaluate(model, val, t.eval_batches, max(1, sched.batch(0) // world), t.precision, rank, world, ep)

        def do_eval(step: int) -> dict:
            m = {}
            vl, vb = run_eval()
            m["val/loss"] = vl
            if vb is not None:
                m["val/bpb"] = vb
            if ema is not None:
                with ema.swap_into(model):
                    el, eb = run_eval()
                m["val/ema_loss"] = el
                if eb is not None:
                    m["val/ema_bpb"] = eb
            if rank == 0:
                tracking.log_metrics(m, step=step)
                val_hist.append({"step": step, **m})
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": step, **m}) + "\n")
                _say(f"[{stage}] step {step} val/loss {vl:.4f}" + (f" val/bpb {vb:.4f}" if vb else "")
                     + (f" val/ema_loss {m['val/ema_loss']:.4f}" if "val/ema_loss" in m else ""), rank)
            return m

        t_start = time.perf_counter()
        steps_run = 0
        last_ckpt_step = state["step"]
        last_val: dict = {}
        s = state["step"]
        injected: set[int] = set()
        while s < t.steps:
            t0 = time.perf_counter()
            lr = sched.lr(s)
            set_lr(opt, lr)
            model.mtp_loss_weight = sched.mtp_weight(s)
            B = sched.batch(s)
            mb, acc = sched.micro_batches(s)
            x = stream.rank_batch(state["data_pos"], B, data_rank, data_world).to(device)
            n_mtp = cfg.model.num_nextn_predict_layers
            sums = torch.zeros(3 + n_mtp, dtype=torch.float64)
            if pipe is not None:
                sums = pipe.forward_backward(x, model.mtp_loss_weight, autocast_ctx(t.precision, device),
                                             poison=(s + 1) in t.debug_nan_steps and (s + 1) not in injected)
            for i in range(acc if pipe is None else 0):
                xb = x[i * mb:(i + 1) * mb]
                with autocast_ctx(t.precision, device):
                    out = model(xb, labels=xb)
                loss = out.loss
                if (s + 1) in t.debug_nan_steps and (s + 1) not in injected:
                    loss = loss * float("nan")  # a bad batch: seen once (the data moves on after a rollback)
                (loss / acc).backward()
                parts = [loss.detach(), out.main_loss.detach(), out.balance_loss.detach(),
                         *[m.detach() for m in out.mtp_losses]]
                parts += [torch.zeros(())] * (3 + n_mtp - len(parts))
                sums += torch.stack([p.double().cpu() for p in parts]) / acc
            if world > 1 and pipe is None:
                if ep is not None:
                    ep.allreduce_grads()
                else:
                    allreduce_grads(params, world)
                dist.all_reduce(sums)
                sums /= world
            loss_val = float(sums[0])
            if pipe is not None:
                grad_norm = pipe.clip_grad_norm(t.grad_clip)
            elif ep is not None:
                grad_norm = ep.clip_grad_norm(t.grad_clip)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.grad_clip))
            mean = state["loss_mean"]
            spike = (not math.isfinite(loss_val) or not math.isfinite(grad_norm)
                     or (mean is not None and state["good"] >= 20 and loss_val > t.spike_factor * mean))
            load = model.expert_load().to(torch.float64).cpu() if n_moe else torch.zeros(0, E)
            if world > 1 and n_moe:
                load_d = load.to(device)
                dist.all_reduce(load_d)
                load = load_d.cpu()
            if not spike:
                opt.step()
                if n_moe:
                    model.update_bias(sched.bias_gamma(s), load.float().to(device))
                    load_total += load
                if ema is not None:
                    ema.update(model)
                state["bad"] = 0
                state["good"] += 1
                state["loss_mean"] = loss_val if mean is None else 0.9 * mean + 0.1 * loss_val
            else:
                if n_moe:
                    model.update_bias(0.0)  # drop this step's load counts
                state["bad"] += 1
                state["skipped"] += 1
                _say(f"[{stage}] step {s + 1}: {'non-finite' if not math.isfinite(loss_val) else 'spike'} "
                     f"loss {loss_val:.4g} grad_norm {grad_norm:.4g}: update skipped", rank)
            if (s + 1) in t.debug_nan_steps:
                injected.add(s + 1)
            opt.zero_grad(set_to_none=True)
            state["data_pos"] += B
            state["tokens"] += B * t.seq_len
            dt = time.perf_counter() - t0
            s += 1
            state["step"] = s
            steps_run += 1
            if t.debug_kill_rank_at_step == s and rank == world - 1:
                marker = out_dir / f".killed_at_{s}"
                if not marker.exists():
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
            pipe_m = pipe.bubble_metrics() if pipe is not None and (s % t.log_every == 0 or s == t.steps) else {}
            if rank == 0:
                tok_s = B * t.seq_len / dt
                rec = {"step": s, "train/loss": loss_val, "train/main_loss": float(sums[1]),
                       "train/balance_loss": float(sums[2]), "train/lr": lr, "train/grad_norm": grad_norm,
                       "train/batch_size": B, "train/mtp_weight": model.mtp_loss_weight,
                       "train/bias_gamma": sched.bias_gamma(s - 1), "train/skipped_steps": state["skipped"],
                       "train/rollbacks": state["rollbacks"], "train/tokens": state["tokens"],
                       "perf/tokens_per_s": tok_s, "perf/step_s": dt,
                       "perf/mfu": tok_s * fpt / (peak * world)}
                for k in range(n_mtp):
                    rec[f"train/mtp_loss_{k + 1}"] = float(sums[3 + k])
                if n_moe and load.sum() > 0:
                    ratio = load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)
                    for i, r in enumerate(ratio.tolist()):
                        rec[f"moe/load_max_over_mean/layer_{i}"] = r
                    rec["moe/bias_norm"] = float(ckpt.routing_biases(model).norm())
                rec.update(pipe_m)
                history.append(rec)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if s % t.log_every == 0 or s == t.steps:
                    tracking.log_metrics(rec, step=s)
                    el = time.perf_counter() - t_start
                    eta = el / steps_run * (t.steps - s)
                    _say(f"[{stage}] step {s}/{t.steps} loss {loss_val:.4f} lr {lr:.2e} gnorm {grad_norm:.2f} "
                         f"{tok_s:,.0f} tok/s mfu {100 * rec['perf/mfu']:.1f}% eta {_fmt_eta(eta)}", rank)
            if state["bad"] >= t.max_bad_steps:
                c = ckpt.latest(ck_root) if rank == 0 or world == 1 else None
                if world > 1:
                    box = [str(c) if c else None]
                    dist.broadcast_object_list(box, src=0)
                    c = Path(box[0]) if box[0] else None
                if c is not None:
                    keep = {k: state[k] for k in ("data_pos", "tokens", "skipped", "rollbacks", "mlflow_run_id")}
                    state.update(load_ckpt(c, model, opt, ema))
                    state.update(keep)
                    state["rollbacks"] += 1
                    state["bad"] = 0
                    s = state["step"]
                    load_total = torch.tensor(state["load_total"], dtype=torch.float64).reshape(n_moe, E)
                    _say(f"[{stage}] {t.max_bad_steps} bad steps in a row: rolled back to {c}", rank)
                else:
                    state["bad"] = 0
            if s % t.eval_every == 0 or s == t.steps:
                last_val = do_eval(s)
            if (s % t.ckpt_every == 0 and state["bad"] == 0) or s == t.steps:  # never checkpoint a bad streak
                save_ckpt(s)
                last_ckpt_step = s

        if ema is not None:
            ema.wait()
        if last_ckpt_step != t.steps and state["step"] == t.steps:
            save_ckpt(t.steps)
        result.history = history
        if rank == 0:
            latest = ckpt.latest(ck_root)
            result.checkpoint = str(latest) if latest else None
            result.final = {k: v for k, v in (history[-1] if history else {}).items() if k != "step"}
            result.final.update(last_val)
            final_dir = out_dir / "final"
            if latest is not None:
                tmp = out_dir / ".final.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(latest / "model", tmp)
                shutil.rmtree(final_dir, ignore_errors=True)
                os.replace(tmp, final_dir)
                result.model_dir = str(final_dir)
            if run is not None:
                if pipe is not None and pipe.gantt(out_dir / "pipeline_gantt.png"):
                    tracking.log_artifact(out_dir / "pipeline_gantt.png", "plots")
                _log_end(cfg, stage, result, history, val_hist, load_total, latest, final_dir)
            (out_dir / "result.json").write_text(json.dumps(result.to_json(), indent=1))
            _say(f"[{stage}] done: {state['step']} steps in {_fmt_eta(time.perf_counter() - t_start)}; "
                 f"checkpoint {result.checkpoint}", rank)
    return result


def _log_end(cfg, stage, result, history, val_hist, load_total, latest, final_dir) -> None:
    from dsv3 import tracking

    t = cfg.train
    if t.plots:
        from dsv3.train import plots

        fig = plots.loss_curves(history, val_hist)
        tracking.log_figure(fig, "plots/loss_curves.png")
        plots.close(fig)
        if load_total.numel():
            fig = plots.expert_load_heatmap(load_total.numpy(), f"{stage}: expert load / mean (layer x expert)")
            tracking.log_figure(fig, "plots/expert_load_heatmap.png")
            plots.close(fig)
    tracking.set_tags({"checkpoint_uri": result.checkpoint, "model_dir": result.model_dir})
    if latest is not None and t.log_checkpoints:
        for p in sorted(latest.iterdir()):
            if p.name != "model":  # the model directory is logged once, by register_model
                tracking.log_artifact(p, f"checkpoints/{latest.name}")
    if result.model_dir and t.register_model:
        result.model_version = tracking.register_model(final_dir, cfg.tracking.registered_model)
        tracking.set_tags({"registered_model": f"models:/{cfg.tracking.registered_model}/{result.model_version}"})
    elif result.model_dir:
        tracking.log_artifact(final_dir, "model")
