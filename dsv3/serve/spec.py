"""MTP speculative decoding (§2.2 trains the MTP modules; §5.4.3: reused for speculative
decoding, 85-90% acceptance of the second token, 1.8x tokens per second).

One iteration for every running sequence, whose cache holds positions 0..n-1 and whose newest
token t_n is known but not yet cached:
1. catch-up + draft 1: the MTP module runs over the positions it has not seen yet
   (mtp_len..n-1; inputs: the main model's hidden state h_i and the embedding of t_{i+1}, eq. 21),
   writing its own latent cache; its output at n-1 predicts t_{n+1}: draft d_1.
2. drafts 2..K: the same module again, one position further each time, with its own previous
   output as the hidden state and the previous draft as the token (the module is reused
   autoregressively, as SGLang / vLLM do with V3's single MTP layer). These MTP-cache entries
   rest on drafts, so they are not counted in mtp_len and are rewritten next iteration.
3. verification: one main-model forward over [t_n, d_1..d_K] at positions n..n+K, over the
   latent cache (the multi-token decode step of runner.py).
4. acceptance (sampling.accept_drafts): greedy keeps drafts while they equal the main argmax,
   sampling uses the rejection rule; the accepted drafts plus one main-model token are committed.
   Rolling the cache back is just setting the sequence's length to n + a + 1: the rejected
   positions' latents are overwritten by later steps (their blocks were reserved at admission).
The main hidden states of the committed positions become the MTP module's pending inputs.

Per draft position, the number of drafts verified and accepted go to /metrics (acceptance =
accepted / verified) and `log_mlflow` logs them (and tokens per step) to an active MLflow run.
"""

from __future__ import annotations

import torch

from dsv3.serve.model_runner import step_input
from dsv3.serve.sampling import accept_drafts, draw, processed_probs


class SpecDecoder:
    def __init__(self, engine, K: int):
        self.engine = engine
        self.runner = engine.runner
        self.K = K
        self.proposed = [0] * K
        self.accepted = [0] * K
        self.steps = 0
        self.tokens = 0

    def _draft(self, rows, logits: torch.Tensor, drafts, qs) -> None:
        for i, r in enumerate(rows):
            if r.params.greedy:
                drafts[i].append(int(logits[i].argmax()))
            else:
                q = processed_probs(logits[i], r.params.temperature, r.params.top_p)
                drafts[i].append(draw(q, r.gen))
                qs[i].append(q)

    @torch.no_grad()
    def step(self, rows) -> None:
        eng, run, K = self.engine, self.runner, self.K
        bs, dev = eng.pool.block_size, eng.model.device
        drafts: list[list[int]] = [[] for _ in rows]
        qs: list[list[torch.Tensor]] = [[] for _ in rows]
        # 1. catch-up over the pending positions, in groups: short ones batched, long ones alone
        h_last = [None] * len(rows)
        logits_1 = [None] * len(rows)
        short = [i for i, r in enumerate(rows) if r.pending_h.shape[0] <= K + 1]  # always, after prefill()
        groups = ([short] if short else []) + [[i] for i in range(len(rows)) if i not in short]
        for g in groups:
            rs = [rows[i] for i in g]
            lens = [r.pending_h.shape[0] for r in rs]
            S = max(lens)
            if run.compiled is not None and S <= K + 1:
                S = K + 1  # one shape for every steady-state catch-up: one compiled graph
            ids = torch.zeros(len(rs), S, dtype=torch.long, device=dev)
            hp = torch.zeros(len(rs), S, eng.model.config.hidden_size, dtype=eng.model.dtype, device=dev)
            for j, r in enumerate(rs):
                ids[j, : lens[j]] = torch.tensor(r.tokens[r.mtp_len + 1:], device=dev)
                hp[j, : lens[j]] = r.pending_h
            inp = step_input([r.mtp_len for r in rs], ids, [r.seq.table for r in rs], bs, lens=lens,
                             pad_batch=eng.pad_batch(len(rs)), t_bucket=run.t_bucket)
            lg, hk = run.mtp_forward(0, hp, inp, all_logits=False, prompt=S > K + 1)  # logits at rows' last position
            for j, i in enumerate(g):
                logits_1[i], h_last[i] = lg[j, 0], hk[j, lens[j] - 1]
        for r in rows:
            r.mtp_len, r.pending_h = r.seq.length, None
        self._draft(rows, torch.stack(logits_1), drafts, qs)
        h_prev = torch.stack(h_last)[:, None]  # [B,1,D]
        # 2. further drafts: the module reused one position ahead
        tables = [r.seq.table for r in rows]
        for k in range(1, K):
            ids = torch.tensor([[d[-1]] for d in drafts], device=dev)
            inp = step_input([r.seq.length + k - 1 for r in rows], ids, tables, bs,
                             pad_batch=eng.pad_batch(len(rows)), t_bucket=run.t_bucket)
            lg, h_prev = run.mtp_forward(0, h_prev, inp)
            self._draft(rows, lg[:, -1], drafts, qs)
        # 3. verification of [t_n, d_1..d_K] in one forward
        ids = torch.tensor([[r.tokens[-1]] + d for r, d in zip(rows, drafts)], device=dev)
        inp = step_input([r.seq.length for r in rows], ids, tables, bs, pad_batch=eng.pad_batch(len(rows)),
                         t_bucket=run.t_bucket)
        logits, hid = run.forward(inp)
        # 4. acceptance, cache roll-back, commit
        for i, r in enumerate(rows):
            q = torch.stack(qs[i]) if qs[i] else None
            new, a = accept_drafts(drafts[i], q, logits[i], r.params, r.gen)
            for k in range(min(a + 1, K)):
                self.proposed[k] += 1
                eng.metrics.spec_proposed.labels(position=str(k + 1)).inc()
            for k in range(a):
                self.accepted[k] += 1
                eng.metrics.spec_accepted.labels(position=str(k + 1)).inc()
            r.pending_h = hid[i, : a + 1].clone()
            r.seq.length += a + 1
            self.tokens += len(new)
            eng._append(r, new, logits[i, : a + 1])
        self.steps += len(rows)

    def stats(self) -> dict[str, float]:
        out = {f"serve/spec_accept_pos{k + 1}": self.accepted[k] / self.proposed[k]
               for k in range(self.K) if self.proposed[k]}
        if self.steps:
            out["serve/spec_tokens_per_step"] = self.tokens / self.steps
        return out

    def log_mlflow(self, step: int | None = None) -> None:
        """Log acceptance per draft position and tokens per step to the active MLflow run (if any)."""
        from dsv3 import tracking

        tracking.log_metrics(self.stats(), step=step)
