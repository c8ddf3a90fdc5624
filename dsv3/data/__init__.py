"""dsv3.data: the pretraining-data pipeline (DeepSeek-V3 §4.1).

sources (ingest + provenance + quarantine) -> normalize -> quality -> pii -> dedup (exact,
MinHash/LSH) -> decontam -> split -> tokenizer (byte-level BPE) -> fim (PSM, rate 0.1)
-> shards (`write_split` / `ShardWriter` / `TokenShards`, checksummed). `curate` wires the stages as
streams in bounded batches (also the three DVC stages; `reference` is the in-memory path it must
equal), `validate` holds the Great Expectations suites (`shard_stats` streams their shard rows),
`version` the data digest (DVC's md5 of the shards) and `dvc repro`, `integrity` re-hashes DVC
outs and cache objects against dvc.lock, `report` the accounting / metrics / markdown views,
`cli` the `dsv3 data` commands.
Heavy imports (tokenizers, transformers, GX, Ray) happen inside the functions that need them.
"""
