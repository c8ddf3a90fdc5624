"""dsv3.parallel: pipeline schedules (DualPipe, DualPipeV, 1F1B) and expert parallelism (report §3.2)."""

from dsv3.parallel.config import ParallelConfig
from dsv3.parallel.expert import ExpertParallelMoE, all_to_all, shard_experts
from dsv3.parallel.pipeline import (DualPipe, DualPipeV, OneFOneB, PipelineSchedule, WeightGradStore, run_backward,
                                    set_p2p_tensor_dtype, set_p2p_tensor_shapes, split_weight_grads)
from dsv3.parallel.partition import Stage, pipeline_for, split_model

__all__ = ["ParallelConfig", "DualPipe", "DualPipeV", "OneFOneB", "PipelineSchedule", "WeightGradStore",
           "run_backward", "set_p2p_tensor_dtype", "set_p2p_tensor_shapes", "split_weight_grads",
           "ExpertParallelMoE", "all_to_all", "shard_experts", "Stage", "pipeline_for", "split_model"]
