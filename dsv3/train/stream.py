"""Packed-sequence batches over `TokenShards`, rank-aware and resumable.

Design choices
- Documents are packed back to back (each ends with EOS) and cut into fixed windows of
  `seq_len` tokens; like the paper (§4.1) there is no cross-document attention mask.
  Labels equal the inputs (HF convention: the model shifts them).
- Order: window indices are permuted per epoch with `numpy.random.default_rng(seed+epoch)`,
  so the whole stream is a pure function of (seed, sample position). The data-loader
  state in a checkpoint is therefore one integer: the global sample position.
- Rank-aware: a global batch is samples [pos, pos+B); rank r reads its contiguous slice
  [pos + r·B/W, pos + (r+1)·B/W), which it splits further into micro-batches. Nothing
  is read twice and a different world size reads the same global batches.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dsv3.data.shards import TokenShards


class PackedStream:
    def __init__(self, shard_dir, split: str, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.shards = TokenShards(shard_dir, split)
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.n_windows = len(self.shards) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"split {split!r} has {len(self.shards)} tokens: fewer than seq_len={seq_len}")
        self._perm_epoch, self._perm = -1, None

    @property
    def bytes_per_token(self) -> float | None:
        nb = self.shards.n_bytes
        return nb / max(1, len(self.shards)) if nb else None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = (np.random.default_rng(self.seed + epoch).permutation(self.n_windows)
                          if self.shuffle else np.arange(self.n_windows))
            self._perm_epoch = epoch
        return self._perm

    def window(self, sample: int) -> np.ndarray:
        epoch, i = divmod(sample, self.n_windows)
        w = int(self._order(epoch)[i])
        return np.asarray(self.shards.tokens[w * self.seq_len:(w + 1) * self.seq_len], dtype=np.int64)

    def samples(self, start: int, n: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.window(start + k) for k in range(n)]))

    def rank_batch(self, pos: int, global_batch: int, rank: int, world: int) -> torch.Tensor:
        per = global_batch // world
        return self.samples(pos + rank * per, per)

    def eval_batches(self, n_batches: int, batch: int, rank: int = 0, world: int = 1):
        """Fixed validation batches (the first windows, unshuffled), split across ranks."""
        total = min(self.n_windows, n_batches * batch)
        idx = list(range(total))[rank::world]
        for k in range(0, len(idx), batch):
            rows = [np.asarray(self.shards.tokens[w * self.seq_len:(w + 1) * self.seq_len], dtype=np.int64)
                    for w in idx[k:k + batch]]
            yield torch.from_numpy(np.stack(rows))


def bits_per_byte(mean_loss_nats: float, bytes_per_token: float | None) -> float | None:
    if not bytes_per_token:
        return None
    return mean_loss_nats / math.log(2) / bytes_per_token
