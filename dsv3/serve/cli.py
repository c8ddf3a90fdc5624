"""`dsv3 serve [MODEL_URI] [...]`: start the OpenAI-compatible server (server.py).

MODEL_URI is a HF-format directory, `runs:/<id>/<path>`, `models:/<name>/<version|latest>` or
`models:/<name>@<alias>` (default `models:/dsv3-chat@champion`). Every ServeConfig field can be
set with `--set field=value`; the common ones have their own flag.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible inference server (continuous batching, MTP "
                                             "speculation, prefill/decode disaggregation)")
    p.add_argument("model", nargs="?", default="models:/dsv3-chat@champion",
                   help="HF dir, runs:/..., models:/name/version or models:/name@alias "
                        "(default: models:/dsv3-chat@champion)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None, help="0 = any free port")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the engine")
    p.add_argument("--max-batch", type=int, default=None, help="running sequences per step")
    p.add_argument("--max-queue", type=int, default=None, help="waiting requests before 429")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--speculative", type=int, default=None, metavar="K", help="MTP draft tokens per step")
    p.add_argument("--pd", choices=["colocated", "disaggregated"], default=None)
    p.add_argument("--pd-worker", choices=["process", "ray", "thread"], default=None)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the decode step")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="any ServeConfig field")
    p.add_argument("--track", action="store_true", help="log the serving run (model version, speculation "
                                                        "acceptance) to MLflow")
    p.set_defaults(func=_serve)


def config_from_args(a: argparse.Namespace):
    import yaml
    from pydantic import ValidationError

    from dsv3.model.config import ConfigError
    from dsv3.serve.config import ServeConfig

    d: dict = {"model": a.model}
    for k in ("host", "port", "served_model_name", "dtype", "threads", "max_batch", "max_queue", "max_model_len",
              "speculative", "pd", "pd_worker", "compile"):
        v = getattr(a, k)
        if v is not None:
            d[k] = v
    for s in a.set:
        key, sep, val = s.partition("=")
        if not sep:
            raise ConfigError(f"--set {s!r}: expected FIELD=VALUE")
        d[key.strip()] = yaml.safe_load(val)
    try:
        return ServeConfig(**d)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"serve.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def _run(srv) -> None:
    """Serve until SIGINT / SIGTERM. uvicorn shuts down gracefully, then re-raises the signal it caught:
    a Ctrl-C (SIGINT) is that stop, not an error (exit status 0, no traceback, a tracked run FINISHED)."""
    try:
        srv.run()
    except KeyboardInterrupt:
        print("dsv3 serve: stopped (SIGINT)", flush=True)


def _serve(a: argparse.Namespace) -> int:
    import logging

    from dsv3.serve.server import Server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = config_from_args(a)
    srv = Server(cfg)
    if not a.track:
        _run(srv)
        return 0
    from dsv3 import tracking

    tags = {k: srv.info.get(k) for k in ("uri", "version", "run_id")}
    with tracking.start_run(cfg.model_dump(mode="json"), stage="serve", tags={f"model_{k}": v for k, v in tags.items()}):
        try:
            _run(srv)
        finally:
            if srv.engine.spec is not None:
                srv.engine.spec.log_mlflow()
            m = srv.engine.metrics
            tracking.log_metrics({"serve/generation_tokens": m.generation_tokens._value.get(),
                                  "serve/prompt_tokens": m.prompt_tokens._value.get()})
    return 0
