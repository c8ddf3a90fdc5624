"""One training step, whatever the parallelism: the `TrainStep` protocol and its plain implementation.

`train()` (loop.py) drives a `TrainStep` and never asks which layout it runs; dsv3/train/layout.py
picks the implementation from `cfg.parallel`:
- `PlainStep` (this file): one process, or every rank of a data-parallel group. Ranks build the same
  model from the same seed, read disjoint slices of each global batch (data.py) and average
  gradients (sum / world, DDP's arithmetic) in buckets all-reduced while the last micro-batch's
  backward runs (dsv3.parallel.grad_buckets, `parallel.bucket_mb`; 0: one flat all-reduce after
  backward, dsv3.parallel.collectives). DDP's scheme, not the DDP wrapper: the loop drives the bare
  model (MTP weight, expert loads, bias update, EMA, checkpoints) and the sum-then-divide arithmetic
  stays the flat path's. MoE leaves different experts unused on different ranks and micro-batches:
  as with DDP's find_unused_parameters, a walk of the last micro-batch's autograd graph marks them
  ready with zero gradients, so every rank launches the same buckets in the same order. `parallel.zero1` shards
  the AdamW state over the ranks (dsv3.parallel.zero, built by optim.make_optimizer); `full_state`
  gathers it to rank 0 in the unsharded format.
- `ExpertStep` (expert_step.py, §3.2.2): the routed experts sharded over EP groups of the data ranks.
- `PipelineStep` (pipeline_step.py, §3.2.1): the model split into stages over pipeline ranks
  (DualPipe / DualPipeV / 1F1B), optionally with expert parallelism inside each stage position.

The protocol (what the loop calls, in this order per step):
    forward_backward(x, micro_batch, mtp_weight, poison) -> loss sums on this rank / pipeline
    sync_grads(sums) -> sums averaged over the data-parallel replicas (gradients too)
    clip_grad_norm(max_norm) -> the whole model's gradient norm (each parameter once)
    evaluate(stream, batches, batch) -> (mean validation loss, bits per byte)
    full_state(opt, ema) -> (whole model, optimizer, EMA) to save on rank 0 (a collective)
    load(ckpt, opt, ema) -> state.json of a whole checkpoint, each rank keeping its part
    step_metrics(log_due) / artifacts(out_dir): layout-specific metrics and plots (pipeline bubbles)
plus `model` (this rank's DeepSeekV3, for the optimizer, EMA and bias update), `precision`,
`n_params` (the whole model's) and `data_rank` / `data_world` (the batch slice this rank reads).
Loss sums are float64 [loss, main, balance, mtp_1..mtp_D] (a step's mean over its micro-batches).

Precision (§3.3) is one `Precision` object (precision.py): `build_model` converts the model (fp8:
FP8 Linears, before any sharding or pipeline split) and every forward runs in its autocast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from dsv3.model.transformer import DeepSeekV3
from dsv3.parallel import collectives
from dsv3.parallel.grad_buckets import GradBuckets
from dsv3.parallel.zero import Zero1
from dsv3.train import checkpoint as ckpt
from dsv3.train.stream import PackedStream, bits_per_byte
from dsv3.train.precision import Precision
from dsv3.train.recompute import apply_recompute


@runtime_checkable
class TrainStep(Protocol):
    model: nn.Module
    precision: Precision
    n_params: int
    data_rank: int
    data_world: int

    def forward_backward(self, x: torch.Tensor, micro_batch: int, mtp_weight: float,
                         poison: bool = False) -> torch.Tensor: ...

    def sync_grads(self, sums: torch.Tensor) -> torch.Tensor: ...

    def clip_grad_norm(self, max_norm: float) -> float: ...

    def evaluate(self, stream: PackedStream, batches: int, batch: int) -> tuple[float, float | None]: ...

    def full_state(self, opt, ema=None) -> tuple: ...

    def load(self, path: str | Path, opt=None, ema=None) -> dict: ...

    def step_metrics(self, log_due: bool) -> dict: ...

    def artifacts(self, out_dir: Path) -> list[Path]: ...


def build_model(cfg, device: torch.device):
    """The whole DeepSeekV3 of `cfg` on `device`: seeded init (every rank builds the same one), the
    `train.init_from` weights, recomputation, then the precision's conversion (fp8 Linears)."""
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    model = DeepSeekV3(cfg.model).to(device)
    if tcfg.init_from:
        from dsv3.tracking import resolve_model_uri

        src = Path(resolve_model_uri(tcfg.init_from))
        ckpt.load_model_weights(model, src / "model" if (src / "model" / "config.json").is_file() else src)
    apply_recompute(model, tcfg.recompute)
    return Precision.of(tcfg.precision).prepare(model)


@torch.no_grad()
def evaluate(model, stream: PackedStream, batches: int, batch: int, precision: Precision | str = "fp32",
             rank: int = 0, world: int = 1, pad=None) -> tuple[float, float | None]:
    """Mean next-token loss (nats) on fixed validation windows, and bits per byte.
    `pad(batches, seq_len) -> [(x, counted)]` makes every rank run the same number of forwards
    (an expert-parallel forward is a collective); uncounted batches add nothing."""
    precision = Precision.of(precision)
    was = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)  # [loss × tokens, tokens]
    xs = list(stream.eval_batches(batches, batch, rank, world))
    for x, counted in (pad(xs, stream.seq_len) if pad is not None else [(x, True) for x in xs]):
        x = x.to(model.device)
        with precision.autocast(model.device):
            out = model(x, labels=x, return_mtp=False)
        n = x.shape[0] * (x.shape[1] - 1) if counted else 0
        totals += torch.tensor([out.main_loss.double().item() * n, n], dtype=torch.float64)
    if world > 1:  # reduced on the model's device (NCCL reduces CUDA tensors only)
        totals = collectives.all_reduce_sum(totals, device=model.device)
    model.train(was)
    loss = float(totals[0] / totals[1].clamp(min=1))
    return loss, bits_per_byte(loss, stream.bytes_per_token)


def loss_parts(out, n_mtp: int) -> torch.Tensor:
    """[loss, main, balance, mtp_1..mtp_n] of one forward, float64 on the CPU (missing MTP depths: 0)."""
    parts = [out.loss.detach(), out.main_loss.detach(), out.balance_loss.detach(),
             *[m.detach() for m in out.mtp_losses]]
    parts += [torch.zeros(())] * (3 + n_mtp - len(parts))
    return torch.stack([p.double().cpu() for p in parts])


class PlainStep:
    """Single process or plain data parallelism over the world (see the module docstring)."""

    part = None  # the sharded layout checkpoint.load hands the whole checkpoint to (None: the whole model)

    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg
        self.precision = Precision.of(cfg.train.precision)
        self.rank, self.world = collectives.world()
        self.data_rank, self.data_world = self.rank, self.world
        self.device = model.device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self.params)
        self.bucket_mb = cfg.parallel.bucket_mb
        self._buckets: GradBuckets | None = None

    def grad_buckets(self) -> GradBuckets | None:
        """The overlapped reduction of this class's sync_grads (built on first use, over `params`); None: the
        flat all-reduce (one rank, bucket_mb = 0, or a subclass with its own sync_grads: ExpertStep
        reduces its expert slices over replica groups, with the flat path)."""
        if self.world == 1 or not self.bucket_mb or type(self).sync_grads is not PlainStep.sync_grads:
            return None
        if self._buckets is None:
            self._buckets = GradBuckets(self.params, self.world, bucket_mb=self.bucket_mb)
        return self._buckets

    def forward_backward(self, x: torch.Tensor, micro_batch: int, mtp_weight: float,
                         poison: bool = False) -> torch.Tensor:
        """Gradient accumulation over the micro-batches of this rank's rows `x` [B, S] (labels = x).
        poison (train.debug_nan_steps): a bad batch, the loss times NaN."""
        self.model.mtp_loss_weight = mtp_weight
        accum = x.shape[0] // micro_batch
        sums = torch.zeros(3 + self.cfg.model.num_nextn_predict_layers, dtype=torch.float64)
        buckets = self.grad_buckets()
        for i in range(accum):
            xb = x[i * micro_batch:(i + 1) * micro_batch]
            with self.precision.autocast(self.device):
                out = self.model(xb, labels=xb)
            if poison:
                out.loss = out.loss * float("nan")
            if buckets is not None and i == accum - 1:
                buckets.arm(out.loss)  # only the last micro-batch's backward communicates (no_sync before)
            (out.loss / accum).backward()
            sums += loss_parts(out, len(sums) - 3) / accum
        return sums

    def sync_grads(self, sums: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return sums
        buckets = self.grad_buckets()
        if buckets is None:
            collectives.mean_grads_(self.params, self.world)
        else:
            buckets.finish()
        return collectives.all_reduce_mean(sums, self.world, device=self.device)

    def clip_grad_norm(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))

    def evaluate(self, stream: PackedStream, batches: int, batch: int) -> tuple[float, float | None]:
        return evaluate(self.model, stream, batches, batch, self.precision, self.rank, self.world)

    def full_state(self, opt, ema=None) -> tuple:
        """(model, optimizer, EMA) to save on rank 0; with a sharded optimizer (zero1) a collective that
        gathers the whole optimizer state to rank 0 ((None, None, None) elsewhere)."""
        if isinstance(opt, Zero1):
            whole = opt.full_state_dict()
            return (self.model, ckpt.StateDict(whole), ema) if whole is not None else (None, None, None)
        return self.model, opt, ema

    def load(self, path: str | Path, opt=None, ema=None) -> dict:
        return ckpt.load(path, self.model, opt, ema, part=self.part)

    def step_metrics(self, log_due: bool) -> dict:
        """With overlapped data parallelism: seconds this rank blocked on gradient buckets and how many
        buckets the backward launched (of all)."""
        stats = self._buckets.stats() if self._buckets is not None else {}
        if not stats:
            return {}
        return {"perf/grad_wait_s": stats["wait_s"], "perf/grad_buckets": stats["buckets"],
                "perf/grad_buckets_in_backward": stats["launched_in_backward"]}

    def artifacts(self, out_dir: Path) -> list[Path]:
        return []
