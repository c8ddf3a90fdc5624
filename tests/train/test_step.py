"""The TrainStep protocol (dsv3/train/step.py): `train()` drives a step only through the protocol, and the
plain, expert-parallel and pipeline-parallel steps all implement it with the plain step's numbers: from the
same whole checkpoint (each rank keeping its part) one forward/backward + sync + clip gives the plain
single-process loss parts and gradient norm, validation gives its loss, and `full_state` assembles the
checkpoint's whole model again."""

import json
from pathlib import Path

import pytest
import torch

from dsv3 import DeepSeekV3
from dsv3.config import RunConfig
from dsv3.parallel.local import spawn
from dsv3.train import checkpoint as ckpt
from dsv3.train import loop
from dsv3.train.stream import PackedStream
from dsv3.train.ema import CpuEMA
from dsv3.train.layout import build_step
from dsv3.train.optim import make_optimizer
from dsv3.train.step import PlainStep, TrainStep, build_model
from tests.train.conftest import tiny_cfg

MEMBERS = {n for n in vars(TrainStep) if not n.startswith("_")} | set(TrainStep.__annotations__)
LAYOUTS = {"dp2": ("parallel.dp=2",), "dp2_ep2": ("parallel.dp=2", "parallel.ep=2"),
           "pp2_1f1b": ("parallel.pp=2", "parallel.schedule=1f1b"), "pp2_dualpipe": ("parallel.pp=2",)}


class _Recorder:
    """Wraps a real TrainStep and records every attribute the loop touches."""

    def __init__(self, inner):
        self._inner, self.touched = inner, []

    def __getattr__(self, name):
        self.touched.append(name)
        return getattr(self._inner, name)


def test_train_touches_only_the_protocol(tiny_shards, tmp_path, monkeypatch):
    seen = []

    def recording_build_step(cfg, device):
        seen.append(_Recorder(build_step(cfg, device)))
        return seen[-1]

    monkeypatch.setattr(loop, "build_step", recording_build_step)
    cfg = tiny_cfg(tiny_shards, tmp_path, "train.steps=4", "train.debug_nan_steps=[4]", "train.max_bad_steps=1",
                   "train.ckpt_every=2", "train.eval_every=2")
    res = loop.train(cfg, track=False)
    touched = set(seen[0].touched)
    assert touched <= MEMBERS, touched - MEMBERS
    # a NaN at step 4 rolled back through `load` to step 2's checkpoint (saved with `full_state`)
    assert {"forward_backward", "sync_grads", "clip_grad_norm", "evaluate", "full_state", "load",
            "step_metrics", "model", "precision", "n_params", "data_rank", "data_world"} <= touched
    assert [h["step"] for h in res.history] == [1, 2, 3, 4, 3, 4] and res.history[-1]["train/rollbacks"] == 1
    assert isinstance(seen[0]._inner, PlainStep) and isinstance(seen[0]._inner, TrainStep)


def _cfg(shards, out, *ov) -> RunConfig:
    return tiny_cfg(shards, out, "model.aux_loss_alpha=0.01", *ov)


def _one_step(step, cfg, shards, path) -> dict:
    """Load the whole checkpoint `path` into `step`; evaluate; one forward/backward/sync/clip; full_state."""
    opt, ema = make_optimizer(step.model, cfg.train), CpuEMA(step.model)
    state = step.load(path, opt, ema)
    val = PackedStream(shards, "val", cfg.train.seq_len, shuffle=False)
    loss, _ = step.evaluate(val, 1, 2)  # the same 2 windows, whatever the number of data ranks
    x = PackedStream(shards, "train", cfg.train.seq_len, seed=0).rank_batch(0, 4, step.data_rank, step.data_world)
    sums = step.sync_grads(step.forward_backward(x, x.shape[0], 0.3))
    norm = step.clip_grad_norm(1.0)
    model, opt_state, ema_state = step.full_state(opt, ema)
    rep = {"is_step": isinstance(step, TrainStep), "kind": type(step).__name__, "step": state["step"],
           "val": loss, "sums": sums.tolist(), "norm": norm, "n_params": step.n_params}
    if model is not None:
        rep["weights"] = {k: v.tolist() for k, v in model.state_dict().items()}
        rep["n_opt"] = len(opt_state.state_dict()["state"])
        rep["ema_keys"] = sorted(ema_state.state_dict())
    return rep


def _layout_worker(rank, world, cfgs, shards, path, out):
    for name, cfg_dict in cfgs.items():
        cfg = RunConfig.from_dict(cfg_dict)
        rep = _one_step(build_step(cfg, torch.device("cpu")), cfg, shards, path)
        if rank == 0:
            Path(out, f"{name}.json").write_text(json.dumps(rep))


@pytest.fixture(scope="module")
def layouts(tiny_shards, tmp_path_factory):
    """A plain checkpoint after one update (so optimizer and EMA state exist), the plain single-process
    report from it, and each layout's report from 2 gloo ranks."""
    d = tmp_path_factory.mktemp("step")
    cfg = _cfg(tiny_shards, d / "plain", "train.steps=1", "train.ckpt_every=1", "train.eval_every=1")
    loop.train(cfg, track=False)
    path = ckpt.latest(d / "plain" / "checkpoints")
    torch.set_num_threads(1)
    plain = _one_step(PlainStep(build_model(cfg, torch.device("cpu")), cfg), cfg, tiny_shards, path)
    cfgs = {name: _cfg(tiny_shards, d / name, *ov).model_dump(mode="json") for name, ov in LAYOUTS.items()}
    spawn(_layout_worker, 2, cfgs, tiny_shards, str(path), str(d))
    return plain, {name: json.loads((d / f"{name}.json").read_text()) for name in LAYOUTS}, path


@pytest.mark.parametrize("name,kind", [("dp2", "PlainStep"), ("dp2_ep2", "ExpertStep"),
                                       ("pp2_1f1b", "PipelineStep"), ("pp2_dualpipe", "PipelineStep")])
def test_each_layout_is_a_train_step_with_the_plain_numbers(layouts, name, kind):
    plain, reports, path = layouts
    rep = reports[name]
    assert rep["is_step"] and rep["kind"] == kind and plain["is_step"]
    assert rep["step"] == plain["step"] == 1 and rep["n_params"] == plain["n_params"]
    assert rep["val"] == pytest.approx(plain["val"], rel=1e-5)
    assert rep["sums"] == pytest.approx(plain["sums"], rel=1e-5, abs=1e-8)
    assert rep["norm"] == pytest.approx(plain["norm"], rel=1e-5)
    # full_state before any update: the whole checkpoint model, every AdamW state and EMA entry
    saved = DeepSeekV3.from_pretrained(path / "model").state_dict()
    assert rep["weights"].keys() == plain["weights"].keys() == saved.keys()
    for k, v in rep["weights"].items():
        assert torch.equal(torch.tensor(v), saved[k]), k
    assert rep["n_opt"] == plain["n_opt"] and rep["ema_keys"] == plain["ema_keys"]
