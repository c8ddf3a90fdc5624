"""Which `TrainStep` a run gets, and whether its parallel layout fits the ranks (§3.2).

`build_step(cfg, device)` is the one place that looks at `cfg.parallel`: it builds the whole model
(step.build_model: seeded init, `init_from`, recomputation, the precision's conversion), then wraps it:
    pp = 1, ep = 1 : PlainStep     (one process, or plain data parallelism over the world)
    pp = 1, ep > 1 : ExpertStep    (routed experts sharded over EP groups of the dp ranks, §3.2.2)
    pp > 1         : PipelineStep  (stages over pipeline ranks, §3.2.1), with an ExpertStep's expert
                     sharding inside each stage position's dp group when ep > 1 too
Sharding and freeing happen in place, before the optimizer and the EMA are built over what is left.

`check_layout(cfg, world)` raises a ConfigError naming the key, before any work (train) and before Ray
starts (launcher): the rank count of a pipeline / expert-parallel run (dp × pp), then the checks of
each layout (`check_pipeline_config`, `check_expert_config`). Rules that need only `parallel.*`
(DualPipe's even pp, num_chunks >= 2·pp, node-limited routing) are ParallelConfig's validator's.
"""

from __future__ import annotations

import torch

from dsv3.model.config import ConfigError
from dsv3.train.expert_step import ExpertStep, check_expert_config
from dsv3.train.pipeline_step import PipelineStep, check_pipeline_config
from dsv3.train.step import PlainStep, TrainStep, build_model


def check_layout(cfg, world: int) -> None:
    """Errors for a layout that cannot run on `world` ranks (plain data parallelism runs on any number)."""
    par = cfg.parallel
    if par.pp > 1 and world % par.pp:
        raise ConfigError(f"parallel.pp: pp={par.pp} does not divide the number of ranks {world} (pipeline runs "
                          "need pp ranks: dsv3 pretrain / dsv3.train.launcher.run_training start dp × pp Ray workers)")
    if (par.pp > 1 or par.ep > 1) and world != par.dp * par.pp:
        kind = "expert parallelism" if par.ep > 1 else "pipeline parallelism"
        raise ConfigError(f"parallel.dp: {kind} needs dp × pp = {par.dp} × {par.pp} ranks, got {world} "
                          "(launch with dsv3.train.launcher.run_training / dsv3 pretrain, which start dp × pp "
                          "workers)")
    if par.pp > 1:
        check_pipeline_config(cfg)
    if par.ep > 1:
        check_expert_config(cfg)


def build_step(cfg, device: torch.device) -> TrainStep:
    """This rank's TrainStep for `cfg` (call check_layout first)."""
    model = build_model(cfg, device)
    expert = ExpertStep(model, cfg) if cfg.parallel.ep > 1 else None  # shards the routed experts in place
    if cfg.parallel.pp > 1:
        return PipelineStep(model, cfg, ep=expert)  # frees the other ranks' stages in place
    return expert or PlainStep(model, cfg)
