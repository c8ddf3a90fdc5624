"""ParallelConfig: pipeline and expert parallelism (owned by dsv3.parallel; report §3.2).

- `pp`, `schedule`: pipeline ranks and schedule (dualpipe needs an even pp); `num_chunks`
  micro-batches per step (0: 2*pp, the smallest DualPipe/DualPipeV accept); `stage_bounds` layer
  indices where stages start (None: even split, see stages.layer_split).
- `ep`, `ep_ranks_per_node`, `max_nodes`: expert-parallel ranks, ranks grouped into a "node", and M of
  node-limited routing (None: the model's own group-limited routing).
- `bucket_mb`: plain data parallelism all-reduces gradients in buckets of this many MB while backward
  runs (dsv3/parallel/grad_buckets.py; 0: one flat all-reduce after backward); `zero1`: AdamW state
  sharded over the data-parallel ranks (dsv3/parallel/zero.py; plain data parallelism only: pp = ep = 1).
Validation here covers the rules that need only these fields (DualPipe's even pp, num_chunks >= 2·pp,
node-limited routing); dsv3/train/layout.py `check_layout` adds the run-level ones (dp × pp ranks,
stages vs layers, batch vs num_chunks, ep vs dp and the experts). Pretraining with `pp > 1` (§3.2.1)
runs dp × pp Ray workers and a PipelineStep (dsv3/train/pipeline_step.py); with `ep > 1` (§3.2.2) an
ExpertStep shards the routed experts over EP groups of `ep` consecutive dp ranks
(dsv3/train/expert_step.py); with pp > 1 too, the EP groups are formed inside each stage position's dp
group.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ParallelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    schedule: Literal["dualpipe", "dualpipev", "1f1b"] = "dualpipe"
    num_chunks: int = Field(0, ge=0)
    stage_bounds: list[int] | None = None
    ep: int = Field(1, ge=1)
    ep_ranks_per_node: int = Field(1, ge=1)
    max_nodes: int | None = Field(None, ge=1)
    bucket_mb: float = Field(25.0, ge=0)
    zero1: bool = False
    use_gpu: bool | None = None  # Ray workers get one GPU each (NCCL); None: when CUDA is visible to the launcher

    @model_validator(mode="after")
    def _check(self) -> "ParallelConfig":
        if self.pp > 1 and self.schedule == "dualpipe" and self.pp % 2:
            raise ValueError(f"pp: DualPipe needs an even number of pipeline ranks, got {self.pp}")
        if self.pp > 1 and self.schedule != "1f1b" and self.num_chunks and self.num_chunks < 2 * self.pp:
            raise ValueError(f"num_chunks: {self.schedule} needs >= 2*pp = {2 * self.pp}, got {self.num_chunks}")
        if self.ep % self.ep_ranks_per_node:
            raise ValueError(f"ep_ranks_per_node: {self.ep_ranks_per_node} does not divide ep={self.ep}")
        if self.max_nodes is not None and self.max_nodes > self.ep // self.ep_ranks_per_node:
            raise ValueError(f"max_nodes: {self.max_nodes} > number of nodes {self.ep // self.ep_ranks_per_node}")
        if self.zero1 and (self.pp > 1 or self.ep > 1):
            raise ValueError(f"zero1: optimizer-state sharding needs plain data parallelism (pp=1, ep=1), got "
                             f"pp={self.pp}, ep={self.ep}")
        return self

    @property
    def chunks(self) -> int:
        """Micro-batches per pipeline step."""
        return self.num_chunks or 2 * self.pp
