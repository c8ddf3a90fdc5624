"""`dsv3 serve MODEL_URI`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with SSE streaming),
GET /v1/models, GET /health, GET /metrics (Prometheus text format).

Design choices
- The model comes from a HF directory or an MLflow URI (`runs:/...`, `models:/name/version`,
  `models:/name@alias`) resolved by dsv3.tracking; the served name is the registered model's
  name (or the directory's), and the log line at start-up names the URI and the version.
- Chat prompts use post-training's template (dsv3.data.chat, §5.1), so a chat model is
  prompted exactly as it was fine-tuned; completion prompts are tokenised as given.
- Status codes: 400 malformed JSON, invalid or unsupported fields, too-long prompts (the
  message says what is wrong); 404 unknown model (OpenAI's and vLLM's code: the official client
  raises NotFoundError); 429 when the waiting queue is full; 503 from /health once the engine
  has failed. Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}.
- A client that disconnects (stream closed, or a plain request abandoned) aborts its request:
  the engine drops it before the next step and releases its cache blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path

import torch
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from dsv3.serve.config import ServeConfig
from dsv3.serve.engine import Engine, Output, QueueFull, Request, RequestError, _merge
from dsv3.serve.protocol import (ChatRequest, CompletionRequest, chat_logprobs, completion_logprobs, error_body,
                                 usage)

log = logging.getLogger("dsv3.serve")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def load_served_model(uri: str, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer, local_dir, info) for a HF dir or an MLflow model URI."""
    from dsv3.model.transformer import DeepSeekV3

    info = {"uri": str(uri)}
    local = str(uri)
    if local.startswith(("runs:/", "models:/")) or "://" in local:
        from dsv3 import tracking

        if local.startswith("models:/"):  # the registered version this server answers with
            mv = tracking.model_version(local)
            info.update(name=mv.name, version=mv.version, run_id=mv.run_id)
        local = tracking.resolve_model_uri(local)
    if not Path(local, "config.json").is_file():
        raise FileNotFoundError(f"{uri}: no config.json (not a HF-format model directory)")
    model = DeepSeekV3.from_pretrained(local, dtype=getattr(torch, dtype), device=device).eval()
    from transformers import PreTrainedTokenizerFast

    if Path(local, "tokenizer_config.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(local)
    else:
        from dsv3.data.chat import load_tokenizer

        tok = load_tokenizer(local)
    info.setdefault("name", Path(local).name if not str(uri).startswith("models:/") else
                    str(uri)[len("models:/"):].split("@")[0].split("/")[0])
    info["local_dir"] = local
    return model, tok, local, info


class OpenAIApp:
    """The HTTP handlers over one engine (FastAPI routes are bound to these methods)."""

    def __init__(self, engine: Engine, served_name: str, info: dict | None = None):
        self.engine, self.tok, self.name = engine, engine.tok, served_name
        self.info = info or {}
        self.names = {served_name, self.info.get("uri")} - {None}
        self.created = int(time.time())

    def tok_str(self, t: int) -> str:
        """A token as text; a token that is only part of a UTF-8 character is shown by its
        vocabulary string instead (so distinct tokens keep distinct keys in top_logprobs)."""
        s = self.tok.decode([t])
        return self.tok.convert_ids_to_tokens(t) if "\ufffd" in s else s

    async def parse(self, request: HTTPRequest, cls):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the JSON body must be an object")
        try:
            req = cls.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise HTTPError(400, f"invalid request: {loc}: {first['msg']}", param=loc) from None
        if req.model is not None and req.model not in self.names:
            raise HTTPError(404, f"The model `{req.model}` does not exist; this server serves `{self.name}`.",
                            "NotFoundError", "model")
        bad = req.unsupported()
        if bad:
            raise HTTPError(400, f"`{bad}` is not supported by this server", param=bad)
        return req

    def submit(self, items: list[tuple[list[int], object]]):
        """Submit one engine request per (prompt ids, params); outputs arrive as (index, Output)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        reqs = []
        try:
            for i, (ids, params) in enumerate(items):
                sink = (lambda out, i=i: loop.call_soon_threadsafe(q.put_nowait, (i, out)))
                reqs.append(self.engine.submit(Request(ids, params, sink)))
        except (QueueFull, RequestError) as e:
            for r in reqs:
                self.engine.abort(r)
            if isinstance(e, QueueFull):
                raise HTTPError(429, str(e), "rate_limit_exceeded") from None
            raise HTTPError(400, str(e)) from None
        return reqs, q

    async def events(self, reqs, q, request: HTTPRequest | None):
        """(index, Output) until every request finished; aborts them if the client goes away."""
        left = len(reqs)
        try:
            while left:
                try:
                    i, out = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if self.engine.error is not None:
                        raise HTTPError(500, f"engine failed: {self.engine.error!r}", "server_error") from None
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                left -= out.finish_reason is not None
                if out.finish_reason == "error":
                    raise HTTPError(500, f"engine failed: {self.engine.error!r}", "server_error")
                yield i, out
        finally:
            for r in reqs:
                if not r.finished:
                    self.engine.abort(r)

    async def collect(self, reqs, q, request, merged: list[Output]) -> bool:
        async for i, out in self.events(reqs, q, request):
            _merge(merged[i], out)
        return all(m.finish_reason is not None for m in merged)  # False: the client went away

    # ---- /v1/completions ----------------------------------------------------------------
    async def completions(self, request: HTTPRequest):
        req = await self.parse(request, CompletionRequest)
        prompts = [p if isinstance(p, list) else self.tok.encode(p) for p in req.prompts()]
        params = req.sampling(req.max_tokens if req.max_tokens is not None else self.engine.cfg.default_max_tokens,
                              req.logprobs, req.echo)
        items = [(ids, _seeded(params, j)) for ids in prompts for j in range(req.n)]
        reqs, q = self.submit(items)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": self.created,
                "model": self.name}
        prefix = [self.tok.decode(ids) if req.echo else "" for ids, _ in items]
        n_prompt = sum(len(ids) for ids, _ in items)

        def lp_of(out: Output, offset: int) -> dict | None:
            if req.logprobs is None:
                return None
            return completion_logprobs(self.tok_str, (out.prompt_logprobs or []) + (out.logprobs or []), offset)

        if req.stream:
            async def gen():
                sent, comp, first = [0] * len(items), [0] * len(items), [True] * len(items)
                async for i, out in self.events(reqs, q, None):
                    text = (prefix[i] if first[i] else "") + out.text
                    first[i], comp[i] = False, out.completion_tokens
                    yield _sse({**head, "choices": [{"index": i, "text": text, "logprobs": lp_of(out, sent[i]),
                                                     "finish_reason": out.finish_reason}]})
                    sent[i] += len(text)
                if req.include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(n_prompt, sum(comp))})
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")
        merged = [Output(logprobs=[] if req.logprobs is not None else None) for _ in items]
        if not await self.collect(reqs, q, request, merged):
            return Response(status_code=499)  # client went away
        choices = [{"index": i, "text": prefix[i] + m.text, "logprobs": lp_of(m, 0), "finish_reason": m.finish_reason}
                   for i, m in enumerate(merged)]
        return {**head, "choices": choices, "usage": usage(n_prompt, sum(m.completion_tokens for m in merged))}

    # ---- /v1/chat/completions -----------------------------------------------------------
    async def chat(self, request: HTTPRequest):
        from dsv3.data.chat import apply_chat_template

        req = await self.parse(request, ChatRequest)
        try:
            ids = apply_chat_template(self.tok, req.dicts(), add_generation_prompt=True)
        except ValueError as e:
            raise HTTPError(400, f"cannot apply the chat template: {e}") from None
        mt = req.max_completion_tokens or req.max_tokens or max(1, self.engine.max_model_len - len(ids))
        items = [(ids, _seeded(req.sampling(mt, (req.top_logprobs or 0) if req.logprobs else None), j))
                 for j in range(req.n)]
        reqs, q = self.submit(items)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": self.created, "model": self.name}
        lp = (lambda out: chat_logprobs(self.tok_str, out.logprobs or [])) if req.logprobs else (lambda out: None)
        if req.stream:
            async def gen():
                base = {**head, "object": "chat.completion.chunk"}
                for i in range(len(items)):
                    yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                comp = [0] * len(items)
                async for i, out in self.events(reqs, q, None):
                    comp[i] = out.completion_tokens
                    yield _sse({**base, "choices": [{"index": i, "delta": {"content": out.text} if out.text else {},
                                                     "logprobs": lp(out), "finish_reason": out.finish_reason}]})
                if req.include_usage:
                    yield _sse({**base, "choices": [], "usage": usage(len(ids) * len(items), sum(comp))})
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")
        merged = [Output(logprobs=[] if req.logprobs else None) for _ in items]
        if not await self.collect(reqs, q, request, merged):
            return Response(status_code=499)
        choices = [{"index": i, "message": {"role": "assistant", "content": m.text}, "logprobs": lp(m),
                    "finish_reason": m.finish_reason} for i, m in enumerate(merged)]
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": usage(len(ids) * len(items), sum(m.completion_tokens for m in merged))}

    # ---- the rest -------------------------------------------------------------------------
    async def models(self):
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "dsv3",
                "max_model_len": self.engine.max_model_len}
        card.update({k: self.info[k] for k in ("uri", "version", "run_id") if self.info.get(k) is not None})
        return {"object": "list", "data": [card]}

    async def health(self):
        if self.engine.error is not None:
            return JSONResponse({"status": "error", "error": repr(self.engine.error)}, status_code=503)
        return {"status": "ok"}

    async def metrics(self):
        return PlainTextResponse(self.engine.metrics.render(), media_type="text/plain; version=0.0.4")


def build_app(engine: Engine, served_name: str, info: dict | None = None) -> FastAPI:
    api = OpenAIApp(engine, served_name, info)
    app = FastAPI(title="dsv3 OpenAI-compatible server")
    app.add_exception_handler(HTTPError, lambda _, e: JSONResponse(error_body(e.message, e.type, e.param),
                                                                   status_code=e.status))
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/metrics", api.metrics, methods=["GET"])
    return app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _seeded(params, j: int):
    """The j-th of n choices: its own seed (seed + j) so that the n samples differ but repeat."""
    if j == 0 or params.seed is None:
        return params
    from dataclasses import replace

    return replace(params, seed=params.seed + j)


class Server:
    """Engine + app + uvicorn: `start()` in a thread (tests, benchmarks), `run()` blocking (CLI)."""

    def __init__(self, cfg: ServeConfig, model=None, tokenizer=None, model_dir: str | None = None,
                 info: dict | None = None):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if model is None:
            model, tokenizer, model_dir, info = load_served_model(cfg.model, cfg.dtype, cfg.device)
        self.cfg, self.info = cfg, dict(info or {"uri": model_dir})
        self.engine = Engine(model, tokenizer, cfg, model_dir=model_dir)
        self.name = cfg.served_model_name or self.info.get("name") or "dsv3"
        self.app = build_app(self.engine, self.name, self.info)
        self._server = None
        self._thread = None
        self.url: str | None = None

    def describe(self) -> str:
        i = self.info
        ver = f" version {i['version']}" if i.get("version") else ""
        run = f" (run {i['run_id']})" if i.get("run_id") else ""
        return (f"serving {i.get('uri')} as `{self.name}`: {i.get('name', '')}{ver}{run} from {i.get('local_dir', '')}; "
                f"{self.cfg.dtype}, pd={self.cfg.pd}, speculative={self.engine.K}, compile={self.cfg.compile}"
                + (f" (warmed up in {i['warm_up_s']} s)" if "warm_up_s" in i else ""))

    def _warm_up(self) -> None:
        """With --compile, the first request would wait for the compiler: compile before listening."""
        if self.cfg.compile:
            secs = self.engine.warm_up()
            log.info("compiled the batch-1 decode step in %.1f s (other batch sizes compile on first use)", secs)
            self.info["warm_up_s"] = round(secs, 1)

    def _socket(self):
        import socket

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.cfg.host, self.cfg.port))
        self.url = f"http://{self.cfg.host}:{sock.getsockname()[1]}"
        return sock

    def start(self) -> str:
        import threading

        import uvicorn

        sock = self._socket()
        self._warm_up()
        self.engine.start()
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        t0 = time.time()
        while not self._server.started:
            if not self._thread.is_alive() or time.time() - t0 > 60:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        log.info(self.describe())
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            self._server = None
        self.engine.stop()

    def run(self) -> None:
        import uvicorn

        sock = self._socket()
        self._warm_up()
        self.engine.start()
        print(f"dsv3 serve: {self.describe()}; listening on {self.url}", flush=True)
        try:
            uvicorn.Server(uvicorn.Config(self.app, log_level="info", lifespan="off")).run(sockets=[sock])
        finally:
            self.engine.stop()

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
