"""Prefect flow `serve`: `dsv3 serve` on the promoted champion (or any model URI), a smoke request
through the official `openai` client, an MLflow run recording which version answered (§3.4 deployment).

Thin by design: the work is dsv3.serve.smoke's (resolve the alias, start the server as its own
process on 127.0.0.1, wait for /health, the smoke, the MLflow run); this module makes them tasks.
    resolve -> models:/dsv3-chat@champion is models:/dsv3-chat/N (none: an error saying what to run)
    start   -> `python -m dsv3.cli serve models:/dsv3-chat/N --port 0`, until GET /health answers
    smoke   -> /v1/models names version N; a greedy chat completion (latency) and streamed (TTFT)
    record  -> MLflow run (stage `serve`; tags model_name/model_version/model_uri; the server's log)
    stop    -> SIGINT, unless `keep_running`
`keep_running` is the deployment's long-running mode: after the smoke the flow run stays Running
for as long as the server does, and stopping either stops both. Stop it by cancelling the flow run
of the deployment (the Prefect UI's Cancel, or `prefect flow-run cancel FLOW_RUN_ID`: the worker's
SIGTERM ends the flow, which stops the server), with Ctrl-C on `python -m flows.serve`, or with
`kill -INT PID` (the server's pid is printed and tagged `serve.pid` on the MLflow run; the flow run
then completes).

    python -m flows.serve [MODEL_URI] [--port 0] [--no-smoke] [--keep-running] [--threads N] [--set FIELD=VALUE]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from dsv3.config_base import config_error_exit  # noqa: E402
from dsv3.errors import ConfigError  # noqa: E402
from dsv3.serve import smoke as sm  # noqa: E402
from flows.artifacts import mlflow_link  # noqa: E402

CHAMPION = "models:/dsv3-chat@champion"


@task(name="resolve", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def resolve(model_uri: str) -> sm.Served:
    served = sm.resolve(model_uri)
    print(f"serving {served.uri}" + (f" (version {served.version} of {served.name}, asked for {served.requested})"
                                     if served.version else ""))
    return served


@task(name="start", cache_policy=NO_CACHE)
def start(served: sm.Served, host: str, port: int, threads: int | None, settings: dict | None, log_dir: str,
          timeout_s: float) -> sm.ServerProcess:
    server = sm.start(served, host, port, threads, settings, log_dir)
    server.wait_ready(timeout_s)
    print(f"`dsv3 serve` (pid {server.pid}) answers on {server.url} after {server.startup_s:.1f} s; "
          f"log {server.log_path}")
    return server


@task(name="smoke", cache_policy=NO_CACHE)
def smoke_request(server: sm.ServerProcess, served: sm.Served, max_tokens: int, prompt: str) -> sm.SmokeResult:
    r = sm.smoke(server.url, served, max_tokens, prompt)
    ttft = "—" if r.ttft_s is None else f"{r.ttft_s * 1000:.0f} ms"
    print(f"smoke: {r.served_name} version {r.card.get('version', '—')} answered {r.text!r} "
          f"({r.completion_tokens} tokens) in {r.latency_s * 1000:.0f} ms; streamed TTFT {ttft}")
    return r


@task(name="record", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def record(served: sm.Served, server: sm.ServerProcess, result: sm.SmokeResult | None, keep_running: bool,
           parent_run_id: str | None, tags: dict | None, params: dict, error: str | None = None) -> str:
    run_id = sm.log_run(served, server, result, keep_running=keep_running, parent_run_id=parent_run_id,
                        tags=tags, params=params, error=error)
    mlflow_link("serve-run", run_id, f"serving {served.uri}")
    return run_id


@flow(name="serve", log_prints=True)
def serve_flow(model_uri: str = CHAMPION, host: str = "127.0.0.1", port: int = 0, smoke: bool = True,
               keep_running: bool = False, threads: int | None = None, settings: dict[str, Any] | None = None,
               max_tokens: int = 8, prompt: str = sm.PROMPT, startup_timeout_s: float = 300.0,
               log_dir: str = "runs/serve", parent_run_id: str | None = None,
               tags: dict[str, str] | None = None) -> dict:
    """Start `dsv3 serve` on `model_uri` (default: the chat champion), run the smoke request, record the
    served version in MLflow; stop the server, or with `keep_running` keep serving until cancelled.
    `settings`: ServeConfig fields (`{"max_batch": 8, "speculative": 1}`)."""
    sm.check_settings(settings)
    served = resolve(model_uri)
    server = start(served, host, port, threads, settings, log_dir, startup_timeout_s)
    params = {"host": host, "port": port, "threads": threads, "max_tokens": max_tokens, "smoke": smoke,
              **{f"serve.{k}": v for k, v in (settings or {}).items()}}
    try:
        result = None
        try:
            result = smoke_request(server, served, max_tokens, prompt) if smoke else None
        except Exception as e:
            record(served, server, None, keep_running, parent_run_id, tags, params, error=f"{type(e).__name__}: {e}")
            raise
        run_id = record(served, server, result, keep_running, parent_run_id, tags, params)
        out = sm.summary(served, server, result, run_id)
        create_markdown_artifact(key="serve", markdown=sm.markdown(out), description=f"serving {served.uri}")
        if keep_running:
            print(f"serving {served.uri} on {server.url} (pid {server.pid}) until this flow run is cancelled, "
                  f"Ctrl-C, or `kill -INT {server.pid}`")
            out["exit_status"] = server.wait()
    finally:
        server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=serve_flow.__doc__)
    ap.add_argument("model", nargs="?", default=CHAMPION, help=f"HF dir, runs:/..., models:/NAME/VERSION or "
                                                               f"models:/NAME@ALIAS (default {CHAMPION})")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = any free port")
    ap.add_argument("--no-smoke", action="store_true", help="start and record, send no request")
    ap.add_argument("--keep-running", action="store_true", help="keep serving after the smoke (stop: Ctrl-C)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds until /health must answer")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="any ServeConfig field")
    a = ap.parse_args(argv)
    try:
        settings = sm.parse_settings(a.set)
    except ConfigError as e:
        return config_error_exit(e, "flows.serve")
    from dsv3 import tracking

    try:  # before Prefect starts: nothing to serve is a message, not a failed run
        sm.resolve(a.model)
    except tracking.ModelNotFound as e:
        print(f"flows.serve: {e}", file=sys.stderr)
        return 2
    try:
        res = serve_flow(a.model, a.host, a.port, not a.no_smoke, a.keep_running, a.threads, settings or None,
                         a.max_tokens, startup_timeout_s=a.startup_timeout)
    except KeyboardInterrupt:
        return 130
    print(sm.markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
