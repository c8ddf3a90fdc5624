"""Prefect artifacts the flows publish (progress bars, links to MLflow runs), the flow-run id, and
whether the Prefect API went away (`prefect_api_lost`: a flow's failure that names the API).

Glue only: the numbers come from dsv3 (training's progress lines, GRPO's step callback), the
links from dsv3.tracking (`experiment_url` opens the MLflow 3 UI's model-training view; the UI
address is the tracking server, else $DSV3_MLFLOW_UI, else `make mlflow-ui`'s). An artifact that
cannot be written is logged and skipped: a display must never fail a training run.
"""

from __future__ import annotations

import os
import urllib.request

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in flow logs
from prefect import get_run_logger
from prefect.artifacts import create_link_artifact, create_progress_artifact, update_progress_artifact


def flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return flow_run.id
    except Exception:  # noqa: BLE001 - called outside a flow run
        return None


def progress(key: str, description: str):
    """A progress artifact at 0% and a callback `(step, total)` that moves it (on whole-percent changes)."""
    try:
        aid = create_progress_artifact(progress=0.0, key=key, description=description)
    except Exception as e:  # noqa: BLE001 - a display must never fail a run
        get_run_logger().warning(f"progress artifact {key!r} not created: {e}")
        return lambda step, total: None
    last = [-1]

    def update(step: int, total: int) -> None:
        pct = int(100 * step / max(1, total))
        if pct != last[0]:
            last[0] = pct
            try:
                update_progress_artifact(artifact_id=aid, progress=float(pct))
            except Exception:  # noqa: BLE001 - the API may be away for a while: the next update retries
                last[0] = -1

    return update


def mlflow_link(key: str, run_id: str | None, description: str) -> str | None:
    """A link artifact to an MLflow run in the model-training view; returns the URL."""
    if not run_id:
        return None
    from dsv3 import tracking

    try:
        eid = tracking.run_info(run_id).info.experiment_id
        url = tracking.experiment_url(tracking.ui_url(), eid, f"runs/{run_id}")
        create_link_artifact(link=url, link_text=f"MLflow run {run_id[:8]}", key=key, description=description)
        return url
    except Exception as e:  # noqa: BLE001
        get_run_logger().warning("no MLflow link artifact for run %s: %s", run_id, e)
        return None


def prefect_api_lost(exc: BaseException) -> str | None:
    """The configured Prefect API URL when `exc` (or an exception it was raised from) is a transport error
    (connection refused, reset, timed out: what Prefect's client raises once its retries are spent) and the
    API does not answer its health check now; else None (also in ephemeral mode: no URL configured)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and not isinstance(exc, httpx.TransportError):
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    url = PREFECT_API_URL.value()
    if exc is None or id(exc) in seen or not url:
        return None
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=3) as r:
            return None if r.status == 200 else url
    except (OSError, ValueError):
        return url
