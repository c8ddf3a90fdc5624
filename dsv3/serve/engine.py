"""Engine: continuous batching over the paged latent cache (§3.4 deployment, one instance).

Design choices
- One engine thread owns the model, the cache pool and the running batch; HTTP handlers only
  `submit` (bounded waiting queue: `QueueFull` becomes 429) and `abort` (client gone). Between
  two steps sequences join (after their prefill) and leave (finished or aborted); their cache
  blocks are released at once, so the next waiting request can be admitted.
- A request is admitted when a batch slot is free and its blocks (prompt + max_tokens + draft
  look-ahead) can be reserved; its prefill then runs here (`pd=colocated`, at most
  `prefill_budget` prompt tokens per iteration, so that a burst of arrivals does not stall the
  running sequences for all of their prompts at once) or in a prefill worker
  (`pd=disaggregated`, pd.py) that hands back the latent cache.
- Each iteration runs one decode step for the whole batch: one token per sequence, or with
  speculation (spec.py) MTP drafts plus one verification forward (§2.2, §5.4.3).
- Outputs are pushed to each request's sink as `Output` deltas (text, token ids, logprobs,
  finish reason); the stop-string logic lives in text.py. Finish reasons are OpenAI's: "stop"
  (EOS, a stop token or string) and "length" (max_tokens).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dsv3.serve.cache import BlockPool, SeqCache
from dsv3.serve.config import ServeConfig
from dsv3.serve.metrics import ServeMetrics
from dsv3.serve.model_runner import ModelRunner, step_input
from dsv3.serve.sampling import SamplingParams, TokenLogprob, choose, top_logprobs
from dsv3.serve.text import TextStream


class QueueFull(RuntimeError):
    """The waiting queue is at max_queue (HTTP 429)."""


class RequestError(ValueError):
    """A request the engine can never serve (HTTP 400); the message says why."""


@dataclass
class Output:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # echo: once, with the first output
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


_ids = itertools.count()


class Request:
    def __init__(self, prompt: list[int], params: SamplingParams, sink=None, rid: str | None = None):
        self.id = rid or f"req-{next(_ids)}"
        self.prompt = list(prompt)
        self.params = params
        self.sink = sink or (lambda out: None)
        self.tokens = list(prompt)  # prompt + generated; the last one is not in the cache yet
        self.generated: list[int] = []
        self.seq: SeqCache | None = None
        self.gen: torch.Generator | None = None
        self.stream: TextStream | None = None
        self.t_arrival = time.perf_counter()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.finished = False
        self.aborted = False
        self.mtp_len = 0  # positions of the MTP cache holding true tokens (speculation)
        self.pending_h: torch.Tensor | None = None  # main hidden states not yet seen by MTP [m, D]


class Engine:
    def __init__(self, model, tokenizer, cfg: ServeConfig | None = None, metrics: ServeMetrics | None = None,
                 model_dir: str | None = None):
        self.cfg = cfg = cfg or ServeConfig()
        self.model, self.tok = model.eval(), tokenizer
        mc = model.config
        self.max_model_len = cfg.max_model_len or mc.max_position_embeddings
        self.max_prompt = cfg.max_prompt_tokens or self.max_model_len - 1
        self.K = cfg.speculative if len(model.mtp) else 0
        if cfg.speculative and not len(model.mtp):
            raise RequestError("speculative decoding needs a model with MTP modules (num_nextn_predict_layers > 0)")
        layers = mc.num_hidden_layers + (1 if self.K else 0)
        self.pool = BlockPool(layers, cfg.cache_tokens, cfg.block_size, mc.kv_lora_rank + mc.qk_rope_head_dim,
                              dtype=model.dtype, device=model.device)
        self.runner = ModelRunner(model, self.pool, static_moe=cfg.static_moe or cfg.compile, compile=cfg.compile)
        self.metrics = metrics or ServeMetrics()
        self.metrics.cache_total.set(self.pool.n_blocks - 1)
        self.eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefilling: dict[str, Request] = {}
        self.lock = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.spec = None
        if self.K:
            from dsv3.serve.spec import SpecDecoder

            self.spec = SpecDecoder(self, self.K)
        self.prefiller = None
        if cfg.pd == "disaggregated":
            from dsv3.serve.pd import make_prefill_worker

            self.prefiller = make_prefill_worker(cfg, model, model_dir, spec=bool(self.K))
        self.error: BaseException | None = None

    # ---- client side (any thread) -----------------------------------------------------------
    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        P = len(prompt)
        if P == 0:
            raise RequestError("the prompt is empty")
        if P > self.max_prompt:
            raise RequestError(f"prompt is {P} tokens, more than this server's limit of {self.max_prompt}")
        if P + params.max_tokens > self.max_model_len:
            raise RequestError(f"this model's maximum context length is {self.max_model_len} tokens; the request "
                               f"asks for {P + params.max_tokens} ({P} in the prompt, {params.max_tokens} to generate)")
        need = self.pool.blocks_for(P + params.max_tokens + self.K + 1)
        if need > self.pool.n_blocks - 1:
            raise RequestError(f"the request needs {need} cache blocks; the pool has {self.pool.n_blocks - 1}")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")

    def submit(self, req: Request) -> Request:
        self.validate(req.prompt, req.params)
        with self.lock:
            if len(self.waiting) >= self.cfg.max_queue:
                self.metrics.rejected.inc()
                raise QueueFull(f"the queue is full ({self.cfg.max_queue} waiting requests); retry later")
            self.waiting.append(req)
            self.metrics.queue_depth.set(len(self.waiting))
            self.lock.notify()
        return req

    def abort(self, req: Request) -> None:
        with self.lock:
            req.aborted = True
            self.lock.notify()

    def generate(self, prompt: list[int], params: SamplingParams, timeout: float = 600) -> Output:
        """Submit and wait (in-process use): the merged outputs of the request."""
        q: queue.Queue = queue.Queue()
        self.submit(Request(prompt, params, q.put))
        merged = Output(logprobs=[] if params.logprobs is not None else None)
        while True:
            if self._thread is None:
                self.step()
            try:
                out = q.get(timeout=timeout if self._thread is not None else 0.0)
            except queue.Empty:
                if self._thread is not None:
                    raise TimeoutError("generation timed out") from None
                continue
            _merge(merged, out)
            if out.finish_reason is not None:
                return merged

    def warm_up(self) -> float:
        """Compile the batch-1 decode step (and speculation's steps) before traffic arrives: one
        short greedy request, run in this thread before `start()`. What it leaves behind is undone:
        its metrics, speculation counters and expert loads are not the server's. Other batch sizes
        compile on first use. Returns the seconds it took."""
        assert self._thread is None, "warm_up runs before start()"
        t = time.perf_counter()
        metrics, load = self.metrics, self.runner.expert_load.clone()
        self.metrics = ServeMetrics()
        try:
            self.generate([0, 1], SamplingParams(max_tokens=2 + 2 * self.K, temperature=0, ignore_eos=True))
        finally:
            self.metrics = metrics
            self.runner.expert_load.copy_(load)
            if self.spec is not None:
                from dsv3.serve.spec import SpecDecoder

                self.spec = SpecDecoder(self, self.K)
        return time.perf_counter() - t

    # ---- the loop (engine thread) -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dsv3-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.prefiller is not None:
            self.prefiller.close()

    def _loop(self) -> None:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        while True:
            with self.lock:
                while not (self._stop or self.waiting or self.running or self.prefilling):
                    self.lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except BaseException as e:  # a bug must not hang clients: fail them all
                self.error = e
                for r in list(self.running) + list(self.prefilling.values()) + list(self.waiting):
                    r.sink(Output(finish_reason="error"))
                raise

    def step(self) -> None:
        """One iteration: drop aborted requests, admit (prefill), one decode step."""
        self._reap()
        self._admit()
        if self.prefiller is not None:
            self._collect_prefills(block=not self.running and bool(self.prefilling))
        if self.running:
            if self.spec is not None:
                self.spec.step(self.running)
            else:
                self._decode(self.running)
            self.metrics.steps.inc()
        self.running = [r for r in self.running if not r.finished]
        self._gauges()

    def _gauges(self) -> None:
        m = self.metrics
        m.queue_depth.set(len(self.waiting))
        m.running.set(len(self.running))
        m.cache_used.set(self.pool.used_blocks)

    def _reap(self) -> None:
        with self.lock:
            gone = [r for r in self.waiting if r.aborted]
            for r in gone:
                self.waiting.remove(r)
        for r in self.running:
            if r.aborted and not r.finished:
                self._release(r, "abort")
        self.running = [r for r in self.running if not r.finished]

    def _admit(self) -> None:
        budget = self.cfg.prefill_budget  # prompt tokens prefilled here per iteration (at least one prompt)
        while True:
            with self.lock:
                if not self.waiting or len(self.running) + len(self.prefilling) >= self.cfg.max_batch:
                    return
                if self.prefiller is None and budget < len(self.waiting[0].prompt) and \
                        budget < self.cfg.prefill_budget:
                    return  # the rest waits one decode step: running sequences are not stalled longer
                req = self.waiting[0]
                seq = self.pool.alloc(len(req.prompt) + req.params.max_tokens + self.K + 1)
                if seq is None:
                    return  # wait for blocks to be released
                self.waiting.popleft()
            req.seq = seq
            req.stream = TextStream(self.tok, req.params.stop)
            if req.params.seed is not None:
                req.gen = torch.Generator(device=self.model.device).manual_seed(req.params.seed)
            self.metrics.prompt_tokens.inc(len(req.prompt))
            if self.prefiller is not None:
                self.prefilling[req.id] = req
                self.prefiller.submit(req.id, req.prompt, self._want_prompt_lp(req))
            else:
                from dsv3.serve.pd import prefill

                res = prefill(self.runner, seq, req.prompt, self._want_prompt_lp(req), spec=bool(self.K))
                self._start(req, res)
                budget -= len(req.prompt)

    def _want_prompt_lp(self, req: Request) -> int | None:
        return req.params.logprobs if req.params.echo and req.params.logprobs is not None else None

    def _collect_prefills(self, block: bool) -> None:
        for rid, res in self.prefiller.poll(block=block):
            req = self.prefilling.pop(rid, None)
            if req is None:
                continue
            req.seq.load(res.kv)
            self.metrics.pd_bytes.inc(res.kv_bytes)
            self.metrics.pd_transfers.inc()
            if req.aborted:
                self._release(req, "abort")
                continue
            self._start(req, res)

    def _start(self, req: Request, res) -> None:
        """A prefilled request: sample its first token and join the running batch."""
        req.seq.length = len(req.prompt)
        req.mtp_len, req.pending_h = res.mtp_len, res.pending_h
        if req.params.max_tokens == 0:
            self._emit(req, [], None, "length", prompt_lp=res.prompt_lp)
            self._release(req, None)
            return
        tok = choose(res.last_logits, req.params, req.gen)
        self._append(req, [tok], res.last_logits[None], prompt_lp=res.prompt_lp)
        if not req.finished:  # done at its first token (EOS, stop, max_tokens=1): no decode row for it
            self.running.append(req)

    # ---- decoding ---------------------------------------------------------------------------
    def _decode(self, rows: list[Request]) -> None:
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.model.device)
        inp = step_input([r.seq.length for r in rows], ids, [r.seq.table for r in rows], self.pool.block_size,
                         pad_batch=self.pad_batch(len(rows)), t_bucket=self.runner.t_bucket)
        logits, _ = self.runner.forward(inp)
        for i, r in enumerate(rows):
            r.seq.length += 1
            self._append(r, [choose(logits[i, -1], r.params, r.gen)], logits[i, -1:])

    def pad_batch(self, B: int) -> int | None:
        """Batch sizes are padded to powers of two when the step is compiled (fewer graphs)."""
        return 1 << (B - 1).bit_length() if self.cfg.compile else None

    def _append(self, req: Request, toks: list[int], logits: torch.Tensor, prompt_lp=None) -> None:
        """Commit new tokens (logits[i] produced toks[i]); stop at EOS / stop / max_tokens."""
        p = req.params
        taken, reason = [], None
        for t in toks:
            taken.append(t)
            req.generated.append(t)
            req.tokens.append(t)
            if (t in self.eos and not p.ignore_eos) or t in p.stop_token_ids:
                reason = "stop"
                break
            if len(req.generated) >= p.max_tokens:
                reason = "length"
                break
        text_ids = taken if reason != "stop" else taken[:-1]
        text, hit = req.stream.add(text_ids)
        if hit:
            reason = "stop"
        if reason is not None:
            text += req.stream.flush()
        lps = None
        if p.logprobs is not None:
            lp = F.log_softmax(logits[: len(taken)].float(), dim=-1)
            vals, idx = top_logprobs(lp, p.logprobs)
            lps = [TokenLogprob(t, float(lp[i, t]), list(zip(idx[i, :p.logprobs].tolist(), vals[i, :p.logprobs].tolist())))
                   for i, t in enumerate(taken)]
        self._emit(req, taken, lps, reason, text=text, prompt_lp=prompt_lp)
        if reason is not None:
            self._release(req, reason)

    def _emit(self, req: Request, toks, lps, reason, text: str = "", prompt_lp=None) -> None:
        now = time.perf_counter()
        if toks:
            m = self.metrics
            if req.t_first is None:
                req.t_first = now
                m.ttft.observe(now - req.t_arrival)
                for _ in toks[1:]:
                    m.tpot.observe(0.0)
            else:
                for _ in toks:
                    m.tpot.observe((now - req.t_last) / len(toks))
            m.generation_tokens.inc(len(toks))
            req.t_last = now
        req.sink(Output(text=text, token_ids=list(toks), logprobs=lps, prompt_logprobs=prompt_lp,
                        finish_reason=reason, prompt_tokens=len(req.prompt), completion_tokens=len(req.generated)))

    def _release(self, req: Request, reason: str | None) -> None:
        req.finished = True
        if req.seq is not None:
            self.pool.release(req.seq)
        if reason is not None:
            self.metrics.requests.labels(finish_reason=reason).inc()
            self.metrics.e2e.observe(time.perf_counter() - req.t_arrival)


def _merge(a: Output, b: Output) -> None:
    a.text += b.text
    a.token_ids += b.token_ids
    if b.logprobs is not None:
        a.logprobs = (a.logprobs or []) + b.logprobs
    if b.prompt_logprobs is not None:
        a.prompt_logprobs = b.prompt_logprobs
    a.finish_reason = b.finish_reason
    a.prompt_tokens, a.completion_tokens = b.prompt_tokens, b.completion_tokens
