"""EvalConfig: which benchmarks, limits, offline data, model loading, reporting (owned by dsv3.evals)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[Literal["mmlu", "drop", "humaneval"]] = ["mmlu", "drop", "humaneval"]
    limit: int | None = Field(None, ge=1)  # documents per task (per MMLU subject); None = all
    data_dir: str | None = None  # offline data (make eval-data); None: $DSV3_EVAL_DATA, else online
    mmlu_subjects: list[str] | None = None  # a subset of the 57 (quick runs); None = all via the group
    num_fewshot: dict[str, int] = {}  # overrides of mmlu 5 / drop 3 / humaneval 0
    batch_size: int = Field(16, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    max_gen_toks: int | None = Field(None, ge=1)  # caps every task's generation length
    seed: int = 1234
    log_samples: bool = True
    # HumanEval runs model-written code; with no sandbox mechanism (dsv3.evals.sandbox) it refuses unless
    # this is set (`--unsafe-no-sandbox`): then the code runs UNCONTAINED, warned and tagged on the run
    unsafe_no_sandbox: bool = False
    # bits-per-byte on the curated validation split (dsv3.data.shards); None: skipped
    bpb_shards: str | None = None
    bpb_split: str = "val"
    bpb_max_tokens: int | None = Field(200_000, ge=1)
    bpb_seq_len: int = Field(512, ge=8)
