"""Shared storage for training without a shared filesystem: checkpoints, inputs and final models move
through an object store, never through a path another machine is assumed to read (infra/ray.md).

Design choices
- One setting: `train.storage_uri` (else `$DSV3_CHECKPOINT_URI`, which `make stack-up` exports; else
  none). `s3://bucket[/prefix]` goes through boto3 (`AWS_ENDPOINT_URL` / `AWS_*` as boto3 reads them);
  `file:///dir` is the same object layout on a mounted filesystem (NFS, or a test's temp dir). No
  storage URI = the laptop default: local paths on one machine, exactly as without this module.
- A run lives at `<storage_uri>/<run key>`, the run key being `train.out_dir` as written (relative
  posix path; an absolute one loses its leading `/`). Under it: `checkpoints/step_XXXXXXXX/` (the
  atomic checkpoint of checkpoint.py, uploaded file by file with its manifest.json LAST: a prefix
  without a manifest is an incomplete upload and is never read), `metrics.jsonl` (uploaded with each
  checkpoint, so a resumed run keeps its history), `final/` (the HF export) and `launch.json` (which
  launch the run belongs to; the Ray launcher's restart detection).
- Every download is verified before it is used: a checkpoint against its manifest's sha256s
  (checkpoint.verify), shards against their own xxh3 checksums (dsv3-shards/2, data/shards.py), any
  other directory against the `.dsv3-manifest.json` (sha256 per file) written last by `push_dir`.
  Downloads go to a temp dir and are renamed into place, so a killed download leaves nothing half
  read; a corrupt newest checkpoint falls back to the previous one, as checkpoint.latest does.
- Inputs are content-addressed: local shards are uploaded once to `<storage_uri>/shards/<data digest>/`
  (the DVC digest of data/version.py), other directories (tokenizer, `init_from` weights) to
  `<storage_uri>/inputs/<sha256 of their manifest>/`. Readers cache them per node under
  `$DSV3_CACHE_DIR/storage/` (shards keyed by the hash of their index.json, which holds the files'
  checksums; other directories by the hash of their manifest), so a node downloads each input once.
- `checkpoints(cfg, out_dir, rank, world)` is the loop's view: `LocalCheckpoints` (today's files in
  `<out_dir>/checkpoints`, one filesystem) or `RemoteCheckpoints` (rank 0 saves locally then uploads;
  on resume rank 0 picks the newest checkpoint that downloads and verifies, and every other rank
  downloads that one into its own directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path, PurePosixPath

from dsv3.errors import CheckpointError, ConfigError
from dsv3.train import checkpoint as ckpt

ENV = "DSV3_CHECKPOINT_URI"
SCHEMES = ("s3://", "file://")
DIR_MANIFEST = ".dsv3-manifest.json"


class StorageError(OSError):
    """An object that is missing, incomplete or fails its checksum; the message names its URI."""


# ---------------------------------------------------------------------------------- where
def is_remote(path) -> bool:
    return isinstance(path, str) and path.startswith(SCHEMES)


def base_uri(cfg) -> str | None:
    """The storage URI in force: `train.storage_uri`, else $DSV3_CHECKPOINT_URI, else None (laptop)."""
    uri = cfg.train.storage_uri or os.environ.get(ENV) or None
    if uri is not None and not is_remote(uri):
        where = "train.storage_uri" if cfg.train.storage_uri else f"${ENV}"
        raise ConfigError(f"{where}: {uri!r} is not a storage URI (use s3://bucket[/prefix] or file:///dir)")
    return uri.rstrip("/") if uri else None


def run_key(out_dir: str) -> str:
    """`train.out_dir` as the run's name under the storage URI (and its path on every node)."""
    parts = [p for p in PurePosixPath(str(out_dir).replace(os.sep, "/")).parts if p not in ("/", ".")]
    if not parts or ".." in parts:
        raise ConfigError(f"train.out_dir: {out_dir!r} cannot name a run in shared storage "
                          "(a relative path without '..', e.g. runs/pretrain)")
    return "/".join(parts)


def cache_root() -> Path:
    return Path(os.environ.get("DSV3_CACHE_DIR") or Path.home() / ".cache" / "dsv3") / "storage"


# ---------------------------------------------------------------------------------- objects
class Store:
    """A prefix in an object store: put / get / list / delete objects by their key under it."""

    def __init__(self, uri: str):
        if not is_remote(uri):
            raise ConfigError(f"storage URI {uri!r}: use s3://bucket[/prefix] or file:///dir")
        self.uri = uri.rstrip("/")
        if self.uri.startswith("file://"):
            self.root, self.bucket, self.prefix = Path(self.uri[len("file://"):]), None, ""
        else:
            bucket, _, prefix = self.uri[len("s3://"):].partition("/")
            if not bucket:
                raise ConfigError(f"storage URI {uri!r}: no bucket")
            self.root, self.bucket, self.prefix = None, bucket, prefix.strip("/")

    def child(self, rel: str) -> "Store":
        return Store(f"{self.uri}/{rel.strip('/')}")

    def _key(self, rel: str) -> str:
        return "/".join(x for x in (self.prefix, rel.strip("/")) if x)

    def _tmp(self, rel: str) -> Path:  # file://: write beside, then rename (an object appears whole or not at all)
        dst = self.root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        return dst.parent / f".upload-{uuid.uuid4().hex}"

    @property
    def _s3(self):
        return _s3_client()

    def put_file(self, rel: str, path: Path) -> None:
        if self.root is not None:
            tmp = self._tmp(rel)
            shutil.copyfile(path, tmp)
            os.replace(tmp, self.root / rel)
        else:
            self._s3.upload_file(str(path), self.bucket, self._key(rel))

    def put_bytes(self, rel: str, data: bytes) -> None:
        if self.root is not None:
            tmp = self._tmp(rel)
            tmp.write_bytes(data)
            os.replace(tmp, self.root / rel)
        else:
            self._s3.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def get_file(self, rel: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self.root is not None:
                shutil.copyfile(self.root / rel, path)
            else:
                self._s3.download_file(self.bucket, self._key(rel), str(path))
        except (FileNotFoundError, _client_error()) as e:
            raise StorageError(f"{self.uri}/{rel}: cannot download ({e})") from None

    def get_bytes(self, rel: str) -> bytes | None:
        """The object, or None when there is none."""
        if self.root is not None:
            p = self.root / rel
            return p.read_bytes() if p.is_file() else None
        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        except _client_error() as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def list(self, rel: str = "") -> list[str]:
        """Keys (relative to this prefix) of every object under `rel`."""
        if self.root is not None:
            base = self.root / rel
            found = (p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".upload-"))
            return sorted(p.relative_to(self.root).as_posix() for p in found) if base.is_dir() else []
        key = self._key(rel)
        pre = key + "/" if key else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=pre):
            out += [o["Key"][strip:] for o in page.get("Contents", [])]
        return sorted(out)

    def delete(self, rels: list[str]) -> None:
        if self.root is not None:
            for r in rels:
                (self.root / r).unlink(missing_ok=True)
                for d in (self.root / r).parents:  # no empty "prefixes" left, as in S3
                    if d == self.root or not d.is_dir() or any(d.iterdir()):
                        break
                    d.rmdir()
            return
        keys = [{"Key": self._key(r)} for r in rels]
        for i in range(0, len(keys), 1000):
            self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i:i + 1000]})


_CLIENT = None


def _s3_client():
    global _CLIENT
    if _CLIENT is None:
        import boto3

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        _CLIENT = boto3.client("s3", endpoint_url=endpoint)
    return _CLIENT


def _client_error():
    try:
        from botocore.exceptions import ClientError

        return ClientError
    except ImportError:  # file:// only
        return OSError


def ray_storage(base: str):
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig: its run state goes to the same store."""
    if base.startswith("file://"):
        return base[len("file://"):] + "/ray", None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kw = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw = {"endpoint_override": host, "scheme": scheme}
    fs = pyarrow.fs.S3FileSystem(access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                                 secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), **kw)
    return base[len("s3://"):] + "/ray", fs


# ---------------------------------------------------------------------------------- directories
def sha256_files(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): ckpt.sha256(p) for p in sorted(d.rglob("*")) if p.is_file()}


def push_dir(local: str | Path, uri: str) -> str:
    """Upload a directory; its manifest (sha256 of every file) goes last and marks it complete. A
    checkpoint's own manifest.json serves (uploaded last); any other directory gets `.dsv3-manifest.json`."""
    src, store = Path(local), Store(uri)
    own = src / "manifest.json"
    name = "manifest.json" if own.is_file() and "files" in json.loads(own.read_text()) else DIR_MANIFEST
    store.delete([name])  # readers see an incomplete directory while it is replaced
    files = sha256_files(src)
    for rel in files:
        if rel != name:
            store.put_file(rel, src / rel)
    if name == DIR_MANIFEST:
        store.put_bytes(name, json.dumps({"files": files}, indent=1, sort_keys=True).encode())
    else:
        store.put_file(name, own)
    return store.uri


def complete(uri: str) -> bool:
    """Whether `push_dir` finished uploading the directory at `uri` (its manifest is there)."""
    store = Store(uri)
    return any(store.get_bytes(name) is not None for name in (DIR_MANIFEST, "manifest.json"))


def _manifest(store: Store) -> tuple[str, bytes]:
    for name in (DIR_MANIFEST, "manifest.json"):
        data = store.get_bytes(name)
        if data is not None:
            return name, data
    raise StorageError(f"{store.uri}: no manifest (not uploaded by dsv3, or the upload did not finish)")


def fetch_dir(uri: str, dst: str | Path | None = None) -> Path:
    """A verified local copy of a directory `push_dir` uploaded (default: the node's cache, keyed by the
    manifest's hash, so it is downloaded once). A checksum mismatch raises StorageError."""
    store = Store(uri)
    name, raw = _manifest(store)
    files = json.loads(raw)["files"]
    final = Path(dst) if dst else cache_root() / "dirs" / hashlib.sha256(raw).hexdigest()[:32]
    if final.is_dir() and _matches(final, files):
        return final
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        for rel, digest in files.items():
            store.get_file(rel, tmp / rel)
            if ckpt.sha256(tmp / rel) != digest:
                raise StorageError(f"{uri}/{rel}: checksum mismatch after download (the object is corrupt)")
        if name == "manifest.json":
            (tmp / name).write_bytes(raw)
        return _place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _matches(d: Path, files: dict) -> bool:
    return all((d / r).is_file() and ckpt.sha256(d / r) == h for r, h in files.items())


def _place(tmp: Path, final: Path) -> Path:
    """Rename a verified download into place; if another process placed it first, keep theirs."""
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    return final


def local_dir(path: str | Path | None) -> str | None:
    """A local directory for a path or a storage URI (fetched into the cache)."""
    if path is None or not is_remote(str(path)):
        return None if path is None else str(path)
    return str(fetch_dir(str(path)))


# ---------------------------------------------------------------------------------- shards
def push_shards(local: str | Path, base: str) -> str:
    """Upload a shard directory to `<base>/shards/<data digest>/` once (index.json last); its URI."""
    from dsv3.data.shards import read_index
    from dsv3.data.version import data_digest

    src = Path(local)
    _, idx = read_index(src)
    store = Store(f"{base}/shards/{data_digest(src).removesuffix('.dir')}")
    if store.get_bytes("index.json") is None:
        for e in idx["splits"].values():
            store.put_file(e["file"], src / e["file"])
        store.put_file("index.json", src / "index.json")
    return store.uri


def fetch_shards(uri: str) -> str:
    """A verified local copy of the shards at `uri`, cached per node under the hash of their index.json
    (which holds every file's xxh3 checksum); verified with the shards' own checks (dsv3-shards/2)."""
    from dsv3.data.shards import FORMAT, ShardError, verify_shards

    store = Store(uri)
    raw = store.get_bytes("index.json")
    if raw is None:
        raise StorageError(f"{uri}: no index.json (not a shard directory, or its upload did not finish)")
    idx = json.loads(raw)
    if idx.get("format") != FORMAT:
        raise StorageError(f"{uri}/index.json: format {idx.get('format')!r}; remote shards must be {FORMAT} "
                           "(checksummed), so a download can be verified; rebuild them (`dvc repro shards`)")
    final = cache_root() / "shards" / hashlib.sha256(raw).hexdigest()[:32]
    if (final / "index.json").is_file():
        return str(final)  # verified when placed; TokenShards checks sizes (and the once-marker) on open
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        for e in idx["splits"].values():
            if Path(e["file"]).name != e["file"]:
                raise StorageError(f"{uri}/index.json: split file {e['file']!r} is not a plain name")
            store.get_file(e["file"], tmp / e["file"])
        (tmp / "index.json").write_bytes(raw)
        try:
            verify_shards(tmp, verify="always")
        except ShardError as e:
            raise StorageError(f"{uri}: downloaded shards fail their checksums: {e}") from None
        return str(_place(tmp, final))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_shards(path: str) -> str:
    return fetch_shards(path) if is_remote(path) else path


# ---------------------------------------------------------------------------------- checkpoints
class LocalCheckpoints:
    """Today's behaviour: `<out_dir>/checkpoints` on a filesystem every rank reads."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.root = out_dir, out_dir / "checkpoints"

    def latest(self) -> Path | None:
        return ckpt.latest(self.root)

    def fetch(self, path) -> Path | None:
        return Path(path) if path else None

    def saved(self, path: Path | None, metrics: Path | None = None) -> None:
        pass

    def uri(self, path: Path | None) -> str | None:
        return str(path) if path else None

    def publish(self, final_dir: Path) -> str:
        return str(final_dir)

    def read_marker(self) -> dict | None:
        f = self.out_dir / ".launch"
        return json.loads(f.read_text()) if f.is_file() else None

    def write_marker(self, marker: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / ".launch").write_text(json.dumps(marker))


class RemoteCheckpoints(LocalCheckpoints):
    """Checkpoints under `<storage>/<run key>/checkpoints/`. Rank 0 saves into `<out_dir>/checkpoints` and
    uploads (`saved`); the other ranks download what they load into `<out_dir>/.rank<r>-checkpoints`."""

    def __init__(self, store: Store, out_dir: Path, rank: int, world: int, keep_last: int):
        super().__init__(out_dir)
        self.store, self.rank, self.world, self.keep_last = store, rank, world, keep_last
        self.mine = self.root if rank == 0 else out_dir / f".rank{rank}-checkpoints"

    def remote_steps(self) -> list[str]:
        """Names of the complete checkpoints in storage (their manifest.json is there), newest first."""
        keys = self.store.list("checkpoints")
        return sorted({k.split("/")[1] for k in keys if k.count("/") == 2 and k.endswith("/manifest.json")},
                      reverse=True)

    def _get(self, name: str) -> Path:
        """Checkpoint `name` in this rank's directory: a verified copy already there, else downloaded."""
        d = self.mine / name
        try:
            ckpt.verify(d)
            return d
        except CheckpointError:
            pass
        fetch_dir(f"{self.store.uri}/checkpoints/{name}", d)  # sha256 of every file, then renamed into place
        if self.rank != 0:  # keep only what this rank loads
            for old in self.mine.glob("step_*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        return d

    def latest(self) -> Path | None:
        """A collective: rank 0 picks the newest checkpoint that downloads and verifies (a corrupt one is
        skipped with a warning) and restores metrics.jsonl; every rank then holds that one locally."""
        from dsv3.parallel import collectives

        name = None
        if self.rank == 0:
            for cand in self.remote_steps():
                try:
                    self._get(cand)
                    name = cand
                    break
                except (StorageError, CheckpointError) as e:
                    msg = f"skipping checkpoint {self.store.uri}/checkpoints/{cand}: {e}; falling back to the previous one"
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
            if name is not None and self.store.get_bytes("metrics.jsonl") is not None:
                self.store.get_file("metrics.jsonl", self.out_dir / "metrics.jsonl")
        name = collectives.broadcast_object(name)
        return self._get(name) if name else None

    def fetch(self, path) -> Path | None:
        """The checkpoint rank 0 named (its local path), on this rank."""
        if not path:
            return None
        return Path(path) if self.rank == 0 else self._get(Path(path).name)

    def saved(self, path: Path | None, metrics: Path | None = None) -> None:
        """Rank 0, after checkpoint.save: upload it (manifest last), then metrics.jsonl, then drop the
        checkpoints beyond keep_last (their manifests first, so a half-deleted one reads as incomplete)."""
        if path is None:
            return
        push_dir(path, f"{self.store.uri}/checkpoints/{path.name}")
        if metrics is not None and metrics.is_file():
            self.store.put_file("metrics.jsonl", metrics)
        keys = self.store.list("checkpoints")
        complete = sorted(self.remote_steps())
        keep = set(complete[-self.keep_last:])
        drop = [k for k in keys if k.count("/") >= 2 and k.split("/")[1] not in keep and k.split("/")[1] < complete[-1]]
        self.store.delete([k for k in drop if k.endswith("/manifest.json")])
        self.store.delete([k for k in drop if not k.endswith("/manifest.json")])

    def uri(self, path: Path | None) -> str | None:
        return f"{self.store.uri}/checkpoints/{Path(path).name}" if path else None

    def publish(self, final_dir: Path) -> str:
        return push_dir(final_dir, f"{self.store.uri}/final")

    def read_marker(self) -> dict | None:
        raw = self.store.get_bytes("launch.json")
        return json.loads(raw) if raw else None

    def write_marker(self, marker: dict) -> None:
        self.store.put_bytes("launch.json", json.dumps(marker).encode())


def checkpoints(cfg, out_dir: Path, rank: int = 0, world: int = 1) -> LocalCheckpoints:
    """Where this run's checkpoints live: local (no storage URI) or in the storage URI's run prefix."""
    base = base_uri(cfg)
    if base is None:
        return LocalCheckpoints(out_dir)
    return RemoteCheckpoints(Store(f"{base}/{run_key(cfg.train.out_dir)}"), out_dir, rank, world,
                             cfg.train.keep_last)
