"""Expert-load statistics for EPLB (§3.4): what training recorded, and what the server sees online.

§3.4 sets the redundant experts "based on statistics collected from the online service" and adjusts them
periodically. Two sources feed `rebalance_experts` here:
- Training's own router statistics. The training loop (dsv3/train/loop.py) sums the per-step expert load
  of every MoE layer into `load_total` [moe layers, experts] and stores it in each checkpoint's
  `state.json`; the MLflow run is tagged with its newest checkpoint (`checkpoint_uri`) and, with
  `train.log_checkpoints`, holds `checkpoints/<step>/state.json` as an artifact. (The logged metrics
  `moe/load_max_over_mean/layer_i` and the heat-map only keep ratios, not per-expert counts.)
  `training_loads(source)` reads a checkpoint dir, a checkpoints root, a run's out_dir, or an MLflow run
  (`runs:/<id>` or a bare run id), through dsv3.tracking only.
- Online: `ExpertLoadRecorder` counts the experts each MoE layer routes tokens to while the model serves.
  The gate's `load` buffer only counts in training mode, so the recorder wraps each gate's `route` (an
  instance attribute, removed by `detach`; no model code changes) and works for any caller of the model
  (forward, forward_step, the EP serving layers). `step()` folds the counts of a window into an
  exponential moving average (the README of DeepSeek's EPLB suggests a moving average of history);
  `sync(group)` sums the window over serving ranks; `plan(...)` calls `rebalance_experts`.
Row i of every load matrix is `model.moe_layers()[i]` (main layers, then the MTP modules' layers).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsv3.serve.eplb import rebalance_experts


def _read_state(state_json: Path) -> torch.Tensor:
    state = json.loads(state_json.read_text())
    if "load_total" not in state:
        raise ValueError(f"{state_json} holds no expert load statistics ('load_total')")
    load = torch.tensor(state["load_total"], dtype=torch.float64)
    if load.dim() != 2 or load.numel() == 0:
        raise ValueError(f"{state_json}: load_total is not a [moe layers, experts] matrix (shape {tuple(load.shape)})")
    return load


def _checkpoint_dir(p: Path) -> Path:
    from dsv3.train import checkpoint as ckpt

    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}")
    if (p / "state.json").is_file():
        return p
    for root in (p, p / "checkpoints"):
        c = ckpt.latest(root)
        if c is not None:
            return c
    raise FileNotFoundError(f"{p} is neither a checkpoint (no state.json) nor a folder of checkpoints")


def checkpoint_loads(path: str | Path, last_interval: bool = False) -> torch.Tensor:
    """load_total [moe layers, experts] (float64 token counts) of a checkpoint: `path` is a checkpoint
    (holds state.json), a checkpoints root or a training out_dir (the newest valid checkpoint is read).
    `last_interval`: only the loads since the previous checkpoint (the router as it is at the end of
    training, rather than summed over its whole history); the whole history when there is none."""
    from dsv3.train import checkpoint as ckpt

    c = _checkpoint_dir(Path(path))
    load = _read_state(c / "state.json")
    if last_interval:
        older = [d for d in ckpt.list_checkpoints(c.parent) if d.name < c.name and (d / "state.json").is_file()]
        if older:
            load = load - _read_state(older[0] / "state.json")
    return load


def run_loads(run_id: str) -> torch.Tensor:
    """load_total of an MLflow training run: its newest checkpoint on disk (tag `checkpoint_uri`), else the
    checkpoint's state.json logged as a run artifact."""
    from dsv3 import tracking

    tags = tracking.run_info(run_id).data.tags
    uri = tags.get("checkpoint_uri")
    if not uri or uri == "None":
        raise ValueError(f"MLflow run {run_id} has no checkpoint_uri tag: it is not a finished training run")
    local = Path(uri)
    if (local / "state.json").is_file():
        return _read_state(local / "state.json")
    try:
        got = tracking.resolve_model_uri(f"runs:/{run_id}/checkpoints/{local.name}/state.json")
    except Exception as e:  # mlflow raises several types for a missing artifact
        raise FileNotFoundError(f"run {run_id}: checkpoint {uri} is gone and no checkpoints/{local.name}/state.json "
                                f"artifact was logged (train.log_checkpoints=false?): {e}") from e
    return _read_state(Path(got))


def training_loads(source: str | Path) -> torch.Tensor:
    """Per-layer expert loads recorded by training: `runs:/<run id>`, a run id, or a checkpoint path."""
    s = str(source)
    if s.startswith("runs:/"):
        return run_loads(s[len("runs:/"):].strip("/").split("/")[0])
    if Path(s).exists():
        return checkpoint_loads(s)
    if len(s) == 32 and all(c in "0123456789abcdef" for c in s):
        return run_loads(s)
    raise FileNotFoundError(f"expert-load source {s!r} is neither a path nor an MLflow run (runs:/<id>)")


class ExpertLoadRecorder:
    """Online per-layer expert counts. `load` = EMA of past windows + the current window's counts."""

    def __init__(self, num_layers: int, num_experts: int, decay: float = 1.0):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay  # 1.0: plain running sum
        self.history = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.window = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self._gates: list = []

    @classmethod
    def for_model(cls, model, decay: float = 1.0, attach: bool = True) -> "ExpertLoadRecorder":
        layers = model.moe_layers()
        rec = cls(len(layers), layers[0].n_experts if layers else 0, decay)
        if attach:
            rec.attach(model)
        return rec

    def record(self, layer: int, indices: torch.Tensor) -> None:
        """Count one routing: indices [tokens, k] of logical experts."""
        self.window[layer] += torch.bincount(indices.flatten().cpu(), minlength=self.window.shape[1]).double()

    def add(self, load: torch.Tensor) -> None:
        """Add a [layers, experts] count matrix (e.g. `model.expert_load()` of a training-mode model)."""
        if tuple(load.shape) != tuple(self.window.shape):
            raise ValueError(f"load shape {tuple(load.shape)} != recorder shape {tuple(self.window.shape)}")
        self.window += load.detach().double().cpu()

    def attach(self, model) -> "ExpertLoadRecorder":
        """Count every routing of `model`'s MoE layers (any mode, any entry point)."""
        self.detach()
        for i, moe in enumerate(model.moe_layers()):
            gate, route = moe.gate, moe.gate.route

            def counted(scores, _i=i, _route=route):
                weights, indices = _route(scores)
                self.record(_i, indices)
                return weights, indices

            gate.route = counted
            self._gates.append(gate)
        return self

    def detach(self) -> None:
        for gate in self._gates:
            if "route" in vars(gate):
                del gate.route
        self._gates = []

    def sync(self, group=None) -> None:
        """Sum the current window over the ranks of `group` (each rank counted its own tokens)."""
        import torch.distributed as dist

        dist.all_reduce(self.window, group=group)

    def step(self) -> None:
        """Close a window: history = decay * history + window."""
        self.history = self.decay * self.history + self.window
        self.window.zero_()

    @property
    def load(self) -> torch.Tensor:
        return self.history + self.window

    def plan(self, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
        """(phy2log, log2phy, logcnt) for the load seen so far (uniform where nothing was seen yet)."""
        load = self.load
        load = torch.where(load.sum(-1, keepdim=True) > 0, load, torch.ones_like(load))
        return rebalance_experts(load, num_replicas, num_groups, num_nodes, num_gpus)

    def log(self, step: int | None = None, prefix: str = "serve/moe") -> dict[str, float]:
        """Log max/mean expert load per layer to the active MLflow run (a no-op without one)."""
        from dsv3 import tracking

        load = self.load
        ratio = load.max(-1).values / load.mean(-1).clamp(min=1e-12)
        m = {f"{prefix}/load_max_over_mean/layer_{i}": float(r) for i, r in enumerate(ratio) if load[i].sum() > 0}
        tracking.log_metrics(m, step=step)
        return m
