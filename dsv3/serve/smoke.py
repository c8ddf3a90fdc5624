"""Serve smoke: `dsv3 serve` on a registered model as its own process, one request through the
official `openai` client, the outcome in MLflow (flows/serve.py and the lifecycle's last stage).

Design choices
- The real server as a user starts it: `python -m dsv3.cli serve models:/NAME/VERSION --host
  127.0.0.1 --port 0` (port 0: the server binds a free port and prints it). Its stdout/stderr go
  to a log file under `log_dir`, kept with the MLflow run: the server's start-up line names the
  URI and the model version it answers with.
- An alias (`models:/dsv3-chat@champion`) is resolved once, before the start: the server gets the
  concrete `models:/NAME/VERSION`, so the version checked is the version that answers even if
  the alias moves meanwhile. No version behind the alias is a `ModelNotFound` saying what to run
  (`make lifecycle`, or `make posttrain` and a promotion).
- Bounded everywhere: start-up (`startup_timeout_s`, until GET /health answers 200; a server
  that exits first is reported with the tail of its log), each request (client timeout, no
  retries), the stop (SIGINT, uvicorn's graceful shutdown; SIGKILL after `stop_timeout_s`).
- The smoke (`smoke`): GET /v1/models must list the served name with the registered version
  on its card; one greedy chat completion gives the latency; the same request streamed gives
  the time to the first token (TTFT), and its text must equal the plain answer (greedy decoding
  is deterministic, so any difference is a serving bug, not noise).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPT = "What is 2 + 3?"
NO_CHAMPION_HINT = ("run `make lifecycle` (trains, gates and promotes `dsv3-chat`), or `make posttrain` and "
                    "promote a version, or name a model explicitly (a HF directory or models:/NAME/VERSION)")


@dataclass
class Served:
    """What the server is started on: the URI asked for and the concrete one (with its version)."""
    requested: str
    uri: str  # models:/NAME/VERSION, or the directory / runs:/ URI as given
    name: str | None = None
    version: str | None = None
    run_id: str | None = None  # the run that registered the version


def resolve(model_uri: str) -> Served:
    """The concrete model behind `model_uri` (an alias is looked up now); `ModelNotFound` when none."""
    if not str(model_uri).startswith("models:/"):
        return Served(str(model_uri), str(model_uri))
    from dsv3 import tracking

    try:
        mv = tracking.model_version(model_uri)
    except tracking.ModelNotFound as e:
        raise tracking.ModelNotFound(f"nothing to serve: {e}. To get one, {NO_CHAMPION_HINT}") from None
    return Served(str(model_uri), mv.uri, mv.name, mv.version, mv.run_id)


@dataclass
class ServerProcess:
    """A `dsv3 serve` subprocess and where it listens (`url`) once `wait_ready` returned."""
    proc: subprocess.Popen
    log_path: Path
    url: str | None = None
    startup_s: float | None = None
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout_s: float = 180.0) -> str:
        """Wait for the `listening on URL` line, then for GET /health == 200; returns the URL."""
        import httpx

        deadline = self.started + timeout_s
        while time.time() < deadline:
            if not self.alive():
                raise RuntimeError(f"`dsv3 serve` exited with status {self.proc.returncode} before it answered; "
                                   f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            if self.url is None:
                m = re.search(r"listening on (http://\S+)", self.log_path.read_text(errors="replace"))
                self.url = m.group(1) if m else None
            if self.url is not None:
                try:
                    if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                        self.startup_s = time.time() - self.started
                        return self.url
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"`dsv3 serve` did not answer /health within {timeout_s:.0f} s (stopped it); its log "
                           f"({self.log_path}) ends:\n{self.log_tail()}")

    def wait(self) -> int:
        """Block until the server exits (the long-running mode); its exit status."""
        return self.proc.wait()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGINT (graceful: in-flight requests end, the engine stops), SIGKILL after `timeout_s`."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def start(served: Served, host: str = "127.0.0.1", port: int = 0, threads: int | None = None,
          settings: dict | None = None, log_dir: str | Path = "runs/serve") -> ServerProcess:
    """Start `dsv3 serve` on `served.uri` (same Python, same MLflow store); `settings`: ServeConfig fields."""
    from dsv3 import tracking

    cmd = [sys.executable, "-m", "dsv3.cli", "serve", served.uri, "--host", host, "--port", str(port)]
    if threads:
        cmd += ["--threads", str(threads)]
    for k, v in (settings or {}).items():
        cmd += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(), "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log_path = Path(log_dir).resolve() / f"serve-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return ServerProcess(proc, log_path)


@dataclass
class SmokeResult:
    served_name: str
    card: dict  # the /v1/models card
    text: str
    completion_tokens: int
    latency_s: float  # the plain chat completion, request to response
    ttft_s: float | None  # the streamed one, request to the first chunk with text (None: no text came)
    stream_s: float


def smoke(url: str, served: Served, max_tokens: int = 8, prompt: str = PROMPT, timeout_s: float = 60.0) -> SmokeResult:
    """GET /v1/models, then one greedy chat completion plain and streamed; errors say what differed."""
    import openai

    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout_s)
    cards = [m.model_dump() for m in c.models.list().data]
    if len(cards) != 1:
        raise RuntimeError(f"{url}/v1/models lists {len(cards)} models, expected the one served: {cards}")
    card = cards[0]
    if served.version is not None and (str(card.get("version")), card.get("uri")) != (served.version, served.uri):
        raise RuntimeError(f"the server answers with {card.get('uri')} version {card.get('version')}, "
                           f"not {served.uri} (version {served.version}) it was started on")
    msgs = [{"role": "user", "content": prompt}]
    t0 = time.perf_counter()
    r = c.chat.completions.create(model=card["id"], messages=msgs, max_tokens=max_tokens, temperature=0)
    latency = time.perf_counter() - t0
    if not r.choices or r.usage is None or r.usage.completion_tokens < 1:
        raise RuntimeError(f"the chat completion returned no tokens: {r}")
    text = r.choices[0].message.content or ""
    t0, ttft, parts = time.perf_counter(), None, []
    for chunk in c.chat.completions.create(model=card["id"], messages=msgs, max_tokens=max_tokens, temperature=0,
                                           stream=True):
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            parts.append(delta)
    stream_s = time.perf_counter() - t0
    if "".join(parts) != text:
        raise RuntimeError(f"greedy answers differ: plain {text!r}, streamed {''.join(parts)!r}")
    return SmokeResult(card["id"], card, text, r.usage.completion_tokens, latency, ttft, stream_s)


def log_run(served: Served, server: ServerProcess, result: SmokeResult | None, *, keep_running: bool,
            parent_run_id: str | None = None, tags: dict | None = None, params: dict | None = None,
            error: str | None = None) -> str:
    """The `serve` MLflow run: the model served (tags), smoke latency / TTFT / start-up (metrics), the
    server's log (artifact `serve/`); FAILED with tag `serve.error` when the smoke failed. Its run id."""
    from dsv3 import tracking

    t = {"model_uri": served.uri, "requested_model_uri": served.requested, "model_name": served.name,
         "model_version": served.version, "model_run_id": served.run_id, "serve.url": server.url,
         "serve.pid": server.pid, "serve.keep_running": str(keep_running).lower(), **(tags or {})}
    if result is not None:
        t["serve.served_model_name"] = result.served_name
    name = f"serve-{served.name}-v{served.version}" if served.version else "serve"
    with tracking.start_run({k: v for k, v in (params or {}).items() if v is not None}, stage="serve",
                            run_name=name, parent_run_id=parent_run_id, tags=t) as run:
        m = {"serve/startup_s": server.startup_s}
        if result is not None:
            m.update({"serve/smoke_latency_s": result.latency_s, "serve/smoke_ttft_s": result.ttft_s,
                      "serve/smoke_stream_s": result.stream_s,
                      "serve/smoke_completion_tokens": float(result.completion_tokens)})
        tracking.log_metrics({k: v for k, v in m.items() if v is not None})
        tracking.log_artifact(server.log_path, "serve")
        run_id = run.info.run_id
    if error:
        tracking.set_run_tags(run_id, {"serve.error": error[:4000]})
        tracking.set_status(run_id, "FAILED")
    return run_id


def summary(served: Served, server: ServerProcess, result: SmokeResult | None, run_id: str | None) -> dict:
    """What the flow returns (JSON): the served model, the server, the smoke's figures."""
    out = {"served": asdict(served), "url": server.url, "pid": server.pid, "log": str(server.log_path),
           "startup_s": server.startup_s, "run_id": run_id}
    if result is not None:
        out["smoke"] = asdict(result)
    return out


def markdown(out: dict) -> str:
    """The flow's result as a short markdown table (Prefect artifact, CLI output)."""
    s, r = out["served"], out.get("smoke") or {}
    ms = (lambda v: "—" if v is None else f"{v * 1000:.0f} ms")
    rows = [("model", f"{s['uri']}" + (f" (asked for {s['requested']})" if s["requested"] != s["uri"] else "")),
            ("version", s.get("version") or "—"), ("url", out.get("url")), ("pid", out.get("pid")),
            ("start-up", "—" if out.get("startup_s") is None else f"{out['startup_s']:.1f} s"),
            ("smoke latency", ms(r.get("latency_s"))), ("smoke TTFT (streamed)", ms(r.get("ttft_s"))),
            ("answer", repr(r["text"]) if r else "— (no smoke request)"), ("MLflow run", out.get("run_id")),
            ("server log", out.get("log"))]
    return "| serve | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def parse_settings(pairs: list[str]) -> dict:
    """`--set FIELD=VALUE` pairs (YAML values) -> checked ServeConfig fields."""
    import yaml

    from dsv3.errors import ConfigError

    out = {}
    for p in pairs:
        key, sep, val = p.partition("=")
        if not sep:
            raise ConfigError(f"--set {p!r}: expected FIELD=VALUE")
        out[key.strip()] = yaml.safe_load(val)
    return check_settings(out)


def check_settings(settings: dict | None) -> dict:
    """ServeConfig fields the server is started with; a ConfigError naming `serve.FIELD` when one is wrong
    (before anything starts)."""
    from pydantic import ValidationError

    from dsv3.errors import ConfigError
    from dsv3.serve.config import ServeConfig

    settings = dict(settings or {})
    if "model" in settings:
        raise ConfigError("serve.model: name the model as the flow's `model_uri`, not a setting")
    try:
        ServeConfig(**settings)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"serve.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return settings
