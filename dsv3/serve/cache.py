"""Paged latent cache: one pool of fixed-size blocks shared by every running sequence.

Design choices
- What is cached is MLA's latent (§2.1.1): per token and layer the normalised c_KV
  (kv_lora_rank) and the rotated k_R (qk_rope_head_dim), side by side in one row, exactly the
  model's `LayerCache` layout, so a decode step scores both with one matmul.
- The pool is one tensor [blocks * block_size, r + rope] per layer; a sequence owns a list of
  blocks (its block table, as in vLLM's PagedAttention), so sequences of any length join and
  leave between steps without moving anyone else's cache. One tensor per layer, not one for all:
  under torch.compile, writing into a view of a larger input is functionalised into a copy of
  the whole input every step; writing into a whole input tensor stays in place. Layers after the main model's hold the
  MTP modules' caches (speculative decoding drafts attend over their own past, §2.2).
- Blocks are reserved at admission for the whole request (prompt + max_tokens + draft
  look-ahead) and released when it finishes or its client disconnects: no preemption, no
  swapping, and a running sequence can never stall for memory. Admission waits instead.
- Block 0 is never handed out: padded batch rows write their (ignored) latents there, so a
  step's shapes can stay static.
- `export` / `load` move one sequence's latents as a contiguous [layers, T, r + rope] tensor:
  the unit a prefill worker hands to a decode worker (its `nbytes` is what crosses).
"""

from __future__ import annotations

import math

import torch


class BlockPool:
    def __init__(self, n_layers: int, n_tokens: int, block_size: int, width: int,
                 dtype=torch.float32, device=None):
        self.block_size = block_size
        self.n_blocks = max(2, math.ceil(n_tokens / block_size) + 1)  # + the scratch block 0
        self.kv = [torch.zeros(self.n_blocks * block_size, width, dtype=dtype, device=device)
                   for _ in range(n_layers)]
        self._free = list(range(self.n_blocks - 1, 0, -1))  # pop() hands out low ids first

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.n_blocks - 1 - len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def bytes_per_token(self) -> int:
        return len(self.kv) * self.kv[0].shape[1] * self.kv[0].element_size()

    def alloc(self, n_tokens: int) -> "SeqCache | None":
        """A block table holding n_tokens, or None when the pool lacks the blocks."""
        n = self.blocks_for(n_tokens)
        if n > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(n)]
        return SeqCache(self, blocks)

    def release(self, seq: "SeqCache") -> None:
        if seq.blocks:
            self._free.extend(reversed(seq.blocks))
            self._free.sort(reverse=True)
            seq.blocks = []
            seq.table = seq.table[:0]


class SeqCache:
    """One sequence's block table and how many of its positions hold valid latents."""

    def __init__(self, pool: BlockPool, blocks: list[int]):
        self.pool = pool
        self.blocks = blocks
        self.table = torch.tensor(blocks, dtype=torch.long, device=pool.kv[0].device)
        self.length = 0  # positions 0..length-1 of the main layers are valid

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Pool rows of positions start..end-1."""
        if end > self.capacity:
            raise ValueError(f"sequence cache overflow: position {end - 1} >= capacity {self.capacity}")
        pos = torch.arange(start, end, device=self.table.device)
        bs = self.pool.block_size
        return self.table[pos // bs] * bs + pos % bs

    def export(self, n: int | None = None) -> torch.Tensor:
        """Latents of positions 0..n-1 as one contiguous tensor [layers, n, r + rope]."""
        slots = self.slots(0, self.length if n is None else n)
        return torch.stack([kv[slots] for kv in self.pool.kv])

    def load(self, kv: torch.Tensor) -> None:
        """Write latents [layers, n, r + rope] (an `export`) into positions 0..n-1."""
        slots = self.slots(0, kv.shape[1])
        for dst, src in zip(self.pool.kv, kv, strict=True):
            dst[slots] = src.to(dst)


def read_slots(tables: list[torch.Tensor], T: int, block_size: int) -> torch.Tensor:
    """[B, T] pool rows of positions 0..T-1 of each sequence; positions past a table read block 0."""
    nb = math.ceil(T / block_size)
    padded = torch.zeros(len(tables), nb, dtype=torch.long, device=tables[0].device if tables else None)
    for i, t in enumerate(tables):
        k = min(nb, t.numel())
        padded[i, :k] = t[:k]
    pos = torch.arange(T, device=padded.device)
    return padded[:, pos // block_size] * block_size + pos % block_size
