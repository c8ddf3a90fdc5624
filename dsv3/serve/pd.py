"""Prefill and prefill/decode disaggregation (§3.4: prefilling and decoding are deployed as
separate units, with their own parallelism, because a long prompt is compute-bound while a
decode step is memory-bound and latency-critical).

Design choices
- `prefill` is the one prompt pass, used in both modes: the main layers over the whole prompt
  (the model's expanded-attention path) into a sequence's cache blocks; with speculation also
  the MTP module over positions 0..P-2, whose inputs are all prompt tokens, so the decode side
  only has the last position left to draft from. It returns the last position's logits: the
  first token is drawn on the decode side, where the request's generator lives (a seeded request
  gives the same tokens in both modes).
- `pd=disaggregated`: prefill runs in worker(s) with their own model copy and cache pool
  (`thread`: in this process; `process`: a spawned process; `ray`: a Ray actor via dsv3.cluster).
  A worker exports the sequence's latents as one contiguous [layers, P, r + rope] tensor (MLA's
  latent: 576 numbers per token and layer for V3, §2.1.1, which is what makes shipping a
  prompt's cache cheap) and the decode engine loads it into blocks it reserved at admission, so
  a finished prefill can always join. The bytes handed over are counted (`dsv3_pd_transfer_bytes`).
- The router sends each prompt to the prefill worker with the fewest prompt tokens in flight
  and hands finished prefills to the decode engine; decode steps never wait for a prompt, which
  is what keeps decode TPOT flat when long prompts arrive (benchmarks/bench_serve.py).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv3.serve.cache import BlockPool, SeqCache
from dsv3.serve.model_runner import ModelRunner, step_input


@dataclass
class Prefilled:
    last_logits: torch.Tensor  # [V] at the last prompt position
    prompt_lp: list | None  # echo + logprobs: TokenLogprob per prompt token (the first has None)
    mtp_len: int  # MTP-cache positions already holding true tokens
    pending_h: torch.Tensor | None  # [m, D] main hidden states the MTP module has not seen yet
    kv: torch.Tensor | None = None  # [layers, P, r+rope] when handed from a worker
    kv_bytes: int = 0


@torch.no_grad()
def prefill(runner: ModelRunner, seq: SeqCache, prompt: list[int], want_lp: int | None, spec: bool) -> Prefilled:
    from dsv3.serve.sampling import TokenLogprob, top_logprobs

    dev = runner.model.device
    P = len(prompt)
    ids = torch.tensor([prompt], device=dev)
    bs = runner.pool.block_size
    logits, h = runner.forward(step_input([0], ids, [seq.table], bs), all_logits=want_lp is not None, prompt=True)
    seq.length = P
    prompt_lp = None
    if want_lp is not None:
        lp = F.log_softmax(logits[0, :-1].float(), dim=-1)  # row i predicts prompt[i + 1]
        vals, idx = top_logprobs(lp, want_lp)
        tgt = torch.tensor(prompt[1:], device=dev)
        chosen = lp.gather(-1, tgt[:, None])[:, 0].tolist() if P > 1 else []
        prompt_lp = [TokenLogprob(prompt[0], None)] + [
            TokenLogprob(t, c, list(zip(idx[i, :want_lp].tolist(), vals[i, :want_lp].tolist())))
            for i, (t, c) in enumerate(zip(prompt[1:], chosen))]
    mtp_len, pending = 0, None
    if spec:
        if P > 1:  # MTP module over positions 0..P-2: h_i with the embedding of token i+1 (§2.2)
            runner.mtp_forward(0, h[:, : P - 1], step_input([0], ids[:, 1:], [seq.table], bs), all_logits=False,
                               prompt=True)
        mtp_len, pending = P - 1, h[0, P - 1:].clone()
    return Prefilled(logits[0, -1].float().clone(), prompt_lp, mtp_len, pending)


class PrefillServer:
    """A prefill worker's state: its own runner and pool; `run` answers one prompt with its cache."""

    def __init__(self, model, pool_tokens: int, block_size: int, spec: bool):
        mc = model.config
        layers = mc.num_hidden_layers + (1 if spec else 0)
        self.spec = spec
        self.pool = BlockPool(layers, pool_tokens, block_size, mc.kv_lora_rank + mc.qk_rope_head_dim,
                              dtype=model.dtype, device=model.device)
        self.runner = ModelRunner(model, self.pool, static_moe=False)

    def run(self, prompt: list[int], want_lp: int | None) -> Prefilled:
        seq = self.pool.alloc(len(prompt))
        if seq is None:
            raise RuntimeError(f"prefill worker: a {len(prompt)}-token prompt does not fit its pool")
        try:
            res = prefill(self.runner, seq, prompt, want_lp, self.spec)
            res.kv = seq.export(len(prompt))
            res.kv_bytes = res.kv.numel() * res.kv.element_size()
            return res
        finally:
            self.pool.release(seq)


def _load_model(model_dir: str, dtype: str, device: str):
    from dsv3.model.transformer import DeepSeekV3

    return DeepSeekV3.from_pretrained(model_dir, dtype=getattr(torch, dtype), device=device).eval()


# ---- workers ---------------------------------------------------------------------------------
class ThreadWorker:
    """In-process prefill worker (shares the weights, owns its pool) on its own thread."""

    def __init__(self, model, pool_tokens, block_size, spec, threads=None):
        self.server = PrefillServer(model, pool_tokens, block_size, spec)  # read-only use of shared weights
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.threads = threads
        self.t = threading.Thread(target=self._loop, daemon=True, name="dsv3-prefill")
        self.t.start()

    def _loop(self):
        if self.threads:
            torch.set_num_threads(self.threads)
        while (job := self.inbox.get()) is not None:
            rid, prompt, want_lp = job
            self.outbox.put((rid, self.server.run(prompt, want_lp)))

    def submit(self, rid, prompt, want_lp):
        self.inbox.put((rid, prompt, want_lp))

    def get(self, timeout):
        return self.outbox.get(timeout=timeout)

    def close(self):
        self.inbox.put(None)
        self.t.join(timeout=30)


def _process_main(model_dir, dtype, device, pool_tokens, block_size, spec, threads, inbox, outbox):
    torch.set_num_threads(threads or 1)
    server = PrefillServer(_load_model(model_dir, dtype, device), pool_tokens, block_size, spec)
    outbox.put(("ready", None))
    while (job := inbox.get()) is not None:
        rid, prompt, want_lp = job
        try:
            outbox.put((rid, server.run(prompt, want_lp)))
        except Exception as e:  # report, keep serving
            outbox.put((rid, e))


class ProcessWorker:
    """A spawned process with its own model copy; latents come back through shared memory."""

    def __init__(self, model_dir, dtype, device, pool_tokens, block_size, spec, threads=None):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_process_main, daemon=True, name="dsv3-prefill",
                                args=(model_dir, dtype, device, pool_tokens, block_size, spec, threads,
                                      self.inbox, self.outbox))
        self.proc.start()
        tag, _ = self.outbox.get(timeout=600)
        assert tag == "ready"

    def submit(self, rid, prompt, want_lp):
        self.inbox.put((rid, prompt, want_lp))

    def get(self, timeout):
        rid, res = self.outbox.get(timeout=timeout)
        if isinstance(res, Exception):
            raise res
        return rid, res

    def close(self):
        try:
            self.inbox.put(None)
            self.proc.join(timeout=30)
        finally:
            if self.proc.is_alive():
                self.proc.kill()


class RayPrefillActor:
    def __init__(self, model_dir, dtype, device, pool_tokens, block_size, spec, threads=None):
        torch.set_num_threads(threads or 1)
        self.server = PrefillServer(_load_model(model_dir, dtype, device), pool_tokens, block_size, spec)

    def run(self, rid, prompt, want_lp):
        return rid, self.server.run(prompt, want_lp)


class RayWorker:
    """A Ray actor holding the prefill model (dsv3.cluster is the module that talks to Ray)."""

    def __init__(self, *args, threads=None):
        from dsv3 import cluster

        self.cluster = cluster
        self.actor = cluster.ray_actor(RayPrefillActor, *args, threads=threads)
        self.refs: list = []

    def submit(self, rid, prompt, want_lp):
        self.refs.append(self.actor.run.remote(rid, prompt, want_lp))

    def get(self, timeout):
        ready = self.cluster.ray_ready(self.refs, timeout=timeout)
        if not ready:
            raise queue.Empty
        self.refs.remove(ready[0])
        return self.cluster.ray_get(ready[0])

    def close(self):
        self.cluster.ray_kill(self.actor)


class Router:
    """Sends prompts to the least-loaded prefill worker; collects finished prefills."""

    def __init__(self, workers: list):
        self.workers = workers
        self.inflight = [0] * len(workers)
        self.owner: dict[str, tuple[int, int]] = {}

    def submit(self, rid: str, prompt: list[int], want_lp: int | None) -> None:
        w = min(range(len(self.workers)), key=self.inflight.__getitem__)
        self.inflight[w] += len(prompt)
        self.owner[rid] = (w, len(prompt))
        self.workers[w].submit(rid, prompt, want_lp)

    def poll(self, block: bool = False, timeout: float = 600.0) -> list[tuple[str, Prefilled]]:
        out = []
        for i, w in enumerate(self.workers):
            while self.inflight[i]:
                try:
                    rid, res = w.get(timeout=timeout if block and not out else 0.001)
                except queue.Empty:
                    break
                wi, n = self.owner.pop(rid)
                self.inflight[wi] -= n
                out.append((rid, res))
        return out

    def close(self) -> None:
        for w in self.workers:
            w.close()


def make_prefill_worker(cfg, model, model_dir: str | None, spec: bool) -> Router:
    """The router over cfg.prefill_workers workers of kind cfg.pd_worker."""
    tokens = cfg.max_prompt_tokens or cfg.max_model_len or model.config.max_position_embeddings
    dtype = str(model.dtype).replace("torch.", "")
    workers = []
    for _ in range(cfg.prefill_workers):
        if cfg.pd_worker == "thread":
            workers.append(ThreadWorker(model, tokens, cfg.block_size, spec, cfg.prefill_threads))
            continue
        if model_dir is None:
            raise ValueError("pd_worker=process|ray needs the model directory (the worker loads its own copy)")
        args = (model_dir, dtype, str(model.device), tokens, cfg.block_size, spec)
        workers.append(ProcessWorker(*args, threads=cfg.prefill_threads) if cfg.pd_worker == "process"
                       else RayWorker(*args, threads=cfg.prefill_threads))
    return Router(workers)
