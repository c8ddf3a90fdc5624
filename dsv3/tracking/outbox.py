"""The outbox: tracking records for an MLflow server that may go away, delivered in order by one daemon
thread with retries, bounded in memory, spilled to disk when they cannot be delivered (the policy is
described in dsv3/tracking/runs.py's docstring; tests/faults/test_tracking_outage.py)."""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import threading
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

log = logging.getLogger("dsv3.tracking")
THREAD = "dsv3-mlflow-outbox"


class _QuietRetries(logging.Filter):
    """urllib3 logs every retry of the outbox's thread; the outbox says it once per outage instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != THREAD


logging.getLogger("urllib3.connectionpool").addFilter(_QuietRetries())


RETRYABLE_STATUS = (429, 502, 503, 504)


def transient(e: BaseException) -> bool:
    """Whether `e` means "the server is not there right now" (worth retrying) rather than a bad request."""
    import requests

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                             ConnectionError, TimeoutError)):
            return True
        if isinstance(seen, mlflow.exceptions.MlflowException):
            msg = str(seen.message)
            if msg.startswith("API request to") and ("failed with exception" in msg or "failed with timeout" in msg):
                return True
            if seen.get_http_status_code() in RETRYABLE_STATUS:
                return True
        seen = seen.__cause__ or seen.__context__
    return False


def reason(e: BaseException) -> str:
    text = str(getattr(e, "message", e))
    for hint in ("Connection refused", "Connection reset", "Name or service not known", "timed out",
                 "Read timed out", "Max retries exceeded"):
        if hint in text:
            return hint
    return text.splitlines()[0][:200] if text else type(e).__name__


def _limit() -> int:
    return int(os.environ.get("DSV3_TRACKING_BUFFER", "100000"))


def spill_dir() -> Path:
    return Path(os.environ.get("DSV3_CACHE_DIR") or Path.home() / ".cache" / "dsv3") / "mlflow-outbox"


def spill(ops: list[dict], why: str) -> Path | None:
    """Append undeliverable records to a JSONL file (what `replay_spilled` sends later)."""
    if not ops:
        return None
    path = spill_dir() / f"{ops[0]['run_id']}-{os.getpid()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(op) + "\n" for op in ops)
    log.warning("MLflow server %s: %d tracking records not delivered (%s) were written to %s; the next run "
                "against that server sends them (dsv3.tracking.runs.replay_spilled)", ops[0]["uri"], len(ops), why, path)
    return path


_CLIENTS: dict[str, MlflowClient] = {}


def _send(op: dict) -> None:
    from mlflow.entities import Metric, Param, RunTag

    client = _CLIENTS.get(op["uri"]) or _CLIENTS.setdefault(op["uri"], MlflowClient(op["uri"]))
    rid, kind, data = op["run_id"], op["kind"], op["data"]
    if kind == "metrics":
        metrics = [Metric(k, v, op["ts"], op["step"] or 0) for k, v in data.items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[i:i + 1000], synchronous=True)
    elif kind == "params":
        try:
            client.log_batch(rid, params=[Param(k, v) for k, v in data.items()], synchronous=True)
        except mlflow.exceptions.MlflowException as e:
            if transient(e):
                raise
            for k, v in data.items():  # a resumed run with a changed value: keep the first (as log_params)
                try:
                    client.log_param(rid, k, v)
                except mlflow.exceptions.MlflowException as e2:
                    if transient(e2):
                        raise
    elif kind == "tags":
        tags = [RunTag(k, v) for k, v in data.items()]
        for i in range(0, len(tags), 100):
            client.log_batch(rid, tags=tags[i:i + 100], synchronous=True)
    elif kind == "terminate":
        client.set_terminated(rid, data["status"], end_time=op["ts"])
    elif kind == "artifact":
        p = Path(data["path"])
        if p.is_dir():
            client.log_artifacts(rid, str(p), data["artifact_path"])
        elif p.is_file():
            client.log_artifact(rid, str(p), data["artifact_path"])
        else:
            log.warning("queued artifact %s no longer exists; not logged", p)


class _Outbox:
    """Ordered, bounded tracking records for a server, delivered by one daemon thread (module docstring)."""

    def __init__(self) -> None:
        self.q: collections.deque[dict] = collections.deque()
        self.cv = threading.Condition()
        self.wake = threading.Event()
        self.busy = False  # the head record is being sent
        self.thread: threading.Thread | None = None
        self.pid = 0
        self.down_since: float | None = None
        self.late = 0  # records queued during the current outage

    def put(self, op: dict) -> None:
        with self.cv:
            if len(self.q) >= _limit():  # spill the oldest half (not the record being sent)
                head = [self.q.popleft()] if self.busy else []
                old = [self.q.popleft() for _ in range(max(1, len(self.q) // 2))]
                self.q.extendleft(head)
                spill(old, f"more than {_limit()} records buffered")
            self.q.append(op)
            if self.down_since is not None:
                self.late += 1
            if self.thread is None or self.pid != os.getpid() or not self.thread.is_alive():
                self.pid = os.getpid()
                self.thread = threading.Thread(target=self._run, name=THREAD, daemon=True)
                self.thread.start()
            self.cv.notify_all()

    def _run(self) -> None:
        delay = 0.5
        while True:
            with self.cv:
                while not self.q:
                    self.cv.wait()
                op, self.busy = self.q[0], True
            sent = self._try(op)
            with self.cv:
                self.busy = False
                if sent and self.q and self.q[0] is op:
                    self.q.popleft()
                self.cv.notify_all()
            if sent:
                delay = 0.5
            else:
                self.wake.wait(delay)
                self.wake.clear()
                delay = min(2 * delay, 10.0)

    def _try(self, op: dict) -> bool:
        """Send one record; False (keep it) when the server is away; a bad record is dropped with a warning."""
        try:
            _send(op)
        except Exception as e:
            if not transient(e):
                log.warning("MLflow rejected %s for run %s: %s; dropped", op["kind"], op["run_id"], reason(e))
                return True
            if self.down_since is None:
                self.down_since, self.late = time.monotonic(), len(self.q)
                log.warning("MLflow server %s unreachable (%s): buffering tracking records and retrying; training "
                            "goes on", op["uri"], reason(e))
            return False
        if self.down_since is not None:
            log.warning("MLflow server %s is back after %.0f s: delivering %d buffered tracking records", op["uri"],
                        time.monotonic() - self.down_since, self.late)
            self.down_since = None
        return True

    def flush(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until every record is delivered; retries at once while waiting."""
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while self.q or self.busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.wake.set()
                self.cv.wait(min(left, 0.5))
        return True

    def take_all(self, wait_s: float = 10.0) -> list[dict]:
        """Everything still queued (emptying the queue), after the send in flight ends (at most `wait_s`;
        past that it is taken too and may arrive twice, which is better than not at all)."""
        deadline = time.monotonic() + wait_s
        with self.cv:
            while self.busy and time.monotonic() < deadline:
                self.cv.wait(0.2)
            ops, self.q = list(self.q), collections.deque()
        return ops


OUTBOX = _Outbox()


def replay_spilled(uri: str) -> int:
    """Queue the records spilled for tracking server `uri` by earlier processes; returns how many."""
    u, n = uri, 0
    d = spill_dir()
    for path in sorted(d.glob("*.jsonl")) if d.is_dir() else []:
        ops = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not ops or any(op.get("uri") != u for op in ops):
            continue
        claimed = path.with_name(f"{path.name}.{os.getpid()}.sending")
        try:
            os.replace(path, claimed)  # claim it (another process may be replaying too)
        except FileNotFoundError:
            continue
        ops = [json.loads(line) for line in claimed.read_text().splitlines() if line.strip()]
        claimed.unlink()
        for op in ops:
            OUTBOX.put(op)
        n += len(ops)
    if n:
        log.warning("MLflow server %s: sending %d tracking records spilled by an earlier run", u, n)
    return n


@atexit.register
def _spill_at_exit() -> None:
    if OUTBOX.q and not OUTBOX.flush(float(os.environ.get("DSV3_TRACKING_EXIT_FLUSH_S", "10"))):
        spill(OUTBOX.take_all(), "the process exited while the server was unreachable")
