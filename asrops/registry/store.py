"""Object stores the registry writes through: a local directory or an S3 bucket. Both give
compare-and-swap on single keys so concurrent writers (CLI, retrain job, controller) never
silently overwrite each other."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Protocol

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from asrops.errors import ConflictError, StoreUnavailableError

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


class ObjectStore(Protocol):
    """Keys are posix paths. Tokens are opaque: pass back what a read returned."""

    def read_bytes(self, key: str) -> tuple[bytes, str]:
        """Content and CAS token; KeyError when absent."""

    def write_bytes(self, key: str, data: bytes) -> str:
        """Unconditional write; returns the new token."""

    def write_if(self, key: str, data: bytes, expected_token: str | None) -> str:
        """Write only if the key still has `expected_token` (None: must not exist), else
        raise ConflictError."""

    def upload_file(self, key: str, local_path: Path) -> None: ...

    def download_file(self, key: str, local_path: Path) -> None:
        """KeyError when absent."""

    def list_prefix(self, prefix: str) -> list[str]: ...

    def exists(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def put_tree(
        self,
        prefix: str,
        files: Mapping[str, Path],
        commit_key: str,
        commit_data: bytes,
        progress: Progress | None = None,
    ) -> None:
        """Store `files` (keys relative to `prefix`) then `commit_key` last and only if it is
        absent (ConflictError otherwise). Readers treat `commit_key` as "the tree is complete"."""

    def local_path(self, key: str) -> Path | None:
        """Where the key lives on this machine's disk, if it does (lets readers skip a copy)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _conflict(key: str, expected: str | None) -> ConflictError:
    wanted = "to be absent" if expected is None else "unchanged since it was read"
    return ConflictError(
        f"{key}: expected {wanted}, but another writer got there first; re-read and retry")


def report_progress(progress: Progress | None, message: str) -> None:
    """Hand a line to the caller's callback (the CLI prints it), or log it when there is none:
    not both, or a command shows every line twice."""
    if progress is not None:
        progress(message)
    else:
        logger.info(message)


_RESERVED = (".staging", ".locks", ".tmp")


class LocalStore:
    """Plain files under `root`. Writes go to a temp file then `os.replace` (atomic); CAS holds
    an exclusive flock on a per-key lock file, so it is safe across threads and processes. The
    token is the sha256 of the content."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        for name in _RESERVED:
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if not parts or key.startswith("/") or ".." in parts or parts[0] in _RESERVED:
            raise ValueError(f"invalid store key {key!r}")
        return self.root.joinpath(*parts)

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        lock = self.root / ".locks" / f"{_sha256(key.encode())[:32]}.lock"
        with open(lock, "a+b") as fh:  # each call opens its own description: threads exclude too
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield  # closing releases the lock

    def _replace(self, path: Path, *, data: bytes | None = None, src: Path | None = None) -> None:
        tmp = self.root / ".tmp" / uuid.uuid4().hex
        try:
            if src is not None:
                shutil.copyfile(src, tmp)
            else:
                with open(tmp, "wb") as fh:
                    fh.write(data or b"")
                    fh.flush()
                    os.fsync(fh.fileno())
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def read_bytes(self, key: str) -> tuple[bytes, str]:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise KeyError(key) from None
        return data, _sha256(data)

    def write_bytes(self, key: str, data: bytes) -> str:
        with self._locked(key):
            self._replace(self._path(key), data=data)
        return _sha256(data)

    def write_if(self, key: str, data: bytes, expected_token: str | None) -> str:
        path = self._path(key)
        with self._locked(key):
            current = _sha256(path.read_bytes()) if path.is_file() else None
            if current != expected_token:
                raise _conflict(key, expected_token)
            self._replace(path, data=data)
        return _sha256(data)

    def upload_file(self, key: str, local_path: Path) -> None:
        self._replace(self._path(key), src=Path(local_path))

    def download_file(self, key: str, local_path: Path) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(self._path(key), local_path)
        except FileNotFoundError:
            raise KeyError(key) from None

    def list_prefix(self, prefix: str) -> list[str]:
        start = self.root.joinpath(*PurePosixPath(prefix.rpartition("/")[0]).parts)
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d not in _RESERVED]
            rel = Path(dirpath).relative_to(self.root)
            keys += [(rel / name).as_posix() for name in filenames]
        return sorted(k for k in keys if k.startswith(prefix))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list_prefix(prefix):
            self._path(key).unlink(missing_ok=True)
        if prefix.strip("/") and (folder := self._path(prefix.rstrip("/"))).is_dir():
            shutil.rmtree(folder, ignore_errors=True)

    def put_tree(self, prefix, files, commit_key, commit_data, progress=None) -> None:
        """Stage everything in `.staging/<uuid>/`, then rename the directory into place: the
        tree appears whole or not at all, and rename refuses an existing target."""
        target = self._path(prefix)
        stage = self.root / ".staging" / uuid.uuid4().hex
        try:
            for rel, src in files.items():
                dst = stage / self._path(f"{prefix}/{rel}").relative_to(target)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                report_progress(progress, f"stored {prefix}/{rel} ({dst.stat().st_size / 1e6:.1f} MB)")
            (stage / commit_key).write_bytes(commit_data)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(stage, target)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise _conflict(f"{prefix}/{commit_key}", None) from None
                raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


TRANSIENT_S3_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                                "Throttling", "ThrottlingException", "RequestLimitExceeded"})


def _unavailable_on_failure(method):
    """S3's own failures (unreachable, 5xx, throttling, after boto3's retries) as our
    StoreUnavailableError; what a caller acts on (absent key, lost CAS) is raised as before."""
    import functools

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (BotoCoreError, S3UploadFailedError) as exc:
            raise StoreUnavailableError(f"S3 ({self.bucket}) unavailable: {exc}") from exc
        except ClientError as exc:
            status = (getattr(exc, "response", {}) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status >= 500 or self._code(exc) in TRANSIENT_S3_CODES:
                raise StoreUnavailableError(f"S3 ({self.bucket}) failed: {exc}") from exc
            raise
    return call


class S3Store:
    """An S3 bucket (or any S3-compatible server). CAS uses S3 conditional writes
    (`If-None-Match: *` to create, `If-Match: <etag>` to replace); the token is the ETag."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str = "us-east-1"):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        config = Config(
            region_name=region,
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=10,
            read_timeout=120,
            # S3-compatible servers (MinIO, moto) rarely resolve virtual-host bucket names.
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @staticmethod
    def _code(exc: Exception) -> str:
        response = getattr(exc, "response", {}) or {}
        return str(response.get("Error", {}).get("Code", ""))

    @_unavailable_on_failure
    def read_bytes(self, key: str) -> tuple[bytes, str]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                raise KeyError(key) from None
            raise
        return resp["Body"].read(), resp["ETag"]

    @_unavailable_on_failure
    def write_bytes(self, key: str, data: bytes) -> str:
        return self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)["ETag"]

    @_unavailable_on_failure
    def write_if(self, key: str, data: bytes, expected_token: str | None) -> str:
        cond = {"IfNoneMatch": "*"} if expected_token is None else {"IfMatch": expected_token}
        try:
            resp = self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, **cond)
        except ClientError as exc:
            # 412: precondition failed; 409: a concurrent conditional write; 404: If-Match on a deleted key.
            if self._code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey",
                                   "412", "409", "404"):
                raise _conflict(key, expected_token) from None
            raise
        return resp["ETag"]

    @_unavailable_on_failure
    def upload_file(self, key: str, local_path: Path) -> None:
        self.client.upload_file(str(local_path), self.bucket, self._key(key))

    @_unavailable_on_failure
    def download_file(self, key: str, local_path: Path) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(local_path))
        except ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                raise KeyError(key) from None
            raise

    @_unavailable_on_failure
    def list_prefix(self, prefix: str) -> list[str]:
        skip = len(self.prefix) + 1 if self.prefix else 0
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix))
        return sorted(obj["Key"][skip:] for page in pages for obj in page.get("Contents", []))

    @_unavailable_on_failure
    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if self._code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    @_unavailable_on_failure
    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(k) for k in self.list_prefix(prefix)]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    @_unavailable_on_failure
    def put_tree(self, prefix, files, commit_key, commit_data, progress=None) -> None:
        """Claim the prefix (`.claim`, If-None-Match) so a rival publisher cannot overwrite our
        files, upload them, then the commit key. A crashed attempt leaves an invisible tree
        whose claim blocks reuse of the prefix: publish under a fresh id."""
        self.write_if(f"{prefix}/.claim", uuid.uuid4().hex.encode(), None)
        for rel, src in files.items():
            self.upload_file(f"{prefix}/{rel}", src)
            report_progress(progress, f"uploaded {prefix}/{rel} ({Path(src).stat().st_size / 1e6:.1f} MB)")
        self.write_if(f"{prefix}/{commit_key}", commit_data, None)

    def local_path(self, key: str) -> Path | None:
        return None


def open_store(uri: str, endpoint_url: str | None = None, region: str = "us-east-1") -> ObjectStore:
    """`s3://bucket/prefix` gives an S3Store (at `endpoint_url`, AWS's own when None); anything
    else is a local directory. The registry and the production log both store through this."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"store uri {uri!r} names no bucket")
        return S3Store(bucket, prefix, endpoint_url=endpoint_url, region=region)
    return LocalStore(Path(uri.removeprefix("file://")))
