"""dsv3.parallel: pipeline schedules (DualPipe, DualPipeV, 1F1B) and expert parallelism (report §3.2)."""

from dsv3.parallel.config import ParallelConfig
from dsv3.parallel.pipeline import DualPipe, DualPipeV, OneFOneB, PipelineSchedule, WeightGradStore, split_weight_grads

__all__ = ["ParallelConfig", "DualPipe", "DualPipeV", "OneFOneB", "PipelineSchedule", "WeightGradStore",
           "split_weight_grads"]
