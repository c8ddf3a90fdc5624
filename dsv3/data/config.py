"""DataConfig: sources and curation parameters (owned by dsv3.data)."""

from pydantic import BaseModel, ConfigDict


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[str] = ["builtin:stdlib"]
    out_dir: str = "data"
    seq_len: int = 512
